"""Incremental detokenization and stop strings, so streamed text deltas never split a multi-byte character."""

from __future__ import annotations

from dataclasses import dataclass

# Tokens of context re-decoded before the new ones: enough for byte-level BPE to merge a split UTF-8 character.
_CONTEXT_TOKENS = 6


@dataclass
class DetokState:
    token_ids: list[int]  # prompt + output so far
    prefix_offset: int
    read_offset: int
    text: str = ""  # output text emitted so far (stop strings excluded)
    stopped: bool = False


def new_state(prompt_token_ids: list[int]) -> DetokState:
    n = len(prompt_token_ids)
    return DetokState(list(prompt_token_ids), max(n - _CONTEXT_TOKENS, 0), n)


def add_token(tokenizer, state: DetokState, token_id: int, stop: tuple[str, ...] = ()) -> str:
    """Append a token; return the new text to emit. Sets ``state.stopped`` when a stop string appears."""
    state.token_ids.append(token_id)
    prefix = tokenizer.decode(state.token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(state.token_ids[state.prefix_offset :], skip_special_tokens=True)
    if full.endswith("\ufffd") or len(full) <= len(prefix):
        return ""  # an incomplete character: wait for the next token
    delta = full[len(prefix) :]
    state.prefix_offset = state.read_offset
    state.read_offset = len(state.token_ids)
    if stop:
        # Search the tail that could contain a stop string straddling the old text and the delta.
        window_start = max(0, len(state.text) - max(len(s) for s in stop))
        window = state.text[window_start:] + delta
        hits = [window.find(s) for s in stop]
        first = min((h for h in hits if h >= 0), default=-1)
        if first >= 0:
            state.stopped = True
            delta = window[:first][len(state.text) - window_start :]
    state.text += delta
    return delta
