"""One step's forward inputs as host lists: what the runner computes from the scheduler's sequences, and what a
tensor-parallel leader hands its followers so that they run the same passes (``rank_group``).

A step is a list of passes run in order: a decode graph, whole-prompt graphs, then one eager pass. Every field is a
list of ints or a list of int rows, so a step packs into one int64 buffer (``pack`` / ``unpack``) without pickling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

_NONE, _LIST, _ROWS = 0, 1, 2


@dataclass
class DecodeGraphPass:
    """Decode rows through a CUDA graph."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]


@dataclass
class PromptGraphPass:
    """A whole prompt from its first token through a CUDA graph."""

    input_ids: list[int]
    slots: list[int]


@dataclass
class EagerPass:
    """Prompt chunks, then decode rows, in one packed eager pass."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]  # of each prompt chunk
    context_lens: list[int]  # of each prompt chunk, once written
    prefill_block_tables: list[list[int]] | None  # None: every chunk starts at its prompt's first token
    decode_block_tables: list[list[int]]
    decode_context_lens: list[int]
    logit_rows: list[int]  # rows whose logits are sampled

    @property
    def num_decodes(self) -> int:
        return len(self.decode_context_lens)


Pass = DecodeGraphPass | PromptGraphPass | EagerPass
_KINDS: tuple[type[DecodeGraphPass] | type[PromptGraphPass] | type[EagerPass], ...] = (
    DecodeGraphPass,
    PromptGraphPass,
    EagerPass,
)


def pack(passes: list[Pass]) -> list[int]:
    """``passes`` as a flat list of ints: per pass its kind, then per field a tag and the field's values."""
    out = [len(passes)]
    for step in passes:
        out.append(_KINDS.index(type(step)))
        for value in (getattr(step, f.name) for f in fields(step)):
            if value is None:
                out.append(_NONE)
            elif value and isinstance(value[0], list):
                out += [_ROWS, len(value)]
                for row in value:
                    out.append(len(row))
                    out += row
            else:
                out += [_LIST, len(value), *value]
    return out


def unpack(flat: list[int]) -> list[Pass]:
    """The passes ``pack`` flattened."""
    at = 1
    passes: list[Pass] = []

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return flat[at - n : at]

    for _ in range(flat[0]):
        kind = _KINDS[take(1)[0]]
        fields: list[list[int] | list[list[int]] | None] = []
        for _ in range(len(kind.__dataclass_fields__)):
            tag = take(1)[0]
            if tag == _NONE:
                fields.append(None)
            elif tag == _LIST:
                fields.append(take(take(1)[0]))
            else:
                fields.append([take(take(1)[0]) for _ in range(take(1)[0])])
        passes.append(kind(*fields))  # type: ignore[arg-type]
    return passes
