"""The kernel table: every op the model computes through, chosen once per model by `resolve_kernels`.

A model holds one `Kernels` and runs exactly it: nothing is looked up process-wide, so a model built
with the reference backend never enters a numba function, whatever other models in the process
loaded. Each field defaults to its torch reference (ops.py, reference.py); a backend replaces the
ops it does faster, and each of its ops falls back to the torch one for a call its kernel does not
take. Backends:

    reference  the spec: ops.py's plain PyTorch and reference.py's loop over L for the scan
    torch      chunked.py's scan (differentiable, any device); on a CPU, cpu.py's routing of the
               projections to MKL or oneDNN by shape; elsewhere PyTorch's own ops
    numba      numba/: fused CPU kernels for float32 inference (the scan, the prompt's norm, conv
               and gate, and the whole one-token step of a layer); needs the `numba` package
    triton     triton/: GPU kernels (the scan forward and backward, its one-token step, the conv,
               the fused MoE), torch custom ops; CUDA devices only; needs the `triton` package

`resolve_kernels("auto", device)` picks the fastest backend for the device and says why (`.why`);
asking for one that cannot run raises, it never falls back silently.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import chunked, cpu, ops, reference

__all__ = ["KERNEL_NAMES", "Kernels", "numba_unavailable", "resolve_kernels", "triton_unavailable"]

logger = logging.getLogger(__name__)

KERNEL_NAMES = ("auto", "torch", "numba", "triton", "reference")

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
Conv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final norm then the head: linear(rms_norm(x)), the reference of `Kernels.norm_linear`."""
    return ops.linear(ops.rms_norm(x, norm_weight, eps), weight, None, scale)


@dataclass(frozen=True)
class Kernels:
    """One backend's ops. Shapes: scan inputs as reference.py's; the rest as ops.py's.

    selective_scan, selective_state_update: the SSM over a prompt, and one step of it (reference.py).
    linear(x, weight, bias, scale): every projection; `scale` (out,) is given for an int8 weight
    (quantize.py), None for a float one. rms_norm(x, weight, eps). silu_mul(gate, up): the
    SwiGLU gate (a backend may write it into gate). conv_silu(x, past, weight, bias): the causal
    depthwise conv of a prompt and its SiLU, `past` moved on; conv_silu_step the same for one token.
    norm_linear(x, norm_weight, eps, weight, scale): the final norm and the head (scale: of an int8 head).
    layer_step(layer, x, attn_mask, pad_mask, cache): a whole Layer's forward in one fused step, or
    None for a call it does not take (then the Layer's own forward runs); None: no fused step.
    experts(x, weights, index, gate, up, down, gate_scale, up_scale, down_scale): a MoE layer's
    experts fused (T, D), or None for a call it does not take (then the Experts module's own loop
    through `linear` and `silu_mul` runs, model.py: the spec); None: no fused MoE.
    why: how the backend came to be chosen (`resolve_kernels`).
    """

    name: str
    why: str = ""
    selective_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.selective_scan_ref
    selective_state_update: Callable[..., torch.Tensor] = reference.selective_state_update_ref
    linear: Linear = ops.linear
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = ops.rms_norm
    silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ops.silu_mul
    conv_silu: Conv = ops.conv_silu_ref
    conv_silu_step: Conv = ops.conv_silu_step
    norm_linear: Callable[..., torch.Tensor] = _norm_linear
    layer_step: Callable[..., Any] | None = None
    experts: Callable[..., torch.Tensor | None] | None = None


def _torch_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return cpu.linear(ops.rms_norm_fast(x, norm_weight, eps), weight, None, scale)


def _reference(why: str) -> Kernels:
    return Kernels("reference", why)


def _torch(why: str) -> Kernels:
    # cpu.linear hands anything but CPU inference to F.linear, so the table serves every device.
    return Kernels(
        "torch",
        why,
        selective_scan=chunked.selective_scan,
        selective_state_update=chunked.selective_state_update,
        linear=cpu.linear,
        rms_norm=ops.rms_norm_fast,
        conv_silu=ops.conv_silu,
        norm_linear=_torch_norm_linear,
    )


def numba_unavailable() -> str | None:
    """Why the numba kernels cannot be used here, or None if they can (numba imports)."""
    try:
        importlib.import_module("numba")
    except ImportError as e:
        return f"numba is not importable ({e}); install it with `pip install numba`"
    return None


def _numba(why: str) -> Kernels:
    """The numba Kernels, compiled now (or loaded from numba's cache); raises if they cannot be."""
    reason = numba_unavailable()
    if reason is not None:
        raise RuntimeError(f"kernels='numba' is unavailable: {reason}")
    return importlib.import_module(f"{__name__}.numba").kernels(why)


def triton_unavailable() -> str | None:
    """Why the triton kernels cannot be built here, or None if they can (triton imports)."""
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not importable ({e}); install it with `pip install triton` (pyjamba[gpu])"
    return None


def _triton(why: str) -> Kernels:
    reason = triton_unavailable()
    if reason is not None:
        raise RuntimeError(f"kernels='triton' is unavailable: {reason}")
    return importlib.import_module(f"{__name__}.triton").kernels(why)


def resolve_kernels(name: str | Kernels = "auto", device: torch.device | str | None = None) -> Kernels:
    """The backend `name` for a model on `device` (default CPU), with why it was chosen.

    "auto" is "numba" on CPU when numba is importable and its kernels compile, else "torch"; on a
    CUDA device "triton" when triton is importable, else "torch"; elsewhere "torch". The choice, and
    why, is logged. "numba" raises if numba is missing or the device is not a CPU; "triton" if
    triton is missing or the device is not a CUDA device.
    """
    if isinstance(name, Kernels):
        return name
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernels {name!r}; choose one of {', '.join(KERNEL_NAMES)}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if name == "numba":
        if device_type != "cpu":
            raise ValueError(f"kernels='numba' runs on CPU only, not on {device_type}")
        return _numba("asked for")
    if name == "triton":
        if device_type != "cuda":
            raise ValueError(f"kernels='triton' runs on CUDA devices only, not on {device_type}")
        return _triton("asked for")
    if name == "torch":
        return _torch("asked for")
    if name == "reference":
        return _reference("asked for")
    if device_type == "cuda":
        if (reason := triton_unavailable()) is not None:
            resolved = _torch(f"auto: on {device_type}, but {reason}")
        else:
            resolved = _triton(f"auto: the model is on {device_type} and triton is installed")
    elif device_type != "cpu":
        resolved = _torch(f"auto: the numba kernels run on CPU only, this model is on {device_type}")
    elif (reason := numba_unavailable()) is not None:
        resolved = _torch(f"auto: {reason}")
    else:
        try:
            resolved = _numba("auto: numba is installed and its kernels compiled")
        except Exception as e:  # a compiler failure must not stop the model; it is logged, not hidden
            logger.warning("the numba kernels failed to compile, using 'torch': %r", e)
            resolved = _torch(f"auto: numba failed to compile its kernels ({type(e).__name__})")
    logger.info("kernels='auto' resolved to %r on device %s: %s", resolved.name, device_type, resolved.why)
    return resolved
