"""The nccl backend's chunking: both sides derive it from the spec, so it must tile the layers exactly."""

from __future__ import annotations

import itertools

import pytest

from splitserve.kv_transfer.nccl import _CHUNKS, chunk_bounds


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 80])
def test_chunks_tile_the_layers_in_order(num_layers):
    bounds = chunk_bounds(num_layers)
    assert 1 <= len(bounds) <= _CHUNKS
    assert bounds[0][0] == 0 and bounds[-1][1] == num_layers
    assert all(first < last for first, last in bounds)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
