"""Block manager: free list, ref counts, per-sequence block tables, prefix-hash chains.

A full block is identified by a chain hash (parent block's hash + its token ids),
so equal hashes mean equal prefixes. With prefix caching on, a new sequence
reuses the cached blocks of its longest cached prefix (ref counts shared). A
freed block keeps its hash and contents until it is handed out again: the free
list is ordered by release time, so the least recently used block is evicted
first. Cached blocks hold exactly the bytes and scales that were written, for
every KV dtype.

A sequence has one block table per KV group (kv/groups.py), all drawing from one
free list. A sliding-window group's blocks that no future query can see (every token
before the window of the next position) are released after each step and their table
entries point at a reserved null block, which attention never reads unmasked. A prefix
hit needs every full group's blocks of the prefix but only the blocks of each window
group that the prefix's last window covers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Protocol


class HasBlocks(Protocol):
    token_ids: list[int]
    block_tables: list[list[int]]  # one per KV group (empty: none allocated yet)
    block_hashes: list[int]
    num_computed: int


class Prefix(NamedTuple):
    """A cached prefix found by lookup: its blocks per group (null out of a window)."""

    num_blocks: int
    tables: list[list[int]]
    hashes: list[int]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        windows: tuple[int | None, ...] = (None,),
    ) -> None:
        """windows: each KV group's sliding window (None: full attention)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self.ref_counts = [0] * num_blocks
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Table entries of blocks that left a window point here; never handed out.
        self.null_block: int | None = None
        if any(w is not None for w in self.windows):
            self.null_block = 0
            del self.free_ids[0]
        self.block_hash: list[tuple[int, int] | None] = [None] * num_blocks  # (group, chain hash)
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[tuple[int, int], int] = {}  # (group, chain hash) -> block id

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_usable(self) -> int:
        """Blocks sequences can hold (the null block excluded)."""
        return self.num_blocks - (self.null_block is not None)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self.free_ids)

    def _tables(self, seq: HasBlocks) -> list[list[int]]:
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.windows]
        return seq.block_tables

    def first_live(self, group: int, num_computed: int) -> int:
        """First block of `group` the queries from position `num_computed` on can see."""
        w = self.windows[group]
        return 0 if w is None else max(0, num_computed - w + 1) // self.block_size

    def max_blocks(self, num_tokens: int, chunk: int) -> int:
        """Most blocks one sequence holds at once on its way to `num_tokens` tokens,
        computing at most `chunk` tokens a step."""
        need = blocks_needed(num_tokens, self.block_size)
        return sum(need if w is None else min(need, self._window_peak(w, chunk)) for w in self.windows)

    def _window_peak(self, window: int, chunk: int) -> int:
        """Most blocks a window group holds at once: the window before a step's first
        query and the step's `chunk` tokens."""
        return blocks_needed(window - 1 + chunk, self.block_size) + 1

    def longest_sequence(self, chunk: int, limit: int) -> int:
        """Most tokens (up to `limit`) one sequence can reach in the whole cache."""
        lo, hi = 0, limit
        while lo < hi:  # max_blocks grows with the length
            mid = (lo + hi + 1) // 2
            if self.max_blocks(mid, chunk) <= self.num_usable:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- growing and freeing ---------------------------------------------------
    def extra_blocks(self, seq: HasBlocks, num_tokens: int) -> int:
        """Blocks `seq` still needs to hold `num_tokens` tokens in total."""
        need = blocks_needed(num_tokens, self.block_size)
        tables = seq.block_tables or [[] for _ in self.windows]
        return sum(
            max(0, need - max(len(t), self.first_live(g, seq.num_computed))) for g, t in enumerate(tables)
        )

    def can_grow(self, seq: HasBlocks, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= self.num_free

    def grow(self, seq: HasBlocks, num_tokens: int) -> None:
        """Give `seq` enough blocks for `num_tokens` tokens in total (a window group: from
        the first block its next query sees)."""
        extra = self.extra_blocks(seq, num_tokens)
        if extra > self.num_free:
            raise RuntimeError(f"KV cache out of blocks: need {extra}, {self.num_free} free")
        need = blocks_needed(num_tokens, self.block_size)
        for g, table in enumerate(self._tables(seq)):
            live = self.first_live(g, seq.num_computed)
            while len(table) < need:
                if len(table) < live:
                    table.append(self.null_block)
                    continue
                block, _ = self.free_ids.popitem(last=False)  # least recently released
                self._forget(block)
                self.ref_counts[block] = 1
                table.append(block)

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_ids[block] = None

    def free(self, seq: HasBlocks) -> None:
        # Tail blocks first, so a prefix outlives its continuations in the LRU order.
        for table in seq.block_tables:
            for block in reversed(table):
                if block != self.null_block:
                    self._release(block)
        seq.block_tables = []
        seq.block_hashes.clear()

    def release_out_of_window(self, seq: HasBlocks) -> int:
        """Release the window groups' blocks no query from `seq.num_computed` on sees;
        returns how many. Called after each step."""
        if self.null_block is None:
            return 0
        released = 0
        for g, table in enumerate(seq.block_tables):
            live = min(self.first_live(g, seq.num_computed), len(table))
            start = live
            while start > 0 and table[start - 1] != self.null_block:
                start -= 1
            for i in range(start, live):  # oldest first: the first to be evicted
                self._release(table[i])
                table[i] = self.null_block
            released += live - start
        return released

    # --- prefix caching -----------------------------------------------------------
    def lookup(self, token_ids: list[int]) -> Prefix:
        """The longest cached prefix of `token_ids` every group can resume from (read-only).

        At least one token is always left to compute, since its logits are needed."""
        empty = Prefix(0, [[] for _ in self.windows], [])
        if not self.enable_prefix_caching:
            return empty
        bs = self.block_size
        tokens = [tuple(token_ids[i * bs : (i + 1) * bs]) for i in range((len(token_ids) - 1) // bs)]
        hashes: list[int] = []
        for t in tokens:
            hashes.append(chain_hash(hashes[-1] if hashes else None, t))

        def block(g: int, i: int) -> int | None:
            b = self.cached.get((g, hashes[i]))
            return b if b is not None and self.block_tokens[b] == tokens[i] else None

        full = [g for g, w in enumerate(self.windows) if w is None]
        n = 0
        while n < len(tokens) and all(block(g, n) is not None for g in full):
            n += 1
        windowed = [g for g, w in enumerate(self.windows) if w is not None]
        while n and not all(
            block(g, i) is not None for g in windowed for i in range(self.first_live(g, n * bs), n)
        ):
            n -= 1
        if not n:
            return empty
        tables = [
            [self.null_block if i < self.first_live(g, n * bs) else block(g, i) for i in range(n)]
            for g in range(self.num_groups)
        ]
        return Prefix(n, tables, hashes[:n])

    def blocks_to_admit(self, prefix: Prefix, num_tokens: int, chunk: int | None = None) -> int:
        """Free blocks consumed by taking `prefix` and growing to `num_tokens`; with `chunk`
        (tokens computed per step), a window group counts only the most it holds at once."""
        held = {b for t in prefix.tables for b in t if b != self.null_block}
        reclaimed = sum(1 for b in held if self.ref_counts[b] == 0)
        need = blocks_needed(num_tokens, self.block_size)
        computed = prefix.num_blocks * self.block_size
        grow = 0
        for g, w in enumerate(self.windows):
            extra = max(0, need - max(prefix.num_blocks, self.first_live(g, computed)))
            if w is not None and chunk is not None:
                extra = min(extra, self._window_peak(w, chunk))
            grow += extra
        return reclaimed + grow

    def take_cached(self, seq: HasBlocks, prefix: Prefix) -> None:
        """Share `prefix` (from lookup) with an empty `seq`; its tokens count as computed."""
        assert not seq.block_tables
        seq.block_tables = [list(t) for t in prefix.tables]
        for table in seq.block_tables:
            for block in table:
                if block == self.null_block:
                    continue
                if self.ref_counts[block] == 0:
                    del self.free_ids[block]
                self.ref_counts[block] += 1
        seq.block_hashes[:] = prefix.hashes
        seq.num_computed = prefix.num_blocks * self.block_size

    def register_full_blocks(self, seq: HasBlocks) -> None:
        """Hash the blocks `seq` has completely computed, making them reusable."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            for g, table in enumerate(seq.block_tables):
                block = table[i]
                # An equal block cached earlier stays the canonical one.
                if block != self.null_block and (g, h) not in self.cached:
                    self.cached[(g, h)] = block
                    self.block_hash[block] = (g, h)
                    self.block_tokens[block] = tokens

    def _forget(self, block: int) -> None:
        key = self.block_hash[block]
        if key is not None and self.cached.get(key) == block:
            del self.cached[key]
        self.block_hash[block] = None
        self.block_tokens[block] = None
