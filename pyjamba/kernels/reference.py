"""The reference selective scan: the Mamba-1 recurrence written as a plain loop in float32. The spec.

Glossary of dimension letters (shared by every kernel):
    B  batch                      L  sequence length
    ED Mamba inner width          N  SSM state size

The recurrence (Mamba paper, Gu & Dao 2023, eq. 2a-2b with the zero-order-hold discretisation of
eq. 4; `selective_scan_ref` in state-spaces/mamba), per channel d and state index n:

    dt_t      = softplus(delta_t + delta_bias)                  (if delta_softplus)
    h_t[d, n] = exp(dt_t[d] * A[d, n]) * h_{t-1}[d, n] + dt_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]
    y_t[d]   *= silu(z_t[d])                                     (if z is given)

Inputs are channel-last, as the linear layers produce them: u, delta, z are (B, L, ED); B and C are
(B, L, N); A is (ED, N); D and delta_bias are (ED,). States are (B, ED, N), float32.

Everything is computed in float32 (bfloat16 and float16 inputs included), except float64 inputs,
which are computed and return their state in float64 so that tests can compare kernels tightly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_state_update_ref"]


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over L steps, one at a time.

    Returns y (B, L, ED) in u's dtype and the last state h_L (B, ED, N) in float32 (float64 for
    float64 inputs). The scan starts from `initial_state` (B, ED, N) if given, else from zeros.
    """
    batch, length, inner = u.shape
    n_state = A.shape[1]
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    A, Bf, Cf, uf = A.to(dtype), B.to(dtype), C.to(dtype), u.to(dtype)
    if initial_state is None:
        h = u.new_zeros(batch, inner, n_state, dtype=dtype)
    else:
        h = initial_state.to(dtype).clone()
    ys = []
    for t in range(length):
        dA = torch.exp(dt[:, t, :, None] * A)  # (B, ED, N)
        dBu = dt[:, t, :, None] * Bf[:, t, None, :] * uf[:, t, :, None]  # (B, ED, N)
        h = dA * h + dBu
        ys.append((h * Cf[:, t, None, :]).sum(-1))  # (B, ED)
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(batch, 0, inner)  # (B, L, ED)
    if D is not None:
        y = y + uf * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h


def selective_state_update_ref(
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
) -> torch.Tensor:
    """One step of the recurrence, for decoding: updates `state` (B, ED, N) in place, returns y (B, ED).

    u, delta, z are (B, ED); B, C are (B, N).
    """
    y, h = selective_scan_ref(
        u[:, None],
        delta[:, None],
        A,
        B[:, None],
        C[:, None],
        D=D,
        z=None if z is None else z[:, None],
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        initial_state=state,
    )
    state.copy_(h)
    return y[:, 0]
