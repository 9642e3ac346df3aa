"""llama.cpp as a peer in `ferrolm bench` (the optional extra `ferrolm[llamacpp]`).

Drives llama-cpp-python's low-level API the way llama.cpp's own `batched` example does:
one context with a sequence slot per concurrent request (`kv_unified` off: each sequence
attends only its own cells), prompts prefilled in `n_batch` chunks, then one `llama_decode`
per step holding one token of every sequence, greedy argmax over the returned logits.
Same GGUF file, same prompts, same thread count as ferrolm; flash attention on; the cache
type is llama.cpp's own (`f16`, `q8_0`, ...).
"""

from __future__ import annotations

import ctypes
import statistics
import time

import numpy as np

CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


def available() -> str | None:
    """None when llama-cpp-python imports, else why not (for the CLI's error)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # an ImportError, or a broken shared library
        return f"llama.cpp baseline needs llama-cpp-python (pip install 'ferrolm[llamacpp]'): {e}"
    return None


def _silence(L) -> None:
    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def quiet(level, text, user_data):
        return None

    _silence.keep = quiet  # the callback must outlive the library's use of it
    L.llama_log_set(quiet, ctypes.c_void_p())


class LlamaCpp:
    """One model and one context sized for `n_seq` sequences of up to `seq_ctx` tokens."""

    def __init__(self, gguf: str, cache_type: str, n_seq: int, seq_ctx: int, threads: int, n_batch=512):
        import llama_cpp as L

        if cache_type not in CACHE_TYPES:
            raise ValueError(f"llama.cpp cache type {cache_type!r}; valid: {', '.join(CACHE_TYPES)}")
        self.L = L
        _silence(L)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        # No weight repacking into "extra" buffer types: on AMX CPUs that repacks Q4_1 for
        # ggml's AMX matmul, which segfaults in ggml_backend_amx_mul_mat (llama-cpp-python
        # 0.3.36, seen under gdb). x86's other repacks do not cover Q4_1, so for the default
        # model this is llama.cpp's ordinary AVX2/AVX-512 Q4_1 x Q8_1 path.
        mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_seq * seq_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.type_k = cp.type_v = CACHE_TYPES[cache_type]
        cp.kv_unified = False
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context ({n_seq} x {seq_ctx}, {cache_type})")
        self.n_seq, self.seq_ctx, self.n_batch = n_seq, seq_ctx, n_batch
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, batch_index: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, batch_index)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def reset(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], list[float]]:
        """Every prompt in n_batch chunks; returns each sequence's first token and the time
        (perf_counter) at which it was known."""
        if len(prompts) > self.n_seq or max(map(len, prompts)) >= self.seq_ctx:
            raise ValueError(f"{len(prompts)} prompts do not fit {self.n_seq} x {self.seq_ctx}")
        work = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        first, when = [0] * len(prompts), [0.0] * len(prompts)
        for at in range(0, len(work), self.n_batch):
            chunk = work[at : at + self.n_batch]
            self._decode(chunk)
            for i, (_, _, s, out) in enumerate(chunk):
                if out:
                    first[s], when[s] = self._argmax(i), time.perf_counter()
        return first, when

    def step(self, last: list[int], pos: list[int]) -> list[int]:
        self._decode([(t, p, s, True) for s, (t, p) in enumerate(zip(last, pos))])
        return [self._argmax(i) for i in range(len(last))]

    def generate(self, prompts: list[list[int]], output_len: int) -> dict:
        """As bench.run_engine_once: medians of TTFT and TPOT, and all output tokens / wall."""
        self.reset()
        start = time.perf_counter()
        last, first_at = self.prefill(prompts)
        pos = [len(p) for p in prompts]
        for _ in range(output_len - 1):
            last = self.step(last, pos)
            pos = [p + 1 for p in pos]
        end = time.perf_counter()
        ttft = [t - start for t in first_at]
        tpot = [(end - t) / (output_len - 1) for t in first_at] if output_len > 1 else []
        return {
            "ttft_s": statistics.median(ttft),
            "tpot_s": statistics.median(tpot) if tpot else float("nan"),
            "tokens_per_s": len(prompts) * output_len / (end - start),
        }

    def decode_step_time(self, prompts: list[list[int]], steps: int) -> float:
        """Median seconds of one decode step of every sequence after their prefill."""
        self.reset()
        last, _ = self.prefill(prompts)
        pos = [len(p) for p in prompts]
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            last = self.step(last, pos)
            times.append(time.perf_counter() - t)
            pos = [p + 1 for p in pos]
        return statistics.median(times)

    def prefill_time(self, prompt: list[int]) -> float:
        self.reset()
        t = time.perf_counter()
        self.prefill([prompt])
        return time.perf_counter() - t
