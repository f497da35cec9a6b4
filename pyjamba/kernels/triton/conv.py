"""The Mamba causal depthwise conv and its SiLU in Triton, for a prompt (`conv_silu`, the op
`pyjamba::conv_silu`) and for one token (`conv_silu_step`, `pyjamba::conv_silu_step`).

Same signatures as `ops.conv_silu_ref` and `ops.conv_silu_step`: x (B, L, ED) or (B, ED) in x's own
layout (channels contiguous, as in_proj writes them: no transpose to F.conv1d's (B, ED, L)), the
W-1 past inputs (B, ED, W-1) moved on in place, weight (ED, 1, W), bias (ED,) or None. Products and
sums in float32. The one-token step also takes `state_batch_indices` (row b moves state row
`state_batch_indices[b]`), for a serving pool of slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from . import common
from .scan import sigmoid

__all__ = ["conv_silu", "conv_silu_step"]

_BLOCK_L = 16
_BLOCK_D = 64


@triton.jit
def _conv_kernel(
    x_ptr, past_ptr, w_ptr, bias_ptr, y_ptr, L, ED,
    s_xb, s_xl, s_pb, s_pd, s_pw,
    HAS_BIAS: tl.constexpr, W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < ED
    valid = (rows < L)[:, None] & dm[None, :]
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        r = rows - (W - 1) + k  # input index; before 0, the past's column W - 1 + r
        in_x = valid & (r >= 0)[:, None]
        in_past = valid & (r < 0)[:, None]
        xv = tl.load(x_ptr + b * s_xb + r[:, None] * s_xl + d[None, :], mask=in_x, other=0.0).to(tl.float32)
        pv = tl.load(
            past_ptr + b * s_pb + d[None, :] * s_pd + (W - 1 + r)[:, None] * s_pw, mask=in_past, other=0.0
        ).to(tl.float32)
        acc += (xv + pv) * tl.load(w_ptr + d * W + k, mask=dm, other=0.0).to(tl.float32)[None, :]
    y = acc * sigmoid(acc)
    tl.store(y_ptr + b * L * ED + rows[:, None] * ED + d[None, :], y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _conv_step_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, idx_ptr, y_ptr, ED, s_x, s_sb, s_sd, s_sw,
    HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr, W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < ED
    row = b
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    x = tl.load(x_ptr + b * s_x + d, mask=dm, other=0.0)
    acc = x.to(tl.float32) * tl.load(w_ptr + d * W + (W - 1), mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    s_base = state_ptr + row * s_sb + d * s_sd
    for k in tl.static_range(W - 1):
        v = tl.load(s_base + k * s_sw, mask=dm, other=0.0)
        acc += v.to(tl.float32) * tl.load(w_ptr + d * W + k, mask=dm, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(s_base + (k - 1) * s_sw, v, mask=dm)  # the window moves on by one
    tl.store(s_base + (W - 2) * s_sw, x.to(state_ptr.dtype.element_ty), mask=dm)
    y = acc * sigmoid(acc)
    tl.store(y_ptr + b * ED + d, y.to(y_ptr.dtype.element_ty), mask=dm)


@torch.library.custom_op("pyjamba::conv_silu", mutates_args=("past",))
def conv_silu_op(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(causal conv) (B, L, ED) in x's dtype; `past` (B, ED, W-1) becomes the last W-1 inputs."""
    batch, length, inner = x.shape
    width = weight.shape[-1]
    y = torch.empty(batch, length, inner, dtype=x.dtype, device=x.device)
    w = weight.reshape(inner, width)
    grid = (triton.cdiv(length, _BLOCK_L), triton.cdiv(inner, _BLOCK_D), batch)
    _conv_kernel[grid](
        x, past, w, common.or_(bias, w), y, length, inner,
        x.stride(0), x.stride(1), past.stride(0), past.stride(1), past.stride(2),
        HAS_BIAS=bias is not None, W=width, BLOCK_L=_BLOCK_L, BLOCK_D=_BLOCK_D, num_warps=4,
    )  # fmt: skip
    # The new past: the last W-1 of [past, x], a few columns, after the kernel has read the old one.
    tail = x[:, max(0, length - (width - 1)) :].transpose(1, 2).to(past.dtype)  # (B, ED, <= W-1)
    past.copy_(torch.cat([past, tail], dim=-1)[..., -(width - 1) :])
    return y


@conv_silu_op.register_fake
def _(x, past, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("pyjamba::conv_silu_step", mutates_args=("state",))
def conv_silu_step_op(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state_batch_indices: torch.Tensor | None,
) -> torch.Tensor:
    """silu(causal conv) of one token per row (B, ED); the state rows move on by one, in place."""
    batch, inner = x.shape
    width = weight.shape[-1]
    y = torch.empty(batch, inner, dtype=x.dtype, device=x.device)
    w = weight.reshape(inner, width)
    grid = (triton.cdiv(inner, _BLOCK_D), batch)
    _conv_step_kernel[grid](
        x, state, w, common.or_(bias, w), common.or_(state_batch_indices, w), y, inner,
        x.stride(0), state.stride(0), state.stride(1), state.stride(2),
        HAS_BIAS=bias is not None, HAS_IDX=state_batch_indices is not None, W=width, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    return y


@conv_silu_step_op.register_fake
def _(x, state, weight, bias, state_batch_indices):
    return torch.empty_like(x)


def conv_silu(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`ops.conv_silu_ref` in Triton. Autograd, float64 and tensors the kernel cannot read take `ops.conv_silu`."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if wants_grad or x.dtype == torch.float64 or x.shape[1] == 0 or not common.takes(x, past, weight, bias):
        return ops.conv_silu(x, past, weight, bias)
    return conv_silu_op(common.last_contiguous(x), past, weight.contiguous(), bias)


def conv_silu_step(
    x: torch.Tensor,
    state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ops.conv_silu_step` in Triton, and with `state_batch_indices` (B,): row b moves state row
    `state_batch_indices[b]` of a pool. float64 and tensors the kernel cannot read take the torch op."""
    if x.dtype == torch.float64 or not common.takes(x, state, weight, bias, state_batch_indices):
        if state_batch_indices is None:
            return ops.conv_silu_step(x, state, weight, bias)
        rows = state[state_batch_indices]
        y = ops.conv_silu_step(x, rows, weight, bias)
        state[state_batch_indices] = rows
        return y
    return conv_silu_step_op(common.last_contiguous(x), state, weight.contiguous(), bias, state_batch_indices)
