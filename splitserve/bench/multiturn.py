"""Multi-turn conversations built from the Azure conversation trace, deterministically from a seed.

Each turn's prompt is the conversation so far (every earlier message and answer, in order) plus a new user
message, so turn k's prompt starts with turn k-1's prompt and answer token for token and a prefix cache can hit.

Lengths come from trace rows, one row drawn per turn (prompt and output length of the same row, keeping their
correlation). The trace has whole-prompt lengths only, not messages, so a turn's new message is derived:

- the first turn's message is the row's whole prompt (what a request with no history sent: system prompt,
  documents and the first question);
- a follow-up turn's message is ``followup_fraction`` of the row's prompt (at least one token): a follow-up
  carries no system prompt or documents. The default 0.1 makes the median follow-up (~100 tokens of the trace's
  ~1k median prompt) about as long as the median answer (~130 tokens);
- the answer's length (``max_tokens``, sent with ``ignore_eos``) is the row's output length.

A conversation ends early where its next turn would not fit ``max_context`` (prompt plus answer).
The first turn of each conversation starts after one think time, so conversations do not all start at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from splitserve.bench.requests import PROMPT_VOCAB
from splitserve.simulator.errors import SimInputError
from splitserve.simulator.workload import LengthDist, load_trace

_THINK_PARAMETERS = {"fixed": 1, "exponential": 1, "uniform": 2}


@dataclass(frozen=True)
class ThinkDist:
    """Seconds between an answer and the next turn: ``S`` (fixed), ``exponential:MEAN`` or ``uniform:LO:HI``."""

    kind: Literal["fixed", "exponential", "uniform"]
    seconds: tuple[float, ...]  # the value; the mean; the bounds

    @classmethod
    def parse(cls, text: str, flag: str) -> ThinkDist:
        fix = f"(fix: {flag} S, {flag} exponential:MEAN or {flag} uniform:LO:HI, in seconds)"
        parts = text.split(":")
        kind, values = ("fixed", parts) if len(parts) == 1 else (parts[0], parts[1:])
        try:
            if _THINK_PARAMETERS.get(kind) != len(values):
                raise ValueError
            seconds = tuple(map(float, values))
        except ValueError:
            raise SimInputError(f"{flag}: cannot read {text!r} {fix}") from None
        if min(seconds) < 0 or list(seconds) != sorted(seconds):
            raise SimInputError(f"{flag}: {text!r} has impossible bounds (times are >= 0, LO <= HI) {fix}")
        return cls(kind, seconds)  # type: ignore[arg-type]

    def sample(self, rng: np.random.Generator) -> float:
        if self.kind == "fixed":
            return self.seconds[0]
        if self.kind == "exponential":
            return float(rng.exponential(self.seconds[0]))
        return float(rng.uniform(self.seconds[0], self.seconds[1]))


@dataclass(frozen=True)
class Turn:
    message_ids: list[int]  # the new user message, appended after the previous answer
    max_tokens: int  # the answer's length
    think_s: float  # wait after the previous answer (the first turn: after the run's start)


@dataclass(frozen=True)
class Conversation:
    index: int
    turns: list[Turn]

    def prompt(self, turn: int, answers: Sequence[Sequence[int]]) -> list[int]:
        """Turn ``turn``'s prompt: every earlier message and answer (``answers[j]`` is turn j's), then its message."""
        if len(answers) < turn:
            raise ValueError(f"answers: turn {turn} needs the answers of turns 0..{turn - 1}, got {len(answers)}")
        ids: list[int] = []
        for j in range(turn):
            ids += self.turns[j].message_ids
            ids += answers[j]
        return ids + self.turns[turn].message_ids


@dataclass(frozen=True)
class MultiTurnSpec:
    trace: str
    conversations: int
    turns: LengthDist = field(default_factory=lambda: LengthDist("fixed", 4))
    think: ThinkDist = field(default_factory=lambda: ThinkDist("exponential", (5.0,)))
    followup_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.conversations < 1:
            raise SimInputError(f"--conversations: must be >= 1, got {self.conversations}")
        if not 0 < self.followup_fraction <= 1:
            raise SimInputError(f"--followup-fraction: must be in (0, 1], got {self.followup_fraction}")


@dataclass(frozen=True)
class TurnLengths:
    message: int  # tokens of the new user message
    answer: int
    think_s: float


def draw_lengths(spec: MultiTurnSpec, max_context: int) -> list[list[TurnLengths]]:
    """Each conversation's turns as lengths and think times (what the simulator needs); a conversation whose first
    turn does not fit ``max_context`` has none."""
    trace = load_trace(spec.trace)
    rng = np.random.default_rng(spec.seed)
    conversations = []
    for count in spec.turns.sample(rng, spec.conversations).tolist():
        turns: list[TurnLengths] = []
        context = 0
        for k in range(count):
            row = int(rng.integers(len(trace)))
            prompt_len, answer = int(trace.prompt_tokens[row]), int(trace.output_tokens[row])
            message = prompt_len if k == 0 else max(1, round(prompt_len * spec.followup_fraction))
            think = spec.think.sample(rng)
            if context + message + answer > max_context:
                break
            turns.append(TurnLengths(message, answer, think))
            context += message + answer
        conversations.append(turns)
    if not any(conversations):
        raise SimInputError(
            f"--max-context: no conversation's first turn fits {max_context} tokens (fix: a model with a longer "
            "context, or a trace with shorter prompts)"
        )
    return conversations


def build_conversations(spec: MultiTurnSpec, max_context: int) -> list[Conversation]:
    """The conversations of ``spec`` with their messages' token ids; the same spec and ``max_context`` give the same
    conversations, ids included."""
    ids = np.random.default_rng([spec.seed, 1])  # apart from the lengths' stream: the simulator draws no ids
    return [
        Conversation(c, [Turn(ids.integers(0, PROMPT_VOCAB, t.message).tolist(), t.answer, t.think_s) for t in turns])
        for c, turns in enumerate(draw_lengths(spec, max_context))
        if turns
    ]
