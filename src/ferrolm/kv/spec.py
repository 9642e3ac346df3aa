"""KV spec: one (key format, value format) per layer.

Built from the user's settings: `dtype` for every layer and both halves,
`key_dtype` / `value_dtype` to override one half, `layer_dtypes` to override
single layers ({"0": "fp16", "-1": "fp16"}; a value is a dtype or a "key/value"
pair such as "int8/int4"; negative indices count from the end), and `rotation`
(auto: each row's own choice; on / off: every scaled format rotated or not).

As text (eval and bench `--kv-dtypes`, and `describe()` in reverse): a pair
`K[/V]`, then optional per-layer overrides `;LAYER=K[/V]`, e.g.
`int8/int4;0=fp16;-1=fp16`; `+rot` / `+norot` after a name switches the rotation
of every scaled format of the spec on / off (`int8+rot`, `int4+norot`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ferrolm.kv.dtypes import FORMATS, KvCacheDtype, KvFormat

ROTATIONS = ("auto", "on", "off")


@dataclass(frozen=True)
class LayerKv:
    key: KvFormat
    value: KvFormat

    def bytes_per_head(self, head_dim: int, block_size: int = 16) -> int:
        """Bytes one token takes in this layer for one kv head, K and V together."""
        return self.key.bytes_per_head(head_dim, block_size) + self.value.bytes_per_head(head_dim, block_size)

    def label(self) -> str:
        k, v = _label(self.key), _label(self.value)
        return k if k == v else f"{k}/{v}"


def _label(fmt: KvFormat) -> str:
    """The format's name, marked when its rotation differs from its row's (kv rotation on/off)."""
    row = FORMATS.get(fmt.dtype)
    if row is None or row.rotated == fmt.rotated:
        return fmt.name
    return fmt.name + ("+rot" if fmt.rotated else "+norot")


def parse_pair(text: str | KvCacheDtype) -> tuple[KvCacheDtype, KvCacheDtype]:
    """'int8' -> (int8, int8); 'int8/int4' -> (int8, int4); errors list the valid names."""
    if isinstance(text, KvCacheDtype):
        return text, text
    parts = str(text).split("/")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(f"a KV dtype pair is 'DTYPE' or 'KEY/VALUE', got {text!r}")
    k = KvCacheDtype.parse(parts[0])
    return k, KvCacheDtype.parse(parts[-1])


def _with_rotation(fmt: KvFormat, rotation: str) -> KvFormat:
    if rotation == "auto" or not fmt.scaled:
        return fmt
    return dataclasses.replace(fmt, rotated=rotation == "on")


@dataclass(frozen=True)
class KvSpec:
    layers: tuple[LayerKv, ...]

    @classmethod
    def build(
        cls,
        num_layers: int,
        dtype: str | KvCacheDtype = KvCacheDtype.FP16,
        key_dtype: str | KvCacheDtype | None = None,
        value_dtype: str | KvCacheDtype | None = None,
        layer_dtypes: Mapping[str | int, str] | None = None,
        rotation: str = "auto",
    ) -> KvSpec:
        if rotation not in ROTATIONS:
            raise ValueError(f"unknown KV rotation {rotation!r}; valid: {', '.join(ROTATIONS)}")
        base_k, base_v = parse_pair(dtype)
        base = (KvCacheDtype.parse(key_dtype or base_k), KvCacheDtype.parse(value_dtype or base_v))
        per_layer = [base] * num_layers
        for index, pair in (layer_dtypes or {}).items():
            per_layer[layer_index(index, num_layers)] = parse_pair(pair)
        return cls(
            tuple(
                LayerKv(_with_rotation(FORMATS[k], rotation), _with_rotation(FORMATS[v], rotation))
                for k, v in per_layer
            )
        )

    @classmethod
    def parse(cls, text: str, num_layers: int, rotation: str = "auto") -> KvSpec:
        """From the text form 'K[/V][;LAYER=K[/V]]...'."""
        f = spec_flags(text)
        return cls.build(
            num_layers,
            f["kv_cache_dtype"],
            value_dtype=f["kv_cache_value_dtype"],
            layer_dtypes=f["kv_cache_layer_dtypes"],
            rotation=f["kv_cache_rotation"] or rotation,
        )

    @classmethod
    def uniform(cls, fmt: KvFormat, num_layers: int, value: KvFormat | None = None) -> KvSpec:
        """Every layer (key fmt, value fmt or fmt): for tests and formats outside the table."""
        return cls(tuple(LayerKv(fmt, value or fmt) for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_head_dim(self, head_dim: int, block_size: int = 16) -> None:
        for lk in self.layers:
            lk.key.check_head_dim(head_dim, block_size)
            lk.value.check_head_dim(head_dim, block_size)

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, block_size: int = 16) -> int:
        """Whole-model bytes one token takes: the sum over layers of K and V, scales included."""
        return num_kv_heads * sum(lk.bytes_per_head(head_dim, block_size) for lk in self.layers)

    @property
    def staged(self) -> bool:
        """Whether some layer keeps not-yet-full blocks in fp16 (per-channel formats)."""
        return any(f.per_channel_block for lk in self.layers for f in (lk.key, lk.value))

    def describe(self) -> str:
        """Short and readable: 'int8/int4, layers 0,29: fp16' (the most common pair first)."""
        labels = [lk.label() for lk in self.layers]
        common = max(dict.fromkeys(labels), key=labels.count)
        others: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            if label != common:
                others.setdefault(label, []).append(i)
        parts = [common] + [f"layers {','.join(map(str, idx))}: {label}" for label, idx in others.items()]
        return ", ".join(parts)


def spec_flags(text: str) -> dict[str, object]:
    """Engine settings (FLAGS names) for a spec in text form, e.g. for eval and bench.
    A '+rot' or '+norot' after a dtype name sets the rotation of the whole spec (as
    kv_cache_rotation on / off): 'int8+rot', 'int4+norot'."""
    text = str(text)
    norot, rot = "+norot" in text, "+rot" in text.replace("+norot", "")
    if norot and rot:
        raise ValueError(f"a spec is rotated or not, not both: {text!r}")
    rotation = "on" if rot else "off" if norot else None
    text = text.replace("+norot", "").replace("+rot", "")
    base, *overrides = [p.strip() for p in text.split(";")]
    key, value = parse_pair(base)
    layers = {}
    for item in overrides:
        index, sep, pair = item.partition("=")
        if not sep:
            raise ValueError(f"a per-layer override is 'LAYER=DTYPE[/DTYPE]', got {item!r} in {text!r}")
        parse_pair(pair)
        layers[index.strip()] = pair.strip()
    return {
        "kv_cache_dtype": key.value,
        "kv_cache_value_dtype": value.value,
        "kv_cache_layer_dtypes": layers or None,
        "kv_cache_rotation": rotation,
    }


def split_specs(text: str) -> list[str]:
    """'fp16,int8/int4,int4;0=fp16;-1=fp16' -> the specs (commas separate specs; a per-layer
    override list continues after ';'). Each spec is checked; errors list valid names."""
    specs = [s.strip() for s in str(text).split(",") if s.strip()]
    for s in specs:
        spec_flags(s)
    if not specs:
        raise ValueError("no KV spec given")
    return specs


def layer_index(index: str | int, num_layers: int) -> int:
    """'3' or -1 -> a layer number; out of range is rejected with the valid range."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"layer index {index!r} is not an integer") from None
    if not -num_layers <= i < num_layers:
        raise ValueError(
            f"layer index {i} is out of range: this model has {num_layers} layers "
            f"(valid: 0..{num_layers - 1}, or -{num_layers}..-1 from the end)"
        )
    return i % num_layers
