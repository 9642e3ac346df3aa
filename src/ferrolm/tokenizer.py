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

# Tokens that end a turn or a text in the common formats: generation stops at any of them
# the vocabulary holds as a token (llama.cpp's end-of-generation set), so a chat reply
# ends at its turn's end even where the file names only the text's end as EOS.
END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    def __init__(
        self,
        hf_tokenizer: Any,
        extra_eos_ids: list[int] | None = None,
        chat_template: str | None = None,
        family_template: str | None = None,
    ) -> None:
        """chat_template: `--chat-template` (overrides the model's); family_template: the
        built-in used when the model's files carry none."""
        self.hf = hf_tokenizer
        # A fast tokenizer's own decode, where the wrapper would add nothing to it (no clean-up
        # of spaces): the wrapper's argument handling took ~6.6 us a call against ~2.3, and
        # the detokenizer calls decode twice per generated token.
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleans = getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = backend.decode if backend is not None and not cleans else None
        eos = set(extra_eos_ids or [])
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        eos.update(self._end_of_generation_ids())
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.chat_template, self.chat_template_source = self._pick_template(chat_template, family_template)

    def _end_of_generation_ids(self) -> set[int]:
        vocab = self.hf.get_vocab()
        special = set(getattr(self.hf, "all_special_tokens", [])) | {
            t.content for t in getattr(self.hf, "added_tokens_decoder", {}).values()
        }
        return {vocab[t] for t in END_OF_GENERATION if t in vocab and t in special}

    def _pick_template(self, override: str | None, family: str | None) -> tuple[str | None, str]:
        from ferrolm.models import chat_templates

        if override:
            return chat_templates.resolve(override)
        own = getattr(self.hf, "chat_template", None)
        if own:
            return own, "the model's"
        if family:
            return chat_templates.BUILTIN[family], f"built-in {family!r} (the model's files have none)"
        return None, "none"

    @classmethod
    def from_model_path(
        cls, path: str | Path, extra_eos_ids: list[int] | None = None, **templates
    ) -> Tokenizer:
        return cls(load_hf_tokenizer(Path(path)), extra_eos_ids, **templates)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn opened."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template; send a plain prompt, or start with --chat-template"
            )
        text = self.hf.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
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
