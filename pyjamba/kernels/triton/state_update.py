"""One token of the selective scan in Triton: `selective_state_update` (the op `pyjamba::state_update`).

Same signature as `reference.selective_state_update_ref`, plus `state_batch_indices`: row b of the
inputs updates state row `state_batch_indices[b]`, so that a serving pool of states (slots, E') is
updated in place for the sequences of a step without gathering them into a batch and back. The state
is read once and written once; everything is computed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .scan import sigmoid, softplus

__all__ = ["selective_state_update"]

_BLOCK_D = 32


@triton.jit
def _state_update_kernel(
    state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, idx_ptr, y_ptr,
    ED, N, s_u, s_d, s_z, s_B, s_C,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm = d < ED
    nm = n < N
    dn = dm[:, None] & nm[None, :]
    row = b
    if HAS_IDX:
        row = tl.load(idx_ptr + b).to(tl.int64)
    s_off = row * ED * N + d[:, None] * N + n[None, :]
    h = tl.load(state_ptr + s_off, mask=dn, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b * s_u + d, mask=dm, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + b * s_d + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt = dt + tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_B + n, mask=nm, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C + n, mask=nm, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bv[None, :]
    tl.store(state_ptr + s_off, h.to(state_ptr.dtype.element_ty), mask=dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y = y + u * tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_z + d, mask=dm, other=0.0).to(tl.float32)
        y = y * z * sigmoid(z)
    tl.store(y_ptr + b * ED + d, y.to(y_ptr.dtype.element_ty), mask=dm)


@torch.library.custom_op("pyjamba::state_update", mutates_args=("state",))
def state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    state_batch_indices: torch.Tensor | None,
) -> torch.Tensor:
    """y (B, ED) in u's dtype; `state` (B or slots, ED, N) updated in place."""
    batch, inner = u.shape
    n_state = A.shape[1]
    y = torch.empty(batch, inner, dtype=u.dtype, device=u.device)
    dummy = y
    grid = (triton.cdiv(inner, _BLOCK_D), batch)
    _state_update_kernel[grid](
        state, u, delta, A, B, C, common.or_(D, dummy), common.or_(z, dummy), common.or_(delta_bias, dummy),
        common.or_(state_batch_indices, dummy), y,
        inner, n_state, u.stride(0), delta.stride(0), 0 if z is None else z.stride(0), B.stride(0), C.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_IDX=state_batch_indices is not None, BLOCK_D=_BLOCK_D,
        BLOCK_N=triton.next_power_of_2(n_state), num_warps=4,
    )  # fmt: skip
    return y


@state_update.register_fake
def _(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_batch_indices):
    return torch.empty_like(u)


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reference.selective_state_update_ref` in Triton: updates `state` in place, returns y (B, ED).

    state_batch_indices (B,) int: input row b updates `state[state_batch_indices[b]]` (a pool of
    slots); None: row b updates state[b]. A float64 state, or tensors the kernel cannot read, take
    the chunked torch update (on the indexed rows, written back)."""
    tensors = (state, u, delta, A, B, C, D, z, delta_bias, state_batch_indices)
    if not common.takes(*tensors) or state.dtype == torch.float64 or not state.is_contiguous():
        if state_batch_indices is None:
            return common.chunked.selective_state_update(
                state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
            )
        rows = state[state_batch_indices]
        y = common.chunked.selective_state_update(rows, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        state[state_batch_indices] = rows
        return y
    u, delta, z, B, C = (common.last_contiguous(t) for t in (u, delta, z, B, C))
    A = A.float().contiguous()
    D, delta_bias = (None if t is None else t.float().contiguous() for t in (D, delta_bias))
    return state_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, state_batch_indices)
