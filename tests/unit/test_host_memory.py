import sys
from pathlib import Path

import pytest
import torch

from ferrolm.kv import host_memory
from ferrolm.kv.pool import KvPool
from ferrolm.kv.spec import KvSpec

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise huge pages are Linux's")


def huge_kib_of(t: torch.Tensor) -> int:
    """AnonHugePages (KiB) of the mapping that holds t's first byte (/proc/self/smaps)."""
    addr, inside, kib = t.data_ptr(), False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            kib = int(line.split()[1])
    return kib


def test_small_and_odd_tensors_are_plain_zeros():
    for shape, dtype in [((3, 5), torch.float16), ((7,), torch.float8_e4m3fn), ((0, 4), torch.uint8)]:
        t = host_memory.zeros(shape, dtype)
        assert t.shape == shape and t.dtype == dtype
        assert (t.float() == 0).all()


@linux
def test_large_tensor_starts_on_a_huge_page_and_is_zero():
    shape = (3, 3 * host_memory.HUGE_PAGE // 128 + 5, 64)  # 3 spans and an odd tail, fp16
    t = host_memory.zeros(shape, torch.float16)
    assert t.shape == shape and t.dtype == torch.float16 and t.is_contiguous()
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    assert (t == 0).all()
    t[-1, -1, -1] = 1.0  # the whole tensor is writable, the tail too
    assert t.sum().item() == 1.0


@linux
@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here"
)
def test_large_tensor_gets_huge_pages_where_the_kernel_offers_them():
    t = host_memory.zeros((8 * host_memory.HUGE_PAGE,), torch.uint8)
    assert huge_kib_of(t) >= 2048, "madvise(MADV_HUGEPAGE) before the first touch should give huge pages"


@linux
def test_pool_data_is_huge_page_aligned_and_reads_back():
    pool = KvPool(KvSpec.parse("int8", 2), 2, 3, 64, num_blocks=400, block_size=128)
    for half in (*pool.keys, *pool.values):
        assert half.data.data_ptr() % host_memory.HUGE_PAGE == 0
        assert (half.data == 0).all()
