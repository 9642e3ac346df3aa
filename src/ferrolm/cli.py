"""ferrolm command line: run | serve | config | pull | list.

Every flag has an environment variable, FERROLM_ + the flag in upper case with
dashes as underscores. Precedence: flag > env > config file > default.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import typing

import click

from ferrolm.config import ENGINE_FLAGS, SERVER_FLAGS, EngineConfig, Flag, env_var, explain


def option(flag: str, *dest: str, command: str | None = None, **kw):
    """A click option of one command. Its env var is FERROLM_<COMMAND>_<FLAG>, so that a
    command's own flags (eval's comma-separated --kv-dtypes, run's --json) never read
    a variable meant for the engine or another command."""
    name = flag.split("/")[0].removeprefix("--")
    return click.option(flag, *dest, envvar=env_var(f"{command}-{name}"), show_envvar=True, **kw)


def _click_type(annotation) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return next((t for t in (bool, int, float) if args[0] is t), str)


def flag_option(name: str, flag: Flag):
    """The click option of one FLAGS entry: type, help and default from the config field,
    env var FERROLM_<NAME>; default None so that 'not given' leaves file and env alone."""
    opt = "--" + name.replace("_", "-")
    kind = _click_type(flag.annotation)
    default = flag.default
    shown = f" [default: {default}]" if default is not None and "[default" not in flag.help else ""
    kw = dict(default=None, help=flag.help + shown, envvar=env_var(name), show_envvar=True)
    if kind is bool:
        return click.option(f"{opt}/--no-{opt[2:]}", name, **kw)
    return click.option(opt, name, type=kind, **kw)


def config_file_option():
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        envvar=env_var("config"),
        show_envvar=True,
        help="Config file (.toml/.yaml/.json).",
    )


def engine_options(*tables):
    """Adds the flags of `tables` (ENGINE_FLAGS by default) and --config; the command
    gets `config: EngineConfig` (files, env and flags merged) instead of them."""
    tables = tables or (ENGINE_FLAGS,)
    names = {n: fl for t in tables for n, fl in t.items()}

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, config_file=None, **kwargs):
            flags = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            try:
                cfg = EngineConfig.resolve(config_file, flags=flags)
            except (ValueError, FileNotFoundError) as e:
                fail(explain(e))
            return f(*args, config=cfg, **kwargs)

        wrapper = config_file_option()(wrapper)
        for name, fl in reversed(names.items()):
            wrapper = flag_option(name, fl)(wrapper)
        return wrapper

    return decorate


run_option = functools.partial(option, command="run")
serve_option = functools.partial(option, command="serve")
config_option = functools.partial(option, command="config")
eval_option = functools.partial(option, command="eval")
bench_option = functools.partial(option, command="bench")


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
@click.argument("text", required=False, metavar="[PROMPT]")
@run_option(
    "--prompt", default=None, help="Prompt text (or PROMPT); without either, an interactive chat starts."
)
@run_option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens to generate.")
@run_option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@run_option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@run_option(
    "--top-k", type=int, default=-1, show_default=True, help="Sample among the k most likely (-1: off)."
)
@run_option("--seed", type=int, default=None, help="Sampling seed.")
@run_option("--chat", is_flag=True, default=False, help="Apply the model's chat template to --prompt.")
@run_option(
    "--json", "as_json", is_flag=True, default=False, help="Print a JSON object with text and token_ids."
)
@engine_options()
def run(text, prompt, max_tokens, temperature, top_p, top_k, seed, chat, as_json, config) -> None:
    """Generate a completion for PROMPT (or --prompt), or chat interactively without one."""
    from ferrolm.engine.sampling_params import SamplingParams

    if text is not None and prompt is not None:
        fail("give the prompt once: as PROMPT or as --prompt, not both")
    prompt = text if text is not None else prompt
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
@serve_option("--log-level", default="info", show_default=True, help="uvicorn log level.")
@engine_options(ENGINE_FLAGS, SERVER_FLAGS)
def serve(log_level, config) -> None:
    """Serve the OpenAI API (completions, chat, models, health, metrics)."""
    import uvicorn

    from ferrolm.server.app import create_app

    llm = make_llm(config)
    app_ = create_app(llm.engine, config.server, config.model.name)
    uvicorn.run(app_, host=config.server.host, port=config.server.port, log_level=log_level)


@app.command("config")
@config_option(
    "--format", "fmt", type=click.Choice(["toml", "yaml", "json"]), default="toml", show_default=True
)
@engine_options(ENGINE_FLAGS, SERVER_FLAGS)
def show_config(fmt, config) -> None:
    """Print the effective config after files, env and flags are merged."""
    click.echo(config.dumps(fmt), nl=False)


@app.command("eval")
@eval_option(
    "--model", default="smollm2-135m", show_default=True, help="Registry name, .gguf file or HF folder."
)
@eval_option(
    "--kv-dtypes",
    default="fp16,bf16,int8,fp8,fp8_e5m2,int4,int4_g16,nf4,int4pc,int4pc/int4,int4pc/nf4,int8/int4,int8/nf4,"
    "int4;0=fp16;-1=fp16",
    show_default=True,
    help="KV specs to compare with the fp32 cache, comma separated: a dtype, a KEY/VALUE pair "
    "(int8/int4), or per-layer overrides after ';' (int4;0=fp16;-1=fp16).",
)
@eval_option(
    "--text",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Text file to score [default: State of the Union excerpt shipped with ferrolm].",
)
@eval_option("--context", type=int, default=1024, show_default=True, help="Tokens per window.")
@eval_option(
    "--windows", type=int, default=8, show_default=True, help="Number of windows (run as one batch)."
)
@eval_option(
    "--prefix", type=int, default=None, help="Tokens prefilled before scoring [default: context / 2]."
)
@eval_option("--chunk", type=int, default=128, show_default=True, help="Scored tokens per step.")
@eval_option(
    "--dtype", default="auto", show_default=True, help="Compute dtype (auto: what `serve` would use here)."
)
@eval_option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON."
)
@eval_option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Quality vs bytes/token PNG."
)
def eval_cmd(model, kv_dtypes, text, context, windows, prefix, chunk, dtype, json_path, plot_path) -> None:
    """KV quality report: perplexity, KL and top-1 agreement against the fp32 cache."""
    from pathlib import Path

    from tqdm import tqdm

    from ferrolm.data import sample_text
    from ferrolm.eval.quality import evaluate, format_table, plot
    from ferrolm.kv.spec import split_specs

    try:
        dtypes = split_specs(kv_dtypes)
    except ValueError as e:
        fail(str(e))
    body = Path(text).read_text() if text else sample_text()
    dtype = compute_dtype_name(dtype)
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


def compute_dtype_name(name: str) -> str:
    """'auto' resolved for this CPU, so reports name the dtype that actually ran."""
    from ferrolm.config import ModelConfig
    from ferrolm.runtime import resolve_compute_dtype

    try:
        name = ModelConfig(dtype=name).dtype
    except ValueError as e:
        fail(explain(e))
    return str(resolve_compute_dtype(name)).removeprefix("torch.")


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


BASELINES = ("hf", "llama.cpp")


def _baselines(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")
    if bad := [n for n in names if n not in BASELINES]:
        fail(f"unknown baseline {bad[0]!r}; valid: none, {', '.join(BASELINES)}")
    return names


@app.command("bench")
@bench_option(
    "--model", default="smollm2-135m", show_default=True, help="Registry name, .gguf file or HF folder."
)
@bench_option(
    "--kv-dtypes",
    default="fp16,int8,fp8",
    show_default=True,
    help="KV specs, comma separated (as in eval: int8, int8/int4, int4;0=fp16).",
)
@bench_option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Compute dtype, auto as `serve` (also the HF baseline's).",
)
@bench_option(
    "--weight-dtype",
    default="auto",
    show_default=True,
    help="Weights: auto (GGUF 4-bit layers as shipped), float32 or bfloat16 (dense).",
)
@bench_option("--prompt-len", type=int, default=256, show_default=True, help="Prompt tokens per request.")
@bench_option("--output-len", type=int, default=64, show_default=True, help="Generated tokens per request.")
@bench_option(
    "--concurrency", default="1,4,16", show_default=True, help="Concurrent requests, comma separated."
)
@bench_option(
    "--context-lens",
    default="128,512,1024",
    show_default=True,
    help="Context lengths of the decode grid ('' to skip).",
)
@bench_option(
    "--decode-concurrency",
    default="1",
    show_default=True,
    help="Concurrent sequences of the decode grid (decode tokens/s at each of these x each context).",
)
@bench_option(
    "--decode-steps",
    type=int,
    default=16,
    show_default=True,
    help="Timed decode steps per KV spec at each grid point, taken in turns of at most 4 with "
    "fp16's (more steps: steadier medians on a noisy machine).",
)
@bench_option(
    "--repeats",
    type=int,
    default=3,
    show_default=True,
    help="Repeats per point (medians reported); with fp16 among the specs, each other spec's run takes turns with fp16's, step by step.",
)
@bench_option(
    "--kv-cache-memory-gb",
    type=float,
    default=1.0,
    show_default=True,
    help="KV cache budget in GiB, per engine (with fp16 among the specs two are alive at a time: a spec's and fp16's).",
)
@bench_option(
    "--baseline",
    default="none",
    show_default=True,
    help="Peers in the same run, comma separated: hf (transformers generate on the same weights), "
    "llama.cpp (llama-cpp-python on the same GGUF, flash attention), or none.",
)
@bench_option(
    "--llamacpp-cache-types",
    default="f16,q8_0",
    show_default=True,
    help="llama.cpp KV cache types to run with --baseline llama.cpp.",
)
@bench_option(
    "--llamacpp-decode-concurrency",
    default=None,
    help="Sequences of llama.cpp's decode grid (default: as --decode-concurrency; its prefill is slow).",
)
@bench_option(
    "--prefill-lens",
    default="",
    show_default=True,
    help="Prompt lengths whose prefill tokens/s to measure (one prompt each; '' to skip).",
)
@bench_option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON."
)
@bench_option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Throughput/decode-time PNG."
)
def bench_cmd(
    model,
    kv_dtypes,
    dtype,
    weight_dtype,
    prompt_len,
    output_len,
    concurrency,
    context_lens,
    decode_concurrency,
    decode_steps,
    repeats,
    kv_cache_memory_gb,
    baseline,
    llamacpp_cache_types,
    llamacpp_decode_concurrency,
    prefill_lens,
    json_path,
    plot_path,
) -> None:
    """Latency and throughput per KV dtype (medians), optionally against HF transformers."""
    from ferrolm.data import sample_text
    from ferrolm.eval.bench import BenchConfig, format_table, plot, run_bench
    from ferrolm.kv.spec import split_specs

    try:
        kv = tuple(split_specs(kv_dtypes))
    except ValueError as e:
        fail(str(e))
    cfg = BenchConfig(
        model=model,
        kv_dtypes=kv,
        compute_dtype=compute_dtype_name(dtype),
        weight_dtype=weight_dtype,
        prompt_len=prompt_len,
        output_len=output_len,
        concurrency=_ints(concurrency),
        context_lens=_ints(context_lens),
        decode_concurrency=_ints(decode_concurrency),
        decode_steps=decode_steps,
        repeats=repeats,
        kv_cache_memory_gb=kv_cache_memory_gb,
        baselines=_baselines(baseline),
        llamacpp_cache_types=tuple(x.strip() for x in llamacpp_cache_types.split(",") if x.strip()),
        prefill_lens=_ints(prefill_lens),
        llamacpp_decode_concurrency=None
        if llamacpp_decode_concurrency is None
        else _ints(llamacpp_decode_concurrency),
    )
    if cfg.repeats < 1 or cfg.output_len < 1 or not cfg.concurrency:
        fail("repeats and output-len must be >= 1 and concurrency non-empty")
    sizes = (
        *cfg.concurrency,
        *cfg.decode_concurrency,
        *cfg.context_lens,
        *cfg.prefill_lens,
        cfg.decode_steps,
    )
    if min(sizes) < 1:
        fail(
            "concurrency, decode-concurrency, context-lens, prefill-lens and decode-steps take integers >= 1"
        )
    if "llama.cpp" in cfg.baselines:
        from ferrolm.eval.llamacpp import CACHE_TYPES, available

        if why := available():
            fail(why)
        if bad := [t for t in cfg.llamacpp_cache_types if t not in CACHE_TYPES]:
            fail(f"unknown llama.cpp cache type {bad[0]!r}; valid: {', '.join(CACHE_TYPES)}")
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
