"""The projection multiply on a CPU by the fastest route PyTorch offers (the `torch` backend's
`linear` there); `ops.linear` (F.linear) is its readable twin. Measured on a 2-core AVX2 CPU,
2 threads (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["CPU_BF16_MATMUL", "linear"]

_ONEDNN = torch.backends.mkldnn.is_available()
# Whether the CPU multiplies bfloat16 natively (AVX512-BF16, AMX); without it torch's bfloat16 GEMM
# is a loop at ~2-4 GFLOP/s, against ~75 in float32.
CPU_BF16_MATMUL = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_MIN_WEIGHT = 1 << 19  # float32 weights from this many elements up go through oneDNN
_FEW_ROWS = 64  # 2 to this many rows: the weight as the left operand
_BF16_ROWS = 4  # bfloat16 without native support: up to this many rows stay in bfloat16


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ops.linear(x, weight, bias, scale)` by the fastest route on a CPU.

    Inference only (autograd, compilation and other devices take F.linear). x (..., in) has `rows`
    rows in all (tokens times sequences):
    - float32, one row: oneDNN's inner product for weights of `_ONEDNN_MIN_WEIGHT` elements or more.
      MKL's matrix-vector product runs on one core; for small weights oneDNN's fixed cost (~50 us)
      loses, and F.linear is kept.
    - float32, 2 to `_FEW_ROWS` rows (decoding a batch): weight @ x^T, transposed back. MKL
      parallelises over the weight's rows and streams it once: 2-3x faster than x @ weight^T
      (1024 x 512 weight, 4 rows: 0.16 ms against 0.40 in MKL and 0.30 in oneDNN).
    - float32, more rows (prompts): as for one row; oneDNN is on par with MKL or up to 15% faster.
    - bfloat16 on a CPU without native bfloat16 GEMM: up to `_BF16_ROWS` rows stay in bfloat16
      (a vectorised matrix-vector product per row, half the bytes of float32); more rows are
      multiplied in float32, the weight converted on the fly (a small cost next to the product).
    - an int8 weight (`scale` given): dequantized to the dtype the product runs in (float32, or
      bfloat16 where the CPU multiplies it natively), then as above. torch's own int8 x float
      product (`_weight_int8pack_mm`) measured 2-40x slower than this on an AVX2 CPU.
    """
    if (
        x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()  # the compiler picks its own matmuls
    ):
        return ops.linear(x, weight, bias, scale)
    if scale is not None:
        native = x.dtype in (torch.float32, torch.float64) or (x.dtype == torch.bfloat16 and CPU_BF16_MATMUL)
        compute = x.dtype if native else torch.float32
        out = linear(x.to(compute), ops.dequantize(weight, scale, compute), _as(bias, compute))
        return out.to(x.dtype)
    rows = x.numel() // max(1, x.shape[-1])
    if weight.dtype == torch.bfloat16 and not CPU_BF16_MATMUL and rows > _BF16_ROWS:
        return linear(x.float(), weight.float(), _as(bias, torch.float32)).to(x.dtype)
    if weight.dtype != torch.float32 or rows == 0:
        return F.linear(x, weight, bias)
    if 2 <= rows <= _FEW_ROWS:
        # MKL wants x^T as a transposed row-major x, hence the row-major input and output.
        flat = x.reshape(rows, x.shape[-1]).contiguous().t()  # (in, rows)
        out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., out)
    if weight.numel() >= _ONEDNN_MIN_WEIGHT and _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    return F.linear(x, weight, bias)


def _as(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bias is None else bias.to(dtype)
