"""Shared fixtures: a tiny random Llama (fast unit tests) and the real default model."""

from __future__ import annotations

import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (serving.py) import as top-level modules

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# this when it is first imported (its own library functions are compiled or interpreted
# from then on), so it is set here, before any test module can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_random_state(request):
    """Each test starts from a random state of its own, fixed by its name: its torch.randn
    draws no longer depend on which tests ran before it, so a failure reproduces when the
    test runs alone (`pytest tests/...::name`) and in every order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


TINY = dict(
    vocab_size=384,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # as DESIGN.md asks: the capacity ratios depend on head_dim
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    eos_token_id=2,
    bos_token_id=1,
)


def sotu_text() -> str:
    from ferrolm.data import sample_text

    return sample_text()


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sotu_text()[:20000]], trainer)
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=template
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised Llama saved as an HF safetensors folder, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer(TINY["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from ferrolm.models.registry import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def hf_default_model(default_model_path):
    """HF transformers on the same GGUF weights, the correctness oracle (kept between runs:
    hf_oracle.py)."""
    from hf_oracle import hf_model_from_gguf

    return hf_model_from_gguf(default_model_path)
