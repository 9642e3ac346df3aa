"""The decoder layers as one compiled loop (kernels/decoder.cpp), where it applies.

A one-sequence decode step is ~300 small kernel calls; from Python each costs several
microseconds of interpreter and dispatcher work, a quarter of the step. The plan holds
every layer's weights and KV cache tensors once (built at the first step on a pool) and
runs the same ops in the same order as the Python layers, so the results are identical.
It applies with the compiled attention backend on formats it reads in place (not the
per-channel int4pc staging), merged q/k/v and gate/up projections, 4-bit or dense weights;
anything else runs the Python layers, which stay the reference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ferrolm.attention.cpu_backend import KERNEL_HEAD_DIMS, MAX_ROWS, CpuBackend, format_code
from ferrolm.kv.pool import HalfCache, KvPool
from ferrolm.models.quant_linear import Q4Linear

log = logging.getLogger("ferrolm")


def _linear_parts(layer: nn.Module | None) -> tuple[list[torch.Tensor], torch.Tensor | None] | None:
    if isinstance(layer, Q4Linear):
        return [layer.q4.codes, layer.q4.scales, layer.q4.mins], None
    if type(layer) is nn.Linear:
        return [layer.weight.detach()], None if layer.bias is None else layer.bias.detach()
    return None


def _half_args(backend: CpuBackend, half: HalfCache) -> list:
    lut, mids = backend.tables(half.fmt)
    return [
        half.data,
        half.scale,
        format_code(half.fmt),
        float(half.fmt.qmax or 0.0),
        mids,
        lut,
        int(half.fmt.rotated),
    ]


def why_not(model, pool: KvPool, backend) -> str | None:
    """Why the compiled layer loop cannot run this model on this pool (None: it can)."""
    if not isinstance(backend, CpuBackend):
        return f"the {getattr(backend, 'name', backend)} attention backend"
    if (unsupported := backend.unsupported(pool.spec)) is not None:
        return unsupported
    if pool.head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {pool.head_dim}"
    if any(h.staging is not None for h in (*pool.keys, *pool.values)):
        return "a per-channel format with staging rows"
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv is None or mlp.gate_up is None:
            return "projections not merged"
        if attn.q_norm is not None:
            return "per-head q/k norms"
        if attn.attn.window:
            return "a sliding window"
        parts = [_linear_parts(m) for m in (attn.qkv.merged, attn.o_proj, mlp.gate_up.merged, mlp.down_proj)]
        if any(p is None for p in parts) or any(p[1] is not None for p in parts[1:]):
            return "a linear layer of another kind"
        if layer.compute_dtype not in (torch.float32, torch.bfloat16):
            return f"compute dtype {layer.compute_dtype}"
    return None


def build_plan(model, pool: KvPool, backend):
    """A ferrolm_cpu.DecoderPlan for this model and pool, or None (logged once: why not)."""
    reason = why_not(model, pool, backend)
    if reason is not None:
        log.info("decoder layers: Python (the compiled loop does not apply: %s)", reason)
        return None
    cfg = model.config
    first = model.layers[0]
    plan = torch.classes.ferrolm_cpu.DecoderPlan(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        pool.block_size,
        MAX_ROWS,
        cfg.rms_norm_eps,
        first.self_attn.attn.scale,
        first.compute_dtype == torch.bfloat16,
    )
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _linear_parts(attn.qkv.merged)
        plan.add_layer(
            layer.input_layernorm.weight.detach(),
            layer.post_attention_layernorm.weight.detach(),
            qkv,
            qkv_bias,
            _linear_parts(attn.o_proj)[0],
            _linear_parts(mlp.gate_up.merged)[0],
            _linear_parts(mlp.down_proj)[0],
            *_half_args(backend, pool.keys[i]),
            *_half_args(backend, pool.values[i]),
        )
    log.info("decoder layers: one compiled loop (%d layers)", len(model.layers))
    return plan
