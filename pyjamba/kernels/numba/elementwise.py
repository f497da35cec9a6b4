"""Fused elementwise steps of a prompt's forward pass on a CPU, compiled by numba: one pass each where
PyTorch makes several. Their readable twins are kernels/ops.py's (`rms_norm`, `conv_silu`,
`silu_mul`), held together by tests/test_elementwise_kernels.py.

Why (jamba-small prefill, 512 tokens, float32, 2 threads): the projections run at the machine's
matmul rate, so what is left is the ~20% of the time spent elsewhere. RMSNorm is six passes in
PyTorch on a CPU (`F.rms_norm` is not fused there), the causal conv four multiply-adds plus the
SiLU, the SwiGLU gate a SiLU and a product: each pass reads and writes (L, width) floats.

Rows are split across `torch.get_num_threads()` threads; within a row the loops run along the
contiguous channels, which vectorise. Only float32 on CPU without autograd (`supported`, shared
with decode.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types

from .decode import _dot, _span, supported
from .scan import _set_threads, _silu

__all__ = ["conv_silu", "rms_norm", "silu_mul", "supported"]

_F32 = np.float32
_OPTIONS = dict(parallel=True, cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
# Explicit signatures (compiled at import, as decode.py's): x of the conv is any view (a half of
# in_proj's output, contiguous or not); everything else is passed contiguous.
_V = types.Array(types.float32, 1, "C")
_M = types.Array(types.float32, 2, "C")
_T = types.Array(types.float32, 3, "C")
_I = types.int64


@njit(types.void(_M, _V, types.float32, _M, _I), **_OPTIONS)
def _rms_norm(x, weight, eps, out, threads):  # type: ignore[no-untyped-def]
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for each row r of x (R, D)."""
    rows, dim = x.shape
    for t in prange(threads):
        lo, hi = _span(rows, t, threads)
        for r in range(lo, hi):
            scale = _F32(1.0) / np.sqrt(_dot(x[r], x[r]) / _F32(dim) + eps)
            for j in range(dim):
                out[r, j] = x[r, j] * scale * weight[j]


@njit(types.void(_M, _M, _I), **_OPTIONS)
def _silu_mul(gate, up, threads):  # type: ignore[no-untyped-def]
    """gate = silu(gate) * up, in place, (R, I)."""
    rows, width = gate.shape
    for t in prange(threads):
        lo, hi = _span(rows, t, threads)
        for r in range(lo, hi):
            for j in range(width):
                gate[r, j] = _silu(gate[r, j]) * up[r, j]


@njit(types.void(types.Array(types.float32, 3, "A"), _T, _M, _V, _T, _I), **_OPTIONS)
def _conv_silu(x, past, weight, bias, out, threads):  # type: ignore[no-untyped-def]
    """out (B, L, ED) = silu(bias + sum_k weight[:, k] x_(t - W + 1 + k)), the inputs before x_0 from
    past (B, ED, W-1). Rows t of each sequence are split across threads; `past` is not changed."""
    batch, length, inner = x.shape
    width = weight.shape[1]
    has_bias = bias.shape[0] > 0
    rows = batch * length
    for t in prange(threads):
        lo, hi = _span(rows, t, threads)
        acc = np.empty(inner, np.float32)
        for row in range(lo, hi):
            b, i = divmod(row, length)
            for d in range(inner):
                acc[d] = bias[d] if has_bias else _F32(0.0)
            for k in range(width):
                s = i - width + 1 + k  # the input this tap reads: x[b, s] or, before 0, past
                if s >= 0:
                    for d in range(inner):
                        acc[d] += weight[d, k] * x[b, s, d]
                else:
                    for d in range(inner):
                        acc[d] += weight[d, k] * past[b, d, width - 1 + s]
            for d in range(inner):
                out[b, i, d] = _silu(acc[d])


def _rows(x: torch.Tensor) -> np.ndarray:
    """x as a contiguous (rows, last) float32 numpy array: a view when x is contiguous, else a copy."""
    return x.detach().reshape(-1, x.shape[-1]).contiguous().numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., D) with weight (D,), as `model.RMSNorm` computes it in float32."""
    out = torch.empty(x.shape, dtype=torch.float32)
    _rms_norm(_rows(x), weight.detach().contiguous().numpy(), _F32(eps), _rows(out), _set_threads())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, written into gate (a fresh projection output, which nothing else reads)."""
    if not gate.is_contiguous() or gate.shape != up.shape:
        return F.silu(gate) * up
    _silu_mul(_rows(gate), _rows(up), _set_threads())
    return gate


def conv_silu(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(causal_conv(x, past, weight, bias)): x (B, L, ED) with any row stride (a half of in_proj's
    output), past (B, ED, W-1) then overwritten with the last W-1 inputs, as `model.causal_conv` does."""
    batch, length, inner = x.shape
    width = weight.shape[-1]
    xs = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(batch, length, inner, dtype=torch.float32)
    bias_np = np.zeros(0, np.float32) if bias is None else bias.detach().contiguous().numpy()
    _conv_silu(
        xs.detach().numpy(), past.detach().contiguous().numpy(), weight.detach().reshape(inner, width).contiguous().numpy(),
        bias_np, out.numpy(), _set_threads(),
    )  # fmt: skip
    # The state moves on: the last W-1 inputs, from past where the chunk is shorter than that.
    window = torch.cat([past.transpose(1, 2).to(x.dtype), x[:, max(0, length - width + 1) :]], dim=1)
    past.copy_(window[:, window.shape[1] - (width - 1) :].transpose(1, 2))
    return out
