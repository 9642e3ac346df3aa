"""Zeroed host tensors backed by 2 MiB pages where the kernel allows it.

A decode step reads the whole cache once per layer, page after page: with 4 KiB pages
every 4 KiB of K or V is a TLB miss (a two-level page walk inside a VM) and a point where
the hardware prefetcher stops. Linux gives transparent huge pages to memory that asks for
them (`madvise(MADV_HUGEPAGE)`) before its first touch, even when the system setting is
`madvise`, not `always`. So a large pool tensor is carved from an allocation 2 MiB larger
than it, at a 2 MiB boundary; its whole 2 MiB spans are advised, then zeroed (the first
touch, which faults them in as huge pages). The tail past the last whole span keeps small
pages, so nothing is resident beyond the tensor's own bytes.

Where madvise is missing (not Linux, the setting `never`, an old kernel) the advice is
refused or ignored and the tensor is an ordinary zeroed one: same values, small pages.
(Fresh pages are zero already; the explicit zeroing is what faults them in.)
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def huge_pages_possible() -> bool:
    """True where memory can be advised to be huge pages (Linux's madvise)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros(shape, dtype, device); on the CPU, tensors of at least one huge page
    start at a 2 MiB boundary with their whole 2 MiB spans advised to be huge pages.

    The bytes come from a private anonymous mapping of their own, not from malloc: after
    large frees glibc serves big requests from its heap, whose pages are touched already
    and would keep their small pages. The tensor holds the mapping; it is unmapped with
    the tensor's last view."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not huge_pages_possible():
        return torch.zeros(shape, dtype=dtype, device=device)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(m, dtype=torch.uint8)  # keeps m alive
    off = -raw.data_ptr() % HUGE_PAGE
    with contextlib.suppress(OSError):  # THP compiled out or refused: small pages, same values
        m.madvise(mmap.MADV_HUGEPAGE, off, nbytes // HUGE_PAGE * HUGE_PAGE)
    out = raw[off : off + nbytes].view(dtype).view(shape)
    return out.zero_()
