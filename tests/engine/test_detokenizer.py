"""Streamed text is the final text cut into pieces: no split characters, no stop string, nothing lost at the end."""

from __future__ import annotations

import random

import pytest

from splitserve.engine import Engine, EngineConfig, RunnerConfig, SamplingParams
from splitserve.engine.detokenizer import DetokState, add_token, flush, new_state, text_decoder
from splitserve.engine.testing import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _stream(tok, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], DetokState]:
    """Feed ``ids`` one at a time as the engine does (no more once a stop string matched)."""
    state = new_state(_ids(tok, "Q: "), stop)
    pieces = []
    for token in ids:
        pieces.append(add_token(text_decoder(tok), state, token))
        if state.stopped:
            break
    return pieces, state


def test_multibyte_characters_come_out_whole(tok):
    text = "héllo 中文 €1 🎉!"
    pieces, _ = _stream(tok, _ids(tok, text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    party = len("héllo 中文 €1 ".encode())
    assert pieces[party : party + 4] == ["", "", "", "🎉"]  # four byte tokens, one character, at its last byte


def test_stop_string_split_across_tokens_is_never_streamed(tok):
    pieces, state = _stream(tok, _ids(tok, "a#b##c###d"), stop=("###",))
    # A "#" waits until the next character rules the stop string out; the full "###" never comes out.
    assert pieces == ["a", "", "#b", "", "", "##c", "", "", ""]
    assert state.stopped and flush(text_decoder(tok), state) == ""


def test_stop_string_of_multibyte_characters(tok):
    pieces, state = _stream(tok, _ids(tok, "x中y中文z"), stop=("中文",))
    assert "".join(pieces) == "x中y" and state.stopped
    assert "".join(pieces[: len("x中".encode())]) == "x"  # the first 中 waits for the "y" that rules it out


def test_first_stop_string_to_complete_wins(tok):
    pieces, state = _stream(tok, _ids(tok, "abcdef"), stop=("bcde", "cd"))
    assert "".join(pieces) == "ab" and state.stopped  # "cd" completes first, though "bcde" starts earlier


def test_a_shorter_hold_takes_over(tok):
    pieces, state = _stream(tok, _ids(tok, "zabcd"), stop=("abx", "bcd"))
    # "ab" may start "abx"; at "c" only "bc" may still start a stop string, so "a" goes out.
    assert pieces == ["z", "", "", "a", ""] and state.stopped


def test_flush_releases_a_stop_prefix_that_never_completed(tok):
    ids = _ids(tok, "ab##")
    pieces, state = _stream(tok, ids, stop=("###",))
    assert pieces == ["a", "b", "", ""] and not state.stopped
    assert flush(text_decoder(tok), state) == "##"
    assert flush(text_decoder(tok), state) == ""


def test_flush_gives_an_incomplete_character_as_decode_does(tok):
    ids = _ids(tok, "a€")[:-1]  # the euro sign's last byte never came
    pieces, state = _stream(tok, ids)
    assert pieces == ["a", "", ""]
    tail = flush(text_decoder(tok), state)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=True) == "a\ufffd"


def _cut_at_first_stop(text: str, stop: tuple[str, ...]) -> str:
    """The reference, one character at a time: text before the stop string that completes first."""
    for end in range(1, len(text) + 1):
        starts = [i for i in (text[:end].find(s) for s in stop) if i >= 0]
        if starts:
            return text[: min(starts)]
    return text


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_add_up_to_the_decode(tok, seed):
    """Valid and broken UTF-8, special tokens and stop strings mixed: the stream equals decode, cut at a stop."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < 40:
        if rng.random() < 0.5:
            ids += _ids(tok, rng.choice(["a", "#", "##", " ", "é", "中", "🎉", "文#"]))
        else:
            ids.append(rng.randrange(len(tok)))  # any byte (often breaking UTF-8), or BOS/EOS/PAD
    full = tok.decode(ids, skip_special_tokens=True)
    start = rng.randrange(len(full))
    stop = (full[start : start + rng.randint(1, 4)], rng.choice(["###", "中#", "é中", "\ufffd#"]), "a\u2603")
    pieces, state = _stream(tok, ids, stop)
    assert "".join(pieces) + flush(text_decoder(tok), state) == _cut_at_first_stop(full, stop)
    assert state.stopped  # the first stop string occurs in the text


def test_random_streams_without_a_stop_add_up_to_the_decode(tok):
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        pieces, state = _stream(tok, ids, stop=("\u2603",))
        assert "".join(pieces) + flush(text_decoder(tok), state) == tok.decode(ids, skip_special_tokens=True)


def test_the_text_decoder_gives_what_the_tokenizer_decode_gives(tok):
    """The Rust tokenizer's decode, called directly, equals ``tokenizer.decode`` (specials skipped, broken UTF-8);
    a tokenizer that cleans up spaces keeps the transformers path, whose clean-up the Rust decode lacks."""
    rng = random.Random(3)
    fast = text_decoder(tok)
    for _ in range(60):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 30))] + _ids(tok, "a , b . 中")
        assert fast(ids) == tok.decode(ids, skip_special_tokens=True)
    cleaning = build_byte_tokenizer()
    cleaning.clean_up_tokenization_spaces = True
    ids = _ids(cleaning, "a , b .")
    assert text_decoder(cleaning)(ids) == cleaning.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(EngineConfig(RunnerConfig(str(tiny_model_dir), device="cpu", num_kv_blocks=128)))


def test_engine_stream_adds_up_to_the_decode(engine):
    prompt = engine.encode("The quick brown fox")
    tok = engine.tokenizer
    # One request per length: some end inside a character (the random model emits any byte), which must be flushed.
    results = engine.generate([prompt] * 10, [SamplingParams(max_tokens=n, ignore_eos=True) for n in range(1, 11)])
    decoded = [tok.decode(r.token_ids, skip_special_tokens=True) for r in results]
    assert [r.text for r in results] == decoded
    assert any(d.endswith("\ufffd") for d in decoded)  # the edge this test is about was exercised

    full = engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    visible = [i for i, ch in enumerate(full.text) if ch.isprintable() and ch != "\ufffd"]
    cut = visible[len(visible) // 2]
    stop = full.text[cut - 1 : cut + 1]  # two characters, so at least two tokens
    stopped = engine.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    # A stop string whose first character ends the output, but which never completes: held, then released at the end.
    prefixes = [tok.decode(full.token_ids[:n], skip_special_tokens=True) for n in range(1, 41)]
    n, text = max((n, t) for n, t in enumerate(prefixes, 1) if t[-1:].isprintable() and t[-1:] != "\ufffd")
    held = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, stop=(text[-1] + "\u2603",)))[0]
    assert held.finish_reason == "length" and held.text == text
