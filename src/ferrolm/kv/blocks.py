"""Block manager: hands out KV blocks and keeps each sequence's block table."""

from __future__ import annotations

from collections import deque
from typing import Protocol


class HasBlocks(Protocol):
    block_table: list[int]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

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
            block = self.free_ids.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def free(self, seq: HasBlocks) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_ids.append(block)
        seq.block_table.clear()
