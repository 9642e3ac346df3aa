"""Architectures ferrolm loads: GGUF `general.architecture` / HF `model_type` -> a family.

A family names its model module (`llama.py`: Llama, Mistral, Qwen2 and Qwen3 share its
layout of RMSNorm, rotate-half RoPE, GQA and SwiGLU; `gemma3.py`: Gemma 3) and, for the
Llama layout, what differs: q/k/v biases (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), a sliding window
(Mistral, where the config sets one), and whether llama.cpp's converter permuted the
Q/K rows for its interleaved RoPE (only Llama-style models: `llama` GGUFs, which include
Mistral's and SmolLM's). Everything a family changes is data here, not an `if` chain in
the loader. An unknown architecture is rejected with the supported list.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    attention_bias: bool | None = None  # None: from the config (attention_bias), else fixed
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    gguf_permuted_qk: bool = False  # llama.cpp permuted Q/K rows (undo when reading GGUF)
    sliding_window_key: str | None = None  # the HF config key of an optional sliding window
    module: str = "llama"  # models/<module>.py holds the model and its config class
    gguf_names: dict = field(default_factory=dict)  # GGUF layer tensor -> HF module, overrides
    gguf_norm_offset: float = 0.0  # llama.cpp stored the norm weights plus this (Gemma: 1)
    gguf_extra: dict = field(default_factory=dict)  # config field -> GGUF key (after the arch)
    chat_template: str = "chatml"  # built-in turn format for files without a template
    hf_twin: str | None = None  # HF class with this layout for the bench baseline (models/hf_twin.py)

    def gguf_config(self, m) -> dict:
        """The family's own config fields from GGUF metadata (m: key after the arch -> value)."""
        return {k: m(key) for k, key in self.gguf_extra.items() if m(key) is not None}

    def classes(self):
        """(config class, model class) of the family."""
        import importlib

        mod = importlib.import_module(f"ferrolm.models.{self.module}")
        name = {"llama": "Llama", "gemma3": "Gemma3"}[self.module]
        return getattr(mod, f"{name}Config"), getattr(mod, f"{name}Model")


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama", ("llama",), ("llama", "smollm", "smollm2"), gguf_permuted_qk=True, hf_twin="LlamaForCausalLM"
    ),
    Family(
        "mistral",
        ("mistral",),
        ("mistral",),
        gguf_permuted_qk=True,
        sliding_window_key="sliding_window",
        chat_template="mistral",
    ),
    Family("qwen2", ("qwen2",), ("qwen2",), attention_bias=True, sliding_window_key=None),
    Family("qwen3", ("qwen3",), ("qwen3",), attention_bias=False, qk_norm=True),
    Family(
        "gemma3",
        ("gemma3_text", "gemma3"),
        ("gemma3",),
        qk_norm=True,
        sliding_window_key="sliding_window",
        module="gemma3",
        # llama.cpp's Gemma 3: ffn_norm is the pre-MLP norm, and two post-sublayer norms.
        gguf_names={
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        gguf_norm_offset=1.0,
        # The attention scale's query_pre_attn_scalar is the head size up to 12B (27B differs).
        gguf_extra={"query_pre_attn_scalar": "attention.key_length"},
        chat_template="gemma",
    ),
)


def supported() -> str:
    return ", ".join(sorted({t for f in FAMILIES for t in (*f.hf_model_types, *f.gguf_archs)}))


def family_for_hf(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.hf_model_types:
            return f
    raise ValueError(f"model_type {model_type!r} is not supported (supported: {supported()})")


def family_by_name(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def family_for_gguf(arch: str | None) -> Family:
    for f in FAMILIES:
        if arch in f.gguf_archs:
            return f
    raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {supported()})")
