"""EngineConfig and its parts; files (TOML/YAML/JSON), FERROLM_* env vars, flags.

One table, ENGINE_FLAGS, names every engine setting a user can set outside a file:
the LLM(...) keyword (vLLM's name), the CLI flag (same name with dashes) and the
environment variable (FERROLM_ + the name in upper case). Precedence:
flag > env > config file > default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    max_model_len: int | None = Field(default=None, ge=1)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "float": "float32"}
        return aliases.get(str(v).lower(), str(v).lower()) if v is not None else v


class KvCacheConfig(_Part):
    dtype: KvCacheDtype = KvCacheDtype.FP16
    block_size: int = Field(default=16, ge=1)
    memory_gb: float = Field(default=2.0, gt=0)
    num_blocks: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True

    @field_validator("dtype", mode="before")
    @classmethod
    def _parse_dtype(cls, v: Any) -> KvCacheDtype:
        return KvCacheDtype.parse(v)


class SchedulerConfig(_Part):
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=1)


class EngineConfig(_Part):
    model: ModelConfig = Field(default_factory=ModelConfig)
    kv_cache: KvCacheConfig = Field(default_factory=KvCacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

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
    def with_flags(self, flags: Mapping[str, Any]) -> EngineConfig:
        """A copy with ENGINE_FLAGS-named values applied (None means 'not given')."""
        data = self.model_dump()
        for name, value in flags.items():
            if value is None:
                continue
            if name not in ENGINE_FLAGS:
                valid = ", ".join(sorted(ENGINE_FLAGS))
                raise TypeError(f"unknown engine setting {name!r}; valid: {valid}")
            part, field = ENGINE_FLAGS[name]
            data[part][field] = value
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


# LLM keyword / CLI flag name -> (config part, field).
ENGINE_FLAGS: dict[str, tuple[str, str]] = {
    "model": ("model", "name"),
    "dtype": ("model", "dtype"),
    "max_model_len": ("model", "max_model_len"),
    "kv_cache_dtype": ("kv_cache", "dtype"),
    "kv_cache_memory_gb": ("kv_cache", "memory_gb"),
    "kv_cache_num_blocks": ("kv_cache", "num_blocks"),
    "block_size": ("kv_cache", "block_size"),
    "enable_prefix_caching": ("kv_cache", "enable_prefix_caching"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
}


def env_var(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def env_flags(env: Mapping[str, str]) -> dict[str, str]:
    """Engine settings given as FERROLM_* variables (values stay strings; pydantic parses)."""
    return {name: env[env_var(name)] for name in ENGINE_FLAGS if env.get(env_var(name), "") != ""}


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
