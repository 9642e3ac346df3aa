"""Gemma 3 (text) in plain torch, in the style of llama.py.

What differs from Llama: the embedding is scaled by sqrt(hidden); RMSNorm multiplies by
(1 + w); four norms per layer (before and after attention, before and after the MLP, the
"after" ones applied to the sublayer's output before the residual add); per-head q/k
norms before RoPE; attention scaled by query_pre_attn_scalar^-0.5; GeGLU with tanh GELU;
local layers with a sliding window and their own RoPE base, a global layer every few
(`layer_types`); an optional final logit soft-cap. Precision as in llama.py: residual,
norms and logits in fp32, linear layers in the compute dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ferrolm.attention import PagedAttention, StepContext
from ferrolm.models.llama import MLP, Attention, LlamaConfig, LlamaModel, rope_base_freq, token_embedding
from ferrolm.models.llama import rope_inv_freq as _llama_inv_freq

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Gemma3Config(LlamaConfig):
    layer_types: list[str] = field(default_factory=list)
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:  # Gemma 3's pattern (and llama.cpp's): every sixth layer global
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers)]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> Gemma3Config:
        cfg = cfg.get("text_config", cfg)  # the multimodal config nests the text model's
        heads = cfg["num_attention_heads"]
        n = cfg["num_hidden_layers"]
        every = cfg.get("sliding_window_pattern", 6)
        types = cfg.get("layer_types") or [FULL if (i + 1) % every == 0 else SLIDING for i in range(n)]
        rope = cfg.get("rope_parameters") or {}
        full, local = rope.get(FULL, {}), rope.get(SLIDING, {})
        scaling = cfg.get("rope_scaling") or (full if full.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=n,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", full.get("rope_theta", 1_000_000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            attention_bias=cfg.get("attention_bias", False),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            family="gemma3",
            qk_norm=True,
            sliding_window=cfg.get("sliding_window", 512),
            layer_types=list(types),
            rope_local_theta=cfg.get("rope_local_base_freq", local.get("rope_theta", 10000.0)),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
        )


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w), in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
        return y.to(out_dtype or x.dtype)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head norm (q/k norms, as llama.py's Attention calls it): same shape and dtype."""
        return self(x)


class Gemma3Attention(Attention):
    """Llama's attention with Gemma's (1 + w) q/k norms, query_pre_attn_scalar and a window
    on local layers only."""

    def __init__(self, cfg: Gemma3Config, layer: int) -> None:
        super().__init__(cfg, layer)
        self.q_norm = GemmaRMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.d, cfg.rms_norm_eps)
        self.local = cfg.layer_types[layer] == SLIDING
        window = cfg.sliding_window if self.local else None
        self.attn = PagedAttention(layer, cfg.query_pre_attn_scalar**-0.5, window)


class Gemma3MLP(MLP):
    """GeGLU: gelu_tanh(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = self.gate_up.split(self.gate_up(x))
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(g, approximate="tanh") * u)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = Gemma3MLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.compute_dtype = torch.float32

    def forward(self, x, rope, ctx: StepContext) -> None:
        """x: the fp32 residual stream, updated in place by both sublayers."""
        dt = self.compute_dtype
        cos, sin = rope[self.self_attn.local]
        a = self.self_attn(self.input_layernorm(x, dt), cos, sin, ctx)
        x.add_(self.post_attention_layernorm(a, torch.float32))
        m = self.mlp(self.pre_feedforward_layernorm(x, dt))
        x.add_(self.post_feedforward_layernorm(m, torch.float32))


class Gemma3Model(LlamaModel):
    def __init__(self, cfg: Gemma3Config) -> None:
        nn.Module.__init__(self)
        self.config = cfg
        self.embed_tokens = token_embedding(cfg)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("inv_freq_local", local_inv_freq(cfg), persistent=False)

    def init_rope(self) -> None:
        self.inv_freq = rope_inv_freq(self.config)
        self.inv_freq_local = local_inv_freq(self.config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rope = {}
        for local, inv in ((False, self.inv_freq), (True, self.inv_freq_local)):
            freqs = positions.float().unsqueeze(-1) * inv.unsqueeze(0)
            emb = torch.cat((freqs, freqs), dim=-1)
            rope[local] = (emb.cos(), emb.sin())
        # The embedding scale rounded to the embedding's dtype, as HF does (a Python number:
        # no tensor made per step, which a CUDA graph could not capture).
        x = (self.embed_tokens(input_ids) * _embed_scale(self.config.hidden_size, self.dtype)).float()
        for layer in self.layers:
            layer(x, rope, ctx)
        return self.norm(x, torch.float32)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


@functools.cache
def _embed_scale(hidden: int, dtype: torch.dtype) -> float:
    return float(torch.tensor(math.sqrt(hidden)).to(dtype))


def rope_inv_freq(cfg: Gemma3Config) -> torch.Tensor:
    """The global layers' frequencies (long base, the config's scaling)."""
    return _llama_inv_freq(cfg)


def local_inv_freq(cfg: Gemma3Config) -> torch.Tensor:
    """The local (sliding-window) layers' frequencies: their own base, no scaling."""
    return rope_base_freq(cfg.rope_local_theta, cfg.head_dim).float()
