"""EngineConfig and its parts; files (TOML/YAML/JSON), FERROLM_* env vars, flags.

One table, FLAGS, names every setting a user can set outside a file: the
LLM(...) keyword (vLLM's name; engine settings only), the CLI flag (same name with
dashes, generated from the table with its help) and the environment variable
(FERROLM_ + the name in upper case). Precedence: flag > env > config file > default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ferrolm.kv.dtypes import KvCacheDtype

DEFAULT_MODEL = "smollm2-135m"
ENV_PREFIX = "FERROLM_"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Part):
    name: str = DEFAULT_MODEL
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    weight_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=1)
    max_logprobs: int = Field(default=20, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    enforce_eager: bool = False
    chat_template: str | None = None  # a built-in name, a Jinja file or a Jinja string

    @field_validator("dtype", "weight_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "float": "float32"}
        return aliases.get(str(v).lower(), str(v).lower()) if v is not None else v


class KvCacheConfig(_Part):
    dtype: KvCacheDtype = KvCacheDtype.FP16
    key_dtype: KvCacheDtype | None = None
    value_dtype: KvCacheDtype | None = None
    layer_dtypes: dict[str, str] | None = None
    rotation: Literal["auto", "on", "off"] = "auto"
    attention_backend: str = "auto"
    # None: 128 tokens, as vLLM's CPU backend (16 with a per-channel format, whose fp16
    # staging rows grow with the block). Decode attention walks each sequence's blocks, and
    # blocks scattered over the pool (sequences growing side by side, churn) cost it
    # 1.6-2.8x at 16 tokens (1-2 KB runs per head that the prefetchers do not keep up
    # with), 1.2-1.4x at 128 (README, "Block size").
    block_size: int | None = Field(default=None, ge=1)
    memory_gb: float = Field(default=2.0, gt=0)
    num_blocks: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True

    @field_validator("dtype", mode="before")
    @classmethod
    def _parse_dtype(cls, v: Any) -> KvCacheDtype:
        return KvCacheDtype.parse(v)

    @field_validator("key_dtype", "value_dtype", mode="before")
    @classmethod
    def _parse_half(cls, v: Any) -> KvCacheDtype | None:
        return None if v is None or v == "" else KvCacheDtype.parse(v)

    @field_validator("layer_dtypes", mode="before")
    @classmethod
    def _parse_layers(cls, v: Any) -> dict[str, str] | None:
        """A mapping, a JSON object, or 'LAYER=DTYPE[/DTYPE],...' (for flags and env vars);
        every value is checked here, the layer indices once the model is known."""
        if v is None or v == "":
            return None
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("{"):
                v = json.loads(text)
            else:
                items = [p.partition("=") for p in text.split(",") if p.strip()]
                if any(not sep for _, sep, _ in items):
                    raise ValueError(
                        f"layer_dtypes is 'LAYER=DTYPE[/DTYPE],...' or a JSON object, got {text!r}"
                    )
                v = {i.strip(): d.strip() for i, _, d in items}
        from ferrolm.kv.spec import parse_pair

        out = {}
        for index, pair in dict(v).items():
            parse_pair(pair)
            out[str(index)] = str(pair)
        return out

    def resolved_block_size(self, spec) -> int:
        """block_size, or the default for this KV spec (see block_size)."""
        if self.block_size is not None:
            return self.block_size
        return 16 if spec.staged else 128

    def spec(self, num_layers: int):
        """The KV spec for a model of num_layers layers (layer indices checked here)."""
        from ferrolm.kv.spec import KvSpec

        return KvSpec.build(
            num_layers, self.dtype, self.key_dtype, self.value_dtype, self.layer_dtypes, self.rotation
        )


class SchedulerConfig(_Part):
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)
    long_prefill_token_threshold: int | None = Field(default=None, ge=1)


class ServerConfig(_Part):
    """The HTTP server's settings and the limits it puts on one request."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_body_mb: float = Field(default=4.0, gt=0)
    max_n: int = Field(default=16, ge=1)
    max_prompts: int = Field(default=64, ge=1)
    max_stop: int = Field(default=16, ge=0)
    max_stop_len: int = Field(default=256, ge=1)
    request_timeout: float = Field(default=600.0, ge=0)
    enable_docs: bool = False


