"""What the Triton kernels' wrappers share: which calls a kernel takes, and how absent tensors are passed."""

from __future__ import annotations

import os

import torch

from .. import chunked

__all__ = ["chunked", "interpreting", "last_contiguous", "or_", "strides2", "takes"]


def interpreting() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (TRITON_INTERPRET=1: the tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def takes(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel can read these tensors: all on one CUDA device, or on the CPU under the interpreter."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if any(t.device != device for t in present):
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def last_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when its last dimension is contiguous (any other strides are passed to the kernel), else a copy."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def or_(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """t, or a placeholder pointer for an absent tensor (the kernel's HAS_* flag keeps it unread)."""
    return placeholder if t is None else t


def strides2(t: torch.Tensor | None) -> tuple[int, int]:
    """The first two strides of a (B, L, ...) tensor, zeros for an absent one."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))
