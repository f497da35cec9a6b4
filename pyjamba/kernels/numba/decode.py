"""Fused one-token decoding on a CPU: a Mamba, attention, SwiGLU MLP or MoE sublayer (its RMSNorm
and residual included), the final norm with the head, and a matrix-vector product, each one numba
call. Their readable twins are `MambaMixer.step`, `Attention`, `MLP`, `SparseMoE` and `ops.linear`
(the eager path), held together by tests/test_decode_kernels.py; step.py decides which calls take
them and hands them a model's weights.

Why (jamba-small, float32, batch 1, 2-core AVX2 CPU; docs/benchmarks.md): a decoding step reads
0.26 GB of weights, 9.5 ms at the machine's 27 GB/s. Eagerly it took 26 ms: the projections ran at
13-19 GB/s (MKL's and oneDNN's matrix-vector products for these shapes), and ~60 small tensor
operations per layer cost ~10 ms of dispatch. Here each sublayer is one call that reads each
weight once at 23-27 GB/s, and does everything between the projections (norms, conv, SSM update,
gating, routing, softmax over the keys, residual) on vectors that stay in cache.

Shapes: x is (B, D), B a handful of sequences; weights are nn.Linear's (out, in), experts stacked
(E, I, D) and (E, D, I). Each call returns x plus the sublayer's output, a new array: the residual
stream is never written in place. The Mamba call advances the conv and SSM states in place.

Parallelism: `threads` contiguous runs of output rows (a projection's rows are independent), one
parallel region per projection; the few serial steps between them (RMS norms, routing) touch
vectors of a few hundred floats. Dot products are vectorised with reassociation allowed, like any
BLAS: the sums differ from the eager path's by float32 rounding (tests hold them to 1e-5).

Only float32 on CPU without autograd; anything else takes the eager path (`supported`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch
from numba import njit, prange, types

from .scan import _exp, _exp2_product, _set_threads, _silu, _softplus

__all__ = ["attention_step", "gemv", "mamba_step", "mlp_step", "moe_step", "norm_gemv", "supported"]

_F32 = np.float32
_ZERO = _F32(0.0)
_OPTIONS = dict(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
_EMPTY = np.zeros(0, np.float32)
# Explicit signatures: every kernel compiles (or loads from numba's disk cache) when this module is
# imported, never at a first call in the middle of a run, and a view that happens to be contiguous
# (a cache filled to its capacity) takes the same compiled code as one that is not.
_V = types.Array(types.float32, 1, "C")
_M = types.Array(types.float32, 2, "C")
_T = types.Array(types.float32, 3, "C")
_ANY4 = types.Array(types.float32, 4, "A")
_I, _F = types.int64, types.float32
_W = 64  # channels whose dt, dt u and silu(z) are computed together


@njit(fastmath={"contract", "reassoc"}, cache=True)
def _dot(a, b):  # type: ignore[no-untyped-def]
    """sum(a * b) over two float32 vectors; reassociation lets LLVM keep vector partial sums."""
    acc = _ZERO
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


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
def _residual_rows(x, w, bias, v, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[:, lo:hi] = x + v w^T (+ bias), rows lo to hi of a sublayer's output projection added to the
    residual stream; x, out (B, D), w (D, K), v (B, K), bias (D,) or empty."""
    for i in range(lo, hi):
        for b in range(x.shape[0]):
            out[b, i] = x[b, i] + _dot(w[i], v[b]) + (bias[i] if bias.shape[0] > 0 else _ZERO)


@njit(inline="always")
def _advance(h, a2, bc, b, d, dt, dtu, n_state):  # type: ignore[no-untyped-def]
    """h[b, d, :] = 2^(dt a2[d, :]) h[b, d, :] + dt u B: one channel's N states, one step."""
    for n in range(n_state):
        h[b, d, n] = _exp2_product(dt, a2[d, n], False) * h[b, d, n] + dtu * bc[b, 0, n]


@njit(types.void(_M, _V, _M, _M, _I), parallel=True, **_OPTIONS)
def _gemv(w, bias, x, y, threads):  # type: ignore[no-untyped-def]
    """y (B, out) = x (B, in) @ w (out, in)^T (+ bias): each row of w read once, for every x."""
    has_bias = bias.shape[0] > 0
    for t in prange(threads):
        lo, hi = _span(w.shape[0], t, threads)
        for i in range(lo, hi):
            for b in range(x.shape[0]):
                y[b, i] = _dot(w[i], x[b]) + (bias[i] if has_bias else _ZERO)


