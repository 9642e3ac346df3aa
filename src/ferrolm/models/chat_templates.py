"""Built-in chat templates, for models whose files carry none.

A model's own template (GGUF `tokenizer.chat_template`, HF `tokenizer_config.json` or
`chat_template.jinja`) always wins. A file without one (Gemma 3's base GGUF, many
community conversions) falls back to its family's turn format, as ollama's per-family
templates and llama.cpp's built-in ones do; `--chat-template` (a built-in name, a
Jinja file or a Jinja string, as vLLM's flag) overrides both.
"""

from __future__ import annotations

from pathlib import Path

# BOS; a system message becomes `prefix` for the first user turn; the other messages are
# `turns`, which must alternate user / assistant (Gemma's and Mistral's own templates).
_ALTERNATING_TURNS = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant/user/...') }}"
    "{%- endif -%}"
)

# Gemma's turns (<start_of_turn>user ... <end_of_turn>, the reply's role is "model").
GEMMA = (
    _ALTERNATING_TURNS + "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# ChatML (Qwen, SmolLM, and llama.cpp's fallback for a model without a template).
CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Mistral's [INST] turns; a system message goes before the first instruction.
MISTRAL = (
    _ALTERNATING_TURNS
    + "{%- if m['role'] == 'user' -%}{{ '[INST] ' + (prefix if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else -%}{{ m['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN: dict[str, str] = {"gemma": GEMMA, "chatml": CHATML, "mistral": MISTRAL}


def resolve(value: str) -> tuple[str, str]:
    """`--chat-template` -> (Jinja source, where it came from): a built-in name, a file,
    or (containing '{{' or '{%') the template itself."""
    if value in BUILTIN:
        return BUILTIN[value], f"built-in {value!r}"
    if "{{" in value or "{%" in value:
        return value, "--chat-template (inline)"
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(), f"file {path}"
    raise ValueError(
        f"--chat-template {value!r} is neither a built-in template ({', '.join(BUILTIN)}), "
        "a file, nor a Jinja template"
    )
