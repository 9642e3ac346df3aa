from dataclasses import dataclass, field

import pytest

from ferrolm.kv.blocks import BlockManager, blocks_needed


@dataclass
class Seq:
    token_ids: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0

    @property
    def block_table(self) -> list[int]:  # the one group of a model without windows
        return self.block_tables[0] if self.block_tables else []


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
    assert bm.num_free == 8 and a.block_tables == [] and sorted(bm.free_ids) == list(range(8))


def _computed(bm, tokens):
    seq = Seq(token_ids=list(tokens))
    bm.take_cached(seq, bm.lookup(seq.token_ids))
    bm.grow(seq, len(tokens))
    seq.num_computed = len(tokens)
    bm.register_full_blocks(seq)
    return seq


def test_prefix_chain_reuse_and_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _computed(bm, range(10))  # blocks: [0..3] [4..7] partial [8, 9]
    assert len(a.block_hashes) == 2
    # Same first block, different second: only the first is shared.
    assert bm.lookup([0, 1, 2, 3, 4, 5, 6, 99, 1]).tables[0] == a.block_table[:1]
    # The last token is always left to compute: 8 tokens match one block, 9 match two.
    assert bm.lookup(list(range(8))).tables[0] == a.block_table[:1]
    assert bm.lookup(list(range(9))).tables[0] == a.block_table[:2]
    b = _computed(bm, list(range(9)))
    assert b.block_table[:2] == a.block_table[:2] and bm.ref_counts[a.block_table[0]] == 2
    # A different first block breaks the chain even if later blocks are equal.
    assert bm.lookup([9, 1, 2, 3, 4, 5, 6, 7, 8]).num_blocks == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and all(r == 0 for r in bm.ref_counts)
    # Freed blocks stay cached until they are handed out again.
    assert bm.lookup(list(range(10))).num_blocks == 2


def test_lru_eviction_forgets_the_oldest_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old = _computed(bm, [1, 2, 3])
    new = _computed(bm, [5, 6, 7])
    new_first = new.block_table[0]
    bm.free(old)
    bm.free(new)
    _computed(bm, [9, 9, 9, 9])  # takes the two least recently freed blocks: old's
    assert bm.lookup([1, 2, 3]).num_blocks == 0
    assert bm.lookup([5, 6, 7]).tables == [[new_first]]


def test_disabled_prefix_caching_never_matches():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    _computed(bm, range(10))
    assert bm.lookup(list(range(10))).num_blocks == 0 and bm.cached == {}
