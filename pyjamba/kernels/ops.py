"""The torch references of every op in the kernel table (`Kernels`): the spec each backend's fast
version is tested against, and what the `reference` backend runs.

Shapes: x (..., D) activations; weights as nn.Linear's (out, in); the conv's weight (ED, 1, W) as
nn.Conv1d's, its past inputs (B, ED, W-1), updated in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv",
    "causal_conv_ref",
    "causal_conv_update",
    "conv_silu",
    "conv_silu_ref",
    "conv_silu_step",
    "dequantize",
    "linear",
    "rms_norm",
    "rms_norm_fast",
    "silu_mul",
]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 weight (..., out, in) times its per-output-row scales (..., out), in float32, as `dtype`."""
    return (weight.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight^T + bias (F.linear); an int8 weight with its per-row `scale` (quantize.py) is
    dequantized to x's dtype first."""
    if scale is not None:
        weight = dequantize(weight, scale, x.dtype)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm, computed in float32 and cast back before the weight (as transformers)."""
    normed = F.rms_norm(x.float(), weight.shape, eps=eps)
    return weight * normed.to(x.dtype)


def rms_norm_fast(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` in one call where x and weight are float32: the same arithmetic, seven ops fewer."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate, silu(gate) * up."""
    return F.silu(gate) * up


def causal_conv_ref(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The causal depthwise conv as F.conv1d over [past W-1 inputs, x]: readable twin of `causal_conv`."""
    window = torch.cat([past.to(x.dtype), x.transpose(1, 2)], dim=-1)  # (B, ED, W-1+L)
    past.copy_(window[:, :, window.shape[-1] - past.shape[-1] :])
    return F.conv1d(window, weight, bias, groups=weight.shape[0]).transpose(1, 2)  # (B, L, ED)


def causal_conv(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise causal conv along L: y_t = bias + sum_k weight[:, 0, k] x_(t - W + 1 + k), (B, L, ED).

    x is (B, L, ED); the W-1 inputs before x_0 come from `past` (B, ED, W-1), which is then
    overwritten with the last W-1 inputs; weight is (ED, 1, W) as nn.Conv1d's. Computed as W
    shifted multiply-adds in x's own layout: F.conv1d wants (B, ED, L), and the transposed copies to
    and from it cost more than the conv.
    """
    length = x.shape[1]
    width = weight.shape[-1]
    window = torch.cat([past.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, W-1+L, ED)
    past.copy_(window[:, length:].transpose(1, 2))
    w = weight[:, 0].t()  # (W, ED)
    y = window[:, :length] * w[0]
    for k in range(1, width):
        y.addcmul_(window[:, k : k + length], w[k])
    return y if bias is None else y.add_(bias)


def causal_conv_update(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`causal_conv` for one token, x (B, ED): the dot of [state, x] with the kernel; state moves on by one."""
    window = torch.cat([state, x[..., None].to(state.dtype)], dim=-1)  # (B, ED, W)
    state.copy_(window[..., 1:])
    y = (window * weight[:, 0]).sum(-1).to(x.dtype)  # (B, ED)
    return y if bias is None else y + bias


def conv_silu_ref(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(causal conv) of a prompt's x (B, L, ED) after its `past`, by F.conv1d; past moves on."""
    return F.silu(causal_conv_ref(x, past, weight, bias))


def conv_silu(
    x: torch.Tensor, past: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`conv_silu_ref` as shifted multiply-adds in x's layout (`causal_conv`)."""
    return F.silu(causal_conv(x, past, weight, bias))


def conv_silu_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(causal conv) of one token per sequence, x (B, ED); state (B, ED, W-1) moves on by one."""
    return F.silu(causal_conv_update(x, state, weight, bias))
