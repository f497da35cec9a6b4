"""The fast CPU selective scan: chunked over time, one fused op per step, in plain PyTorch.

Same signatures and glossary as `reference.py`, plus T, the chunk length. The sequence is cut into
chunks of T steps. For each chunk the discretised decay exp(dt * A) and input dt * B * u are written
at once into buffers of shape (T, B, N, ED), allocated once per call and reused; the recurrence then
runs step by step, one in-place `addcmul` per step that turns the input buffer into the states h_t;
and the outputs come from one batched matmul of those states with C. Memory is O(B * T * ED * N) for
the scan plus the (B, L, ED) output, whatever L is: no (B, L, ED, N) tensor is ever made.

Why this shape (measured on a 2-core CPU with 2 threads, L = 4096, N = 16; docs/benchmarks.md):
- The exp over (L, ED, N) is about a third of the time and cannot be avoided, nor fused with its
  neighbours without a compiler, so the rest is arranged to cost as little memory traffic as possible.
- Buffers are time-major with ED last, (T, B, N, ED): each step is one contiguous (B, N, ED) block and
  every broadcast has a long contiguous inner loop. ED last was 1.2-1.5x faster than N last.
- T is chosen so that a buffer holds about `_CHUNK_ELEMENTS` numbers (2 MiB in float32) and the
  buffers stay in cache between passes: T = 4 for B * ED = 8192, 32 for ED = 1024 (B = 1). Longer
  chunks spill to memory, shorter ones pay per-op overhead; both were slower.
- The (B, L, ED) work (softplus, D, z) is done per block of several chunks, `_BLOCK_ELEMENTS` numbers:
  per chunk the ops are too small for two threads, over the whole sequence they make big temporaries.
- A log-depth (Hillis-Steele) scan within the chunk was measured and lost by 1.7-3x: it does T log T
  work against T, and on a CPU the one-op-per-step loop is already cheap next to the exp.

Autograd: the in-place loop cannot be differentiated by autograd, so when a gradient is needed the
scan runs inside `_SelectiveScan`, whose backward is the same chunked scan run in reverse (the
gradient g_t = dL/dh_t obeys g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}; `selective_scan_bwd` in
state-spaces/mamba). The forward keeps the state at the start of each chunk, (L / T, B, N, ED), and
the backward recomputes each chunk's states from it. That path uses chunks of at least `_GRAD_CHUNK`
steps so the saved states stay smaller than the saved inputs. Without gradients nothing is saved.

Precision: float64 inputs are computed in float64; every other dtype in float32, like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["selective_scan", "selective_state_update"]

_CHUNK_ELEMENTS = 1 << 19  # numbers per (T, B, N, ED) buffer: 2 MiB in float32
_MAX_CHUNK = 128
_BLOCK_ELEMENTS = 1 << 18  # numbers per (K, B, ED) block of the elementwise prologue and epilogue
_GRAD_CHUNK = 32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_length(batch: int, inner: int, n_state: int, length: int) -> int:
    """T: as many steps as fit `_CHUNK_ELEMENTS` numbers per buffer, within [1, min(L, 128)]."""
    per_step = max(1, batch * inner * n_state)
    return max(1, min(length, _MAX_CHUNK, _CHUNK_ELEMENTS // per_step))


def _initial_state(h0: torch.Tensor | None, A: torch.Tensor, batch: int) -> torch.Tensor:
    """A fresh working state (B, N, ED) in A's dtype: zeros, or a copy of h0 (B, ED, N), never h0 itself."""
    inner, n_state = A.shape
    h = A.new_empty(batch, n_state, inner)
    return h.zero_() if h0 is None else h.copy_(h0.transpose(1, 2))


def _discretise(
    dt: torch.Tensor, dtu: torch.Tensor, At: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, S: torch.Tensor
) -> None:
    """Write exp(dt A) into dA and dt u B into S, both (T, B, N, ED), for one chunk.

    dt and dtu (= dt * u) are (T, B, ED); B is (T, B, N); At is A transposed, (N, ED).
    """
    torch.mul(dt[:, :, None, :], At, out=dA).exp_()
    torch.mul(dtu[:, :, None, :], B[..., None], out=S)


def _recur(dA: torch.Tensor, S: torch.Tensor, h: torch.Tensor) -> None:
    """h_t = dA_t * h_{t-1} + S_t from h_0 = h, in place over S (T, B, N, ED): then S[t] holds h_t."""
    prev = h
    for s_t, dA_t in zip(S.unbind(0), dA.unbind(0), strict=True):
        prev = s_t.addcmul_(dA_t, prev)


