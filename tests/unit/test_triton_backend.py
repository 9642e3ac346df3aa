"""The Triton backend against the torch reference, for every KV format pair.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors;
on a CUDA machine the same tests run the compiled kernels on the GPU (bench/gpu_check.sh).
Stores must give the reference's bytes; attention must match it to fp16 dot precision.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Without a GPU: the interpreter (conftest.py sets TRITON_INTERPRET before triton is imported).
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton", reason="the triton package is not installed (pip install triton)")

from ferrolm.attention import TorchBackend, TritonBackend, paged_attention, select_backend  # noqa: E402
from ferrolm.attention.metadata import AttentionMetadata  # noqa: E402
from ferrolm.kv.pool import KvPool  # noqa: E402
from ferrolm.kv.spec import KvSpec  # noqa: E402

FORMATS = ["fp16", "bf16", "fp32", "int8", "fp8", "fp8_e5m2", "int4", "int4_g16", "nf4"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.uint8)


def _pools(spec: KvSpec, kvh: int, d: int, blocks: int, bs: int):
    return [KvPool(spec, spec.num_layers, kvh, d, blocks, bs, DEVICE) for _ in range(2)]


def _vectors(t: int, kvh: int, d: int, seed: int, decades: tuple[float, float] = (-3, 2)) -> torch.Tensor:
    """Normal values with a spread of magnitudes per token (10^decades), an all-zero vector
    and exact halves (rounding ties) among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, kvh, d, generator=g) * torch.logspace(*decades, t).view(t, 1, 1)
    x[0, 0] = 0.0
    x[1, 0, :8] = torch.tensor([0.5, 1.5, -2.5, 3.5, 127.0, -127.0, 7.0, -7.0])
    return x.to(DEVICE)


def _fill(spec, kvh, d, bs, tables, lens, seed=0, decades=(-3, 2), triton_store=True):
    """Both pools written with the same keys and values for every position of every
    sequence: by the Triton kernels and by the reference (or both by the reference, where
    only attention is under test: the stores' bytes are equal, checked above, and the
    interpreter runs one store program per token)."""
    pools = _pools(spec, kvh, d, 1 + max(max(t) for t in tables), bs)
    meta = AttentionMetadata(tables, [0] * len(lens), lens, bs, DEVICE)
    n = meta.slot_mapping.numel()
    for layer in range(spec.num_layers):
        k = _vectors(n, kvh, d, seed + 2 * layer, decades)
        v = _vectors(n, kvh, d, seed + 2 * layer + 1, decades)
        (TritonBackend() if triton_store else TorchBackend()).write(pools[0], layer, meta.slot_mapping, k, v)
        TorchBackend().write(pools[1], layer, meta.slot_mapping, k, v)
    return pools


@pytest.mark.parametrize("pair", FORMATS + ["int8/int4", "fp8/fp16", "nf4/fp8_e5m2"])
def test_store_writes_the_reference_bytes(pair):
    spec = KvSpec.build(2, pair, rotation="off")
    mine, ref = _fill(spec, 2, 64, 16, [[0, 2], [1, 3]], [12, 19])
    for a, b in zip(mine.tensors(), ref.tensors()):
        assert a.dtype == b.dtype
        assert torch.equal(_bytes(a), _bytes(b))


def _step(spec, kvh, g, d, bs, tables, starts, news, splits, seed=0, **launch):
    """One step over cached prefixes (decodes and prefill chunks together): the Triton
    attention output and the reference's, over pools holding the same bytes. Keys of
    magnitudes real models have (scores of tens: fp16 queries keep them to ~1e-2)."""
    lens = [s + n for s, n in zip(starts, news)]
    mine, ref = _fill(spec, kvh, d, bs, tables, lens, seed, decades=(-1, 0.5), triton_store=False)
    meta = AttentionMetadata(tables, starts, news, bs, DEVICE)
    gen = torch.Generator().manual_seed(seed + 99)
    q = torch.randn(sum(news), kvh * g, d, generator=gen).to(DEVICE)
    out = TritonBackend(splits=splits, **launch).attend(q, 0, mine, meta, d**-0.5)
    want = TorchBackend().attend(q, 0, ref, meta, d**-0.5)
    return out, want


def _close(out: torch.Tensor, want: torch.Tensor, pair: str) -> None:
    """Equal up to the dot's input rounding (fp16: 11 bits; bf16 caches: 8 bits), relative
    to the largest output (the test vectors span five orders of magnitude)."""
    tol = 2e-2 if "bf16" in pair else 4e-3
    scale = want.float().abs().max()
    torch.testing.assert_close(out.float() / scale, want.float() / scale, atol=tol, rtol=0)


