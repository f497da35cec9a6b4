"""Fused one-token decoding on a CPU: a Mamba, attention, SwiGLU MLP or MoE sublayer (its RMSNorm
and residual included), the final norm with the head, and a matrix-vector product, each one numba
call. Their readable twins are `MambaMixer.step`, `Attention`, `MLP`, `SparseMoE` and `ops.linear`
(the eager path), held together by tests/test_decode_kernels.py and tests/test_quantized_kernels.py;
step.py decides which calls take them and hands them a model's weights.

Why (jamba-small, float32, batch 1, 2-core AVX2 CPU; docs/benchmarks.md): a decoding step reads
0.26 GB of weights, 9.5 ms at the machine's 27 GB/s. Eagerly it took 26 ms: the projections ran at
13-19 GB/s (MKL's and oneDNN's matrix-vector products for these shapes), and ~60 small tensor
operations per layer cost ~10 ms of dispatch. Here each sublayer is one call that reads each
weight once at 23-27 GB/s, and does everything between the projections (norms, conv, SSM update,
gating, routing, softmax over the keys, residual) on vectors that stay in cache.

Shapes: x is (B, D), B a handful of sequences; weights are nn.Linear's (out, in), experts stacked
(E, I, D) and (E, D, I). Each call returns x plus the sublayer's output, a new array: the residual
stream is never written in place. The Mamba call advances the conv and SSM states in place.

Weight kinds: a projection's matrix is read as stored, float32, int8 (quantize.py: symmetric per
output row, its float32 scales beside it) or bfloat16 (as its int16 bits), and converted to float32
in registers (`_wload`), so that a token reads 1, 2 or 4 bytes per weight. A row's dot product is
sum_j q[i, j] x[j], times the row's scale once for int8 (`_row`); float weights pass an empty scale.
numba specialises a kernel by its arguments' types, so each kernel is one source compiled per kind:
float32 when this module is imported, the others the first time a model with such weights decodes
(`_kernel`; numba's disk cache keeps them). Activations, norms, the SSM state and every sum are
float32 whatever the weights (a bfloat16 model's small vectors are converted once and kept); a
bfloat16 conv state is read and written as bfloat16 bits.

Parallelism: `threads` contiguous runs of output rows (a projection's rows are independent), one
parallel region per projection; the few serial steps between them (RMS norms, routing) touch
vectors of a few hundred floats. Dot products are vectorised with reassociation allowed, like any
BLAS: the sums differ from the eager path's by float32 rounding (tests hold them to 1e-5).

CPU tensors without autograd only; anything else takes the eager path (`supported`, step.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from .scan import _as_float, _exp, _exp2_product, _set_threads, _silu, _softplus, _store

__all__ = [
    "attention_step",
    "dequantize",
    "gemv",
    "mamba_step",
    "mlp_step",
    "moe_step",
    "norm_gemv",
    "supported",
]

_F32 = np.float32
_ZERO = _F32(0.0)
_OPTIONS = dict(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy", parallel=True)
_EMPTY = np.zeros(0, np.float32)
_EMPTY2 = np.zeros((0, 0), np.float32)  # the scales of float experts
# Explicit signatures (`_kernel`): a kernel compiles (or loads from numba's disk cache) before its
# first call, never for whatever layout a call happens to bring, and a view that happens to be
# contiguous (a cache filled to its capacity) takes the same compiled code as one that is not.
_V = types.Array(types.float32, 1, "C")
_M = types.Array(types.float32, 2, "C")
_T = types.Array(types.float32, 3, "C")
_I, _F = types.int64, types.float32
_KINDS = {np.dtype(np.float32): types.float32, np.dtype(np.int8): types.int8, np.dtype(np.int16): types.int16}
_W = 64  # channels whose dt, dt u and silu(z) are computed together


def _wload(v):  # type: ignore[no-untyped-def]
    """A stored weight as float32: float32 as is, int8 as its integer, int16 as a bfloat16's bits. (numba only)"""
    raise NotImplementedError