def _scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h: torch.Tensor,
    chunk: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scan proper: y (B, L, ED) in u's dtype, with D and z applied if given.

    A, D, delta_bias and the state h (B, N, ED) are in the compute dtype; u, delta, z, B, C may be in a
    narrower one. h holds the initial state on entry and the last one on return. If `starts`
    (chunks, B, N, ED) is given, the state before each chunk is stored there.

    The (B, L, ED) work (dtype conversion, softplus, the D and z epilogue) is done a block of several
    chunks at a time: large enough for two threads to share, small enough to make no (B, L, ED)
    temporaries.
    """
    batch, length, inner = u.shape
    n_state = A.shape[1]
    dtype = h.dtype
    At = A.t().contiguous()  # (N, ED)
    y = u.new_empty(batch, length, inner)
    block = chunk * max(1, _BLOCK_ELEMENTS // (chunk * batch * inner))
    dA_buf = h.new_empty(min(chunk, length), batch, n_state, inner)  # (T, B, N, ED)
    # Two state buffers used in turn, so the last state of one chunk is still there for the next.
    S_bufs = (torch.empty_like(dA_buf), torch.empty_like(dA_buf))
    y_buf = h.new_empty(min(block, length), batch, inner)  # (K, B, ED)
    last = h
    i = 0
    for b_start in range(0, length, block):
        b_stop = min(b_start + block, length)
        ub = u[:, b_start:b_stop].transpose(0, 1).to(dtype)  # (K, B, ED)
        dtb = delta[:, b_start:b_stop].transpose(0, 1).to(dtype)  # (K, B, ED)
        if delta_bias is not None:
            dtb = dtb + delta_bias
        if delta_softplus:
            dtb = F.softplus(dtb)
        dtub = dtb * ub
        Bb = B[:, b_start:b_stop].transpose(0, 1).to(dtype)  # (K, B, N)
        Cb = C[:, b_start:b_stop].transpose(0, 1).to(dtype).contiguous()  # (K, B, N)
        yb = y_buf[: b_stop - b_start]
        for start in range(0, b_stop - b_start, chunk):
            stop = min(start + chunk, b_stop - b_start)
            steps = stop - start
            if starts is not None:
                starts[i].copy_(last)
            dA, S = dA_buf[:steps], S_bufs[i % 2][:steps]
            _discretise(dtb[start:stop], dtub[start:stop], At, Bb[start:stop], dA, S)
            _recur(dA, S, last)
            last = S[-1]
            # y_t = sum_n C_t[n] h_t[n, :] for the whole chunk at once.
            torch.bmm(
                Cb[start:stop].view(steps * batch, 1, n_state),
                S.view(steps * batch, n_state, inner),
                out=yb[start:stop].view(steps * batch, 1, inner),
            )
            i += 1
        if D is not None:
            yb.addcmul_(ub, D)
        if z is not None:
            yb.mul_(F.silu(z[:, b_start:b_stop].transpose(0, 1).to(dtype)))
        y[:, b_start:b_stop] = yb.transpose(0, 1)
    h.copy_(last)
    return y


class _SelectiveScan(torch.autograd.Function):
    """`_scan_forward` with a backward that runs the chunked scan in reverse, recomputing states."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        h0: torch.Tensor | None,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, inner = u.shape
        n_state = A.shape[1]
        h = _initial_state(h0, A, batch)
        starts = u.new_empty(-(-length // chunk), batch, n_state, inner)  # (L/T, B, N, ED)
        y = _scan_forward(u, dt, A, B, C, h, chunk, starts=starts)
        ctx.save_for_backward(u, dt, A, B, C, starts)
        ctx.chunk = chunk
        ctx.has_h0 = h0 is not None
        return y, h.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, gy: torch.Tensor, gh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, dt, A, B, C, starts = ctx.saved_tensors
        chunk = ctx.chunk
        batch, length, inner = u.shape
        n_state = A.shape[1]
        At = A.t().contiguous()  # (N, ED)
        g_u, g_dt = torch.empty_like(u), torch.empty_like(u)
        g_B, g_C = torch.empty_like(B), torch.empty_like(C)
        g_At = torch.zeros_like(At)
        # carry: dL/dh at the end of the chunk being processed, from later steps and from h_L itself.
        carry = gh.transpose(1, 2).contiguous()  # (B, N, ED)
        steps = min(chunk, length)
        dA_buf = u.new_empty(steps, batch, n_state, inner)  # (T, B, N, ED)
        H_buf, G_buf = torch.empty_like(dA_buf), torch.empty_like(dA_buf)
        for i in reversed(range(len(starts))):
            start = i * chunk
            stop = min(start + chunk, length)
            steps = stop - start
            flat = steps * batch
            dA, H, G = dA_buf[:steps], H_buf[:steps], G_buf[:steps]
            h_start = starts[i]
            dtc = dt[:, start:stop].transpose(0, 1).contiguous()  # (T, B, ED)
            uc = u[:, start:stop].transpose(0, 1).contiguous()  # (T, B, ED)
            Bc = B[:, start:stop].transpose(0, 1).contiguous()  # (T, B, N)
            Cc = C[:, start:stop].transpose(0, 1).contiguous()  # (T, B, N)
            gyc = gy[:, start:stop].transpose(0, 1).contiguous()  # (T, B, ED)
            dtu = dtc * uc
            _discretise(dtc, dtu, At, Bc, dA, H)
            _recur(dA, H, h_start)  # H[t] = h_t
            # dL/dC_t[n] = sum_d h_t[n, d] gy_t[d]
            g_Cc = torch.bmm(H.view(flat, n_state, inner), gyc.view(flat, inner, 1))  # (T*B, N, 1)
            # G_t = dL/dh_t = C_t gy_t + dA_{t+1} G_{t+1}: the recurrence again, backwards in time.
            torch.mul(Cc[..., None], gyc[:, :, None, :], out=G)
            G[-1].add_(carry)
            for t in range(steps - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            torch.mul(dA[0], G[0], out=carry)
            # h_t = dA_t h_{t-1} + dt_t u_t B_t. G_t is the gradient of the input term dt_t u_t B_t,
            g_dtu = torch.bmm(Bc.view(flat, 1, n_state), G.view(flat, n_state, inner))  # (T*B, 1, ED)
            g_Bc = torch.bmm(G.view(flat, n_state, inner), dtu.view(flat, inner, 1))  # (T*B, N, 1)
            # and P_t = G_t h_{t-1} dA_t that of the exponent dt_t A (P is written over G, now spent).
            P = G
            P[1:].mul_(H[:-1])
            P[0].mul_(h_start)
            P.mul_(dA)
            g_At.add_(torch.mul(P, dtc[:, :, None, :], out=H).sum((0, 1)))  # H is spent too
            g_dtc = P.mul_(At).sum(2)  # (T, B, ED)
            g_dtu = g_dtu.view(steps, batch, inner)
            g_dtc.addcmul_(g_dtu, uc)
            g_u[:, start:stop] = (g_dtu * dtc).transpose(0, 1)
            g_dt[:, start:stop] = g_dtc.transpose(0, 1)
            g_B[:, start:stop] = g_Bc.view(steps, batch, n_state).transpose(0, 1)
            g_C[:, start:stop] = g_Cc.view(steps, batch, n_state).transpose(0, 1)
        g_h0 = carry.transpose(1, 2) if ctx.has_h0 else None
        return g_u, g_dt, g_At.t(), g_B, g_C, g_h0, None


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
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan: y (B, L, ED) in u's dtype and the last state (B, ED, N) in float32
    (float64 for float64 inputs).

    Differentiable with respect to every tensor argument. `chunk_size` (T) defaults to a length that
    keeps a chunk buffer near `_CHUNK_ELEMENTS` numbers, and at least `_GRAD_CHUNK` under autograd.
    """
    batch, length, inner = u.shape
    n_state = A.shape[1]
    dtype = _compute_dtype(u.dtype)
    A, D, delta_bias = (None if t is None else t.to(dtype) for t in (A, D, delta_bias))
    h0 = None if initial_state is None else initial_state.to(dtype)
    chunk = chunk_size or _chunk_length(batch, inner, n_state, length)
    differentiable = (u, delta, A, B, C, D, z, delta_bias, h0)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)):
        h = _initial_state(h0, A, batch)
        y = _scan_forward(u, delta, A, B, C, h, chunk, D, z, delta_bias, delta_softplus)
        return y, h.transpose(1, 2).contiguous()
    # Autograd: the step, D and z go through ordinary ops around the scan's own backward.
    uf = u.to(dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias
    if delta_softplus:
        dt = F.softplus(dt)
    chunk = chunk_size or max(chunk, min(length, _GRAD_CHUNK))
    y, h = _SelectiveScan.apply(uf, dt, A, B.to(dtype), C.to(dtype), h0, chunk)
    if D is not None:
        y = torch.addcmul(y, uf, D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h


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
) -> torch.Tensor:
    """One decoding step: updates `state` (B, ED, N) in place and returns y (B, ED). Not differentiable.

    u, delta, z are (B, ED); B, C are (B, N).
    """
    dtype = _compute_dtype(u.dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = F.softplus(dt)
    uf = u.to(dtype)
    dA = torch.exp(dt[..., None] * A.to(dtype))  # (B, ED, N)
    state.mul_(dA).addcmul_((dt * uf)[..., None], B.to(dtype)[:, None, :])
    y = torch.bmm(state.to(dtype), C.to(dtype)[:, :, None]).squeeze(-1)  # (B, ED)
    if D is not None:
        y = torch.addcmul(y, uf, D.to(dtype))
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)
