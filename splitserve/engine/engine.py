"""The engine every worker runs: a model runner, a block manager and a continuous-batching scheduler.

Three ways to drive it, one per role:
- colocated / offline: ``add_request`` + ``step`` (chunked prefill mixed with decode in one batch, as Sarathi does);
- prefill worker: ``prefill`` runs whole prompts, yields the first token, and holds the pages until ``release``;
- decode worker: ``reserve`` allocates pages for a prompt's KV (reusing the prefix its cache holds), the transfer
  fills the rest, ``admit`` starts decoding.

Whatever role, a request's full blocks stay in the prefix cache once it ends (prompt and output alike, as far as
their KV was computed), so a conversation's next turn finds its previous turn's context here.

On CUDA, steps overlap: ``step`` launches the next step before it reads the previous one back (``overlap.py``),
so a step's outputs come from the call after the one that launched it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field, replace

import torch

from splitserve.engine import detokenizer, step_trace
from splitserve.engine.block_manager import BlockManager, OutOfBlocks
from splitserve.engine.host_copy import DeviceWait
from splitserve.engine.model import LayerHook
from splitserve.engine.overlap import PENDING_TOKEN, InFlight, awaits_token
from splitserve.engine.runner import BatchOutput, ModelRunner, RunnerConfig
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import FinishReason, SeqStatus, Sequence
from splitserve.engine.step_timing import StepTimes
from splitserve.engine.tensor_parallel import RankGroup

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot serve as given; the message names the field."""


@dataclass
class EngineConfig:
    runner: RunnerConfig
    max_batch_size: int = 128
    enable_prefix_caching: bool = True
    load_tokenizer: bool = True
    # Launch each step before reading the previous one back. None: where the device runs ahead of the host (CUDA);
    # on the CPU a forward pass is synchronous, so True only exercises the pipeline (tests).
    overlap_decode: bool | None = None


