"""KV cache groups: sliding-window layers keep only their window (vLLM's hybrid allocator).

Layers that attend alike share a block table: full-attention layers, and layers with
one sliding window. A group is `group_size` layers of one kind, and every group's
block is a page of the same bytes, so all groups draw from one free list: a block
freed by a windowed group (its tokens left the window) is at once a block any group
can use. Layer k of every group (its slot) lives in the same pool tensors, read with
that group's block ids, so those layers must share their KV formats.

Gemma 3 270M (15 local layers with a 512-token window, 3 global): group_size 3, one
full group and five window groups, so a long sequence's cache grows on 3 of 18 layers.
A model without windows (or a per-layer KV spec whose formats differ within a slot)
has one group of every layer: windows are then only masked, their blocks kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from ferrolm.kv.spec import KvSpec


@dataclass(frozen=True)
class KvGroups:
    layer_group: tuple[int, ...]  # each layer's group
    layer_slot: tuple[int, ...]  # each layer's index in its group (the pool tensors it uses)
    windows: tuple[int | None, ...]  # each group's sliding window (None: full attention)
    note: str = ""  # why windows are not freed, where they could be

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def group_size(self) -> int:
        return len(self.layer_slot) // self.num_groups

    @property
    def frees_windows(self) -> bool:
        return any(w is not None for w in self.windows)

    def slot_layers(self) -> list[int]:
        """For each slot, a layer stored in it (all of a slot's layers share formats)."""
        return [self.layer_slot.index(k) for k in range(self.group_size)]

    @classmethod
    def single(cls, num_layers: int, note: str = "") -> KvGroups:
        return cls((0,) * num_layers, tuple(range(num_layers)), (None,), note)

    @classmethod
    def plan(cls, windows: list[int | None], spec: KvSpec) -> KvGroups:
        """Groups for layers with these windows (None: full attention)."""
        n = len(windows)
        kinds = list(dict.fromkeys(windows))  # in order of first appearance
        if kinds == [None]:
            return cls.single(n)
        members = {w: [i for i in range(n) if windows[i] == w] for w in kinds}
        size = 0
        for layers in members.values():
            size = gcd(size, len(layers))
        layer_group, layer_slot, group_windows = [0] * n, [0] * n, []
        for w in kinds:
            layers = members[w]
            for start in range(0, len(layers), size):
                for k, layer in enumerate(layers[start : start + size]):
                    layer_group[layer], layer_slot[layer] = len(group_windows), k
                group_windows.append(w)
        for k in range(size):
            formats = {spec.layers[i] for i in range(n) if layer_slot[i] == k}
            if len(formats) > 1:
                return cls.single(
                    n,
                    "the per-layer KV spec gives layers that would share pool tensors different "
                    "formats, so blocks that left a sliding window are kept (only masked)",
                )
        return cls(tuple(layer_group), tuple(layer_slot), tuple(group_windows))
