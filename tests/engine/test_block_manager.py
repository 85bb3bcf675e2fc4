import random

import pytest

from splitserve.engine.block_manager import BlockManager, OutOfBlocks


def test_no_leak_after_thousands_of_random_cycles():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    rng = random.Random(0)
    live: list[list[int]] = []
    shared_prefix = [rng.randrange(100) for _ in range(12)]
    for _ in range(5000):
        if live and (rng.random() < 0.5 or bm.num_free < 8):
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        tokens = (shared_prefix if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randint(1, 20))]
        try:
            table, cached = bm.allocate_prompt(tokens)
        except OutOfBlocks:
            continue
        assert cached % 4 == 0 and cached < len(tokens)
        assert len(set(table)) == len(table) == bm.blocks_for(len(tokens))
        bm.commit_full_blocks(table, tokens)
        if rng.random() < 0.3:
            bm.append_slot(table, len(tokens) + 5)
        live.append(table)
    for table in live:
        bm.free(table)
    assert bm.num_free == 64
    assert bm.prefix_hits > 0


def test_out_of_blocks_allocates_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    table, _ = bm.allocate_prompt(list(range(12)))
    with pytest.raises(OutOfBlocks) as info:
        bm.allocate_prompt(list(range(100, 108)))
    assert info.value.needed == 2 and info.value.free == 1
    assert bm.num_free == 1
    bm.free(table)
    assert bm.num_free == 4


def test_shared_prefix_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    a, _ = bm.allocate_prompt(prompt)
    bm.commit_full_blocks(a, prompt)
    b, cached = bm.allocate_prompt(prompt)
    assert cached == 8 and b[:2] == a[:2] and b[2] != a[2]
    bm.free(a)
    assert bm.num_free == 8 - 3  # b still holds the two shared blocks and its own last block
    bm.free(b)
    assert bm.num_free == 8
    with pytest.raises(RuntimeError, match="double free"):
        bm.free([a[0]] if a else [0])
