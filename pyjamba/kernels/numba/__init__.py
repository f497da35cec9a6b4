"""The numba backend: CPU kernels compiled by numba, for float32 inference.

    scan.py         the selective scan and its one-token update, one fused pass (any dtype it
                    cannot take, or autograd, goes to the chunked PyTorch scan)
    elementwise.py  RMSNorm, causal conv + SiLU and the SwiGLU gate of a prompt, one pass each
    decode.py       one-token sublayers (Mamba, attention, MLP, MoE with their norm and residual),
                    the final norm with the head, and a matrix-vector product for a few rows
    step.py         which decoding calls take decode.py's kernels, and the weights each reads

`kernels()` compiles them (or loads them from numba's on-disk cache) and returns the table. Every op
here falls back to the torch backend's for a call its kernel does not take (another dtype, autograd,
a non-CPU tensor), so a model built with this backend runs anywhere the torch backend does.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .. import Kernels, cpu, ops

__all__ = ["kernels"]

logger = logging.getLogger(__name__)

_GEMV_ROWS = 4  # float32, up to this many rows: the numba matrix-vector product
_NOTICE_AFTER_S = 2.0  # a compilation this slow is a first run: say so, rather than sit silent


@contextmanager
def _notice(what: str) -> Iterator[None]:
    """Tell stderr once `what` has taken more than a couple of seconds (the first run on a machine
    compiles for over a minute; later runs load numba's cache in about a second), and when it ends."""
    start = time.perf_counter()
    shown = threading.Event()

    def show() -> None:
        shown.set()
        print(
            f"pyjamba: {what} (the first run on this machine takes a minute or two; later runs load "
            "them from numba's cache)...",
            file=sys.stderr,
            flush=True,
        )

    timer = threading.Timer(_NOTICE_AFTER_S, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            print(f"pyjamba: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def kernels(why: str = "") -> Kernels:
    """The numba backend's table, compiled now; raises ImportError if numba is missing."""
    with _notice("compiling the numba CPU kernels"):
        start = time.perf_counter()
        scan = importlib.import_module(f"{__name__}.scan")
        scan.compile_kernels()
        decode = importlib.import_module(f"{__name__}.decode")  # compiled at import (signatures)
        elementwise = importlib.import_module(f"{__name__}.elementwise")
        step = importlib.import_module(f"{__name__}.step")
    logger.info("numba kernels compiled or loaded in %.1f s", time.perf_counter() - start)

    def linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (
            0 < rows <= _GEMV_ROWS
            and scale is None
            and weight.dtype == torch.float32
            and decode.supported(x, weight)
        ):
            return decode.gemv(x, weight, bias)  # streams the weight at ~23 GB/s, MKL's at 11-19
        return cpu.linear(x, weight, bias, scale)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if elementwise.supported(x, weight):
            return elementwise.rms_norm(x, weight, eps)  # one pass; F.rms_norm is six on a CPU
        return ops.rms_norm_fast(x, weight, eps)

    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if elementwise.supported(gate, up):
            return elementwise.silu_mul(gate, up)
        return ops.silu_mul(gate, up)

    def conv_silu(
        x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if past.is_contiguous() and elementwise.supported(x, past, weight):
            return elementwise.conv_silu(x, past, weight, bias)
        return ops.conv_silu(x, past, weight, bias)

    def norm_linear(
        x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
    ) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if 0 < rows <= _GEMV_ROWS and decode.supported(x, norm_weight, weight):
            return decode.norm_gemv(None, x, eps, (norm_weight, weight))  # the final norm and the head
        return linear(rms_norm(x, norm_weight, eps), weight)

    return Kernels(
        name="numba",
        why=why,
        selective_scan=scan.selective_scan,
        selective_state_update=scan.selective_state_update,
        linear=linear,
        rms_norm=rms_norm,
        silu_mul=silu_mul,
        conv_silu=conv_silu,
        conv_silu_step=ops.conv_silu_step,
        norm_linear=norm_linear,
        layer_step=step.layer_step,
    )
