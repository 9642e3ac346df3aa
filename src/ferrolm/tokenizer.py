"""Tokenizer, chat template and incremental detokenization.

Wraps the model's own Hugging Face tokenizer so that special tokens (BOS or not)
follow the model's tokenizer config exactly as transformers does. A GGUF file's
tokenizer is converted once by transformers and cached as tokenizer.json beside
the engine's other files, since the conversion takes seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ferrolm.paths import ferrolm_home


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, extra_eos_ids: list[int] | None = None) -> None:
        self.hf = hf_tokenizer
        eos = set(extra_eos_ids or [])
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_model_path(cls, path: str | Path, extra_eos_ids: list[int] | None = None) -> Tokenizer:
        return cls(load_hf_tokenizer(Path(path)), extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn opened."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model has no chat template; send a plain prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already holds any BOS it wants; don't add special tokens twice.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    cache = _tokenizer_cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = cache.with_name(cache.name + ".tmp")
    tok.save_pretrained(str(tmp))
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    tmp.rename(cache)
    return tok


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return ferrolm_home() / "tokenizers" / f"{gguf_path.stem}-{key}"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a window of recent tokens and only emits text once it no longer ends in
    an incomplete UTF-8 sequence (shown by the replacement character), so a
    multi-byte character split over several tokens is never emitted in halves.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        delta = full[len(prefix) :]
        self.text += delta
        return delta
