"""Token sampling for a batch with per-request settings: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import torch

from splitserve.engine.sequence import Sequence


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p set ([B, V]; k = 0 means all, p = 1 means all)."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass before it is under p (so the top token is always kept).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row of ``logits`` ([B, V] float32), and logprobs when any sequence asked for them, left on
    the device (the caller reads them back in one wait).

    Greedy rows take the argmax with no randomness. Sampled rows draw from their own ``torch.Generator`` when the
    request has a seed, so a seeded request gives the same output whatever it is batched with.
    """
    greedy = logits.argmax(dim=-1)
    tokens = greedy
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        sub = logits[rows]
        temps = torch.tensor([seqs[i].params.temperature for i in sampled_rows], device=logits.device)
        top_k = torch.tensor([seqs[i].params.top_k for i in sampled_rows], device=logits.device)
        top_p = torch.tensor([seqs[i].params.top_p for i in sampled_rows], device=logits.device)
        probs = _filter_top_k_top_p(sub / temps[:, None], top_k, top_p).softmax(dim=-1)
        tokens = greedy.clone()
        for j, i in enumerate(sampled_rows):
            tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
    logprobs = None
    if any(s.params.logprobs for s in seqs):
        logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs
