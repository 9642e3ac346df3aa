"""Attention over the paged KV cache, behind a backend seam (see backend.py)."""

from __future__ import annotations

import torch

from ferrolm.attention.backend import AttentionBackend
from ferrolm.attention.cpu_backend import CpuBackend
from ferrolm.attention.layer import PagedAttention, StepContext, paged_attention
from ferrolm.attention.metadata import AttentionGroup, AttentionMetadata
from ferrolm.attention.torch_backend import TorchBackend
from ferrolm.attention.triton_backend import TritonBackend
from ferrolm.kv.spec import KvSpec

# "auto" takes the first that runs on the device and can run the spec: on a CPU the
# compiled kernels where they build, on CUDA the Triton kernels; else the torch reference.
BACKENDS: dict[str, type] = {"cpu": CpuBackend, "triton": TritonBackend, "torch": TorchBackend}


def _make(cls: type, spec: KvSpec, device: torch.device) -> tuple[AttentionBackend | None, str | None]:
    """(the backend, None), or (None, why it cannot run the spec on the device). The device
    is asked of the class first: the CPU backend builds its kernels when made."""
    if not cls.supports_device(device):
        return None, f"it does not run on {device.type} tensors"
    if device.type != "cpu" and spec.staged:
        return None, "per-channel formats (int4pc) keep their staging bookkeeping on the CPU"
    backend = cls()
    why = backend.unsupported(spec)
    return (None, why) if why else (backend, None)


def select_backend(name: str, spec: KvSpec, device: torch.device | str = "cpu") -> AttentionBackend:
    """'auto': the first backend that runs on `device` and supports the spec; or the named
    one (an error says why it cannot, or lists the valid names)."""
    device = torch.device(device)
    if name == "auto":
        reasons = []
        for key, cls in BACKENDS.items():
            if key == "triton" and device.type == "cpu":
                continue  # Triton on CPU tensors is its interpreter: for tests, never chosen
            backend, why = _make(cls, spec, device)
            if backend is not None:
                return backend
            reasons.append(f"{key}: {why}")
        raise ValueError(
            f"no attention backend runs the KV spec {spec.describe()} on {device.type} ({'; '.join(reasons)})"
        )
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    backend, why = _make(BACKENDS[name], spec, device)
    if why:
        raise ValueError(
            f"attention backend {name} cannot run the KV spec {spec.describe()} on {device.type}: {why}"
        )
    return backend


__all__ = [
    "AttentionBackend",
    "AttentionGroup",
    "AttentionMetadata",
    "CpuBackend",
    "PagedAttention",
    "StepContext",
    "TorchBackend",
    "TritonBackend",
    "paged_attention",
    "select_backend",
]
