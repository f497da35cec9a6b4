"""The numba backend: CPU kernels compiled by numba, for inference in float32 (and, decoding, on
bfloat16 or int8 weights: decode.py).

    scan.py         the selective scan and its one-token update, one fused pass (any dtype it
                    cannot take, or autograd, goes to the chunked PyTorch scan)
    elementwise.py  RMSNorm, causal conv + SiLU and the SwiGLU gate of a prompt, one pass each
    decode.py       one-token sublayers (Mamba, attention, MLP, MoE with their norm and residual),
                    the final norm with the head, and a matrix-vector product for a few rows
    step.py         which decoding calls take decode.py's kernels, and the weights each reads

`kernels()` compiles them (or loads them from numba's on-disk cache) and returns the table; the
decoding kernels for int8 and bfloat16 weights compile the first time a model with such weights
decodes. int8 weights (quantize.py): a few rows take decode.py's int8 matrix-vector product, a prompt
a one-pass dequantization then the float32 product. Every op here falls back to the torch backend's
for a call its kernel does not take (another dtype, autograd, a non-CPU tensor), so a model built
with this backend runs anywhere the torch backend does.
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

_GEMV_ROWS = 4  # float32 or int8 weights, up to this many rows: the numba matrix-vector product
_HEAD_DTYPES = (torch.float32, torch.bfloat16)  # the fused final norm and head read these
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


def _cpu_inference(*tensors: torch.Tensor) -> bool:
    """No gradient wanted, not compiling, every tensor on the CPU (any dtype)."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" for t in tensors)
    )


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
        if rows > 0 and decode.supported(x) and weight.device.type == "cpu":
            if scale is None and weight.dtype == torch.float32 and rows <= _GEMV_ROWS:
                return decode.gemv(x, weight, bias)  # streams the weight at ~23 GB/s, MKL's at 11-19
            if scale is not None and weight.dtype == torch.int8 and weight.dim() == 2:
                if rows <= _GEMV_ROWS:  # int8 read once, converted in registers: a quarter of the bytes
                    return decode.gemv(x, weight, bias, scale)
                # A prompt: dequantized in one pass, then multiplied as float32 (see _dequantize_linear).
                return _dequantize_linear(x, weight, bias, scale)
        if (
            rows > 0
            and scale is not None
            and x.dtype == torch.bfloat16
            and weight.dtype == torch.int8
            and weight.dim() == 2
            and _cpu_inference(x, weight)
        ):
            # bfloat16 activations (a bfloat16 model's int8 head): the same kernels in float32, as the
            # fused step runs them; cpu.linear would dequantize the whole weight on every call.
            out = linear(x.float(), weight, None if bias is None else bias.float(), scale)
            return out.to(x.dtype)
        return cpu.linear(x, weight, bias, scale)

    def _dequantize_linear(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
    ) -> torch.Tensor:
        """An int8 projection of many rows (a prompt): the weight dequantized into a reused float32
        buffer in one parallel pass, then multiplied as float32. The pass costs ~1 ns per weight
        (2-core AVX2), under 4% of a 512-token product, which reads each weight ~1000 times; torch's
        dequantize (two passes and a fresh buffer) cost 15-80%. Multiplying tiles of the weight as
        they are dequantized measured 2-4x slower (MKL on narrow row blocks)."""
        return cpu.linear(x, decode.dequantize(weight, scale, scratch=True), bias)

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
        x: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (
            scale is None
            and 0 < rows <= _GEMV_ROWS
            and x.dtype in _HEAD_DTYPES
            and weight.dtype == x.dtype
            and _cpu_inference(x, norm_weight, weight)
        ):
            # The final norm and the head; a bfloat16 head read as is, the sums in float32, rounded once.
            return decode.norm_gemv(None, x, eps, (norm_weight, weight)).to(x.dtype)
        return linear(rms_norm(x, norm_weight, eps), weight, None, scale)  # an int8 head: its gemv

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
