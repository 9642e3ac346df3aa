from dataclasses import dataclass, field

import pytest

from ferrolm.kv.blocks import BlockManager, blocks_needed


@dataclass
class Seq:
    block_table: list[int] = field(default_factory=list)


def test_blocks_needed():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


def test_grow_and_free_return_to_initial_state():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = Seq(), Seq()
    bm.grow(a, 5)
    bm.grow(b, 4)
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    assert not set(a.block_table) & set(b.block_table)
    bm.grow(a, 8)  # still fits in 2 blocks
    assert len(a.block_table) == 2 and bm.num_free == 5
    assert bm.can_grow(a, 28) and not bm.can_grow(a, 29)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.grow(a, 100)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and a.block_table == [] and sorted(bm.free_ids) == list(range(8))