@overload(_wload, inline="always")
def _wload_impl(v):  # type: ignore[no-untyped-def]
    if isinstance(v, types.Integer) and v.bitwidth == 16:
        return lambda v: _as_float(np.int32(v) << np.int32(16))
    return lambda v: np.float32(v)


@njit(fastmath={"contract", "reassoc"}, cache=True)
def _dot(a, b):  # type: ignore[no-untyped-def]
    """sum(a * b) over two vectors of any weight kind, in float32; reassociation lets LLVM keep
    vector partial sums (and widen int8 or bfloat16 lanes to float32 in registers)."""
    acc = _ZERO
    for j in range(a.shape[0]):
        acc += _wload(a[j]) * _wload(b[j])
    return acc


@njit(inline="always")
def _row(w, s, i, x):  # type: ignore[no-untyped-def]
    """Row i of matrix w dotted with x, times its scale s[i] for int8 (s empty for float weights)."""
    acc = _dot(w[i], x)
    return acc * s[i] if s.shape[0] > 0 else acc


@njit(inline="always")
def _expert_row(w, s, e, i, x):  # type: ignore[no-untyped-def]
    """`_row` for row i of expert e of a stack w (E, out, in), scales s (E, out) or empty."""
    acc = _dot(w[e, i], x)
    return acc * s[e, i] if s.shape[0] > 0 else acc


@njit(inline="always")
def _span(rows, t, threads):  # type: ignore[no-untyped-def]
    """Thread t's run [lo, hi) of `rows` rows."""
    return rows * t // threads, rows * (t + 1) // threads


@njit(inline="always")
def _rms_norm(x, weight, eps, out):  # type: ignore[no-untyped-def]
    """out = x / sqrt(mean(x^2) + eps) * weight, one vector (RMSNorm in float32)."""
    scale = _F32(1.0) / np.sqrt(_dot(x, x) / _F32(x.shape[0]) + eps)
    for j in range(x.shape[0]):
        out[j] = x[j] * scale * weight[j]


