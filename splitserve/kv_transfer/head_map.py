"""Which prefill rank sends which KV heads to which decode rank, when the two workers' TP degrees differ.

Rank ``r`` of a TP group holds the KV heads ``rank_kv_heads(kv_heads, tp, r)`` (engine/tensor_parallel.py): an even
part where there are at least ``tp`` heads, else one head replicated on ``tp / kv_heads`` consecutive ranks. A
request's KV moves as one transfer per *link*: a (prefill rank, decode rank) pair and the run of heads it carries.
Every head a decode rank holds comes over exactly one link, from a prefill rank that holds it; where a head is
replicated on the prefill side, the decode ranks that need it take its holders in turn, so the senders share the
load. Nothing here moves bytes: both ends derive the same links from (kv_heads, prefill TP, decode TP).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.tensor_parallel import rank_kv_heads


@dataclass(frozen=True)
class HeadLink:
    """KV heads ``heads`` (the model's numbering) of one request, from rank ``src_rank`` of the prefill worker's
    ``src_tp`` ranks to rank ``dst_rank`` of the decode worker's ``dst_tp``. Carried by the transfer's spec, so the
    receiver can check that both ends planned the same link."""

    kv_heads: int  # the model's
    src_tp: int
    src_rank: int
    dst_tp: int
    dst_rank: int
    heads: range

    def __post_init__(self) -> None:
        for side, tp in (("prefill", self.src_tp), ("decode", self.dst_tp)):
            check_splits(self.kv_heads, tp, side)
        if not self.heads or self.heads.step != 1:
            raise ValueError(f"heads: {self.heads} is not a run of KV heads")
        for side, held in (("prefill", self.src_held), ("decode", self.dst_held)):
            if self.heads.start < held.start or self.heads.stop > held.stop:
                raise ValueError(
                    f"heads: {_span(self.heads)} are not all on the {side} rank, which holds {_span(held)}"
                )

    @classmethod
    def whole(cls, kv_heads: int) -> HeadLink:
        """The one link between two single-rank workers: every head."""
        return cls(kv_heads, 1, 0, 1, 0, range(kv_heads))

    @property
    def src_held(self) -> range:
        return rank_kv_heads(self.kv_heads, self.src_tp, self.src_rank)

    @property
    def dst_held(self) -> range:
        return rank_kv_heads(self.kv_heads, self.dst_tp, self.dst_rank)

    @property
    def src_slice(self) -> slice | None:
        """The link's heads in the sender's pages (local head index); None where that is all of them."""
        return _local(self.heads, self.src_held)

    @property
    def dst_slice(self) -> slice | None:
        """The link's heads in the receiver's pages (local head index); None where that is all of them."""
        return _local(self.heads, self.dst_held)

    def __str__(self) -> str:
        src = f"prefill rank {self.src_rank}/{self.src_tp} (holds {_span(self.src_held)})"
        dst = f"decode rank {self.dst_rank}/{self.dst_tp} (holds {_span(self.dst_held)})"
        return f"KV heads {_span(self.heads)} of {self.kv_heads} from {src} to {dst}"

    def to_wire(self) -> list[int]:
        ends = [self.src_tp, self.src_rank, self.dst_tp, self.dst_rank]
        return [self.kv_heads, *ends, self.heads.start, self.heads.stop]

    @classmethod
    def from_wire(cls, fields: list[int]) -> HeadLink:
        kv_heads, src_tp, src_rank, dst_tp, dst_rank, start, stop = fields
        return cls(kv_heads, src_tp, src_rank, dst_tp, dst_rank, range(start, stop))


def check_splits(kv_heads: int, tp: int, side: str) -> None:
    """Refuse a TP degree whose ranks cannot hold the model's KV heads (see the module docstring)."""
    if tp < 1 or kv_heads < 1 or (kv_heads % tp and tp % kv_heads):
        raise ValueError(
            f"{side} tensor_parallel_size: {tp} ranks cannot hold {kv_heads} KV heads "
            "(fix: a size that divides the KV head count, or a multiple of it)"
        )


def head_links(kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadLink]:
    """Every link of a transfer from a prefill worker of ``src_tp`` ranks to a decode worker of ``dst_tp``, ordered
    by (source rank, destination rank). At ``src_tp == dst_tp`` that is rank r to rank r, all its heads."""
    check_splits(kv_heads, src_tp, "prefill")
    check_splits(kv_heads, dst_tp, "decode")
    links: list[HeadLink] = []
    for dst in range(dst_tp):
        run: list[int] = []  # heads of the link being built: consecutive, from one source
        source = -1
        for head in rank_kv_heads(kv_heads, dst_tp, dst):
            chosen = _source_of(kv_heads, src_tp, dst_tp, head, dst)
            if run and chosen != source:
                links.append(HeadLink(kv_heads, src_tp, source, dst_tp, dst, range(run[0], run[-1] + 1)))
                run = []
            source = chosen
            run.append(head)
        links.append(HeadLink(kv_heads, src_tp, source, dst_tp, dst, range(run[0], run[-1] + 1)))
    return sorted(links, key=lambda link: (link.src_rank, link.dst_rank, link.heads.start))


def links_from(kv_heads: int, src_tp: int, dst_tp: int, src_rank: int) -> list[HeadLink]:
    """What prefill rank ``src_rank`` sends."""
    return [link for link in head_links(kv_heads, src_tp, dst_tp) if link.src_rank == src_rank]


def links_to(kv_heads: int, src_tp: int, dst_tp: int, dst_rank: int) -> list[HeadLink]:
    """What decode rank ``dst_rank`` receives: one transfer per link."""
    return [link for link in head_links(kv_heads, src_tp, dst_tp) if link.dst_rank == dst_rank]


def _holders(kv_heads: int, tp: int, head: int) -> range:
    """The ranks of ``tp`` that hold ``head``."""
    if kv_heads >= tp:
        return range(head // (kv_heads // tp), head // (kv_heads // tp) + 1)
    per = tp // kv_heads
    return range(head * per, (head + 1) * per)


def _source_of(kv_heads: int, src_tp: int, dst_tp: int, head: int, dst: int) -> int:
    """The prefill rank that sends ``head`` to decode rank ``dst``: the i-th decode holder of the head takes the
    head's prefill holders in turn (i modulo their number)."""
    sources = _holders(kv_heads, src_tp, head)
    turn = _holders(kv_heads, dst_tp, head).index(dst)
    return sources[turn % len(sources)]


def _local(heads: range, held: range) -> slice | None:
    if heads == held:
        return None
    return slice(heads.start - held.start, heads.stop - held.start)


def _span(heads: range) -> str:
    return str(heads.start) if len(heads) == 1 else f"{heads.start}-{heads.stop - 1}"
