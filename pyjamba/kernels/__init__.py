"""Kernel selection: the selective scan and its one-token update, chosen once and passed to the model.

`resolve_kernels("auto")` picks the fastest implementation available for a device and logs the
choice; asking for a kernel that cannot run raises, it never falls back silently.

    reference  reference.py: the spec, a loop over L in PyTorch
    torch      chunked.py: chunked scan in PyTorch, differentiable; any device
    numba      fused.py: one fused pass compiled by numba, CPU only, forward only (under autograd and for
               float64 it hands the call to the chunked scan); needs the `numba` package. With it come
               decode.py's fused one-token sublayers (`Kernels.decode`), which the model uses for
               float32 decoding on CPU without autograd, and elementwise.py's fused norm, conv and
               gate passes for prompts.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from . import chunked, reference

__all__ = ["KERNEL_NAMES", "Kernels", "loaded", "numba_unavailable", "resolve_kernels"]

logger = logging.getLogger(__name__)

KERNEL_NAMES = ("auto", "torch", "numba", "reference")


@dataclass(frozen=True)
class Kernels:
    """A named pair, the full-sequence selective scan and the one-token state update, and optionally
    the fused decoding sublayers (the `decode` module: `mamba_step`, `mlp_step`, `moe_step`, `gemv`)."""

    name: str
    selective_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    selective_state_update: Callable[..., torch.Tensor]
    decode: Any = None


_REGISTRY = {
    "reference": Kernels("reference", reference.selective_scan_ref, reference.selective_state_update_ref),
    "torch": Kernels("torch", chunked.selective_scan, chunked.selective_state_update),
}


def _fused() -> ModuleType:
    """Import the numba kernels (importing numba itself takes a moment, so only when asked for)."""
    return importlib.import_module(f"{__name__}.fused")


def numba_unavailable() -> str | None:
    """Why the numba kernels cannot be used here, or None if they can (numba imports)."""
    try:
        _fused()
    except ImportError as e:
        return f"numba is not importable ({e}); install it with `pip install numba`"
    return None


def _numba_kernels() -> Kernels:
    """The numba Kernels, compiled now (or loaded from numba's cache); raises if they cannot be."""
    reason = numba_unavailable()
    if reason is not None:
        raise RuntimeError(f"kernels='numba' is unavailable: {reason}")
    fused = _fused()
    seconds = fused.compile_kernels()
    logger.info("numba kernels compiled or loaded in %.1f s", seconds)
    decode = importlib.import_module(f"{__name__}.decode")
    importlib.import_module(f"{__name__}.elementwise")  # for `loaded`
    return Kernels("numba", fused.selective_scan, fused.selective_state_update, decode)


def loaded(name: str) -> ModuleType | None:
    """The numba module `name` ("decode" or "elementwise") once the numba kernels are loaded in this
    process, else None. model.py's pieces that hold no `Kernels` (`linear`, RMSNorm, the SwiGLU gate)
    use them through this, process-wide; it never imports numba itself."""
    return sys.modules.get(f"{__name__}.{name}")


def resolve_kernels(name: str | Kernels = "auto", device: torch.device | str | None = None) -> Kernels:
    """Turn a kernel name into Kernels.

    "auto" is "numba" on CPU when numba is importable and its kernels compile, else "torch"; on other
    devices "torch". The choice, and why, is logged. "numba" raises if numba is missing or the device is
    not a CPU.
    """
    if isinstance(name, Kernels):
        return name
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(KERNEL_NAMES)}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if name == "numba":
        if device_type != "cpu":
            raise ValueError(f"kernels='numba' runs on CPU only, not on {device_type}")
        return _numba_kernels()
    if name != "auto":
        return _REGISTRY[name]
    if device_type != "cpu":
        resolved, why = _REGISTRY["torch"], "the numba kernels run on CPU only"
    elif (reason := numba_unavailable()) is not None:
        resolved, why = _REGISTRY["torch"], reason
    else:
        try:
            resolved, why = _numba_kernels(), "numba is installed and its kernels compiled"
        except Exception as e:  # a compiler failure must not stop the model; it is logged, not hidden
            logger.warning("the numba kernels failed to compile, using 'torch': %r", e)
            resolved, why = _REGISTRY["torch"], f"numba failed to compile ({type(e).__name__})"
    logger.info("kernels='auto' resolved to %r on device %s: %s", resolved.name, device_type, why)
    return resolved