@njit(inline="always")
def _residual_rows(x, w, s, bias, v, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[:, lo:hi] = x + v w^T (+ bias), rows lo to hi of a sublayer's output projection added to the
    residual stream; x, out (B, D), w (D, K) with scales s, v (B, K), bias (D,) or empty."""
    for i in range(lo, hi):
        for b in range(x.shape[0]):
            out[b, i] = x[b, i] + _row(w, s, i, v[b]) + (bias[i] if bias.shape[0] > 0 else _ZERO)


@njit(inline="always")
def _advance(h, a2, bc, b, d, dt, dtu, n_state):  # type: ignore[no-untyped-def]
    """h[b, d, :] = 2^(dt a2[d, :]) h[b, d, :] + dt u B: one channel's N states, one step."""
    for n in range(n_state):
        h[b, d, n] = _exp2_product(dt, a2[d, n], False) * h[b, d, n] + dtu * bc[b, 0, n]


@njit(**_OPTIONS)
def _gemv(w, s, bias, x, y, threads):  # type: ignore[no-untyped-def]
    """y (B, out) = x (B, in) @ w (out, in)^T (+ bias): each row of w read once, for every x."""
    has_bias = bias.shape[0] > 0
    for t in prange(threads):
        lo, hi = _span(w.shape[0], t, threads)
        for i in range(lo, hi):
            for b in range(x.shape[0]):
                y[b, i] = _row(w, s, i, x[b]) + (bias[i] if has_bias else _ZERO)


@njit(**_OPTIONS)
def _dequantize(w, s, out, threads):  # type: ignore[no-untyped-def]
    """out (out, in) = w * s[:, None]: int8 rows times their scales, in float32, one pass."""
    for t in prange(threads):
        lo, hi = _span(w.shape[0], t, threads)
        for i in range(lo, hi):
            scale = s[i]
            for j in range(w.shape[1]):
                out[i, j] = _F32(w[i, j]) * scale


@njit(**_OPTIONS)
def _mamba(  # type: ignore[no-untyped-def]
    x, norm_w, eps, in_w, in_s, in_b, conv_w, conv_b, conv_state, x_w, x_s, dt_norm_w, b_norm_w,
    c_norm_w, dt_w, dt_s, dt_b, a2, D, h, out_w, out_s, out_b, threads,
):  # fmt: skip
    """x + MambaMixer(RMSNorm(x)) for one token per sequence; conv_state and h advance in place.

    a2 is A log2(e) (ED, N), so that exp(dt A) = 2^(dt a2).
    """
    batch, dim = x.shape
    inner, n_state = a2.shape
    rank = dt_w.shape[1]
    width = conv_w.shape[1]
    normed = np.empty((batch, dim), np.float32)
    for b in range(batch):
        _rms_norm(x[b], norm_w, eps, normed[b])
    u = np.empty((batch, inner), np.float32)
    z = np.empty((batch, inner), np.float32)
    # in_proj, then per channel the causal conv over [state, new input] and SiLU.
    for t in prange(threads):
        lo, hi = _span(inner, t, threads)
        for d in range(lo, hi):
            for b in range(batch):
                xd = _row(in_w, in_s, d, normed[b]) + (in_b[d] if in_b.shape[0] > 0 else _ZERO)
                z[b, d] = _row(in_w, in_s, inner + d, normed[b]) + (
                    in_b[inner + d] if in_b.shape[0] > 0 else _ZERO
                )
                acc = conv_w[d, width - 1] * xd
                for k in range(width - 1):
                    acc += conv_w[d, k] * _wload(conv_state[b, d, k])
                for k in range(width - 2):
                    conv_state[b, d, k] = conv_state[b, d, k + 1]
                conv_state[b, d, width - 2] = _store(xd, conv_state[b, d, width - 2])
                u[b, d] = _silu(acc + (conv_b[d] if conv_b.shape[0] > 0 else _ZERO))
    # x_proj into dt, B, C.
    dbc = np.empty((batch, rank + 2 * n_state), np.float32)
    for t in prange(threads):
        lo, hi = _span(dbc.shape[1], t, threads)
        for r in range(lo, hi):
            for b in range(batch):
                dbc[b, r] = _row(x_w, x_s, r, u[b])
    dt_in = np.empty((batch, rank), np.float32)
    bc = np.empty((batch, 2, n_state), np.float32)
    for b in range(batch):
        _rms_norm(dbc[b, :rank], dt_norm_w, eps, dt_in[b])
        _rms_norm(dbc[b, rank : rank + n_state], b_norm_w, eps, bc[b, 0])
        _rms_norm(dbc[b, rank + n_state :], c_norm_w, eps, bc[b, 1])
    # dt_proj, the SSM step and the gate, per channel.
    # dt, dt u and silu(z) for a block of _W channels at once (so that they vectorise), then each
    # channel's N states.
    y = np.empty((batch, inner), np.float32)
    for t in prange(threads):
        lo, hi = _span(inner, t, threads)
        rows = np.zeros((4, _W), np.float32)  # dt, dt u, u, silu(z)
        for d0 in range(lo, hi, _W):
            w = min(_W, hi - d0)
            for b in range(batch):
                for j in range(w):
                    rows[0, j] = _row(dt_w, dt_s, d0 + j, dt_in[b]) + dt_b[d0 + j]
                    rows[2, j] = u[b, d0 + j]
                    rows[3, j] = z[b, d0 + j]
                for j in range(_W):
                    rows[0, j] = _softplus(rows[0, j])
                for j in range(_W):
                    rows[1, j] = rows[0, j] * rows[2, j]
                    rows[3, j] = _silu(rows[3, j])
                for j in range(w):
                    d = d0 + j
                    if n_state == 16:  # Jamba's N: a fixed trip count, unrolled into two vectors
                        _advance(h, a2, bc, b, d, rows[0, j], rows[1, j], 16)
                    else:
                        _advance(h, a2, bc, b, d, rows[0, j], rows[1, j], n_state)
                    y[b, d] = (_dot(bc[b, 1], h[b, d]) + D[d] * rows[2, j]) * rows[3, j]
    # out_proj, added to the residual.
    out = np.empty((batch, dim), np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        _residual_rows(x, out_w, out_s, out_b, y, out, lo, hi)
    return out


@njit(**_OPTIONS)
def _mlp(x, norm_w, eps, gate_w, gate_s, up_w, up_s, down_w, down_s, threads):  # type: ignore[no-untyped-def]
    """x + MLP(RMSNorm(x)): down(silu(gate(h)) * up(h))."""
    batch, dim = x.shape
    width = gate_w.shape[0]
    normed = np.empty((batch, dim), np.float32)
    for b in range(batch):
        _rms_norm(x[b], norm_w, eps, normed[b])
    g = np.empty((batch, width), np.float32)
    for t in prange(threads):
        lo, hi = _span(width, t, threads)
        for i in range(lo, hi):
            for b in range(batch):
                g[b, i] = _silu(_row(gate_w, gate_s, i, normed[b])) * _row(up_w, up_s, i, normed[b])
    out = np.empty((batch, dim), np.float32)
    no_bias = np.empty(0, np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        _residual_rows(x, down_w, down_s, no_bias, g, out, lo, hi)
    return out


@njit(**_OPTIONS)
def _moe(x, norm_w, eps, router_w, gate_w, gate_s, up_w, up_s, down_w, down_s, top_k, threads):  # type: ignore[no-untyped-def]
    """x + SparseMoE(RMSNorm(x)) and the router logits (B, E): float32 softmax, top-k, unrenormalised."""
    batch, dim = x.shape
    experts, width, _ = gate_w.shape
    normed = np.empty((batch, dim), np.float32)
    for b in range(batch):
        _rms_norm(x[b], norm_w, eps, normed[b])
    logits = np.empty((batch, experts), np.float32)
    chosen = np.empty((batch, top_k), np.int64)
    weights = np.empty((batch, top_k), np.float32)
    probs = np.empty(experts, np.float32)
    for b in range(batch):
        for e in range(experts):
            logits[b, e] = _dot(router_w[e], normed[b])
        top = logits[b].max()
        total = _ZERO
        for e in range(experts):
            probs[e] = _exp(logits[b, e] - top)
            total += probs[e]
        for e in range(experts):
            probs[e] /= total
        for k in range(top_k):  # the k-th largest, ties to the lower index (as torch.topk)
            best = 0
            for e in range(1, experts):
                if probs[e] > probs[best]:
                    best = e
            chosen[b, k] = best
            weights[b, k] = probs[best]
            probs[best] = _F32(-1.0)
    g = np.empty((batch, top_k, width), np.float32)
    for t in prange(threads):
        lo, hi = _span(width, t, threads)
        for i in range(lo, hi):
            for b in range(batch):
                for k in range(top_k):
                    e = chosen[b, k]
                    g[b, k, i] = _silu(_expert_row(gate_w, gate_s, e, i, normed[b])) * _expert_row(
                        up_w, up_s, e, i, normed[b]
                    )
    out = np.empty((batch, dim), np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        for i in range(lo, hi):
            for b in range(batch):
                acc = _ZERO
                for k in range(top_k):
                    acc += weights[b, k] * _expert_row(down_w, down_s, chosen[b, k], i, g[b, k])
                out[b, i] = x[b, i] + acc
    return out, logits


@njit(**_OPTIONS)
def _norm_gemv(x, norm_w, eps, w, threads):  # type: ignore[no-untyped-def]
    """RMSNorm(x) @ w^T: the final norm and the language-model head."""
    batch, dim = x.shape
    normed = np.empty((batch, dim), np.float32)
    for b in range(batch):
        _rms_norm(x[b], norm_w, eps, normed[b])
    y = np.empty((batch, w.shape[0]), np.float32)
    for t in prange(threads):
        lo, hi = _span(w.shape[0], t, threads)
        for i in range(lo, hi):
            for b in range(batch):
                y[b, i] = _dot(w[i], normed[b])
    return y


@njit(**_OPTIONS)
def _qkv(x, norm_w, eps, q_w, q_s, k_w, k_s, v_w, v_s, threads):  # type: ignore[no-untyped-def]
    """The attention sublayer's RMSNorm, then its q, k and v projections (B, H Dh), (B, Hkv Dh) x 2."""
    batch, dim = x.shape
    n_q, n_kv = q_w.shape[0], k_w.shape[0]
    normed = np.empty((batch, dim), np.float32)
    for b in range(batch):
        _rms_norm(x[b], norm_w, eps, normed[b])
    q = np.empty((batch, n_q), np.float32)
    k = np.empty((batch, n_kv), np.float32)
    v = np.empty((batch, n_kv), np.float32)
    for t in prange(threads):
        lo, hi = _span(n_q + 2 * n_kv, t, threads)  # the rows of q_w, then k_w, then v_w
        for i in range(lo, hi):
            for b in range(batch):
                if i < n_q:
                    q[b, i] = _row(q_w, q_s, i, normed[b])
                elif i < n_q + n_kv:
                    k[b, i - n_q] = _row(k_w, k_s, i - n_q, normed[b])
                else:
                    v[b, i - n_q - n_kv] = _row(v_w, v_s, i - n_q - n_kv, normed[b])
    return q, k, v


@njit(**_OPTIONS)
def _attend(x, q, keys, values, o_w, o_s, threads):  # type: ignore[no-untyped-def]
    """x + o_proj(softmax(q k^T / sqrt(Dh)) v): one query per sequence over all S keys (no mask).

    q (B, H Dh); keys, values (B, Hkv, S, Dh), float32 or bfloat16 bits; query head h reads key head
    h // (H / Hkv).
    """
    batch, dim = x.shape
    kv_heads, length, head_dim = keys.shape[1], keys.shape[2], keys.shape[3]
    heads = q.shape[1] // head_dim
    group = heads // kv_heads
    scale = _F32(1.0) / np.sqrt(_F32(head_dim))
    mixed = np.zeros((batch, heads * head_dim), np.float32)
    pairs = batch * heads
    for t in prange(threads):
        lo, hi = _span(pairs, t, threads)
        scores = np.empty(length, np.float32)
        for pair in range(lo, hi):
            b, h = divmod(pair, heads)
            g = h // group
            query = q[b, h * head_dim : (h + 1) * head_dim]
            top = _F32(-np.inf)
            for j in range(length):
                scores[j] = _dot(query, keys[b, g, j]) * scale
                top = max(top, scores[j])
            total = _ZERO
            for j in range(length):
                scores[j] = _exp(scores[j] - top)
                total += scores[j]
            out = mixed[b, h * head_dim : (h + 1) * head_dim]
            for j in range(length):
                p = scores[j] / total
                for c in range(head_dim):
                    out[c] += p * _wload(values[b, g, j, c])
    y = np.empty((batch, dim), np.float32)
    no_bias = np.empty(0, np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        _residual_rows(x, o_w, o_s, no_bias, mixed, y, lo, hi)
    return y


def _a(kind: types.Type, ndim: int, layout: str = "C") -> types.Array:
    return types.Array(kind, ndim, layout)


def _mamba_args(w: types.Type, conv: types.Type) -> tuple[types.Type, ...]:
    """`_mamba`'s argument types for matrices of kind w and a conv state of kind conv."""
    w2 = _a(w, 2)
    return (
        _M, _V, _F, w2, _V, _V, _M, _V, _a(conv, 3), w2, _V, _V, _V, _V, w2, _V, _V, _M, _V, _T, w2, _V, _V, _I,
    )  # fmt: skip


# Each kernel's signature for the kinds of its weights (numba element types), in argument order.
_SIGNATURES: dict[Callable, Callable[..., types.Signature]] = {
    _gemv: lambda w: types.void(_a(w, 2), _V, _V, _M, _M, _I),
    _dequantize: lambda w: types.void(_a(w, 2), _V, _M, _I),
    _mamba: lambda w, conv: _M(*_mamba_args(w, conv)),
    _mlp: lambda w: _M(_M, _V, _F, _a(w, 2), _V, _a(w, 2), _V, _a(w, 2), _V, _I),
    _moe: lambda w: types.Tuple((_M, _M))(_M, _V, _F, _M, _a(w, 3), _M, _a(w, 3), _M, _a(w, 3), _M, _I, _I),
    _norm_gemv: lambda w: _M(_M, _V, _F, _a(w, 2), _I),
    _qkv: lambda w: types.UniTuple(_M, 3)(_M, _V, _F, _a(w, 2), _V, _a(w, 2), _V, _a(w, 2), _V, _I),
    _attend: lambda kv, w: _M(_M, _M, _a(kv, 4, "A"), _a(kv, 4, "A"), _a(w, 2), _V, _I),
}
_READY: set[tuple[Callable, tuple[np.dtype, ...]]] = set()
_COMPILING = threading.Lock()


def _kernel(kernel: Callable, *kinds: np.dtype, quiet: bool = False) -> Callable:
    """`kernel`, compiled for weights of these numpy dtypes (float32, int8, int16 for bfloat16) the
    first time they are asked for, or loaded from numba's disk cache: the float32 kernels at import,
    the others only in a process that decodes such a model (their first compilation takes tens of
    seconds on a 2-core machine, which a float32 user should not pay)."""
    key = (kernel, kinds)
    if key not in _READY:
        with _COMPILING:
            if key not in _READY:
                from . import _notice  # here: the package imports this module

                signature = _SIGNATURES[kernel](*(_KINDS[k] for k in kinds))
                # Compiling is allowed here only: a call whose arrays do not match a signature exactly
                # (a C-contiguous view where the signature says "A") must take the compiled code by
                # conversion, never compile a new specialisation in the middle of a generation.
                kernel.disable_compile(False)
                try:
                    if quiet:  # at import: the package's own notice covers it
                        kernel.compile(signature)
                    else:
                        names = "/".join(str(k) for k in kinds)
                        with _notice(
                            f"compiling the numba decoding kernel {kernel.__name__} for {names} weights"
                        ):
                            kernel.compile(signature)
                finally:
                    kernel.disable_compile(True)
                _READY.add(key)
    return kernel


_FLOAT32 = np.dtype(np.float32)
for _k in (_gemv, _mlp, _moe, _norm_gemv, _qkv):
    _kernel(_k, _FLOAT32, quiet=True)
_kernel(_mamba, _FLOAT32, _FLOAT32, quiet=True)
_kernel(_attend, _FLOAT32, _FLOAT32, quiet=True)


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the numba CPU kernels (these and elementwise.py's) take a call on these tensors:
    float32 on CPU, no gradient wanted, not compiling."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
    )


def _np(t: torch.Tensor | None) -> np.ndarray:
    """A contiguous float32 numpy array of t: a view when t is contiguous float32; None gives an empty one."""
    if t is None:
        return _EMPTY
    return t.detach().to(torch.float32).contiguous().numpy()


def _raw(t: torch.Tensor) -> np.ndarray:
    """A weight matrix as the kernels read it: float32 or int8 as is, bfloat16 as its int16 bits (a
    view when contiguous); any other dtype as a float32 copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy()
    if t.dtype == torch.int8:
        return t.contiguous().numpy()
    return _np(t)


_RAW_VIEWS = (torch.float32, torch.int8, torch.bfloat16)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stamp(t: torch.Tensor | None, raw: bool) -> object:
    """What must not change for a kept array of t to still be right: where t is, for an array that
    is a view of it (in-place changes show through); also its version counter for a converted copy
    (a bfloat16 model's norms and biases); None where it cannot be told (an inference tensor has no
    version counter), which is never kept."""
    if t is None:
        return 0
    if t.is_contiguous() and (t.dtype == torch.float32 or (raw and t.dtype in _RAW_VIEWS)):
        return t.data_ptr()
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:
        return None


def _views(
    owner: object | None, tensors: tuple[torch.Tensor | None, ...], raw: frozenset[int] = frozenset()
) -> tuple[np.ndarray, ...]:
    """numpy arrays of `tensors` (those at positions `raw` by `_raw`, the others as float32), kept for
    `owner` (the sublayer) while every tensor stays as it is (`_stamp`).

    Making a view costs a few microseconds, and a sublayer has up to 20 weights: per token and layer
    that was a third of the kernel's time. They are held here, weakly keyed by the owner: nothing on
    the modules.
    """
    if owner is None:  # nothing to keep them for
        return tuple(_raw(t) if i in raw and t is not None else _np(t) for i, t in enumerate(tensors))
    key = tuple(_stamp(t, i in raw) for i, t in enumerate(tensors))
    cached = _VIEWS.get(owner)
    if cached is not None and cached[0] == key:
        return cached[1]
    arrays = tuple(_raw(t) if i in raw and t is not None else _np(t) for i, t in enumerate(tensors))
    if None not in key:
        _VIEWS[owner] = (key, arrays)
    return arrays


def _state(t: torch.Tensor, conv: bool = False) -> np.ndarray:
    """A numpy view of a conv or SSM state, which the kernel advances in place (a bfloat16 conv state
    as its int16 bits)."""
    if t.is_contiguous() and t.dtype == torch.float32:
        return t.detach().numpy()
    if conv and t.is_contiguous() and t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy()
    raise ValueError(
        "the fused decode kernels need contiguous float32 states (or a bfloat16 conv state), "
        f"got {t.dtype} {tuple(t.stride())}"
    )


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """`ops.linear(x, weight, bias, scale)` for a few rows of float32 x (..., in): the weight (float32,
    bfloat16, or int8 with its row scales) streamed once."""
    rows = x.reshape(-1, x.shape[-1])
    w = _raw(weight)
    y = np.empty((rows.shape[0], weight.shape[0]), np.float32)
    _kernel(_gemv, w.dtype)(w, _np(scale), _np(bias), _np(rows), y, _set_threads())
    return torch.from_numpy(y).view(*x.shape[:-1], weight.shape[0])


_SCRATCH = threading.local()


def dequantize(weight: torch.Tensor, scale: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """`ops.dequantize(weight, scale, torch.float32)` for an int8 matrix (out, in), in one pass.

    scratch: write into this thread's reusable buffer, grown to the largest matrix seen (valid until
    the next such call on the thread). A fresh buffer of a 3B model's in_proj (105 MB) costs ~120 ms
    of page faults on every call, five times the dequantization itself.
    """
    w = _raw(weight)
    if scratch:
        buffer = getattr(_SCRATCH, "buffer", _EMPTY)
        if buffer.shape[0] < w.size:
            buffer = _SCRATCH.buffer = np.empty(w.size, np.float32)
        out = torch.from_numpy(buffer[: w.size].reshape(w.shape))
    else:
        out = torch.empty(w.shape, dtype=torch.float32)
    _kernel(_dequantize, w.dtype)(w, _np(scale), out.numpy(), _set_threads())
    return out


def mamba_step(
    owner: object,
    x: torch.Tensor,
    eps: float,
    weights: tuple[torch.Tensor | None, ...],
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
) -> torch.Tensor:
    """x (B, D) plus the Mamba sublayer's output, one new token per sequence, in float32.

    weights, in order: the input RMSNorm's, in_proj weight, scale and bias, conv1d weight (ED, 1, W)
    and bias, x_proj weight and scale, the dt, B and C RMSNorms', dt_proj weight, scale and bias,
    A log2(e) (ED, N), D, out_proj weight, scale and bias (None for an absent bias or the scale of a
    float weight; the four matrices of one kind); every norm uses `eps`. Their arrays are kept on
    `owner`. conv_state (B, ED, W-1), float32 or bfloat16, and ssm_state (B, ED, N) float32, both
    contiguous, advance in place.
    """
    conv, ssm = _state(conv_state, conv=True), _state(ssm_state)
    w = _views(owner, weights, _MAMBA_RAW)
    conv_w = w[4].reshape(w[4].shape[0], -1)
    out = _kernel(_mamba, w[1].dtype, conv.dtype)(
        _np(x), w[0], _F32(eps), w[1], w[2], w[3], conv_w, w[5], conv, *w[6:16], ssm, *w[16:], _set_threads()
    )
    return torch.from_numpy(out)


_MAMBA_RAW = frozenset((1, 6, 11, 16))


def attention_step(
    owner: object,
    x: torch.Tensor,
    eps: float,
    weights: tuple[torch.Tensor | None, ...],
    head_dim: int,
    update_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """x (B, D) plus causal attention of its RMSNorm, one new token per sequence, no padding; float32.

    weights: the norm's, then q_proj, k_proj, v_proj, o_proj each with its scale (None for float)
    (arrays kept on owner). update_kv takes the new keys and values (B, Hkv, 1, Dh) in x's dtype,
    stores them, and returns every key and value (B, Hkv, S, Dh), as `HybridCache.update_kv` does.
    """
    norm, q_w, q_s, k_w, k_s, v_w, v_s, o_w, o_s = _views(owner, weights, _ATTENTION_RAW)
    threads = _set_threads()
    xs = _np(x)
    q, k, v = _kernel(_qkv, q_w.dtype)(xs, norm, _F32(eps), q_w, q_s, k_w, k_s, v_w, v_s, threads)
    batch = x.shape[0]
    new = [torch.from_numpy(t).to(x.dtype).view(batch, 1, -1, head_dim).transpose(1, 2) for t in (k, v)]
    keys, values = (_bits(t) for t in update_kv(*new))
    out = _kernel(_attend, keys.dtype, o_w.dtype)(xs, q, keys, values, o_w, o_s, threads)
    return torch.from_numpy(out)


_ATTENTION_RAW = frozenset((1, 3, 5, 7))


def _bits(t: torch.Tensor) -> np.ndarray:
    """Cached keys or values as the kernel reads them: float32, or bfloat16 as int16 bits; no copy."""
    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.to(torch.float32).numpy()


def norm_gemv(
    owner: object | None, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """RMSNorm(x) @ weight^T in float32 for x (..., D): the final norm and the head; weights: the
    norm's, the projection's (float32 or bfloat16; arrays kept on owner)."""
    norm, w = _views(owner, weights, frozenset((1,)))
    rows = x.reshape(-1, x.shape[-1])
    y = _kernel(_norm_gemv, w.dtype)(_np(rows), norm, _F32(eps), w, _set_threads())
    return torch.from_numpy(y).view(*x.shape[:-1], w.shape[0])


def mlp_step(
    owner: object, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor | None, ...]
) -> torch.Tensor:
    """x (B, D) plus the SwiGLU MLP of its RMSNorm, in float32; weights: the norm's, then gate, up,
    down each with its scale (None for float) (arrays kept on owner)."""
    norm, gate, gate_s, up, up_s, down, down_s = _views(owner, weights, _MLP_RAW)
    out = _kernel(_mlp, gate.dtype)(
        _np(x), norm, _F32(eps), gate, gate_s, up, up_s, down, down_s, _set_threads()
    )
    return torch.from_numpy(out)


_MLP_RAW = frozenset((1, 3, 5))


def moe_step(
    owner: object, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor | None, ...], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, D) plus the MoE of its RMSNorm, and the router logits (B, E), in float32.

    weights: the norm's, the router's, and the stacked expert gate (E, I, D), up (E, I, D) and
    down (E, D, I), each followed by its scales (E, out) (None for float) (arrays kept on owner).
    """
    norm, router, gate, gate_s, up, up_s, down, down_s = _views(owner, weights, _MOE_RAW)
    if gate_s.ndim == 1:  # float experts: no scales
        gate_s = up_s = down_s = _EMPTY2
    out, logits = _kernel(_moe, gate.dtype)(
        _np(x), norm, _F32(eps), router, gate, gate_s, up, up_s, down, down_s, top_k, _set_threads()
    )
    return torch.from_numpy(out), torch.from_numpy(logits)


_MOE_RAW = frozenset((2, 4, 6))
