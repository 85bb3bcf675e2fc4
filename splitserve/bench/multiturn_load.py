"""Replays multi-turn conversations against a running cluster through the async gRPC SDK.

Closed loop per conversation, open across them: a conversation sends its next turn once the previous answer has
come back and its think time has passed, with the answer's token ids appended to the context (greedy,
``ignore_eos``, so the answer is exactly ``max_tokens`` long), while every conversation runs at once. A failed
turn ends its conversation: the next prompt would need the answer that never came. Each turn names its
conversation as its ``session_id`` (a hint the ``cache_aware`` router may use; the others ignore it).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, replace

from splitserve.bench.multiturn import Conversation
from splitserve.client import AsyncClient, SplitserveError
from splitserve.client.types import Timing

OK = "ok"


@dataclass(frozen=True)
class TurnRecord:
    conversation: int
    turn: int
    sent_s: float  # from the run's start
    prompt_tokens: int
    reused_tokens: int  # the previous turn's prompt + answer, which this prompt starts with (0 on the first turn)
    max_tokens: int
    status: str
    output_tokens: int = 0
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    kv_transfer_ms: float | None = None
    prefill_worker: str | None = None
    decode_worker: str | None = None
    cached_prompt_tokens: int | None = None  # served from the prefill worker's prefix cache
    kv_transfer_bytes: int | None = None

    @property
    def new_tokens(self) -> int:
        """The turn's user message: the prompt past what the previous turn already had."""
        return self.prompt_tokens - self.reused_tokens


@dataclass(frozen=True)
class _Answer:
    token_ids: list[int]
    ttft_ms: float
    e2e_ms: float
    timing: Timing | None


async def _ask(
    client: AsyncClient, prompt: list[int], max_tokens: int, timeout_s: float | None, session_id: str
) -> _Answer:
    sent = time.monotonic()
    first: float | None = None
    ids: list[int] = []
    timing: Timing | None = None
    stream = client.generate(
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        ignore_eos=True,
        temperature=0.0,
        timeout=timeout_s,
        session_id=session_id,
    )
    async with aclosing(stream) as events:
        async for event in events:
            if event.token_ids and first is None:
                first = time.monotonic()
            ids += event.token_ids
            timing = event.timing or timing
    end = time.monotonic()
    return _Answer(ids, ((first or end) - sent) * 1000, (end - sent) * 1000, timing)


async def _converse(
    client: AsyncClient, conversation: Conversation, start: float, timeout_s: float | None
) -> tuple[list[TurnRecord], list[list[int]]]:
    """Every turn of ``conversation`` in order; its records and the prompts sent."""
    records: list[TurnRecord] = []
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    for k, turn in enumerate(conversation.turns):
        await asyncio.sleep(turn.think_s)
        prompt = conversation.prompt(k, answers)
        reused = len(prompts[-1]) + len(answers[-1]) if k else 0
        base = TurnRecord(conversation.index, k, time.monotonic() - start, len(prompt), reused, turn.max_tokens, OK)
        prompts.append(prompt)
        try:
            answer = await _ask(client, prompt, turn.max_tokens, timeout_s, f"conversation-{conversation.index}")
        except SplitserveError as err:
            records.append(replace(base, status=err.code.name.lower() if err.code is not None else "error"))
            break
        if not answer.token_ids:
            records.append(replace(base, status="no_tokens"))
            break
        t = answer.timing
        records.append(
            replace(
                base,
                output_tokens=len(answer.token_ids),
                ttft_ms=answer.ttft_ms,
                e2e_ms=answer.e2e_ms,
                kv_transfer_ms=None if t is None else t.kv_transfer_ms,
                cached_prompt_tokens=None if t is None else t.cached_prompt_tokens,
                kv_transfer_bytes=None if t is None else t.kv_transfer_bytes,
                prefill_worker=None if t is None else t.prefill_worker,
                decode_worker=None if t is None else t.decode_worker,
            )
        )
        answers.append(answer.token_ids)
    return records, prompts


@dataclass(frozen=True)
class Replay:
    records: list[TurnRecord]  # by conversation, then turn
    prompts: dict[tuple[int, int], list[int]]  # (conversation, turn) -> the prompt sent
    duration_s: float


async def replay(client: AsyncClient, conversations: list[Conversation], timeout_s: float | None = None) -> Replay:
    """Run every conversation at once; each turn waits for the previous answer plus its think time."""
    start = time.monotonic()
    done = await asyncio.gather(*(_converse(client, c, start, timeout_s) for c in conversations))
    records = [r for recs, _ in done for r in recs]
    prompts = {(c.index, k): p for c, (_, ps) in zip(conversations, done, strict=True) for k, p in enumerate(ps)}
    return Replay(records, prompts, time.monotonic() - start)


async def replay_at(
    address: str, conversations: list[Conversation], timeout_s: float | None, token: str | None = None
) -> Replay:
    """``replay`` through a client of its own to the cluster at ``address``."""
    async with AsyncClient(address, token=token) as client:
        return await replay(client, conversations, timeout_s)


async def max_context(address: str, token: str | None = None) -> int:
    """The longest prompt plus answer the cluster at ``address`` serves."""
    async with AsyncClient(address, token=token) as client:
        return (await client.health()).max_model_len
