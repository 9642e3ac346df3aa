"""ferrolm command line: run | serve | config | pull | list.

Every flag has an environment variable, FERROLM_ + the flag in upper case with
dashes as underscores. Precedence: flag > env > config file > default.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ferrolm.config import ENGINE_FLAGS, EngineConfig, env_var, explain


def option(flag: str, *dest: str, **kw):
    """A click option whose env var follows the FERROLM_<FLAG> rule."""
    name = flag.split("/")[0].removeprefix("--")
    return click.option(flag, *dest, envvar=env_var(name), show_envvar=True, **kw)


ENGINE_OPTIONS = [
    option(
        "--model",
        default=None,
        help="Registry name, .gguf file or HF safetensors folder [default: smollm2-135m].",
    ),
    option(
        "--dtype",
        default=None,
        help="Compute dtype: auto (bfloat16 where the CPU has native bf16, else float32), float32, bfloat16.",
    ),
    option(
        "--kv-cache-dtype",
        default=None,
        help="KV cache dtype: fp16 (default), bf16, int8, fp8, fp8_e5m2, fp32.",
    ),
    option("--kv-cache-memory-gb", type=float, default=None, help="KV cache budget in GiB [default: 2]."),
    option(
        "--kv-cache-num-blocks",
        type=int,
        default=None,
        help="Explicit KV block count (overrides the budget).",
    ),
    option("--block-size", type=int, default=None, help="Tokens per KV block [default: 16]."),
    option(
        "--max-model-len", type=int, default=None, help="Longest prompt + completion [default: the model's]."
    ),
    option("--max-num-seqs", type=int, default=None, help="Most sequences per step [default: 64]."),
    option("--max-num-batched-tokens", type=int, default=None, help="Most tokens per step [default: 512]."),
    option(
        "--enable-prefix-caching/--no-enable-prefix-caching",
        default=None,
        help="Reuse cached prompt prefixes.",
    ),
    option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Config file (.toml/.yaml/.json).",
    ),
]


def engine_options(f):
    """Adds the engine flags; the command gets `config: EngineConfig` instead of them."""

    @functools.wraps(f)
    def wrapper(*args, config_file=None, **kwargs):
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k in ENGINE_FLAGS}
        try:
            cfg = EngineConfig.resolve(config_file, flags=flags)
        except (ValueError, FileNotFoundError) as e:
            fail(explain(e))
        return f(*args, config=cfg, **kwargs)

    for opt in reversed(ENGINE_OPTIONS):
        wrapper = opt(wrapper)
    return wrapper


def fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """ferrolm: LLM inference with a choice of KV cache dtype."""


def make_llm(config: EngineConfig):
    from ferrolm.llm import LLM

    try:
        return LLM(config=config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(explain(e))


@app.command()
@option("--prompt", default=None, help="Prompt text; without it, an interactive chat starts.")
@option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate.")
@option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@option("--top-k", type=int, default=-1, show_default=True, help="Sample among the k most likely (-1: off).")
@option("--seed", type=int, default=None, help="Sampling seed.")
@option("--chat", is_flag=True, default=False, help="Apply the model's chat template to --prompt.")
@option("--json", "as_json", is_flag=True, default=False, help="Print a JSON object with text and token_ids.")
@engine_options
def run(prompt, max_tokens, temperature, top_p, top_k, seed, chat, as_json, config) -> None:
    """Generate a completion for a prompt, or chat interactively."""
    from ferrolm.engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
    except ValueError as e:
        fail(str(e))
    llm = make_llm(config)
    if prompt is None:
        return interactive_chat(llm, params)
    try:
        text_or_ids = (
            llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        )
        out = llm.generate([text_or_ids], params)[0]
    except ValueError as e:
        fail(str(e))
    if as_json:
        c = out.outputs[0]
        click.echo(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}))
    else:
        click.echo(out.text)


def interactive_chat(llm, params) -> None:
    """A REPL: each line is a user turn; the reply streams as it is generated."""
    history: list[dict[str, str]] = []
    eng = llm.engine
    click.echo("ferrolm chat. Ctrl-D or /exit to quit, /reset to forget the conversation.", err=True)
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo("", err=True)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = eng.tokenizer.apply_chat_template(history)
            eng.add_request(f"chat-{turn}", ids, params)
        except ValueError as e:
            history.pop()
            click.echo(f"error: {e}", err=True)
            continue
        turn += 1
        reply = ""
        while eng.has_unfinished():
            for out in eng.step():
                click.echo(out.outputs[0].delta_text, nl=False)
                reply = out.text
        click.echo("")
        history.append({"role": "assistant", "content": reply})


@app.command()
@option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise)."
)
@option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/*.")
@option("--served-model-name", default=None, help="Model id clients use [default: the --model string].")
@option("--log-level", default="info", show_default=True, help="uvicorn log level.")
@engine_options
def serve(host, port, api_key, served_model_name, log_level, config) -> None:
    """Serve the OpenAI API (completions, chat, models, health, metrics)."""
    import uvicorn

    from ferrolm.server.app import create_app

    llm = make_llm(config)
    app_ = create_app(llm.engine, served_model_name or config.model.name, api_key)
    uvicorn.run(app_, host=host, port=port, log_level=log_level)


@app.command("config")
@option("--format", "fmt", type=click.Choice(["toml", "yaml", "json"]), default="toml", show_default=True)
@engine_options
def show_config(fmt, config) -> None:
    """Print the effective config after files, env and flags are merged."""
    click.echo(config.dumps(fmt), nl=False)


@app.command("eval")
@option("--model", default="smollm2-135m", show_default=True, help="Registry name, .gguf file or HF folder.")
@option(
    "--kv-cache-dtype",
    default="fp16,bf16,int8,fp8,fp8_e5m2",
    show_default=True,
    help="KV dtypes to compare with the fp32 cache, comma separated.",
)
@option(
    "--text",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Text file to score [default: State of the Union excerpt shipped with ferrolm].",
)
@option("--context", type=int, default=1024, show_default=True, help="Tokens per window.")
@option("--windows", type=int, default=8, show_default=True, help="Number of windows (run as one batch).")
@option("--prefix", type=int, default=None, help="Tokens prefilled before scoring [default: context / 2].")
@option("--chunk", type=int, default=128, show_default=True, help="Scored tokens per step.")
@option("--dtype", default="float32", show_default=True, help="Compute dtype.")
@option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON."
)
@option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Quality vs bytes/token PNG."
)
def eval_cmd(
    model, kv_cache_dtype, text, context, windows, prefix, chunk, dtype, json_path, plot_path
) -> None:
    """KV quality report: perplexity, KL and top-1 agreement against the fp32 cache."""
    from pathlib import Path

    from tqdm import tqdm

    from ferrolm.data import sample_text
    from ferrolm.eval.quality import evaluate, format_table, plot
    from ferrolm.kv.dtypes import KvCacheDtype

    try:
        dtypes = [KvCacheDtype.parse(d) for d in kv_cache_dtype.split(",") if d.strip()]
    except ValueError as e:
        fail(str(e))
    body = Path(text).read_text() if text else sample_text()
    prefix = context // 2 if prefix is None else prefix
    total = context - 1
    with tqdm(total=total, unit="pos", desc=f"eval {len(dtypes) + 1} KV dtypes x {windows} windows") as bar:
        try:
            report = evaluate(
                model, body, dtypes, context, windows, prefix, chunk, dtype, progress=bar.update
            )
        except (ValueError, FileNotFoundError) as e:
            fail(explain(e))
    emit_report(report, format_table, plot, json_path, plot_path)


def emit_report(report: dict, format_table, plot, json_path: str | None, plot_path: str | None) -> None:
    """Table on the terminal; JSON and PNG files when asked."""
    from pathlib import Path

    click.echo(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    if plot_path:
        plot(report, plot_path)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"expected comma-separated integers, got {text!r}")


@app.command("bench")
@option("--model", default="smollm2-135m", show_default=True, help="Registry name, .gguf file or HF folder.")
@option("--kv-cache-dtype", default="fp16,int8,fp8", show_default=True, help="KV dtypes, comma separated.")
@option("--dtype", default="float32", show_default=True, help="Compute dtype (also the HF baseline's).")
@option("--prompt-len", type=int, default=256, show_default=True, help="Prompt tokens per request.")
@option("--output-len", type=int, default=64, show_default=True, help="Generated tokens per request.")
@option("--concurrency", default="1,4,16", show_default=True, help="Concurrent requests, comma separated.")
@option(
    "--context-lens",
    default="128,512,1024",
    show_default=True,
    help="Context lengths for the decode-time curve ('' to skip).",
)
@option("--repeats", type=int, default=3, show_default=True, help="Repeats per point (medians reported).")
@option("--kv-cache-memory-gb", type=float, default=1.0, show_default=True, help="KV cache budget in GiB.")
@option(
    "--baseline",
    type=click.Choice(["none", "hf"]),
    default="none",
    show_default=True,
    help="Also run HF transformers generate on the same weights.",
)
@option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON."
)
@option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Throughput/decode-time PNG."
)
def bench_cmd(
    model,
    kv_cache_dtype,
    dtype,
    prompt_len,
    output_len,
    concurrency,
    context_lens,
    repeats,
    kv_cache_memory_gb,
    baseline,
    json_path,
    plot_path,
) -> None:
    """Latency and throughput per KV dtype (medians), optionally against HF transformers."""
    from ferrolm.data import sample_text
    from ferrolm.eval.bench import BenchConfig, format_table, plot, run_bench
    from ferrolm.kv.dtypes import KvCacheDtype

    try:
        kv = tuple(KvCacheDtype.parse(d).value for d in kv_cache_dtype.split(",") if d.strip())
    except ValueError as e:
        fail(str(e))
    cfg = BenchConfig(
        model=model,
        kv_dtypes=kv,
        compute_dtype=dtype,
        prompt_len=prompt_len,
        output_len=output_len,
        concurrency=_ints(concurrency),
        context_lens=_ints(context_lens),
        repeats=repeats,
        kv_cache_memory_gb=kv_cache_memory_gb,
        baseline=None if baseline == "none" else baseline,
    )
    if cfg.repeats < 1 or cfg.output_len < 1 or not cfg.concurrency:
        fail("repeats and output-len must be >= 1 and concurrency non-empty")
    try:
        report = run_bench(cfg, sample_text(), progress=lambda m: click.echo(m, err=True))
    except (ValueError, FileNotFoundError) as e:
        fail(explain(e))
    emit_report(report, format_table, plot, json_path, plot_path)


@app.command()
@click.argument("name", default="smollm2-135m")
def pull(name: str) -> None:
    """Fetch a registry model into FERROLM_HOME (checks its sha256)."""
    from ferrolm.models.registry import REGISTRY
    from ferrolm.models.registry import pull as do_pull

    if name not in REGISTRY:
        fail(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    try:
        path = do_pull(name)
    except RuntimeError as e:
        fail(str(e), 1)
    click.echo(f"{name}: {path}")


@app.command("list")
def list_models() -> None:
    """Show registry models and which are on disk."""
    from ferrolm.models.registry import REGISTRY, local_path

    click.echo(f"{'NAME':<16} {'SIZE':>9}  {'STATUS':<10} DESCRIPTION")
    for name, entry in REGISTRY.items():
        path = local_path(name)
        size = f"{path.stat().st_size / 1e6:.0f} MB" if path else "-"
        status = "pulled" if path else "not pulled"
        click.echo(f"{name:<16} {size:>9}  {status:<10} {entry.description}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
