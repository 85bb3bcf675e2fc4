"""Incremental detokenization and stop strings, so streamed text deltas are exactly the final text, cut into pieces.

Two things are held back until they resolve: an incomplete multi-byte character (the next token may complete it) and
a tail that a stop string starts with (the next token may complete the stop string, which must never be streamed).
``flush`` releases both when the request ends some other way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

TextDecoder = Callable[[list[int]], str]  # token ids -> text, special tokens skipped

# Tokens of context re-decoded before the new ones: enough for byte-level BPE to merge a split UTF-8 character.
_CONTEXT_TOKENS = 6


@dataclass
class DetokState:
    token_ids: list[int]  # prompt + output so far
    prefix_offset: int
    read_offset: int
    stop: tuple[str, ...] = ()
    held: str = ""  # decoded text not streamed yet: it may be the start of a stop string
    stopped: bool = False


def text_decoder(tokenizer) -> TextDecoder:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, straight through the Rust tokenizer where that gives the
    same text (a fast tokenizer with no clean-up of spaces). The transformers wrapper adds ~7 us to each call, made
    twice per streamed token on the engine thread: on the 2-core CPU box a token's detokenization took 23 us through
    it, 9 us without (0.5 ms of a 37-sequence decode step)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if isinstance(backend, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def new_state(prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> DetokState:
    n = len(prompt_token_ids)
    return DetokState(list(prompt_token_ids), max(n - _CONTEXT_TOKENS, 0), n, stop)


def add_token(decode: TextDecoder, state: DetokState, token_id: int) -> str:
    """Append a token; return the text that can be streamed now. Sets ``state.stopped`` when a stop string appears."""
    state.token_ids.append(token_id)
    return _release(state, _decode_new(decode, state, final=False), final=False)


def flush(decode: TextDecoder, state: DetokState) -> str:
    """Everything still held back, for a request that ends now: its streamed text then equals the full decode.

    An incomplete character comes out as U+FFFD, as ``tokenizer.decode`` gives it. Nothing comes after a stop string.
    """
    if state.stopped:
        return ""
    return _release(state, _decode_new(decode, state, final=True), final=True)


def _decode_new(decode: TextDecoder, state: DetokState, final: bool) -> str:
    """Text of the tokens past ``read_offset``, decoded with context so a character split across tokens comes whole.

    Returns "" and leaves the tokens unread while they end in an incomplete character, unless ``final``.
    """
    prefix = decode(state.token_ids[state.prefix_offset : state.read_offset])
    full = decode(state.token_ids[state.prefix_offset :])
    if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
        return ""
    state.prefix_offset = state.read_offset
    state.read_offset = len(state.token_ids)
    return full[len(prefix) :]


def _release(state: DetokState, new: str, final: bool) -> str:
    """Pass new text through the stop strings: cut before the first to complete, hold back a tail that may start one.

    "First to complete" (ties: the longer) makes the cut independent of how the tokens split the text.
    """
    text = state.held + new
    # Earlier text was released only once no stop string could start in it, so a match lies within ``text``.
    found = [(i + len(s), i) for s in state.stop if (i := text.find(s)) >= 0]
    if found:
        state.stopped = True
        state.held = ""
        return text[: min(found)[1]]
    keep = 0 if final else _stop_prefix_len(text, state.stop)
    state.held = text[len(text) - keep :]
    return text[: len(text) - keep]


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that a stop string starts with: the next tokens may complete it."""
    longest = min(len(text), max((len(s) for s in stop), default=1) - 1)
    for n in range(longest, 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0
