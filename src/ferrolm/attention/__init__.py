"""Attention over the paged KV cache, behind a backend seam (see backend.py)."""

from __future__ import annotations

from ferrolm.attention.backend import AttentionBackend
from ferrolm.attention.cpu_backend import CpuBackend
from ferrolm.attention.layer import PagedAttention, StepContext, paged_attention
from ferrolm.attention.metadata import AttentionGroup, AttentionMetadata
from ferrolm.attention.torch_backend import TorchBackend
from ferrolm.kv.spec import KvSpec

# "auto" takes the first that can run the spec: the compiled kernels where they build,
# else the torch reference.
BACKENDS: dict[str, type] = {"cpu": CpuBackend, "torch": TorchBackend}


def select_backend(name: str, spec: KvSpec) -> AttentionBackend:
    """'auto': the first backend that supports the spec; or the named one (an error says why
    it cannot run the spec, or lists the valid names)."""
    if name == "auto":
        for cls in BACKENDS.values():
            backend = cls()
            if backend.unsupported(spec) is None:
                return backend
        raise ValueError(f"no attention backend supports the KV spec {spec.describe()}")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    backend = BACKENDS[name]()
    why = backend.unsupported(spec)
    if why:
        raise ValueError(f"attention backend {name} cannot run the KV spec {spec.describe()}: {why}")
    return backend


__all__ = [
    "AttentionBackend",
    "AttentionGroup",
    "AttentionMetadata",
    "CpuBackend",
    "PagedAttention",
    "StepContext",
    "TorchBackend",
    "paged_attention",
    "select_backend",
]
