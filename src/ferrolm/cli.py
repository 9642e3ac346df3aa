"""ferrolm command line: run | pull | list.

Every flag has an environment variable, FERROLM_ + the flag in upper case with
dashes as underscores. Precedence: flag > env > config file > default.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ferrolm.config import EngineConfig, env_var, explain

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="ferrolm: LLM inference with a choice of KV cache dtype."
)


def _opt(flag: str, help: str, negatable: bool = False):
    """A typer option whose env var follows the FERROLM_<FLAG> rule."""
    decl = f"--{flag}/--no-{flag}" if negatable else f"--{flag}"
    return typer.Option(decl, envvar=env_var(flag), help=help, show_envvar=True)


Model = Annotated[Optional[str], _opt("model", "Registry name, .gguf file or HF safetensors folder.")]
Dtype = Annotated[Optional[str], _opt("dtype", "Compute dtype: auto (bfloat16), float32, bfloat16.")]
KvDtype = Annotated[
    Optional[str], _opt("kv-cache-dtype", "KV cache dtype: fp16, bf16, int8, fp8, fp8_e5m2, fp32.")
]
KvMem = Annotated[Optional[float], _opt("kv-cache-memory-gb", "KV cache budget in GiB.")]
KvBlocks = Annotated[
    Optional[int], _opt("kv-cache-num-blocks", "Explicit KV block count (overrides the budget).")
]
BlockSize = Annotated[Optional[int], _opt("block-size", "Tokens per KV block.")]
MaxLen = Annotated[Optional[int], _opt("max-model-len", "Longest prompt + completion, in tokens.")]
MaxSeqs = Annotated[Optional[int], _opt("max-num-seqs", "Most sequences per step.")]
MaxTokens = Annotated[Optional[int], _opt("max-num-batched-tokens", "Most tokens per step.")]
Prefix = Annotated[
    Optional[bool], _opt("enable-prefix-caching", "Reuse cached prompt prefixes.", negatable=True)
]
ConfigFile = Annotated[Optional[Path], _opt("config", "Config file (.toml, .yaml or .json).")]


def engine_config(config: Optional[Path], **flags) -> EngineConfig:
    """Files < env < flags. Typer already merged env into flags; resolve() adds the file."""
    try:
        return EngineConfig.resolve(config, flags=flags)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {explain(e)}", err=True)
        raise typer.Exit(2) from e


@app.command()
def run(
    prompt: Annotated[Optional[str], _opt("prompt", "Prompt text.")] = None,
    max_tokens: Annotated[int, _opt("max-tokens", "Most tokens to generate.")] = 128,
    temperature: Annotated[float, _opt("temperature", "0 is greedy.")] = 0.0,
    top_p: Annotated[float, _opt("top-p", "Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, _opt("top-k", "Sample among the k most likely (-1: off).")] = -1,
    seed: Annotated[Optional[int], _opt("seed", "Sampling seed.")] = None,
    chat: Annotated[bool, _opt("chat", "Apply the model's chat template.")] = False,
    as_json: Annotated[bool, _opt("json", "Print a JSON object with text and token_ids.")] = False,
    model: Model = None,
    dtype: Dtype = None,
    kv_cache_dtype: KvDtype = None,
    kv_cache_memory_gb: KvMem = None,
    kv_cache_num_blocks: KvBlocks = None,
    block_size: BlockSize = None,
    max_model_len: MaxLen = None,
    max_num_seqs: MaxSeqs = None,
    max_num_batched_tokens: MaxTokens = None,
    enable_prefix_caching: Prefix = None,
    config: ConfigFile = None,
) -> None:
    """Generate a completion for a prompt."""
    from ferrolm.engine.sampling_params import SamplingParams
    from ferrolm.llm import LLM

    if prompt is None:
        raise typer.BadParameter("give a prompt with --prompt", param_hint="--prompt")
    cfg = engine_config(
        config,
        model=model,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory_gb=kv_cache_memory_gb,
        kv_cache_num_blocks=kv_cache_num_blocks,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
    )
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        llm = LLM(config=cfg)
        text_or_ids: str | list[int] = prompt
        if chat:
            text_or_ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        out = llm.generate([text_or_ids], params)[0]
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {explain(e)}", err=True)
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(
            json.dumps(
                {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.outputs[0].finish_reason}
            )
        )
    else:
        typer.echo(out.text)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="Registry model name.")] = "smollm2-135m") -> None:
    """Fetch a registry model into FERROLM_HOME (checks its sha256)."""
    from ferrolm.models.registry import REGISTRY
    from ferrolm.models.registry import pull as do_pull

    if name not in REGISTRY:
        typer.echo(f"error: unknown model {name!r}; known: {', '.join(REGISTRY)}", err=True)
        raise typer.Exit(2)
    try:
        path = do_pull(name)
    except RuntimeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"{name}: {path}")


@app.command("list")
def list_models() -> None:
    """Show registry models and which are on disk."""
    from ferrolm.models.registry import REGISTRY, local_path

    typer.echo(f"{'NAME':<16} {'SIZE':>9}  {'STATUS':<10} DESCRIPTION")
    for name, entry in REGISTRY.items():
        path = local_path(name)
        size = f"{path.stat().st_size / 1e6:.0f} MB" if path else "-"
        status = "pulled" if path else "not pulled"
        typer.echo(f"{name:<16} {size:>9}  {status:<10} {entry.description}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