@njit(
    _M(_M, _V, _F, _M, _V, _M, _V, _T, _M, _V, _V, _V, _M, _V, _M, _V, _T, _M, _V, _I),
    parallel=True,
    **_OPTIONS,
)
def _mamba(  # type: ignore[no-untyped-def]
    x, norm_w, eps, in_w, in_b, conv_w, conv_b, conv_state, x_w, dt_norm_w, b_norm_w, c_norm_w,
    dt_w, dt_b, a2, D, h, out_w, out_b, threads,
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
                xd = _dot(in_w[d], normed[b]) + (in_b[d] if in_b.shape[0] > 0 else _ZERO)
                z[b, d] = _dot(in_w[inner + d], normed[b]) + (in_b[inner + d] if in_b.shape[0] > 0 else _ZERO)
                acc = conv_w[d, width - 1] * xd
                for k in range(width - 1):
                    acc += conv_w[d, k] * conv_state[b, d, k]
                for k in range(width - 2):
                    conv_state[b, d, k] = conv_state[b, d, k + 1]
                conv_state[b, d, width - 2] = xd
                u[b, d] = _silu(acc + (conv_b[d] if conv_b.shape[0] > 0 else _ZERO))
    # x_proj into dt, B, C.
    dbc = np.empty((batch, rank + 2 * n_state), np.float32)
    for t in prange(threads):
        lo, hi = _span(dbc.shape[1], t, threads)
        for r in range(lo, hi):
            for b in range(batch):
                dbc[b, r] = _dot(x_w[r], u[b])
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
                    rows[0, j] = _dot(dt_w[d0 + j], dt_in[b]) + dt_b[d0 + j]
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
        _residual_rows(x, out_w, out_b, y, out, lo, hi)
    return out


@njit(_M(_M, _V, _F, _M, _M, _M, _I), parallel=True, **_OPTIONS)
def _mlp(x, norm_w, eps, gate_w, up_w, down_w, threads):  # type: ignore[no-untyped-def]
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
                g[b, i] = _silu(_dot(gate_w[i], normed[b])) * _dot(up_w[i], normed[b])
    out = np.empty((batch, dim), np.float32)
    no_bias = np.empty(0, np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        _residual_rows(x, down_w, no_bias, g, out, lo, hi)
    return out


@njit(types.Tuple((_M, _M))(_M, _V, _F, _M, _T, _T, _T, _I, _I), parallel=True, **_OPTIONS)
def _moe(x, norm_w, eps, router_w, gate_w, up_w, down_w, top_k, threads):  # type: ignore[no-untyped-def]
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
                    g[b, k, i] = _silu(_dot(gate_w[e, i], normed[b])) * _dot(up_w[e, i], normed[b])
    out = np.empty((batch, dim), np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        for i in range(lo, hi):
            for b in range(batch):
                acc = _ZERO
                for k in range(top_k):
                    acc += weights[b, k] * _dot(down_w[chosen[b, k], i], g[b, k])
                out[b, i] = x[b, i] + acc
    return out, logits


@njit(_M(_M, _V, _F, _M, _I), parallel=True, **_OPTIONS)
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


@njit(types.UniTuple(_M, 3)(_M, _V, _F, _M, _M, _M, _I), parallel=True, **_OPTIONS)
def _qkv(x, norm_w, eps, q_w, k_w, v_w, threads):  # type: ignore[no-untyped-def]
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
                    q[b, i] = _dot(q_w[i], normed[b])
                elif i < n_q + n_kv:
                    k[b, i - n_q] = _dot(k_w[i - n_q], normed[b])
                else:
                    v[b, i - n_q - n_kv] = _dot(v_w[i - n_q - n_kv], normed[b])
    return q, k, v


@njit(_M(_M, _M, _ANY4, _ANY4, _M, _I), parallel=True, **_OPTIONS)
def _attend(x, q, keys, values, o_w, threads):  # type: ignore[no-untyped-def]
    """x + o_proj(softmax(q k^T / sqrt(Dh)) v): one query per sequence over all S keys (no mask).

    q (B, H Dh); keys, values (B, Hkv, S, Dh); query head h reads key head h // (H / Hkv).
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
                    out[c] += p * values[b, g, j, c]
    y = np.empty((batch, dim), np.float32)
    no_bias = np.empty(0, np.float32)
    for t in prange(threads):
        lo, hi = _span(dim, t, threads)
        _residual_rows(x, o_w, no_bias, mixed, y, lo, hi)
    return y


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the numba CPU kernels (these and elementwise.py's) take a call on these tensors:
    float32 on CPU, no gradient wanted, not compiling.

    Decoding checks the activations only: weights of another dtype are converted on every call
    (correct, but slow); a float32 model has none.
    """
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


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _views(owner: object | None, tensors: tuple[torch.Tensor | None, ...]) -> tuple[np.ndarray, ...]:
    """numpy views of `tensors`, kept for `owner` (the sublayer) while every tensor stays where it is.

    Making a view costs a few microseconds, and a sublayer has up to 15 weights: per token and layer
    that was a third of the kernel's time. Views share the weights' memory, so in-place updates show
    through; a replaced weight (another data pointer) rebuilds them. Copies (a weight not contiguous
    float32) are never kept. They are held here, weakly keyed by the owner: nothing on the modules.
    """
    if owner is None:  # nothing to keep them for
        return tuple(_np(t) for t in tensors)
    key = tuple(0 if t is None else t.data_ptr() for t in tensors)
    cached = _VIEWS.get(owner)
    if cached is not None and cached[0] == key:
        return cached[1]
    arrays = tuple(_np(t) for t in tensors)
    if all(t is None or a.ctypes.data == t.data_ptr() for t, a in zip(tensors, arrays, strict=True)):
        _VIEWS[owner] = (key, arrays)
    return arrays


def _state(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a conv or SSM state, which the kernel advances in place."""
    if not (t.is_contiguous() and t.dtype == torch.float32):
        raise ValueError(
            f"the fused decode kernels need contiguous float32 states, got {t.dtype} {tuple(t.stride())}"
        )
    return t.detach().numpy()


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows of float32 x (..., in): the weight streamed once."""
    rows = x.reshape(-1, x.shape[-1])
    y = np.empty((rows.shape[0], weight.shape[0]), np.float32)
    _gemv(_np(weight), _np(bias), _np(rows), y, _set_threads())
    return torch.from_numpy(y).view(*x.shape[:-1], weight.shape[0])


def mamba_step(
    owner: object,
    x: torch.Tensor,
    eps: float,
    weights: tuple[torch.Tensor | None, ...],
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
) -> torch.Tensor:
    """x (B, D) plus the Mamba sublayer's output, one new token per sequence.

    weights, in order: the input RMSNorm's, in_proj weight and bias, conv1d weight (ED, 1, W) and
    bias, x_proj weight, the dt, B and C RMSNorms', dt_proj weight and bias, A log2(e) (ED, N), D,
    out_proj weight and bias (None for an absent bias); every norm uses `eps`. Their numpy views are
    kept on `owner`. conv_state (B, ED, W-1) and ssm_state (B, ED, N), contiguous float32, advance
    in place.
    """
    conv_state, ssm_state = _state(conv_state), _state(ssm_state)
    w = _views(owner, weights)
    conv_w = w[3].reshape(w[3].shape[0], -1)
    out = _mamba(
        _np(x), w[0], _F32(eps), w[1], w[2], conv_w, w[4], conv_state, *w[5:13], ssm_state, w[13], w[14],
        _set_threads(),
    )  # fmt: skip
    return torch.from_numpy(out)


def attention_step(
    owner: object,
    x: torch.Tensor,
    eps: float,
    weights: tuple[torch.Tensor, ...],
    head_dim: int,
    update_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """x (B, D) plus causal attention of its RMSNorm, one new token per sequence, no padding.

    weights: the norm's, q_proj, k_proj, v_proj, o_proj (views kept on owner). update_kv takes the new
    keys and values (B, Hkv, 1, Dh), stores them, and returns every key and value (B, Hkv, S, Dh), as
    `HybridCache.update_kv` does for a layer.
    """
    norm, q_w, k_w, v_w, o_w = _views(owner, weights)
    q, k, v = _qkv(_np(x), norm, _F32(eps), q_w, k_w, v_w, _set_threads())
    batch = x.shape[0]
    new = [torch.from_numpy(t).view(batch, 1, -1, head_dim).transpose(1, 2) for t in (k, v)]
    keys, values = update_kv(*new)
    out = _attend(_np(x), q, keys.detach().numpy(), values.detach().numpy(), o_w, _set_threads())
    return torch.from_numpy(out)


def norm_gemv(
    owner: object | None, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """RMSNorm(x) @ weight^T for x (..., D): the final norm and the head; weights: the norm's, the
    projection's (views kept on owner)."""
    norm, w = _views(owner, weights)
    rows = x.reshape(-1, x.shape[-1])
    y = _norm_gemv(_np(rows), norm, _F32(eps), w, _set_threads())
    return torch.from_numpy(y).view(*x.shape[:-1], w.shape[0])


def mlp_step(owner: object, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x (B, D) plus the SwiGLU MLP of its RMSNorm; weights: the norm's, gate, up, down (views kept on owner)."""
    norm, gate, up, down = _views(owner, weights)
    return torch.from_numpy(_mlp(_np(x), norm, _F32(eps), gate, up, down, _set_threads()))


def moe_step(
    owner: object, x: torch.Tensor, eps: float, weights: tuple[torch.Tensor, ...], top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, D) plus the MoE of its RMSNorm, and the router logits (B, E).

    weights: the norm's, the router's, and the stacked expert gate (E, I, D), up (E, I, D) and
    down (E, D, I) (views kept on owner).
    """
    w = _views(owner, weights)
    out, logits = _moe(_np(x), w[0], _F32(eps), *w[1:], top_k, _set_threads())
    return torch.from_numpy(out), torch.from_numpy(logits)
