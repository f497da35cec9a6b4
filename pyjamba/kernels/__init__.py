"""Kernel selection: the selective scan and its one-token update, chosen once and passed to the model.

`resolve_kernels("auto")` picks the fastest implementation available for a device and logs the
choice; asking for a kernel that cannot run raises, it never falls back silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import chunked, reference

__all__ = ["KERNEL_NAMES", "Kernels", "resolve_kernels"]

logger = logging.getLogger(__name__)

KERNEL_NAMES = ("auto", "torch", "reference")


@dataclass(frozen=True)
class Kernels:
    """A named pair: the full-sequence selective scan and the one-token state update."""

    name: str
    selective_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    selective_state_update: Callable[..., torch.Tensor]


_REGISTRY = {
    "reference": Kernels("reference", reference.selective_scan_ref, reference.selective_state_update_ref),
    "torch": Kernels("torch", chunked.selective_scan, chunked.selective_state_update),
}


def resolve_kernels(name: str | Kernels = "auto", device: torch.device | str | None = None) -> Kernels:
    """Turn a kernel name into Kernels. "auto" is the chunked PyTorch scan on every device today."""
    if isinstance(name, Kernels):
        return name
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(KERNEL_NAMES)}")
    if name == "auto":
        resolved = _REGISTRY["torch"]
        logger.info("kernels='auto' resolved to %r on device %s", resolved.name, device or "cpu")
        return resolved
    return _REGISTRY[name]
