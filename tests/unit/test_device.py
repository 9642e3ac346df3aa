"""--device auto | cpu | cuda (config, env, LLM(device=...))."""

import pytest
import torch

from ferrolm import LLM


def test_device_choices_are_checked(tiny_model_dir):
    """--device: a wrong name lists the valid ones; cuda without a GPU says so."""
    from ferrolm.runtime import resolve_device

    with pytest.raises(ValueError, match="valid: auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(Exception, match="auto.*cpu.*cuda"):
        LLM(str(tiny_model_dir), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            LLM(str(tiny_model_dir), device="cuda")
        assert LLM(str(tiny_model_dir), dtype="float32", kv_cache_memory_gb=0.01).engine.device.type == "cpu"
