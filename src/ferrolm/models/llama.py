"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2 ...) in plain torch.

RMSNorm, RoPE (theta and scaling from the config), grouped-query attention over
the paged KV pool, SwiGLU MLP. Weights use Hugging Face names and layout.
Works on flat token batches: [T, hidden] with per-token positions.

Precision: the linear layers run in the compute dtype (bf16 or fp32); the residual
stream, the norms and the logits are always fp32. Rounding logits to bf16 quantizes
them to steps of 1/16-1/8 at the magnitudes this model produces, which turned a
0.08-nat lead ("The capital ..." over "L'Étoile ...") into a tie or a flip; a bf16
residual stream doubled the KL to fp32 again. Both cost little: the residual is
[T, hidden], and the fp32 head only reads the step's last rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferrolm.attention import PagedAttention, StepContext
from ferrolm.models.fused import FusedLinear, fuse
from ferrolm.models.layer_ops import add_rms_norm, rope_, silu_mul


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    family: str = "llama"  # models/families.py
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # keys a query sees at most (Mistral); None: all

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face config.json dict (its model_type picks the family)."""
        from ferrolm.models.families import family_for_hf

        fam = family_for_hf(cfg.get("model_type", "llama"))
        config_class = fam.classes()[0]
        if config_class is not cls and cls is LlamaConfig:  # another family's own config
            return config_class.from_hf(cfg)
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=(
                cfg.get("attention_bias", False) if fam.attention_bias is None else fam.attention_bias
            ),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            family=fam.name,
            qk_norm=fam.qk_norm,
            sliding_window=cfg.get(fam.sliding_window_key) if fam.sliding_window_key else None,
        )


def rope_base_freq(theta: float, d: int) -> torch.Tensor:
    """1 / theta^(2i / d), i < d / 2, in fp64 on the CPU (made on the meta device the model is
    built on, torch.arange imported torch._dynamo: ~3 s of every start-up)."""
    return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with linear or llama3 scaling if the config asks for it."""
    inv = rope_base_freq(cfg.rope_theta, cfg.head_dim)
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(mid, scaled, inv)
    elif kind not in ("default", None):
        raise NotImplementedError(f"rope scaling {kind!r} is not supported")
    return inv.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, out_dtype: torch.dtype, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: the fp32 residual stream [T, H], first increased by `delta` in place when given;
        returns the normalised x in out_dtype (computed in fp32)."""
        return add_rms_norm(x, delta, self.weight, self.eps, out_dtype)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head norm (Qwen3's q/k norms): x [T, heads, D] -> the same shape and dtype,
        computed in fp32 (a new contiguous tensor)."""
        xf = x.float()
        y = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        return y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kvh * self.d, bias=bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(layer, self.d**-0.5, cfg.sliding_window)
        self.qkv: FusedLinear | None = None  # set by LlamaModel.fuse_projections

    def fuse(self) -> None:
        object.__setattr__(self, "qkv", fuse([self.q_proj, self.k_proj, self.v_proj]))

    def forward(self, x, cos, sin, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        if self.qkv is not None:
            q, k, v = self.qkv.split(self.qkv(x))
            if not x.is_cuda:  # the CPU kernels take contiguous rows; CUDA ones take strides
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(T, self.h, self.d), k.view(T, self.kvh, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm.heads(q), self.k_norm.heads(k)
        q = rope_(q, cos, sin)
        k = rope_(k, cos, sin)
        v = v.view(T, self.kvh, self.d)
        return self.o_proj(self.attn(q, k, v, ctx))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: FusedLinear | None = None  # set by LlamaModel.fuse_projections

    def fuse(self) -> None:
        object.__setattr__(self, "gate_up", fuse([self.gate_proj, self.up_proj]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            return self.down_proj(silu_mul(self.gate_up(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.compute_dtype = torch.float32  # of the sublayers' inputs (set by to_compute_dtype)

    def forward(self, x, delta, cos, sin, ctx: StepContext) -> torch.Tensor:
        """x: the fp32 residual stream, updated in place: first by `delta` (the previous
        layer's MLP output, or None), then by this layer's attention; returns this layer's
        MLP output, which the next norm adds. The sublayers compute in the compute dtype."""
        dt = self.compute_dtype
        attn = self.self_attn(self.input_layernorm(x, dt, delta), cos, sin, ctx)
        return self.mlp(self.post_attention_layernorm(x, dt, attn))


def token_embedding(cfg: LlamaConfig) -> nn.Embedding:
    """The token table, uninitialised (the loader fills it): nn.Embedding's own normal_
    init on the meta device the model is built on imports torch._dynamo (see rope_base_freq)."""
    return nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = token_embedding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_rope(self) -> None:
        """(Re)compute the RoPE frequencies (buffers made on the meta device hold none)."""
        self.inv_freq = rope_inv_freq(self.config)

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention), for the KV groups."""
        return [layer.self_attn.attn.window for layer in self.layers]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (after the norm)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.unsqueeze(0)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(input_ids).float()  # a fresh tensor: the layers update it in place
        if ctx.plan is not None:  # the same layers as one compiled loop (models/decoder_plan.py)
            m = ctx.meta
            delta = ctx.plan.run(
                x, cos, sin, m.slot_mapping, m.block_tables, m.q_start, m.ctx_len, torch.get_num_threads()
            )
        else:
            delta = None
            for layer in self.layers:
                delta = layer(x, delta, cos, sin, ctx)
        return self.norm(x, torch.float32, delta)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 hidden states -> fp32 logits, with an fp32 head (see the module docstring)."""
        if not isinstance(self.lm_head, nn.Linear):  # kept as shipped (Q8Linear): fp32 out
            return self.lm_head(hidden.float())
        return F.linear(hidden.float(), self.lm_head.weight.float())

    def weights_description(self) -> str:
        """'4-bit as shipped (210 linear layers), rest bfloat16' or 'bfloat16'."""
        from ferrolm.models.quant_linear import Q4Linear

        n = sum(isinstance(m, Q4Linear) for m in self.modules())
        dense = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        head = "" if isinstance(self.lm_head, nn.Linear) else ", Q8_0 head as shipped"
        return f"4-bit as shipped ({n} linear layers){head}, rest {dense}" if n else dense

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight as a dense tensor (4-bit layers dequantized), HF names without "model."."""
        from ferrolm.models.quant_linear import Q4Linear, Q8Linear

        state = dict(self.state_dict())
        for name, mod in self.named_modules():
            if isinstance(mod, (Q4Linear, Q8Linear)):
                state[f"{name}.weight"] = mod.dense_weight()
        return state

    def fuse_projections(self) -> LlamaModel:
        """q/k/v and gate/up each become one matrix (models/fused.py); call after the last
        dtype change (the original layers then hold row-slices of the merged weights)."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def to_compute_dtype(self, dtype: torch.dtype) -> LlamaModel:
        """Linear layers and the embedding to `dtype`; norms and the output head stay fp32
        (the head becomes an untied fp32 copy when it shares the bf16 embedding)."""
        keep = {n: p.detach().float() for n, p in self.named_parameters() if n.endswith("norm.weight")}
        dense_head = isinstance(self.lm_head, nn.Linear)
        head = self.lm_head.weight.detach().float() if dense_head else None
        self.to(dtype)
        for layer in self.layers:
            layer.compute_dtype = dtype
        for name, value in keep.items():
            self.get_parameter(name).data = value
        if dense_head and self.lm_head.weight.dtype != torch.float32:
            self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        if not dense_head:  # a Q8_0 head as shipped: bf16 products with its top rescored
            self.lm_head.bf16_products = dtype == torch.bfloat16
        return self