@pytest.mark.parametrize("pair", [f"{k}/{v}" for k, v in itertools.product(FORMATS, FORMATS)])
def test_attention_matches_reference_for_every_format_pair(pair):
    # Three sequences: a decode over 37 cached tokens, a 6-token chunk after a 12-token
    # prefix, a fresh 3-token prompt; block tables out of order.
    spec = KvSpec.build(1, pair, rotation="off")
    out, want = _step(spec, 2, 2, 64, 16, [[5, 1, 3], [0, 4], [2]], [36, 12, 0], [1, 6, 3], splits=1)
    _close(out, want, pair)


def test_int8_keys_see_the_fixed_point_query():
    # fp32 values make the dot fp32 (not fp16), which resolves the query's 15-bit rounding
    # (kv/fixed_point.py): without it the scores move by ~1e-4 of the largest output.
    spec = KvSpec.build(1, "int8/fp32", rotation="off")
    out, want = _step(spec, 2, 3, 64, 16, [[5, 1, 3], [0, 4], [2]], [36, 12, 0], [1, 6, 3], splits=1)
    scale = want.float().abs().max()
    torch.testing.assert_close(out.float() / scale, want.float() / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kvh, g, d, bs, splits",
    [
        (1, 1, 64, 16, 1),  # multi-head (one query head per kv head)
        (3, 3, 64, 128, 1),  # SmolLM2's 9 heads over 3 (rows padded to 4 per query)
        (2, 4, 128, 16, 4),  # Llama-1B-like groups, context split four ways
        (2, 8, 32, 16, 2),  # wide groups, small heads
        (1, 4, 64, 32, 8),  # more splits than some sequences have key tiles
    ],
)
@pytest.mark.parametrize("pair", ["fp16", "int8/int4"])
def test_attention_shapes_and_context_splits(kvh, g, d, bs, splits, pair):
    spec = KvSpec.build(1, pair, rotation="off")
    nblk = -(-140 // bs)
    tables = [list(range(i * nblk, (i + 1) * nblk))[::-1] for i in range(3)]
    out, want = _step(spec, kvh, g, d, bs, tables, [139, 100, 64], [1, 30, 5], splits=splits, seed=3)
    _close(out, want, pair)


@pytest.mark.parametrize(
    "launch", [dict(scale_tiles=False), dict(block_n=64), dict(block_n=32, scale_tiles=False)]
)
@pytest.mark.parametrize("pair", ["int8/fp8", "fp8_e5m2/int4"])
def test_attention_launch_settings(pair, launch):
    """The settings bench/gpu_attention.py sweeps give the same attention: per-token scales
    on the scores and probabilities instead of the tiles, other tile sizes."""
    spec = KvSpec.build(1, pair, rotation="off")
    tables = [[3, 1, 0], [2, 4]]
    out, want = _step(spec, 2, 4, 64, 128, tables, [260, 40], [1, 5], splits=2, seed=5, **launch)
    _close(out, want, pair)


@pytest.mark.parametrize(
    "pair, splits, d",
    [("int8", 1, 64), ("int4", 2, 64), ("fp8/nf4", 1, 64), ("fp16/int8", 2, 64), ("int8/int4", 2, 256)],
)
def test_rotated_formats_through_the_attention_layer(pair, splits, d):
    """Rotated formats: the Triton kernels rotate keys and values before they quantize
    (the reference's butterflies: the same bytes), queries and outputs by the matrix; the
    reference gets them rotated by the attention layer."""
    spec = KvSpec.build(1, pair)
    assert spec.layers[0].value.rotated
    bs, kvh, g = 16, 2, 2  # d = 256 (Gemma 3): queries and outputs rotated outside the kernel
    tables, starts, news = [[1, 0], [2]], [20, 0], [1, 9]
    pools = _pools(spec, kvh, d, 3, bs)
    outs = []
    for backend, pool in zip((TritonBackend(splits=splits), TorchBackend()), pools):
        pre = AttentionMetadata(tables[:1], [0], [starts[0]], bs, DEVICE)
        k, v = _vectors(starts[0], kvh, d, 1), _vectors(starts[0], kvh, d, 2)
        q0 = torch.zeros(starts[0], kvh * g, d, device=DEVICE)
        paged_attention(q0, k, v, 0, pool, pre, d**-0.5, backend)
        meta = AttentionMetadata(tables, starts, news, bs, DEVICE)
        q, k, v = (_vectors(sum(news), n, d, s) for n, s in ((kvh * g, 3), (kvh, 4), (kvh, 5)))
        outs.append(paged_attention(q, k, v, 0, pool, meta, d**-0.5, backend))
    for a, b in zip(pools[0].tensors(), pools[1].tensors()):
        assert torch.equal(_bytes(a), _bytes(b))
    _close(outs[0], outs[1], pair)


def test_backend_choice_by_device(monkeypatch):
    spec = KvSpec.build(2, "int8/int4")
    assert select_backend("auto", spec, "cpu").name in ("cpu", "torch")  # never Triton on a CPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="does not run on cpu tensors"):
        select_backend("triton", spec, "cpu")
    with pytest.raises(ValueError, match=r"per-channel formats \(int4pc\)"):
        select_backend("triton", KvSpec.build(2, "int4pc"), "cuda")
    assert "the torch backend does" in TritonBackend().unsupported(KvSpec.build(2, "int4pc"))


@pytest.mark.parametrize("eager", [False, True])
def test_engine_generates_as_the_reference_with_triton_attention(tiny_model_dir, eager):
    """The whole engine (prefill, decode, rotation, int8 and int4 caches) on the Triton
    backend gives the torch backend's greedy tokens on the tiny model; decode steps from
    the static buffers of CUDA graphs (captured on a GPU, run eagerly without one: the
    padding rows, the kernel's launch from shapes alone) or eagerly."""
    from ferrolm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(3, 30)), list(range(40, 45)), list(range(7, 60))]
    for kv in ("fp16", "int8/int4"):
        runs = []
        for backend in ("triton", "torch"):
            llm = LLM(
                str(tiny_model_dir),
                dtype="float32",
                kv_cache_dtype=kv.split("/")[0],
                kv_cache_value_dtype=kv.split("/")[-1],
                kv_cache_num_blocks=16,
                block_size=16,
                attention_backend=backend,
                device=DEVICE,
                enforce_eager=eager,
            )
            assert llm.engine.backend.name == backend
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            graphs = llm.engine.runner.graphs
            if backend == "triton" and not eager:  # 3 sequences padded to 4
                assert graphs is not None and 4 in graphs.graphs and graphs.failed is None
            else:
                assert graphs is None
        assert runs[0] == runs[1], kv


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels above are compiled for it and run")
def test_kernels_compile_for_hopper():
    """The kernels compile for sm_90 (the interpreter does not run Triton's compiler)."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "triton_aot.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "compiled for .target sm_90a" in done.stdout


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bench/gpu_check.sh runs it on one)")
def test_cuda_engine_matches_hf(tiny_model_dir, tiny_hf_model):
    """The engine on CUDA (model, pool and step tensors there; Triton attention; fp32
    compute and cache) against HF on the CPU: every decode step's logits."""
    from recording import step_logits

    from ferrolm import LLM

    llm = LLM(
        str(tiny_model_dir), dtype="float32", kv_cache_dtype="fp32", kv_cache_num_blocks=64, device="cuda"
    )
    eng = llm.engine
    assert eng.backend.name == "triton" and eng.pool.keys[0].data.is_cuda
    prompt = list(range(3, 40))
    token_ids, steps = step_logits(eng, prompt, 10)
    with torch.no_grad():
        ref = tiny_hf_model(torch.tensor([token_ids])).logits[0]
    for i, got in enumerate(steps):
        torch.testing.assert_close(got, ref[len(prompt) - 1 + i], atol=2e-3, rtol=2e-3)


def test_windowed_model_decodes_from_per_group_static_buffers(tmp_path):
    """A Gemma 3 with 5 local layers (window 8) and a global one: six KV groups, each with
    its own static slots and block tables in the decode-graph buffers (run eagerly without
    a GPU), blocks dropped from the windows; greedy tokens equal the torch backend's."""
    import transformers
    from conftest import TINY, _tiny_tokenizer

    from ferrolm import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 6},
        sliding_window=8,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        query_pre_attn_scalar=48,
    )
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    _tiny_tokenizer(TINY["vocab_size"]).save_pretrained(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(3, 43)), list(range(50, 55)), list(range(7, 40))]
    runs = []
    for backend in ("triton", "torch"):
        llm = LLM(
            str(tmp_path),
            dtype="float32",
            kv_cache_dtype="int8",
            kv_cache_num_blocks=16,
            block_size=16,
            attention_backend=backend,
            device=DEVICE,
        )
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        if backend == "triton":
            graphs = llm.engine.runner.graphs
            assert graphs.num_groups == 6 and 4 in graphs.graphs and graphs.failed is None
    assert runs[0] == runs[1]
