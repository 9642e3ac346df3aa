"""Decode speed per KV format on a GPU, on random weights with real models' shapes.

Model weights cannot travel to a GPU machine with no network, so each shape is built
with random bf16 weights (the speed of a decode step does not depend on their values):
`smollm2-135m` (the default model's config) and `llama-1b` (Llama-3.2-1B's). For every
KV format, concurrency and context length, each of `concurrency` sequences holds
`context` tokens in the paged cache (written once by the backend's store kernel) and the
engine's decode step runs as the engine runs it: metadata built on the host and copied
once, the model forward (attention through the chosen backend), the fp32 head and
greedy argmax, host sync. Reported: the median step time, tokens/s, and the ratio to
fp16 at the same point, all measured in one run. Also the fp16 step at one sequence
against the memory roofline: the bytes every decode step must read (weights, the KV
context) over the copy bandwidth measured in the same run.

    python bench/gpu_decode.py --json out.json
    python bench/gpu_decode.py --shapes llama-1b --kv fp16,int8 --concurrency 1,64 --context 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from ferrolm.attention import select_backend
from ferrolm.engine.runner import ModelRunner
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec
from ferrolm.models.llama import LlamaConfig, LlamaModel, rope_inv_freq

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.2-1B config.json (RoPE scaling left out: it changes no cost)
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}


def random_model(shape: str, device: torch.device) -> LlamaModel:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    model.to_compute_dtype(torch.bfloat16)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False).fuse_projections()


def weight_bytes(model: LlamaModel) -> int:
    """Bytes one decode step reads of the weights: every parameter but the embedding table
    (one row per token), the head in its own dtype."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens") or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    if model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr():
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 2 GiB copy on the device (read + write counted), median of 10."""
    n = 1 << (31 if device.type == "cuda" else 27)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n / statistics.median(times[2:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fill(pool: KvPool, backend, device: torch.device) -> None:
    """Every slot of the pool written once by the backend's store kernel (random values:
    a decode step's cost does not depend on them)."""
    H, D = pool.num_kv_heads, pool.head_dim
    for layer in range(pool.num_layers):
        for start in range(0, pool.num_slots, 1 << 20):
            slots = torch.arange(start, min(start + (1 << 20), pool.num_slots), device=device)
            k = torch.randn(len(slots), H, D, device=device, dtype=torch.bfloat16)
            backend.write(pool, layer, slots, k, k)


def decode_steps(runner: ModelRunner, c: int, ctx: int, steps: int, nblk: int) -> list[float]:
    """Each of c sequences holds ctx tokens (sequence i in blocks i * nblk ...); time
    `steps` decode steps (+2 warm-up, which compile and capture what is new) as the engine
    runs them: runner.execute (CUDA graphs unless eager), then greedy argmax to the host."""
    device = runner.model.device
    vocab = runner.model.config.vocab_size
    seqs = [
        SimpleNamespace(block_tables=[list(range(i * nblk, (i + 1) * nblk))], token_ids=[], num_computed=ctx)
        for i in range(c)
    ]
    ids = torch.randint(0, vocab, (c,)).tolist()
    times = []
    for _ in range(steps + 2):
        sync(device)
        t0 = time.perf_counter()
        for seq, tok in zip(seqs, ids):
            seq.token_ids = _Tokens(seq.num_computed, tok)
        batch = [SimpleNamespace(seq=s, num_new_tokens=1) for s in seqs]
        ids = runner.execute(batch).argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
        for seq in seqs:
            seq.num_computed += 1
    return times[2:]


class _Tokens:
    """A sequence's token list as the runner reads it: only the newest token exists."""

    def __init__(self, pos: int, token: int) -> None:
        self.pos, self.token = pos, token

    def __getitem__(self, index):
        if isinstance(index, slice):  # eager steps read token_ids[s : s + n]
            return [self.token] if index.start == self.pos else []
        return self.token


def profile_step(runner, c, ctx, nblk, label) -> None:
    from torch.profiler import ProfilerActivity, profile

    decode_steps(runner, c, ctx, 1, nblk)  # warm
    cuda = runner.model.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        decode_steps(runner, c, ctx, 1, nblk)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"\nprofile: {label}, {c} x {ctx} (3 steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b")
    ap.add_argument("--kv", default="fp16,bf16,int8,fp8,fp8_e5m2,int4,nf4")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--context", default="1024,8192")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--eager-kv", default="fp16,int8", help="formats also measured without CUDA graphs")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on small shapes")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile",
        default="",
        help="KV formats whose decode step is profiled (torch profiler, GPU time per kernel) at the "
        "largest concurrency and context of the last shape",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    conc = [int(x) for x in args.concurrency.split(",")]
    ctxs = [int(x) for x in args.context.split(",")]
    bs = args.block_size
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        model = random_model(shape, device)
        cfg = model.config
        wbytes = weight_bytes(model)
        nblk = -(-(max(ctxs) + args.steps + 2) // bs)
        for kv in args.kv.split(","):
            spec = KvSpec.parse(kv, cfg.num_layers)
            backend = select_backend(args.backend, spec, device)
            pool = KvPool(spec, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max(conc) * nblk, bs, device)
            fill(pool, backend, device)
            per_token = pool.bytes_per_token
            modes = ["graphs", "eager"] if kv in args.eager_kv.split(",") else ["graphs"]
            for mode in modes:
                graphs = (max(conc), nblk) if mode == "graphs" else None
                runner = ModelRunner(model, pool, backend, graphs)
                label = kv if mode == "graphs" else kv + " eager"
                for c in conc:
                    for ctx in ctxs:
                        t = statistics.median(decode_steps(runner, c, ctx, args.steps, nblk))
                        floor = (wbytes + c * ctx * per_token) / bw
                        row = dict(shape=shape, kv=label, backend=backend.name, concurrency=c, context=ctx)
                        row.update(step_ms=t * 1e3, tokens_per_s=c / t, roofline_ms=floor * 1e3)
                        rows.append(row)
                        print(
                            f"{shape:13s} {label:14s} c={c:<4d} ctx={ctx:<5d} step {t * 1e3:8.2f} ms "
                            f"{c / t:9.0f} tok/s  (roofline {floor * 1e3:.2f} ms, x{t / floor:.2f})",
                            flush=True,
                        )
                if runner.graphs is not None and runner.graphs.failed:
                    print(f"CUDA graphs failed: {runner.graphs.failed}", flush=True)
                if kv in args.profile.split(",") and mode == "graphs":
                    profile_step(runner, max(conc), max(ctxs), nblk, f"{shape} {label}")
                del runner
            del pool
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
    base = {
        (r["shape"], r["concurrency"], r["context"]): r["tokens_per_s"] for r in rows if r["kv"] == "fp16"
    }
    print("\ntokens/s relative to fp16 at the same point (one run):")
    for r in rows:
        key = (r["shape"], r["concurrency"], r["context"])
        if key in base:
            r["vs_fp16"] = r["tokens_per_s"] / base[key]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    kvs = list(dict.fromkeys(r["kv"] for r in rows))
    for shape in shapes:
        points = [(c, x) for c in conc for x in ctxs]
        print(f"{shape}: " + "  ".join(f"{c}x{x}" for c, x in points))
        for kv in kvs:
            vals = {
                (r["concurrency"], r["context"]): r.get("vs_fp16", float("nan"))
                for r in rows
                if r["shape"] == shape and r["kv"] == kv
            }
            print(f"  {kv:14s} " + "  ".join(f"{vals.get(p, float('nan')):.2f}" for p in points))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
