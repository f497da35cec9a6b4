"""Model weights in transparent huge pages, for faster decoding on a CPU.

Decoding one sequence streams every weight from memory once per token, so its speed is memory
bandwidth. With 4 KiB pages the CPU's prefetchers stop at every page boundary and every page costs a
TLB entry; with 2 MiB pages a matrix-vector product streams 10-12% faster here (the 1-4 MB
projections of jamba-small: 24 -> 27 GB/s; 2-core AMD EPYC VM, docs/benchmarks.md).

Linux only gives huge pages to anonymous memory a process asks for (`madvise(MADV_HUGEPAGE)`, when
/sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always"). torch's allocator never asks,
and weights mapped from safetensors files are page cache in 4 KiB pages, so `move_to_huge_pages`
copies the parameters into one mapping that asks, and points each parameter at its copy.
"""

from __future__ import annotations

import logging
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["huge_pages_unavailable", "move_to_huge_pages"]

logger = logging.getLogger(__name__)

_HUGE = 2 << 20  # 2 MiB, the x86-64 and arm64 (4 KiB base page) huge page
_ALIGN = 64  # each tensor starts on a cache line
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_unavailable() -> str | None:
    """Why weights cannot be put in transparent huge pages here, or None if they can."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "transparent huge pages are a Linux feature"
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return f"{_THP_SETTING} is not readable (no transparent huge pages in this kernel)"
    if "[never]" in setting:
        return f"transparent huge pages are off ({_THP_SETTING}: {setting.strip()})"
    return None


def move_to_huge_pages(module: nn.Module) -> int:
    """Copy every CPU parameter of `module` into memory advised to use huge pages; returns the bytes
    moved (0 where huge pages are unavailable, which is logged).

    Values, dtypes, shapes and `requires_grad` are unchanged, and tied parameters stay tied (each
    parameter object is moved once). Copies are made one parameter at a time, so the old storage of
    each (page cache for a memory-mapped checkpoint) can be released as the next is copied.
    """
    reason = huge_pages_unavailable()
    if reason is not None:
        logger.info("weights left in ordinary pages: %s", reason)
        return 0
    params = [p for p in module.parameters() if p.device.type == "cpu" and p.numel() > 0]
    sizes = [_round_up(p.numel() * p.element_size(), _ALIGN) for p in params]
    total = sum(sizes)
    if total == 0:
        return 0
    region = mmap.mmap(-1, _round_up(total, _HUGE) + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    # The tensor keeps the mapping alive (frombuffer holds the buffer) for as long as any view of it lives.
    arena = torch.frombuffer(region, dtype=torch.uint8)
    offset = (-arena.data_ptr()) % _HUGE  # start on a huge page boundary
    with torch.no_grad():
        for p, size in zip(params, sizes, strict=True):
            nbytes = p.numel() * p.element_size()
            copy = arena[offset : offset + nbytes].view(p.dtype).view(p.shape)
            copy.copy_(p)
            p.data = copy
            offset += size
    logger.info("moved %.1f MB of weights into transparent huge pages", total / 1e6)
    return total


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
