"""Reading GGUF files of each family: tiny models written as llama.cpp's converter writes
them (Q/K rows permuted for Llama-style architectures only, Qwen2's biases, Qwen3's q/k
norms), read back by the loader into the very HF weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ferrolm.models.loader import read_gguf  # noqa: E402

H, FF, HEADS, KV, D, VOCAB = 64, 96, 4, 2, 16, 50
NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, arch: str, bias: bool, qk_norm: bool, permute: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hf: dict[str, torch.Tensor] = {
        "embed_tokens.weight": torch.randn(VOCAB, H, generator=g),
        "norm.weight": torch.randn(H, generator=g),
        "lm_head.weight": torch.randn(VOCAB, H, generator=g),
    }
    shapes = {
        "q_proj": (HEADS * D, H),
        "k_proj": (KV * D, H),
        "v_proj": (KV * D, H),
        "o_proj": (H, HEADS * D),
        "gate_proj": (FF, H),
        "up_proj": (FF, H),
        "down_proj": (H, FF),
    }
    for name, shape in shapes.items():
        part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        hf[f"layers.0.{part}.{name}.weight"] = torch.randn(*shape, generator=g)
        if bias and name in ("q_proj", "k_proj", "v_proj"):
            hf[f"layers.0.{part}.{name}.bias"] = torch.randn(shape[0], generator=g)
    for name in ("input_layernorm", "post_attention_layernorm"):
        hf[f"layers.0.{name}.weight"] = torch.randn(H, generator=g)
    if qk_norm:
        for name in ("q_norm", "k_norm"):
            hf[f"layers.0.self_attn.{name}.weight"] = torch.randn(D, generator=g)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_context_length(256)
    w.add_vocab_size(VOCAB)
    for name, t in hf.items():
        a = t.numpy()
        if name == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, layer, *_, module, kind = name.split(".")
            gname = f"blk.{layer}.{NAMES[module]}.{kind}"
            if permute and module in ("q_proj", "k_proj"):
                a = _llama_cpp_permute(a, HEADS if module == "q_proj" else KV)
        w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize(
    "arch, bias, qk_norm, permute",
    [("llama", False, False, True), ("qwen2", True, False, False), ("qwen3", False, True, False)],
)
def test_gguf_reads_back_the_hf_weights(tmp_path, arch, bias, qk_norm, permute):
    path = tmp_path / f"{arch}.gguf"
    hf = _write(path, arch, bias, qk_norm, permute)
    cfg, weights = read_gguf(path)
    assert cfg.family == arch and cfg.attention_bias == bias and cfg.qk_norm == qk_norm
    assert set(weights) == set(hf)
    for name, t in hf.items():
        assert torch.equal(weights[name], t), name


def test_unknown_gguf_architecture_is_rejected(tmp_path):
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'rwkv6' is not supported \(supported: .*qwen2"):
        read_gguf(path)