@dataclass
class TokenOutput:
    """One new token of one request, as streamed to the client."""

    request_id: str
    token_id: int
    text: str
    finished: bool = False
    finish_reason: str | None = None
    logprob: float | None = None
    # On a request's first token only: the prompt tokens its prefill found in the prefix cache (not computed).
    cached_prompt_tokens: int | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, config: EngineConfig, hf_config=None, rank_group: RankGroup | None = None):
        """``rank_group``: this engine is a tensor-parallel group's leader (``rank_loop``)."""
        self.config = config
        self.runner = ModelRunner(self.runner_config(config), hf_config, rank_group)
        self.spec = self.runner.spec
        self.max_model_len = self.runner.max_model_len
        self.max_batch_tokens = config.runner.max_batch_tokens
        self.blocks = BlockManager(self.runner.num_kv_blocks, self.runner.block_size, config.enable_prefix_caching)
        self.tokenizer = None
        if config.load_tokenizer and config.runner.model_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(config.runner.model_dir, local_files_only=True)
        self._decode_text = detokenizer.text_decoder(self.tokenizer) if self.tokenizer is not None else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}  # prefilled (prefill role) or reserved (decode role), not running
        self._detok: dict[str, detokenizer.DetokState] = {}
        self.on_release: Callable[[str], None] | None = None  # called with the request id when its pages are freed
        # Runs each step's wait for the device (given the blocking wait): a worker lets calls that touch nothing the
        # step uses (``reserve``, ``admit``, ``add_request``: they take effect at the next step) use the engine then.
        self.device_wait: DeviceWait | None = None
        self.step_times = StepTimes()
        overlap = config.overlap_decode
        self.overlap_decode = self.runner.device.type == "cuda" if overlap is None else overlap
        if rank_group is not None:  # followers take each step's input tokens from the host, so none stays in flight
            self.overlap_decode = False
        self._in_flight: InFlight | None = None  # the step launched and not read back yet

    @staticmethod
    def runner_config(config: EngineConfig) -> RunnerConfig:
        """Graphs are captured for every decode batch size up to the scheduler's limit, and no larger."""
        return replace(config.runner, max_decode_batch=config.max_batch_size)

    # --- requests ---

    def make_sequence(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_token_ids:
            raise RequestError("prompt: empty prompt (fix: send at least one token)")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt: {len(prompt_token_ids)} tokens, the model's context is {self.max_model_len} "
                "(fix: shorten the prompt)"
            )
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt_token_ids: ids must be in [0, {vocab})")
        if self.runner.num_kv_blocks < self.blocks.blocks_for(len(prompt_token_ids) + 1):
            raise RequestError("prompt: longer than this worker's whole KV cache (fix: shorten the prompt)")
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return seq

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        if request_id in self._detok:
            raise RequestError(f"request_id: {request_id!r} is already running")
        seq = self.make_sequence(request_id, prompt_token_ids, params)
        self._detok[request_id] = detokenizer.new_state(seq.prompt_token_ids, params.stop)
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its pages now. True if it was here."""
        found = self.held.pop(request_id, None)
        if found is None:
            queued = self._queued(request_id)
            if queued is not None:
                queue, found = queued
                queue.remove(found)
        self._detok.pop(request_id, None)
        if found is None:
            return False
        self._finish(found, FinishReason.ABORT)
        return True

    def in_batch(self, request_id: str) -> bool:
        """Whether the request is waiting or running: a step in flight may be writing its pages."""
        return self._queued(request_id) is not None

    def _queued(self, request_id: str) -> tuple[list[Sequence] | deque[Sequence], Sequence] | None:
        """The request's sequence where it is running or waiting, and that queue."""
        for queue in (self.running, self.waiting):
            seq = next((s for s in queue if s.request_id == request_id), None)
            if seq is not None:
                return queue, seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def num_active(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.held)

    def pending_prefill_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting) + sum(
            s.num_tokens - s.num_computed_tokens for s in self.running if s.num_tokens - s.num_computed_tokens > 1
        )

    # --- colocated / offline scheduling ---

    def _preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's pages; it is recomputed (prefix cache helps) when there is room."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        log.debug("preempted %s", seq.request_id)

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        budget = self.max_batch_tokens
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running or not self._decodes_next(seq):
                continue
            if len(decodes) >= self.config.max_batch_size or budget <= 0:
                break
            while not self.blocks.can_append(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                continue
            self.blocks.append_slot(seq.block_table, seq.num_tokens)
            decodes.append(seq)
            budget -= 1
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                chunks.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            try:
                seq.block_table, seq.num_cached_tokens = self.blocks.allocate_prompt(seq.all_token_ids)
            except OutOfBlocks:
                break
            self.waiting.popleft()
            seq.num_computed_tokens = seq.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chunks.append((seq, n))
            budget -= n
        return chunks, decodes

    def step(self, layer_hook: LayerHook | None = None) -> list[TokenOutput]:
        """One continuous-batching step: decode every running sequence, fill the rest of the budget with prefill.

        With ``overlap_decode``, the step is launched before the one in flight is read back, and the outputs returned
        are that earlier step's. A step with a layer hook, or one that must preempt, first reads back the one in
        flight (it needs every token on the host), then runs as is.
        """
        start, waited = time.perf_counter(), self.step_times.device_wait_s
        read_back = self._in_flight is not None
        if self.overlap_decode and layer_hook is None and not self._must_preempt():
            chunks, decodes, outputs = self._launch_ahead()
        else:
            outputs = self._drain()
            chunks, decodes = self._schedule()
            if chunks or decodes:
                out = self.runner.execute(chunks, decodes, layer_hook, self._timed_wait())
                self._commit_prompt_blocks(seq for seq, _ in chunks)
                outputs += self._apply(out)
        if chunks or decodes or read_back:
            self._count_step(start, waited, chunks, decodes, read_back)
        return outputs

    def _count_step(
        self, start: float, waited: float, chunks: list[tuple[Sequence, int]], decodes: list[Sequence], read_back: bool
    ) -> None:
        seconds = time.perf_counter() - start
        self.step_times.add_step(seconds, waited)
        if step_trace.directory() is not None:
            step_trace.record(start, seconds, self.step_times.device_wait_s - waited, chunks, decodes, read_back)

    def _timed_wait(self) -> DeviceWait:
        return self.step_times.timed_wait(self.device_wait)

    def _must_preempt(self) -> bool:
        """Whether the next step's decodes need more new pages than are free (``_schedule`` then preempts)."""
        decodes = [seq for seq in self.running if self._decodes_next(seq)][: self.config.max_batch_size]
        return (
            sum(not self.blocks.can_append(seq.block_table, seq.num_tokens) for seq in decodes) > self.blocks.num_free
        )

    def _decodes_next(self, seq: Sequence) -> bool:
        """A running sequence the next step decodes: its prompt is computed, and it has a token to compute that is
        not its last one already in flight (a sequence is never computed past its ``max_tokens`` or the context)."""
        if seq.num_tokens - seq.num_computed_tokens != 1:
            return False
        return not (awaits_token(seq) and self._ends_by_length(seq))

    def _ends_by_length(self, seq: Sequence) -> bool:
        return len(seq.output_token_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _launch_ahead(self) -> tuple[list[tuple[Sequence, int]], list[Sequence], list[TokenOutput]]:
        """Launch the next step (decodes, and prompt chunks if any) with the tokens of the step in flight taken on
        the device, then read that step back. The chunks and decodes launched, and the outputs read back."""
        previous, self._in_flight = self._in_flight, None
        chunks, decodes = self._schedule()
        launching = bool(chunks or decodes)
        if launching:
            feed = previous.feed_for(decodes) if previous is not None else None
            launched = self.runner.launch(chunks, decodes, feed=feed)
            self._commit_prompt_blocks(seq for seq, _ in chunks)
            for seq in launched.seqs:
                seq.output_token_ids.append(PENDING_TOKEN)
            self._in_flight = InFlight(launched, [len(seq.output_token_ids) - 1 for seq in launched.seqs])
        return chunks, decodes, self._read_in_flight(previous) if previous is not None else []

    def _drain(self) -> list[TokenOutput]:
        """Read back the step in flight, if any: the ordinary scheduler needs every token on the host."""
        previous, self._in_flight = self._in_flight, None
        return self._read_in_flight(previous) if previous is not None else []

    def _read_in_flight(self, step: InFlight) -> list[TokenOutput]:
        out = step.step.read(self._timed_wait())
        for seq in step.deferred:  # their last step is done with their pages
            self._free_pages(seq)
        return self._apply(out, step.at)

    def _apply(self, out: BatchOutput, at: list[int] | None = None) -> list[TokenOutput]:
        """Record each row's token (into its placeholder, when ``at`` gives one), skipping sequences that ended
        while the step ran (aborted, or stopped one step earlier in an overlapped step)."""
        outputs = []
        for i, (seq, token) in enumerate(zip(out.seqs, out.token_ids, strict=True)):
            if seq.is_finished:
                continue
            logprob = out.logprobs[i] if out.logprobs else None
            outputs.append(self._append_token(seq, token, logprob, None if at is None else at[i]))
            if seq.is_finished and seq in self.running:
                self.running.remove(seq)
        return outputs

    def _commit_prompt_blocks(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self.blocks.commit_full_blocks(seq.block_table, seq.all_token_ids[: seq.num_computed_tokens])

    def _append_token(self, seq: Sequence, token: int, logprob: float | None, at: int | None = None) -> TokenOutput:
        """Record a sampled token (appended, or into its placeholder ``at``) and say whether the request ends."""
        if at is None:
            seq.output_token_ids.append(token)
            at = len(seq.output_token_ids) - 1
        else:
            seq.output_token_ids[at] = token
        count = at + 1
        if logprob is not None and seq.params.logprobs:
            seq.output_logprobs.append(logprob)
        params = seq.params
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.spec.eos_token_ids)
        text = ""
        decode = self._decode_text
        state = self._detok.get(seq.request_id) if decode is not None else None
        if state is not None and decode is not None and not is_stop_token:
            text = detokenizer.add_token(decode, state, token)
        reason = None
        if is_stop_token or (state is not None and state.stopped):
            reason = FinishReason.STOP
        elif count >= params.max_tokens or seq.num_prompt_tokens + count >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            if state is not None and decode is not None:  # the last output carries what was held back
                text += detokenizer.flush(decode, state)
            self._finish(seq, reason)
        return TokenOutput(
            seq.request_id,
            token,
            text,
            reason is not None,
            reason.value if reason else None,
            logprob if params.logprobs else None,
            seq.num_cached_tokens if at == 0 else None,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status == SeqStatus.FINISHED:
            return
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        while awaits_token(seq):
            seq.output_token_ids.pop()  # a token computed in an overlapped step after the one that ended it
        if self._in_flight is not None and self._in_flight.includes(seq):
            self._in_flight.deferred.append(seq)  # the step in flight still writes its KV
        else:
            self._free_pages(seq)
        self._detok.pop(seq.request_id, None)

    def _free_pages(self, seq: Sequence) -> None:
        if seq.block_table:
            # Only tokens whose KV is in the pages: a reservation's count stays 0 until its transfer landed.
            computed = seq.all_token_ids[: seq.num_computed_tokens]
            if PENDING_TOKEN in computed:  # never name a block by a token not read back
                computed = computed[: computed.index(PENDING_TOKEN)]
            self.blocks.commit_full_blocks(seq.block_table, computed)
            self.blocks.free(seq.block_table)
            if self.on_release is not None:
                self.on_release(seq.request_id)

    def generate(
        self, prompts: Sequence_[list[int] | str], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run prompts to completion offline (tests, the ``generate`` CLI)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            ids: list[int] = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            seqs.append(self.add_request(f"offline-{i}-{id(prompt)}", ids, p))
        texts: dict[str, list[str]] = {s.request_id: [] for s in seqs}
        while self.has_work():
            for out in self.step():
                texts[out.request_id].append(out.text)
        return [
            GenerationResult(
                s.request_id,
                s.prompt_token_ids,
                s.output_token_ids,
                "".join(texts[s.request_id]),
                s.finish_reason.value if s.finish_reason else "abort",
                s.output_logprobs,
            )
            for s in seqs
        ]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("prompt: this engine has no tokenizer (fix: send token ids)")
        return self.tokenizer(text)["input_ids"]

    # --- prefill role ---

    def prefill(
        self,
        seqs: list[Sequence],
        hook_for: Callable[[list[Sequence]], LayerHook | None] | None = None,
    ) -> list[TokenOutput]:
        """Compute whole prompts (chunked to the token budget) and sample each one's first token.

        The pages stay held until ``release``, so the transfer can read them. ``hook_for`` is asked, before each
        forward pass, for a layer hook given the sequences whose prompts complete in that pass. A sequence released
        during a pass (from its layer hook, or while it waits for the device in ``device_wait``) gets no first token
        and no further pass: its pages are free at once, as only passes queued behind this one on the same stream
        can write them again.
        Raises OutOfBlocks (nothing allocated) when the prompts do not fit now.
        """
        needed = sum(self.blocks.blocks_for(s.num_tokens) for s in seqs)
        if needed > self.blocks.num_free:
            raise OutOfBlocks(needed, self.blocks.num_free)
        for seq in seqs:
            seq.block_table, seq.num_cached_tokens = self.blocks.allocate_prompt(seq.all_token_ids)
            seq.num_computed_tokens = seq.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.held[seq.request_id] = seq
            self._detok[seq.request_id] = detokenizer.new_state(seq.prompt_token_ids, seq.params.stop)
        outputs: list[TokenOutput] = []
        pending = list(seqs)
        try:
            while pending:
                budget = self.max_batch_tokens
                chunks = []
                for seq in pending:
                    n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                    if n <= 0:
                        break
                    chunks.append((seq, n))
                    budget -= n
                start, waited = time.perf_counter(), self.step_times.device_wait_s
                completing = [s for s, n in chunks if s.num_computed_tokens + n == s.num_tokens]
                hook = hook_for(completing) if hook_for else None
                out = self.runner.execute(chunks, [], hook, self._timed_wait())
                self._commit_prompt_blocks(s for s, _ in chunks)
                outputs += self._apply(out)
                self._count_step(start, waited, chunks, [], read_back=False)
                pending = [s for s in pending if not s.is_finished and s.num_computed_tokens < s.num_prompt_tokens]
        except BaseException:
            for seq in seqs:
                self.abort(seq.request_id)
            raise
        return outputs

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's pages once its KV has left (or will never leave)."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self._finish(seq, seq.finish_reason or FinishReason.STOP)
        return True

    # --- decode role ---

    def reserve(self, seq: Sequence) -> tuple[list[int], int]:
        """Pages for a prompt's KV arriving from a prefill worker: the leading blocks this worker's prefix cache
        holds are reused (held from now on, so no eviction can take them before admission), and the transfer fills
        the others. Returns those other pages and the prompt tokens cached. Raises OutOfBlocks when there is no
        room."""
        if seq.request_id in self.held or seq.request_id in self._detok:
            raise RequestError(f"request_id: {seq.request_id!r} is already here")
        seq.block_table, seq.num_cached_tokens = self.blocks.allocate_prompt(seq.prompt_token_ids)
        self.held[seq.request_id] = seq
        return seq.block_table[seq.num_cached_tokens // self.blocks.block_size :], seq.num_cached_tokens

    def admit(self, request_id: str, first_token: int) -> None:
        """Start decoding a request whose prompt KV is now in its reserved pages."""
        seq = self.held.pop(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.status = SeqStatus.RUNNING
        state = detokenizer.new_state(seq.prompt_token_ids, seq.params.stop)
        self._detok[request_id] = state
        seq.output_token_ids.append(first_token)
        if self._decode_text is not None:  # the prefill worker streamed this token's text; what it held back is here
            detokenizer.add_token(self._decode_text, state, first_token)
        self.running.append(seq)
