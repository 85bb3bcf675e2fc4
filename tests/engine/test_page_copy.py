"""Page gather/scatter through int64 word views: the same bytes as index_select / index_copy_, any layout."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.page_copy import gather_pages, scatter_pages, select_blocks


@pytest.mark.parametrize(
    ("dtype", "head_dim"),
    [(torch.bfloat16, 8), (torch.float32, 4), (torch.bfloat16, 3), (torch.float64, 2)],  # 3 x bf16: not words
)
def test_gather_and_scatter_match_index_select_and_index_copy(dtype, head_dim):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 10, 4, 2, head_dim, generator=gen).to(dtype)
    index = torch.tensor([7, 2, 5])
    assert torch.equal(gather_pages(cache, index), cache.index_select(1, index))
    pages = torch.randn(2, 3, 4, 2, head_dim, generator=gen).to(dtype)
    expected = cache.clone().index_copy_(1, index, pages)
    scatter_pages(cache, index, pages)
    assert torch.equal(cache, expected)


def test_a_strided_layer_view_is_written_in_place():
    """A layer of the whole cache (a view) must be written through, not copied."""
    cache = torch.zeros(3, 2, 6, 4, 2, 8, dtype=torch.bfloat16)
    pages = torch.ones(2, 2, 4, 2, 8, dtype=torch.bfloat16)
    scatter_pages(cache[1], torch.tensor([0, 4]), pages)
    assert cache[1][:, [0, 4]].eq(1).all() and cache.sum() == pages.numel()


def test_a_run_of_layers_is_written_in_one_call():
    """The receivers land several layers at once: each layer's blocks go to the same block ids, nothing else moves."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(4, 2, 6, 4, 2, 8, generator=gen).to(torch.bfloat16)
    pages = torch.randn(2, 2, 3, 4, 2, 8, generator=gen).to(torch.bfloat16)  # layers 1 and 2, three blocks each
    index = torch.tensor([5, 0, 3])
    expected = cache.clone()
    for i, layer in enumerate([1, 2]):
        expected[layer].index_copy_(1, index, pages[i])
    scatter_pages(cache[1:3], index, pages)
    assert torch.equal(cache, expected)
    assert torch.equal(gather_pages(cache[1:3], index), pages)


def test_a_consecutive_run_is_a_slice_and_moves_the_same_bytes_as_an_index():
    cpu = torch.device("cpu")
    assert select_blocks([3, 4, 5], cpu) == slice(3, 6)
    assert isinstance(select_blocks([3, 5, 4], cpu), torch.Tensor)
    gen = torch.Generator().manual_seed(2)
    cache = torch.randn(3, 2, 8, 4, 2, 8, generator=gen).to(torch.bfloat16)
    by_index, by_run = cache.clone(), cache.clone()
    pages = torch.randn(2, 2, 3, 4, 2, 8, generator=gen).to(torch.bfloat16)
    scatter_pages(by_index[1:], torch.tensor([3, 4, 5]), pages)
    scatter_pages(by_run[1:], select_blocks([3, 4, 5], cpu), pages)
    assert torch.equal(by_run, by_index) and not torch.equal(by_run, cache)
    assert torch.equal(gather_pages(by_run[1:], slice(3, 6)), pages)


def test_a_run_gathered_is_a_copy_even_of_a_whole_layer():
    """The sender may release the source blocks once a layer is gathered."""
    cache = torch.zeros(2, 4, 4, 2, 8, dtype=torch.bfloat16)
    pages = gather_pages(cache, slice(0, 4))
    cache.fill_(1)
    assert pages.eq(0).all()


def test_pages_that_do_not_fill_the_run_are_refused_not_broadcast():
    cache = torch.zeros(2, 6, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fill"):
        scatter_pages(cache, slice(0, 3), torch.ones(2, 1, 4, 2, 8, dtype=torch.bfloat16))
    assert cache.eq(0).all()
