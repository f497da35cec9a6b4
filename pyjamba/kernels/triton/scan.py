"""The Mamba-1 selective scan in Triton, forward and backward, as the torch custom op `pyjamba::scan_fwd`
(and `pyjamba::scan_bwd`), differentiable through `torch.library.register_autograd`.

Same signature, glossary and precision as `reference.selective_scan_ref`: u, delta, z (B, L, ED) in any
float dtype and any strides with ED contiguous (the halves of in_proj's output are taken as they are),
B, C (B, L, N), A (ED, N), states (B, ED, N) float32; everything is computed in float32.

How (one program per batch row and block of BLOCK_D channels, the state (BLOCK_D, N) in registers):
the sequence is read in chunks of T steps, each chunk's inputs loaded as (T, BLOCK_D) tiles in one
go, its decays exp(dt A) and inputs dt B u formed as (T, BLOCK_D, N) tiles, and the recurrence
h_t = dA_t h_{t-1} + dBu_t solved for the whole chunk by `tl.associative_scan` (the pairs (dA, dBu)
compose as affine maps), the state carried into the first step of the next chunk. A step-by-step loop
would wait on a load per step; tiles keep the loads wide and the memory busy.

Backward: the forward stores the state at the start of each chunk, (B, L/T, ED, N). The backward
runs the chunks in reverse; per chunk it recomputes the states from that checkpoint with the same
scan, then solves the gradient recurrence G_t = C_t gy_t + dA_{t+1} G_{t+1} (G_t = dL/dh_t;
`selective_scan_bwd` in state-spaces/mamba) with a reverse associative scan. Where the gradient of
the exponent needs dA_t h_{t-1}, it takes h_t - dBu_t (no shift of register tiles, no division by a
vanishing dA). dB and dC sum over every channel: each program adds its block's share atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common

__all__ = ["selective_scan"]

_T = 16  # steps per chunk; the backward uses the forward's chunks (their checkpoints)
_BLOCK_D = 16
# Triton's interpreter runs an associative scan one element at a time in Python: there (the tests
# without a GPU) smaller tiles waste less on padding.
_T_INTERPRETED = 8
_BLOCK_D_INTERPRETED = 8


def _tiles() -> tuple[int, int]:
    """T (steps per chunk) and BLOCK_D (channels per program)."""
    return (_T_INTERPRETED, _BLOCK_D_INTERPRETED) if common.interpreting() else (_T, _BLOCK_D)


@triton.jit
def _combine(a1, b1, a2, b2):
    """Two affine maps x -> a x + b, the earlier (a1, b1) applied first."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def softplus(x):
    """log(1 + e^x), accurate for the very negative x of Mamba's dt (Kahan's log1p: no log1p needed)."""
    e = tl.exp(x)
    one_plus = 1.0 + e
    log1p = tl.where(one_plus == 1.0, e, tl.log(one_plus) * (e / (one_plus - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, h_ptr, ckpt_ptr,
    L, ED, N,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_yb, s_yl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    dm = d < ED
    nm = n < N
    dn_mask = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)  # (BD, BN)
    state_off = b * ED * N + d[:, None] * N + n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    first = (t == 0)[:, None, None]
    last = (t == T - 1)[:, None, None]
    n_chunks = tl.cdiv(L, T)
    for c in range(0, n_chunks):
        if SAVE:
            tl.store(ckpt_ptr + (b * n_chunks + c) * ED * N + d[:, None] * N + n[None, :], h, mask=dn_mask)
        rows = c * T + t
        rm = rows < L
        m2 = rm[:, None] & dm[None, :]
        u = tl.load(u_ptr + b * s_ub + rows[:, None] * s_ul + d[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + b * s_db + rows[:, None] * s_dl + d[None, :], mask=m2, other=0.0).to(
            tl.float32
        )
        if HAS_BIAS:
            dt = dt + bias[None, :]
        if SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(m2, dt, 0.0)  # past the end: dA = 1 and dBu = 0, the state passes through
        tn = rm[:, None] & nm[None, :]
        Bt = tl.load(B_ptr + b * s_Bb + rows[:, None] * s_Bl + n[None, :], mask=tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + rows[:, None] * s_Cl + n[None, :], mask=tn, other=0.0).to(tl.float32)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])  # (T, BD, BN)
        dBu = (dt * u)[:, :, None] * Bt[:, None, :]
        dBu = dBu + tl.where(first, dA * h[None, :, :], 0.0)
        _, H = tl.associative_scan((dA, dBu), 0, _combine)  # H[t] = h_t
        y = tl.sum(H * Ct[:, None, :], axis=2)  # (T, BD)
        if HAS_D:
            y = y + u * Dv[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + rows[:, None] * s_zl + d[None, :], mask=m2, other=0.0).to(
                tl.float32
            )
            y = y * z * sigmoid(z)
        tl.store(y_ptr + b * s_yb + rows[:, None] * s_yl + d[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(last, H, 0.0), axis=0)
    tl.store(h_ptr + state_off, h, mask=dn_mask)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, gy_ptr, gh_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr, gbias_ptr, gh0_ptr,
    L, ED, N,
    s_ub, s_ul, s_db, s_dl, s_zb, s_zl, s_Bb, s_Bl, s_Cb, s_Cl, s_gyb, s_gyl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GH: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    dm = d < ED
    nm = n < N
    dn_mask = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    state_off = b * ED * N + d[:, None] * N + n[None, :]
    # carry: G at the first step after the chunk being processed (dL/dh_L itself for the last chunk)
    if HAS_GH:
        carry = tl.load(gh_ptr + state_off, mask=dn_mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    gA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    gD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    gbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = (t == 0)[:, None, None]
    last = (t == T - 1)[:, None, None]
    n_chunks = tl.cdiv(L, T)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        h_start = tl.load(
            ckpt_ptr + (b * n_chunks + c) * ED * N + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0
        )
        rows = c * T + t
        rm = rows < L
        m2 = rm[:, None] & dm[None, :]
        tn = rm[:, None] & nm[None, :]
        u = tl.load(u_ptr + b * s_ub + rows[:, None] * s_ul + d[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.load(delta_ptr + b * s_db + rows[:, None] * s_dl + d[None, :], mask=m2, other=0.0).to(
            tl.float32
        )
        if HAS_BIAS:
            x = x + bias[None, :]
        dt = x
        if SOFTPLUS:
            dt = softplus(x)
        dt = tl.where(m2, dt, 0.0)
        # dt of the next step, for dA_{t+1} of the gradient recurrence (1 past the end of the sequence)
        m_next = (rows + 1 < L)[:, None] & dm[None, :]
        x1 = tl.load(delta_ptr + b * s_db + (rows + 1)[:, None] * s_dl + d[None, :], mask=m_next, other=0.0)
        x1 = x1.to(tl.float32)
        if HAS_BIAS:
            x1 = x1 + bias[None, :]
        dt1 = x1
        if SOFTPLUS:
            dt1 = softplus(x1)
        dt1 = tl.where(m_next, dt1, 0.0)
        Bt = tl.load(B_ptr + b * s_Bb + rows[:, None] * s_Bl + n[None, :], mask=tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_Cb + rows[:, None] * s_Cl + n[None, :], mask=tn, other=0.0).to(tl.float32)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])  # (T, BD, BN)
        dtu = dt * u
        dBu = dtu[:, :, None] * Bt[:, None, :]
        _, H = tl.associative_scan((dA, dBu + tl.where(first, dA * h_start[None, :, :], 0.0)), 0, _combine)
        gy = tl.load(gy_ptr + b * s_gyb + rows[:, None] * s_gyl + d[None, :], mask=m2, other=0.0).to(
            tl.float32
        )
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + rows[:, None] * s_zl + d[None, :], mask=m2, other=0.0).to(
                tl.float32
            )
            y = tl.sum(H * Ct[:, None, :], axis=2)
            if HAS_D:
                y = y + u * Dv[None, :]
            sig = sigmoid(z)
            gz = gy * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(
                gz_ptr + b * L * ED + rows[:, None] * ED + d[None, :], gz.to(gz_ptr.dtype.element_ty), mask=m2
            )
            gy = gy * z * sig  # the gradient of y before the gate
        if HAS_D:
            gD_acc += tl.sum(gy * u, axis=0)
        dA1 = tl.exp(dt1[:, :, None] * A[None, :, :])
        bG = Ct[:, None, :] * gy[:, :, None] + tl.where(last, dA1 * carry[None, :, :], 0.0)
        _, G = tl.associative_scan((dA1, bG), 0, _combine, reverse=True)  # G[t] = dL/dh_t
        carry = tl.sum(tl.where(first, G, 0.0), axis=0)
        P = G * (H - dBu)  # G_t dA_t h_{t-1}: the gradient of the exponent dt_t A
        gA_acc += tl.sum(P * dt[:, :, None], axis=0)
        gdtu = tl.sum(G * Bt[:, None, :], axis=2)  # (T, BD)
        gdt = tl.sum(P * A[None, :, :], axis=2) + gdtu * u
        gu = gdtu * dt
        if HAS_D:
            gu = gu + gy * Dv[None, :]
        if SOFTPLUS:
            gdt = gdt * sigmoid(x)
        gdt = tl.where(m2, gdt, 0.0)
        gbias_acc += tl.sum(gdt, axis=0)
        out_off = b * L * ED + rows[:, None] * ED + d[None, :]
        tl.store(gu_ptr + out_off, gu.to(gu_ptr.dtype.element_ty), mask=m2)
        tl.store(gdelta_ptr + out_off, gdt.to(gdelta_ptr.dtype.element_ty), mask=m2)
        gB = tl.sum(G * dtu[:, :, None], axis=1)  # (T, BN): this block's share of the sum over ED
        gC = tl.sum(H * gy[:, :, None], axis=1)
        tl.atomic_add(gB_ptr + b * L * N + rows[:, None] * N + n[None, :], gB, mask=tn)
        tl.atomic_add(gC_ptr + b * L * N + rows[:, None] * N + n[None, :], gC, mask=tn)
    # dL/dh0 = dA_0 G_0, dA_0 recomputed from the first step
    m0 = dm & (d * 0 < L)
    x0 = tl.load(delta_ptr + b * s_db + d, mask=m0, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x0 = x0 + bias
    dt0 = x0
    if SOFTPLUS:
        dt0 = softplus(x0)
    dt0 = tl.where(m0, dt0, 0.0)
    tl.store(gh0_ptr + state_off, tl.exp(dt0[:, None] * A) * carry, mask=dn_mask)
    tl.store(gA_ptr + state_off, gA_acc, mask=dn_mask)
    tl.store(gD_ptr + b * ED + d, gD_acc, mask=dm)
    tl.store(gbias_ptr + b * ED + d, gbias_acc, mask=dm)


def _n_chunks(length: int) -> int:
    return -(-length // _tiles()[0])


@torch.library.custom_op("pyjamba::scan_fwd", mutates_args=())
def scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, L, ED) in u's dtype, the last state (B, ED, N) float32, and the chunk-start states
    (B, L/T, ED, N) float32 when `save_checkpoints` (for the backward), else an empty tensor."""
    batch, length, inner = u.shape
    n_state = A.shape[1]
    y = torch.empty(batch, length, inner, dtype=u.dtype, device=u.device)
    h = torch.empty(batch, inner, n_state, dtype=torch.float32, device=u.device)
    chunks = _n_chunks(length) if save_checkpoints else 0
    ckpt = torch.empty(batch, chunks, inner, n_state, dtype=torch.float32, device=u.device)
    steps, block_d = _tiles()
    grid = (triton.cdiv(inner, block_d), batch)
    dummy = h  # stands for absent optional tensors; never read (the HAS_* flags)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, common.or_(D, dummy), common.or_(z, dummy), common.or_(delta_bias, dummy),
        common.or_(initial_state, dummy), y, h, ckpt,
        length, inner, n_state,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        *common.strides2(z), B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_H0=initial_state is not None, SAVE=save_checkpoints,
        T=steps, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state), num_warps=4,
    )  # fmt: skip
    return y, h, ckpt


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_checkpoints):
    batch, length, inner = u.shape
    n_state = A.shape[1]
    chunks = _n_chunks(length) if save_checkpoints else 0
    return (
        u.new_empty(batch, length, inner),
        u.new_empty(batch, inner, n_state, dtype=torch.float32),
        u.new_empty(batch, chunks, inner, n_state, dtype=torch.float32),
    )


@torch.library.custom_op("pyjamba::scan_bwd", mutates_args=())
def scan_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    checkpoints: torch.Tensor,
    grad_y: torch.Tensor,
    grad_last: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """Gradients of u, delta, A, B, C, D, z, delta_bias and the initial state, given those of y and
    of the last state (None: zero): u's, delta's, B's, C's and z's in their dtypes, the rest float32."""
    batch, length, inner = u.shape
    n_state = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    gA = torch.empty(batch, inner, n_state, **f32)
    # written in the inputs' dtypes by the kernel: no float32 pass over (B, L, ED) to convert them
    gu = torch.empty(batch, length, inner, dtype=u.dtype, device=u.device)
    gdelta = torch.empty(batch, length, inner, dtype=delta.dtype, device=u.device)
    gz = (
        torch.empty(batch, length, inner, dtype=z.dtype, device=u.device)
        if z is not None
        else gA.new_empty(0)
    )
    gB = torch.zeros(batch, length, n_state, **f32)
    gC = torch.zeros(batch, length, n_state, **f32)
    gD = torch.empty(batch, inner, **f32)
    gbias = torch.empty(batch, inner, **f32)
    gh0 = torch.empty(batch, inner, n_state, **f32)
    grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y
    dummy = gA
    steps, block_d = _tiles()
    grid = (triton.cdiv(inner, block_d), batch)
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, common.or_(D, dummy), common.or_(z, dummy), common.or_(delta_bias, dummy),
        checkpoints, grad_y, common.or_(grad_last, dummy),
        gu, gdelta, gz if z is not None else dummy, gB, gC, gA, gD, gbias, gh0,
        length, inner, n_state,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), *common.strides2(z),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), grad_y.stride(0), grad_y.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_GH=grad_last is not None,
        T=steps, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state), num_warps=8,
    )  # fmt: skip
    return gu, gdelta, gA.sum(0), gB.to(B.dtype), gC.to(C.dtype), gD.sum(0), gz, gbias.sum(0), gh0


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoints, grad_y, grad_last):
    batch, length, inner = u.shape
    n_state = A.shape[1]
    f32 = torch.float32
    return (
        u.new_empty(batch, length, inner),
        delta.new_empty(batch, length, inner),
        A.new_empty(inner, n_state, dtype=f32),
        B.new_empty(batch, length, n_state),
        C.new_empty(batch, length, n_state),
        u.new_empty(inner, dtype=f32),
        z.new_empty(batch, length, inner) if z is not None else u.new_empty(0, dtype=f32),
        u.new_empty(inner, dtype=f32),
        u.new_empty(batch, inner, n_state, dtype=f32),
    )


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.has = (D is not None, z is not None, delta_bias is not None, initial_state is not None)


def _backward(ctx, grad_y, grad_last, _grad_ckpt):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0 = scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ckpt, grad_y, grad_last
    )
    has_d, has_z, has_bias, has_h0 = ctx.has
    return (
        gu, gdelta, gA.to(A.dtype), gB, gC,
        gD.to(D.dtype) if has_d else None,
        gz if has_z else None,
        gbias.to(delta_bias.dtype) if has_bias else None,
        None,
        gh0 if has_h0 else None,
        None,
    )  # fmt: skip


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(
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
    """`reference.selective_scan_ref` in Triton: y (B, L, ED) in u's dtype, the last state (B, ED, N)
    float32. Differentiable in every tensor. float64 (and a tensor the kernel cannot read: not on a
    CUDA device, outside the interpreter) goes to the chunked torch scan."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not common.takes(*tensors) or u.dtype == torch.float64:
        return common.chunked.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
    u, delta, z = (common.last_contiguous(t) for t in (u, delta, z))
    B, C = common.last_contiguous(B), common.last_contiguous(C)
    A = A.float().contiguous()
    D, delta_bias = (None if t is None else t.float().contiguous() for t in (D, delta_bias))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, h, _ = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, wants_grad)
    return y, h
