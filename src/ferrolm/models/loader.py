"""Weights from a .gguf file or a Hugging Face safetensors folder.

GGUF files are read by models/gguf_file.py; tensors not kept as shipped are dequantized
with the `gguf` package, and all are renamed to Hugging Face names; llama.cpp's converter
permutes the rows of Q and K for its rotary layout, so those are permuted back. Loaded
models are kept in a small cache so that several engines in one process (tests, a server
restarted in-process) share them.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferrolm.models.families import family_for_gguf
from ferrolm.models.gguf_file import read_gguf_file
from ferrolm.models.llama import LlamaConfig, LlamaModel
from ferrolm.models.quant_linear import Q4Linear, Q4Weight, Q8Linear, Q8Weight, q4_from_gguf, q8_from_gguf

# GGUF types kept as shipped by weight_dtype "auto" (linear layers only).
KEPT_QUANT = ("Q4_0", "Q4_1")

_CACHE: OrderedDict[tuple[str, torch.dtype, str, str], LlamaModel] = OrderedDict()
_CACHE_SIZE = 2

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    weights: str = "dense",
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """Load (or reuse) a model from a .gguf file or a safetensors folder onto `device`.
    weights "auto": GGUF Q4_0/Q4_1 linear layers stay 4-bit (Q4Linear, CPU only); "dense":
    every weight in `dtype`."""
    path = Path(path).resolve()
    device = torch.device(device)
    if weights == "auto" and device.type != "cpu":
        raise ValueError("4-bit weights as shipped run on the CPU only; load them dense on " + str(device))
    key = (str(path), dtype, weights, str(device))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if path.is_file() and path.suffix == ".gguf":
        cfg, tensors = read_gguf(path, keep_quant=weights == "auto")
    elif path.is_dir() and (path / "config.json").is_file():
        cfg, tensors = read_safetensors_folder(path)
    else:
        raise FileNotFoundError(
            f"model path {path} is neither a .gguf file nor a folder with config.json and safetensors"
        )
    model = build_model(cfg, tensors, dtype, device)
    _CACHE[key] = model
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return model


def build_model(
    cfg: LlamaConfig,
    weights: dict[str, torch.Tensor | Q4Weight],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> LlamaModel:
    weights = {k.removeprefix("model."): v for k, v in weights.items()}
    if "lm_head.weight" not in weights:
        cfg.tie_word_embeddings = True
    from ferrolm.models.families import family_by_name

    model_class = family_by_name(cfg.family).classes()[1]
    with torch.device("meta"):
        model = model_class(cfg)
    model = model.to_empty(device="cpu")
    packed = {k: w for k, w in weights.items() if isinstance(w, (Q4Weight, Q8Weight))}
    for name, w in packed.items():  # these linear layers keep their weights as shipped
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), child, Q4Linear(w) if isinstance(w, Q4Weight) else Q8Linear(w))
        del weights[name]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    unexpected = [u for u in unexpected if "rotary_emb" not in u]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if cfg.tie_word_embeddings and "lm_head.weight" not in packed:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to_compute_dtype(dtype)
    model.init_rope()  # meta buffers hold no data; frequencies stay fp32
    # Moved before the projections are merged: the merged weights are made where they run.
    return model.to(device).eval().requires_grad_(False).fuse_projections()


# --- GGUF --------------------------------------------------------------------
def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (rotary pairs interleaved -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path, keep_quant: bool = False) -> tuple[LlamaConfig, dict[str, torch.Tensor | Q4Weight]]:
    import gguf

    meta, gguf_tensors = read_gguf_file(path)
    arch = meta.get("general.architecture")
    try:
        fam = family_for_gguf(arch)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None

    def m(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    heads = m("attention.head_count")
    hidden = m("embedding_length")
    tensors: dict[str, torch.Tensor | Q4Weight | Q8Weight] = {}
    has_output = any(t.name == "output.weight" for t in gguf_tensors)
    for t in gguf_tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        kind = t.tensor_type.name
        if keep_quant and kind in KEPT_QUANT and t.name.startswith("blk.") and len(shape) == 2:
            tensors[t.name] = q4_from_gguf(t.data, kind, shape)
            continue
        head = t.name == "output.weight" or (t.name == "token_embd.weight" and not has_output)
        if keep_quant and kind == "Q8_0" and head and len(shape) == 2:
            tensors["output.weight"] = q8_from_gguf(t.data, shape)  # the head, as shipped
            if t.name == "output.weight":
                continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    vocab = m("vocab_size") or tensors["token_embd.weight"].shape[0]  # dense: read for lookups
    scaling = None
    if m("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": m("rope.scaling.factor")}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    cfg = fam.classes()[0](
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(m("feed_forward_length")),
        num_layers=int(m("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=int(m("attention.key_length", hidden // heads)),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(m("context_length", 2048)),
        tie_word_embeddings=not has_output,
        attention_bias=any(name.endswith("attn_q.bias") for name in tensors),
        eos_token_ids=[int(eos)] if eos is not None else [],
        family=fam.name,
        qk_norm=fam.qk_norm,
        sliding_window=m("attention.sliding_window") if fam.sliding_window_key else None,
        **fam.gguf_config(m),
    )
    weights: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if name in _GGUF_NAMES:
            if fam.gguf_norm_offset and name == "output_norm.weight":
                w = w - fam.gguf_norm_offset
            weights[_GGUF_NAMES[name]] = w
            continue
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        names = {**_GGUF_LAYER_NAMES, **fam.gguf_names}
        if not match or match.group(2) not in names:
            continue  # e.g. rope_freqs: recomputed from the config
        layer, part, kind = match.groups()
        if fam.gguf_norm_offset and part.endswith("norm"):  # stored as offset + w
            w = w - fam.gguf_norm_offset
        if part in ("attn_q", "attn_k") and fam.gguf_permuted_qk:
            n = cfg.num_heads if part == "attn_q" else cfg.num_kv_heads
            w = (
                w.permute_rows(lambda t, n=n: _unpermute(t, n))
                if isinstance(w, Q4Weight)
                else _unpermute(w, n)
            )
        weights[f"layers.{layer}.{names[part]}.{kind}"] = w
    return cfg, weights


# --- safetensors ---------------------------------------------------------------
def read_safetensors_folder(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    hf = json.loads((path / "config.json").read_text())
    try:
        cfg = LlamaConfig.from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update({k: v.float() for k, v in load_file(str(f)).items()})
    return cfg, weights