class EngineConfig(_Part):
    model: ModelConfig = Field(default_factory=ModelConfig)
    kv_cache: KvCacheConfig = Field(default_factory=KvCacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    # --- files -----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> EngineConfig:
        return cls.model_validate(read_config_file(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.dumps(_format_of(path)))

    def dumps(self, fmt: str = "toml") -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if fmt == "json":
            return json.dumps(data, indent=2) + "\n"
        if fmt == "yaml":
            import yaml

            return yaml.safe_dump(data, sort_keys=False)
        if fmt == "toml":
            import tomli_w

            return tomli_w.dumps(data)
        raise ValueError(f"unknown config format {fmt!r}; use toml, yaml or json")

    # --- flags and environment --------------------------------------------------
    def with_flags(self, flags: Mapping[str, Any], table: Mapping[str, Flag] | None = None) -> EngineConfig:
        """A copy with FLAGS-named values applied (None means 'not given'). `table`
        limits which names are accepted (LLM(...) takes ENGINE_FLAGS only)."""
        table = FLAGS if table is None else table
        data = self.model_dump()
        for name, value in flags.items():
            if value is None:
                continue
            if name not in table:
                valid = ", ".join(sorted(table))
                raise TypeError(f"unknown engine setting {name!r}; valid: {valid}")
            flag = table[name]
            data[flag.part][flag.field] = value
        return EngineConfig.model_validate(data)

    @classmethod
    def resolve(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> EngineConfig:
        """Defaults < config file < FERROLM_* environment < flags."""
        env = os.environ if env is None else env
        config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
        cfg = cls.load(config_file) if config_file else cls()
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        return cfg.with_flags({**env_flags(env), **given})


@dataclass(frozen=True)
class Flag:
    part: str  # EngineConfig part
    field: str  # field of that part
    help: str

    @property
    def default(self) -> Any:
        return _PARTS[self.part].model_fields[self.field].default

    @property
    def annotation(self) -> Any:
        return _PARTS[self.part].model_fields[self.field].annotation


_PARTS: dict[str, type[_Part]] = {
    "model": ModelConfig,
    "kv_cache": KvCacheConfig,
    "scheduler": SchedulerConfig,
    "server": ServerConfig,
}

# Settings of the engine: LLM(...) keywords and the flags of run, serve and config.
ENGINE_FLAGS: dict[str, Flag] = {
    "model": Flag("model", "name", "Registry name, .gguf file or HF safetensors folder."),
    "dtype": Flag(
        "model",
        "dtype",
        "Compute dtype: auto (bfloat16 where the CPU has native bf16, AVX512-BF16 or AMX; "
        "else float32), float32, bfloat16.",
    ),
    "weight_dtype": Flag(
        "model",
        "weight_dtype",
        "Weights: auto (GGUF Q4_0/Q4_1 linear layers stay 4-bit as shipped, the rest in the compute "
        "dtype), float32 or bfloat16 (every weight dequantized to that dtype, which the layers then compute in).",
    ),
    "device": Flag(
        "model",
        "device",
        "Where the model and the KV cache live: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda.",
    ),
    "enforce_eager": Flag(
        "model",
        "enforce_eager",
        "Run every step eagerly: no CUDA graphs for decode steps (with the Triton backend).",
    ),
    "chat_template": Flag(
        "model",
        "chat_template",
        "Chat template for /v1/chat/completions and --chat, overriding the model's: a built-in "
        "(gemma, chatml, mistral), a Jinja file or a Jinja string [default: the model's own; "
        "its family's built-in where the file has none].",
    ),
    "max_model_len": Flag("model", "max_model_len", "Longest prompt + completion [default: the model's]."),
    "max_logprobs": Flag("model", "max_logprobs", "Most logprobs a request may ask for per token."),
    "kv_cache_dtype": Flag(
        "kv_cache", "dtype", f"KV cache dtype: {', '.join(d.value for d in KvCacheDtype)} (or an alias)."
    ),
    "kv_cache_key_dtype": Flag("kv_cache", "key_dtype", "KV dtype of the keys [default: --kv-cache-dtype]."),
    "kv_cache_value_dtype": Flag(
        "kv_cache", "value_dtype", "KV dtype of the values [default: --kv-cache-dtype]."
    ),
    "kv_cache_layer_dtypes": Flag(
        "kv_cache",
        "layer_dtypes",
        "Per-layer overrides, 'LAYER=DTYPE[/DTYPE],...' (e.g. '0=fp16,-1=fp16') or a JSON object.",
    ),
    "kv_cache_rotation": Flag(
        "kv_cache", "rotation", "Hadamard rotation of scaled KV formats: auto (each format's own), on, off."
    ),
    "attention_backend": Flag(
        "kv_cache",
        "attention_backend",
        "Attention backend: auto (on a CPU the compiled kernels where they build, on CUDA the Triton "
        "kernels, else torch), cpu, triton or torch.",
    ),
    "kv_cache_memory_gb": Flag("kv_cache", "memory_gb", "KV cache budget in GiB."),
    "kv_cache_num_blocks": Flag(
        "kv_cache",
        "num_blocks",
        "Explicit KV block count, in blocks of every layer (overrides the budget; sliding-window "
        "models hold the same memory in blocks of their layer groups).",
    ),
    "block_size": Flag(
        "kv_cache", "block_size", "Tokens per KV block (default 128; 16 with a per-channel format)."
    ),
    "enable_prefix_caching": Flag("kv_cache", "enable_prefix_caching", "Reuse cached prompt prefixes."),
    "max_num_seqs": Flag("scheduler", "max_num_seqs", "Most sequences per step."),
    "max_num_batched_tokens": Flag("scheduler", "max_num_batched_tokens", "Most tokens per step."),
    "long_prefill_token_threshold": Flag(
        "scheduler", "long_prefill_token_threshold", "Most prompt tokens one sequence computes per step."
    ),
}

# Settings of the HTTP server (ferrolm serve; [server] in a config file).
SERVER_FLAGS: dict[str, Flag] = {
    "host": Flag("server", "host", "Address to bind (loopback unless told otherwise)."),
    "port": Flag("server", "port", "Port to listen on."),
    "api_key": Flag("server", "api_key", "Require 'Authorization: Bearer KEY' on /v1/* (and /docs)."),
    "served_model_name": Flag(
        "server", "served_model_name", "Model id clients use [default: the --model string]."
    ),
    "max_request_body_mb": Flag("server", "max_request_body_mb", "Largest request body in MiB (413 above)."),
    "max_n": Flag("server", "max_n", "Most completions per request (n)."),
    "max_prompts": Flag("server", "max_prompts", "Most prompts in one /v1/completions request."),
    "max_stop": Flag("server", "max_stop", "Most stop strings per request."),
    "max_stop_len": Flag("server", "max_stop_len", "Longest stop string, in characters."),
    "request_timeout": Flag(
        "server", "request_timeout", "Seconds a request may run before it is aborted (0: no limit)."
    ),
    "enable_docs": Flag("server", "enable_docs", "Serve /docs, /redoc and /openapi.json."),
}

FLAGS: dict[str, Flag] = {**ENGINE_FLAGS, **SERVER_FLAGS}


def env_var(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def env_flags(env: Mapping[str, str]) -> dict[str, str]:
    """Settings given as FERROLM_* variables (values stay strings; pydantic parses)."""
    return {name: env[env_var(name)] for name in FLAGS if env.get(env_var(name), "") != ""}


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    formats = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
    if suffix not in formats:
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    return formats[suffix]


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    fmt = _format_of(path)
    text = path.read_text()
    if fmt == "json":
        return json.loads(text)
    if fmt == "yaml":
        import yaml

        return yaml.safe_load(text) or {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def explain(error: Exception) -> str:
    """A one-line-per-problem message for a pydantic ValidationError (or any error)."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)
