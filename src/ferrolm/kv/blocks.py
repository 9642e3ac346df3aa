"""Block manager: free list, ref counts, per-sequence block tables, prefix-hash chains.

A full block is identified by a chain hash (parent block's hash + its token ids),
so equal hashes mean equal prefixes. With prefix caching on, a new sequence
reuses the cached blocks of its longest cached prefix (ref counts shared). A
freed block keeps its hash and contents until it is handed out again: the free
list is ordered by release time, so the least recently used block is evicted
first. Cached blocks hold exactly the bytes and scales that were written, for
every KV dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class HasBlocks(Protocol):
    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[int]
    num_computed: int


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chain hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    # --- growing and freeing ---------------------------------------------------
    def extra_blocks(self, seq: HasBlocks, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens in total."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: HasBlocks, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= self.num_free

    def grow(self, seq: HasBlocks, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens in total."""
        need = self.extra_blocks(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"KV cache out of blocks: need {need}, {self.num_free} free")
        for _ in range(need):
            block, _ = self.free_ids.popitem(last=False)  # least recently released
            self._forget(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: HasBlocks) -> None:
        # Tail blocks first, so a prefix outlives its continuations in the LRU order.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    # --- prefix caching -----------------------------------------------------------
    def lookup(self, token_ids: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids` (read-only).

        At least one token is always left to compute, since its logits are needed."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            found.append(block)
            parent = h
        return found

    def blocks_to_admit(self, cached: list[int], num_tokens: int) -> int:
        """Free blocks consumed by taking `cached` and growing to `num_tokens`."""
        reclaimed = sum(1 for b in cached if self.ref_counts[b] == 0)
        return reclaimed + max(0, blocks_needed(num_tokens, self.block_size) - len(cached))

    def take_cached(self, seq: HasBlocks, cached: list[int]) -> None:
        """Share `cached` (from lookup) with an empty `seq`; its tokens count as computed."""
        assert not seq.block_table
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.free_ids[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(self.block_hash[block])
        seq.num_computed = len(cached) * self.block_size

    def register_full_blocks(self, seq: HasBlocks) -> None:
        """Hash the blocks `seq` has completely computed, making them reusable."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:  # an equal block cached earlier stays the canonical one
                self.cached[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = tokens

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
        self.block_hash[block] = None
        self.block_tokens[block] = None
