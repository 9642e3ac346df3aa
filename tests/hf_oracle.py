"""HF transformers on a GGUF file, the correctness oracle, kept between runs.

transformers reads a GGUF file slowly (its reader parses the file twice and rebuilds a name
map per tensor: ~23 s for the default model, ~53 s for Gemma 3 270M on a 2-core VM). The
model it builds, HF's own dequantization of the file in fp32, is saved once as safetensors
under FERROLM_HOME (as pulled models are) and loaded from there next time, keyed by the
file (path, size, mtime) and the transformers version, so the oracle stays HF's reading of
that file."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import torch


def hf_model_from_gguf(path: Path):
    import transformers
    from transformers import AutoModelForCausalLM

    from ferrolm.paths import ferrolm_home

    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    cache = ferrolm_home() / "test-oracles" / f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    if (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained refuses a model read from GGUF ("quantized with gguf"): its weights as
    # they are (fp32) and its config without the GGUF marker, a plain fp32 model to read back
    from safetensors.torch import save_model

    tmp.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    for stale in cache.parent.glob(f"{path.stem}-" + "?" * 16):  # the same file's other keys
        if stale != cache and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return model
