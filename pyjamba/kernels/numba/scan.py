"""The fused CPU selective scan and its one-token update: one pass over the sequence, compiled by numba.

Same signatures and glossary as `reference.py`, plus W = 128, the channels of a task, and T = 32, the
steps of a tile. A task is one block of W channels of one sequence, independent of the others; each
of `torch.get_num_threads()` threads takes a run of consecutive tasks. Per tile of T steps and per
task, the kernel loads u, delta and z (any strides; float32, or bfloat16 read in the kernel), computes
dt = softplus(delta + bias), dt u and silu(z) for the whole tile, runs the recurrence step by step
with the task's state h (N, W) and A (N, W) in cache, and writes y = (C h + D u) silu(z) in u's dtype.
A thread advances its tasks in lockstep, tile by tile, so that it reads and writes rows of a few KiB
rather than 512 bytes per row, which the prefetcher and the TLB serve much better. Nothing of size
(L, N) is made and nothing of size (B, L, ED) besides y: memory is the output plus ~100 KiB a thread.
The one-token update (`_update_tasks`) keeps the state in its (B, ED, N) layout, a channel's N states
being two vectors, since for one step transposing the state would cost more than the step.

Why numba, and why this shape (2-core AMD EPYC VM, AVX2 + FMA; docs/benchmarks.md):
- The work is L * ED * N exponentials: a CPU does them no faster than a vectorised polynomial, here
  about 0.8-1.2 ns per (t, d, n) per thread whatever the language: the same loop written with AVX2
  intrinsics and built by gcc -O3 -march=native was within 10% of numba's. numba ships as a wheel
  wherever torch does and needs no C compiler on the user's machine, which a
  `torch.utils.cpp_extension` build would (plus ninja, and a longer first build). Its first
  compilation takes 20-50 s per dtype here and is cached on disk (`cache=True`, next to this file or
  in numba's user cache); later processes load it in about 0.3 s.
- Channels are the vector lanes (contiguous in the input rows), not the N states, so that one vector
  op advances 8 channels and dt is shared by the N states of a channel. Four states are advanced per
  pass over the lanes (n unrolled by four), which gives the CPU independent chains to overlap.
- exp is evaluated by hand, not by `math.exp`: LLVM cannot vectorise libm's exp (numba has no vector
  math library here), and a scalar exp per (t, d, n) costs 5x more. The decay exp(dt A) is computed as
  2^(dt A'), A' = A log2(e) rounded once per call: 2^y = 2^round(y) p(y - round(y)), p a degree-6
  polynomial (relative error 8e-8 in float32, about one ulp), 2^round(y) added into the exponent bits.
  Rounding A' costs a relative error of about |dt A| 6e-8 on top of the reference's own rounding of
  dt A: agreement with the reference stays at float32 rounding level, which the tests hold to 1e-5.
  softplus and silu use an exp with two-step (Cody-Waite) range reduction and cephes' log1p polynomial.
  Nothing is approximated beyond float32 rounding; the only fast-math flag is `contract` (a * b + c
  may become one fused multiply-add, rounded once instead of twice).
- Where dt >= 0 and A <= 0 (softplus makes dt >= 0; trained A is negative) and dt A >= -125 over a
  tile, which is checked per tile and task, the exponent needs no clamp; otherwise it is clamped to
  [-125, 127] in base 2 (exp(dt A) below 2^-125 becomes 2^-125: an absolute error under 3e-38; a NaN
  in A is lost there, while a NaN in u, delta or B still reaches y through dt u B).
- Scratch arrays are rows of a few arrays rather than many arrays: separately allocated arrays can
  start at the same offset modulo 4 KiB, and then loads wait on stores to unrelated addresses.

Precision: float32 compute for float32, bfloat16 and float16 inputs (float16 is converted to float32
first); float64 inputs go to `chunked.selective_scan`, which computes in float64, as do tensors on
other devices (with a warning, once: a model built with kernels="auto" and moved to a GPU keeps
working).

Autograd: the kernels have no backward. When any input requires grad (and grad mode is on), the call
goes to `chunked.selective_scan` (or its update), whose custom backward recomputes states chunk by
chunk; the forward values then come from the chunked scan, not from this kernel.

Threads: numba's own pool (its "omp" or "tbb" layer, whichever is installed; "workqueue" otherwise),
sized to `torch.get_num_threads()` at each call, so `torch.set_num_threads` governs both.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .. import chunked

__all__ = ["compile_kernels", "selective_scan", "selective_state_update"]

logger = logging.getLogger(__name__)

_W = 128  # channels per task: one task's state is (N, W) floats, 8 KiB at N = 16
_T = 32  # steps per tile of dt, dt u, silu(z) and y

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LOG2E_64 = 1.4426950408889634
_MAGIC = _F32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 of magnitude < 2**22 to an integer
_EXP2_HI, _EXP2_LO = _F32(127.0), _F32(-125.0)
# 2^r = 1 + r * (ln 2 + r * (E2 + r * (E3 + ...))) on [-0.5, 0.5], relative error 3e-9 in exact arithmetic.
_LN2 = _F32(0.6931471805599453)
_E2, _E3, _E4, _E5, _E6 = (
    _F32(0.24022647738456726),
    _F32(0.05550359562039375),
    _F32(0.009618517942726612),
    _F32(0.001339095993898809),
    _F32(0.0001532430324004963),
)
# exp(r) = 1 + r + r^2 * (X2 + r * (X3 + ...)) on [-ln2 / 2, ln2 / 2], after Cody-Waite reduction.
_LN2_HI, _LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)  # LN2_HI has 9 bits: k * LN2_HI is exact
_X2, _X3, _X4, _X5, _X6 = (
    _F32(0.4999999403953552),
    _F32(0.1666652113199234),
    _F32(0.04166838899254799),
    _F32(0.008368710987269878),
    _F32(0.0013814604608342052),
)
_EXP_HI, _EXP_LO = _F32(88.0), _F32(-86.5)
# log(1 + f) = f - f^2 / 2 + f^3 * P(f) on [sqrt(1/2) - 1, sqrt(2) - 1] (cephes logf).
_L = tuple(
    _F32(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = _L
_SQRT2 = _F32(1.4142135623730951)
_ZERO, _HALF, _ONE = _F32(0.0), _F32(0.5), _F32(1.0)


@intrinsic
def _as_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret int32 bits as a float32."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _as_int(typingctx, x):  # type: ignore[no-untyped-def]
    """Reinterpret float32 bits as an int32."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(types.int32))

    return sig, codegen


def _load(x):  # type: ignore[no-untyped-def]
    """A stored number as float32: float32 as is, int16 as the bits of a bfloat16. (numba only)"""
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(x):  # type: ignore[no-untyped-def]
    if isinstance(x, types.Integer):
        return lambda x: _as_float(np.int32(x) << np.int32(16))
    return lambda x: np.float32(x)


def _store(x, like):  # type: ignore[no-untyped-def]
    """A float32 as the element type of `like`: float32 as is, bfloat16 bits rounded to nearest even."""
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(x, like):  # type: ignore[no-untyped-def]
    if isinstance(like, types.Integer):

        def to_bfloat16(x, like):  # type: ignore[no-untyped-def]
            bits = _as_int(x)
            rounded = (bits + np.int32(0x7FFF) + ((bits >> np.int32(16)) & np.int32(1))) >> np.int32(16)
            nan = (bits >> np.int32(16)) | np.int32(0x0040)  # keep NaN a (quiet) NaN
            return np.int16(nan if x != x else rounded)

        return to_bfloat16
    return lambda x, like: np.float32(x)


@njit(inline="always")
def _exp2_product(d, a, in_range):  # type: ignore[no-untyped-def]
    """2^(d a) for float32 d, a. `in_range` is a literal: True where -125 <= d a <= 127 is known, which
    saves the clamps; otherwise d a is clamped to that range first."""
    if in_range:
        k = d * a + _MAGIC  # one fused multiply-add; round(d a) sits in the low mantissa bits of k
        r = d * a - (k - _MAGIC)  # d a - round(d a), in [-0.5, 0.5], rounded once
    else:
        y = d * a
        y = y if y < _EXP2_HI else _EXP2_HI
        y = y if y > _EXP2_LO else _EXP2_LO
        k = y + _MAGIC
        r = y - (k - _MAGIC)  # exact
    p = ((((((_E6 * r + _E5) * r + _E4) * r + _E3) * r + _E2) * r + _LN2) * r) + _ONE
    return _as_float(_as_int(p) + (_as_int(k) << np.int32(23)))  # p * 2^round(d a)


@njit(inline="always")
def _exp(x):  # type: ignore[no-untyped-def]
    """exp(x) for float32 x, with x clamped to [-86.5, 88]."""
    x = x if x < _EXP_HI else _EXP_HI
    x = x if x > _EXP_LO else _EXP_LO
    k = x * _LOG2E + _MAGIC
    kf = k - _MAGIC
    r = x - kf * _LN2_HI
    r = r - kf * _LN2_LO
    p = ((((_X6 * r + _X5) * r + _X4) * r + _X3) * r + _X2) * (r * r) + r + _ONE
    return _as_float(_as_int(p) + (_as_int(k) << np.int32(23)))


@njit(inline="always")
def _log1p_unit(w):  # type: ignore[no-untyped-def]
    """log(1 + w) for w in [0, 1]."""
    u = _ONE + w
    big = u >= _SQRT2
    f = _HALF * u - _ONE if big else w  # 1 + w = 2^e (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1]
    e = _ONE if big else _ZERO
    z = f * f
    p = (((((((_L0 * f + _L1) * f + _L2) * f + _L3) * f + _L4) * f + _L5) * f + _L6) * f + _L7) * f + _L8
    y = f * z * p + e * _LN2_LO - _HALF * z
    return f + y + e * _LN2_HI


@njit(inline="always")
def _softplus(x):  # type: ignore[no-untyped-def]
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|); equals x above 20 like torch's threshold."""
    return (x if x > _ZERO else _ZERO) + _log1p_unit(_exp(-abs(x)))


@njit(inline="always")
def _silu(x):  # type: ignore[no-untyped-def]
    return x / (_ONE + _exp(-x))


@njit(inline="always")
def _advance(st, tile, Bm, Cm, b, t0, steps, n_state, in_range):  # type: ignore[no-untyped-def]
    """Run the recurrence over one tile. st (N, 2, W) holds A log2(e) and h per state; tile (T, 5, W) gives
    dt and dt u in rows 0 and 1 and receives y = C h in row 4. `in_range` is a literal (see _exp2_product)."""
    n4 = n_state - n_state % 4
    for t in range(steps):
        for j in range(_W):
            tile[t, 4, j] = _ZERO
        # Four states at a time: four independent chains of work per channel for the CPU to overlap.
        for n in range(0, n4, 4):
            B0, B1, B2, B3 = _load(Bm[b, t0 + t, n]), _load(Bm[b, t0 + t, n + 1]), _load(Bm[b, t0 + t, n + 2]), _load(Bm[b, t0 + t, n + 3])  # fmt: skip
            C0, C1, C2, C3 = _load(Cm[b, t0 + t, n]), _load(Cm[b, t0 + t, n + 1]), _load(Cm[b, t0 + t, n + 2]), _load(Cm[b, t0 + t, n + 3])  # fmt: skip
            for j in range(_W):
                d = tile[t, 0, j]
                x = tile[t, 1, j]
                h0 = _exp2_product(d, st[n, 0, j], in_range) * st[n, 1, j] + x * B0
                h1 = _exp2_product(d, st[n + 1, 0, j], in_range) * st[n + 1, 1, j] + x * B1
                h2 = _exp2_product(d, st[n + 2, 0, j], in_range) * st[n + 2, 1, j] + x * B2
                h3 = _exp2_product(d, st[n + 3, 0, j], in_range) * st[n + 3, 1, j] + x * B3
                st[n, 1, j] = h0
                st[n + 1, 1, j] = h1
                st[n + 2, 1, j] = h2
                st[n + 3, 1, j] = h3
                acc = tile[t, 4, j] + C0 * h0
                acc += C1 * h1
                acc += C2 * h2
                tile[t, 4, j] = acc + C3 * h3
        for n in range(n4, n_state):
            Bn, Cn = _load(Bm[b, t0 + t, n]), _load(Cm[b, t0 + t, n])
            for j in range(_W):
                hn = _exp2_product(tile[t, 0, j], st[n, 0, j], in_range) * st[n, 1, j] + tile[t, 1, j] * Bn
                st[n, 1, j] = hn
                tile[t, 4, j] += Cn * hn


@njit(inline="always")
def _stage(src, b, t0, d0, steps, w, tile, row):  # type: ignore[no-untyped-def]
    """Copy src[b, t0 : t0 + steps, d0 : d0 + w] (B, L, ED), any strides, into tile[:steps, row, :w] as float32,
    walking src along whichever of its axes is closer together in memory."""
    if src.strides[1] < src.strides[2]:  # channel-first, like a transposed (B, ED, L) tensor
        for j in range(w):
            for t in range(steps):
                tile[t, row, j] = _load(src[b, t0 + t, d0 + j])
    else:
        for t in range(steps):
            for j in range(w):
                tile[t, row, j] = _load(src[b, t0 + t, d0 + j])


@njit(inline="always")
def _tile(u, delta, z, Bm, Cm, st, vec, bounds, tile, y, b, t0, steps, d0, has_D, has_z, softplus):  # type: ignore[no-untyped-def]
    """One task's tile: steps t0 .. t0 + steps of channels d0 .. d0 + W of sequence b, from the state in st."""
    n_state = st.shape[0]
    w = min(_W, y.shape[2] - d0)
    if w < _W:  # keep the lanes past the last channel at zero
        tile[:, 0, w:] = _ZERO
        tile[:, 2, w:] = _ZERO
        tile[:, 3, w:] = _ZERO
    _stage(delta, b, t0, d0, steps, w, tile, 0)
    _stage(u, b, t0, d0, steps, w, tile, 2)
    if has_z:
        _stage(z, b, t0, d0, steps, w, tile, 3)
    # dt's sign and largest value from its bits (integer min and max, which vectorise): the bits of
    # non-negative floats order like the floats, negative floats have negative bits, NaN the largest.
    least, most = np.int32(0), np.int32(0)
    for t in range(steps):
        if softplus:
            for j in range(_W):
                tile[t, 0, j] = _softplus(tile[t, 0, j] + vec[0, j])
        else:
            for j in range(_W):
                tile[t, 0, j] = tile[t, 0, j] + vec[0, j]
        for j in range(_W):
            bits = _as_int(tile[t, 0, j])
            least = min(least, bits)
            most = max(most, bits)
            tile[t, 1, j] = tile[t, 0, j] * tile[t, 2, j]
        if has_z:
            for j in range(_W):
                tile[t, 3, j] = _silu(tile[t, 3, j])
    # 0 <= dt <= dt_max and A <= 0 put every exponent dt A in [dt_max min(A), 0].
    if least >= 0 and bounds[1] <= _ZERO and _as_float(most) * bounds[0] >= _EXP2_LO:
        _advance(st, tile, Bm, Cm, b, t0, steps, n_state, True)
    else:
        _advance(st, tile, Bm, Cm, b, t0, steps, n_state, False)
    for t in range(steps):
        if has_D:
            for j in range(_W):
                tile[t, 4, j] += vec[1, j] * tile[t, 2, j]
        if has_z:
            for j in range(_W):
                tile[t, 4, j] *= tile[t, 3, j]
        for j in range(w):
            y[b, t0 + t, d0 + j] = _store(tile[t, 4, j], y[b, t0 + t, d0 + j])


def _scan_tasks(u, delta, z, Bm, Cm, A, D, bias, h, y, has_D, has_z, has_bias, softplus, threads):  # type: ignore[no-untyped-def]
    """The kernel: y (B, L, ED) and the state h (B, ED, N), which holds h_0 on entry, from the inputs.

    A task is one block of W channels of one sequence. Each thread takes a run of consecutive tasks and,
    when the sequence is longer than a tile, advances them together a tile of T steps at a time, so that
    it reads and writes the rows of u, delta, z and y a few KiB at a time rather than 512 bytes per row,
    which the hardware prefetcher and the TLB serve much better. A sequence of one tile (decoding) takes
    the tasks one after another and needs scratch space for one.
    """
    batch, length, inner = y.shape
    n_state = A.shape[1]
    blocks = (inner + _W - 1) // _W
    tasks = batch * blocks
    runs = max(1, min(threads, tasks))
    for run in prange(runs):
        first = run * tasks // runs
        count = (run + 1) * tasks // runs - first
        group = count if length > _T else 1
        # Rows of a few arrays rather than many arrays: separately allocated arrays can start at the same
        # offset modulo 4 KiB, and then loads wait on stores to unrelated addresses ("4K aliasing").
        # Lanes w..W-1 of a last, partial block stay zero: dt = 0 keeps their state at 0.
        st = np.zeros((group, n_state, 2, _W), np.float32)  # per task and state: A log2(e), h
        vec = np.zeros((group, 2, _W), np.float32)  # per task: delta_bias, D
        bounds = np.zeros((group, 2), np.float32)  # per task: min and max of A log2(e)
        tile = np.zeros((min(_T, length), 5, _W), np.float32)  # per step: dt, dt u, u, silu(z), y
        for g0 in range(first, first + count, group):
            for i in range(group):
                b, d0 = divmod(g0 + i, blocks)
                d0 *= _W
                lo, hi = np.float32(np.inf), np.float32(-np.inf)
                for j in range(min(_W, inner - d0)):
                    for n in range(n_state):
                        a2 = np.float32(np.float64(A[d0 + j, n]) * _LOG2E_64)
                        st[i, n, 0, j] = a2
                        st[i, n, 1, j] = h[b, d0 + j, n]
                        lo = min(lo, a2)
                        hi = max(hi, a2)
                    if has_bias:
                        vec[i, 0, j] = bias[d0 + j]
                    if has_D:
                        vec[i, 1, j] = D[d0 + j]
                bounds[i, 0], bounds[i, 1] = lo, hi
            for t0 in range(0, length, _T):
                steps = min(_T, length - t0)
                for i in range(group):
                    b, d0 = divmod(g0 + i, blocks)
                    d0 *= _W
                    _tile(u, delta, z, Bm, Cm, st[i], vec[i], bounds[i], tile, y, b, t0, steps, d0, has_D, has_z, softplus)  # fmt: skip
            for i in range(group):
                b, d0 = divmod(g0 + i, blocks)
                d0 *= _W
                for j in range(min(_W, inner - d0)):
                    for n in range(n_state):
                        h[b, d0 + j, n] = st[i, n, 1, j]


@njit(inline="always")
def _update_channel(h, A, bc, b, d, dt, dtu, n_state):  # type: ignore[no-untyped-def]
    """h[b, d, :] = exp(dt A[d, :]) h[b, d, :] + dt u B, for one channel; bc[0] holds B."""
    for n in range(n_state):
        a2 = np.float32(np.float64(A[d, n]) * _LOG2E_64)
        h[b, d, n] = _exp2_product(dt, a2, False) * h[b, d, n] + dtu * bc[0, n]


def _update_tasks(u, delta, z, Bm, Cm, A, D, bias, h, y, has_D, has_z, has_bias, softplus, threads):  # type: ignore[no-untyped-def]
    """One step for decoding: y (B, ED) from u, delta, z (B, ED), B, C (B, N), updating h (B, ED, N) in place.

    The state stays in its (B, ED, N) layout: each channel's N states are one or two vectors, so nothing is
    transposed, which for a single step would cost more than the step. dt, dt u and silu(z) are computed
    first for a block of W channels at once, so that they vectorise.
    """
    batch, inner = y.shape
    n_state = A.shape[1]
    blocks = (inner + _W - 1) // _W
    tasks = batch * blocks
    runs = max(1, min(threads, tasks))
    for run in prange(runs):
        first = run * tasks // runs
        count = (run + 1) * tasks // runs - first
        rows = np.zeros((4, _W), np.float32)  # dt, dt u, u, silu(z)
        bc = np.zeros((2, n_state), np.float32)  # B, C
        for task in range(first, first + count):
            b, d0 = divmod(task, blocks)
            d0 *= _W
            w = min(_W, inner - d0)
            for j in range(w):
                rows[0, j] = _load(delta[b, d0 + j]) + (bias[d0 + j] if has_bias else _ZERO)
                rows[2, j] = _load(u[b, d0 + j])
            if softplus:
                for j in range(_W):
                    rows[0, j] = _softplus(rows[0, j])
            for j in range(_W):
                rows[1, j] = rows[0, j] * rows[2, j]
            if has_z:
                for j in range(w):
                    rows[3, j] = _load(z[b, d0 + j])
                for j in range(_W):
                    rows[3, j] = _silu(rows[3, j])
            for n in range(n_state):
                bc[0, n] = _load(Bm[b, n])
                bc[1, n] = _load(Cm[b, n])
            for j in range(w):
                if n_state == 16:  # Jamba's N: a fixed trip count, so the loop is unrolled into two vectors
                    _update_channel(h, A, bc, b, d0 + j, rows[0, j], rows[1, j], 16)
                else:
                    _update_channel(h, A, bc, b, d0 + j, rows[0, j], rows[1, j], n_state)
            # y = C h for the block, states outer: a sum over n per channel would be a serial chain.
            for j in range(_W):
                rows[0, j] = _ZERO
            for n in range(n_state):
                c = bc[1, n]
                for j in range(w):
                    rows[0, j] += c * h[b, d0 + j, n]
            if has_D:
                for j in range(w):
                    rows[0, j] += D[d0 + j] * rows[2, j]
            if has_z:
                for j in range(w):
                    rows[0, j] *= rows[3, j]
            for j in range(w):
                y[b, d0 + j] = _store(rows[0, j], y[b, d0 + j])


_NUMBA_TYPES = {torch.float32: types.float32, torch.bfloat16: types.int16}
_KERNELS = {"scan": (_scan_tasks, 3), "update": (_update_tasks, 2)}
_threads = threading.local()


@functools.cache
def _compiled(kind: str, in_dtypes: tuple[torch.dtype, ...], out_dtype: torch.dtype) -> Callable[..., None]:
    """The "scan" or "update" kernel for these dtypes of (u, delta, z, B, C) and y, compiled or loaded
    from numba's on-disk cache.

    The inputs are typed with any strides ("A" layout), so that one compilation serves contiguous tensors
    and views alike (the model's u is a transposed view, its z half of a projection).
    """
    func, dims = _KERNELS[kind]
    vector = types.Array(types.float32, 1, "C")
    sig = types.void(
        *(types.Array(_NUMBA_TYPES[dtype], dims, "A") for dtype in in_dtypes),  # u, delta, z, B, C
        types.Array(types.float32, 2, "C"),  # A
        vector,  # D
        vector,  # delta_bias
        types.Array(types.float32, 3, "C"),  # h
        types.Array(_NUMBA_TYPES[out_dtype], dims, "C"),  # y
        types.boolean,  # has_D
        types.boolean,  # has_z
        types.boolean,  # has_bias
        types.boolean,  # softplus
        types.int64,  # threads
    )
    start = time.perf_counter()
    kernel = njit(sig, parallel=True, cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")(
        func
    )
    logger.info(
        "numba %s kernel for %s -> %s ready in %.1f s",
        kind,
        ", ".join(str(d).removeprefix("torch.") for d in in_dtypes),
        str(out_dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return kernel


def compile_kernels(dtype: torch.dtype = torch.float32) -> float:
    """Compile (or load from numba's on-disk cache) both kernels for inputs of `dtype`; returns seconds.

    `resolve_kernels` calls it, so that a kernel that cannot compile is reported at once, not at the first
    forward. The first compilation on a machine takes tens of seconds; later processes load it in well
    under a second.
    """
    start = time.perf_counter()
    dtype = dtype if dtype in _NUMBA_TYPES else torch.float32
    for kind in _KERNELS:
        _compiled(kind, (dtype,) * 5, dtype)
    return time.perf_counter() - start


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (bfloat16 as its int16 bits); no copy. Other dtypes become float32."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return (t if t.dtype == torch.float32 else t.to(torch.float32)).numpy()


def _vector(t: torch.Tensor | None, inner: int, name: str) -> np.ndarray:
    """D or delta_bias as a contiguous float32 (ED,) array; an empty one when absent."""
    if t is None:
        return _EMPTY
    if t.shape != (inner,):
        raise ValueError(f"{name} must have shape ({inner},), got {tuple(t.shape)}")
    return np.ascontiguousarray(_array(t), dtype=np.float32)


_EMPTY = np.zeros(0, np.float32)


def _set_threads() -> int:
    """Size numba's pool for this thread to torch.get_num_threads(); cached, numba's setter costs microseconds."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads, "n", None) != threads:
        numba.set_num_threads(threads)
        _threads.n = threads
    return threads


def _run(
    kind: str,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    h: np.ndarray,
) -> torch.Tensor:
    """Check shapes and run a kernel; h (B, ED, N) is the float32 state, updated in place.

    For "scan" u, delta, z are (B, L, ED) and B, C (B, L, N); for "update" they lack the L axis.
    Returns y in u's dtype (float32 for dtypes other than float32 and bfloat16, converted back). Tensors
    on other devices fail in `Tensor.numpy()`. This runs once per layer and token when decoding, so it
    keeps to cheap checks: a wrong shape would make the kernel read out of bounds.
    """
    arrays = [_array(t) for t in (u, delta, u if z is None else z, B, C)]
    a = np.ascontiguousarray(_array(A), dtype=np.float32)
    inner, n_state = a.shape
    shape = arrays[0].shape
    if (
        shape[-1] != inner
        or arrays[1].shape != shape
        or arrays[2].shape != shape
        or arrays[3].shape != (*shape[:-1], n_state)
        or arrays[4].shape != arrays[3].shape
        or h.shape != (shape[0], inner, n_state)
    ):
        raise ValueError(
            "selective scan shapes do not match: u, delta, z (..., ED), B, C (..., N), A (ED, N), state "
            f"(B, ED, N); got u {tuple(u.shape)}, delta {tuple(delta.shape)}, z {None if z is None else tuple(z.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}, A {tuple(A.shape)}, state {h.shape}"
        )
    out_dtype = torch.bfloat16 if u.dtype == torch.bfloat16 else torch.float32
    y = torch.empty(shape, dtype=out_dtype)
    kernel = _compiled(kind, tuple(_DTYPES[x.dtype] for x in arrays), out_dtype)
    kernel(
        *arrays,
        a,
        _vector(D, inner, "D"),
        _vector(delta_bias, inner, "delta_bias"),
        h,
        _array(y),
        D is not None,
        z is not None,
        delta_bias is not None,
        delta_softplus,
        _set_threads(),
    )
    return y if y.dtype == u.dtype else y.to(u.dtype)


_DTYPES = {np.dtype(np.int16): torch.bfloat16, np.dtype(np.float32): torch.float32}


def _off_cpu(u: torch.Tensor) -> bool:
    """True for tensors on another device, which go to the chunked scan, with a warning the first time:
    a model built with kernels="auto" on CPU and moved to a GPU keeps working."""
    if u.is_cpu:
        return False
    if not _warned_devices:
        logger.warning("the numba kernels run on CPU only; %s tensors go to the chunked scan", u.device.type)
        _warned_devices.add(u.device.type)
    return True


_warned_devices: set[str] = set()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    """Fused selective scan: y (B, L, ED) in u's dtype and the last state (B, ED, N) in float32.

    float64 inputs, and calls that need a gradient, are computed by `chunked.selective_scan` (see the
    module docstring); the state is then float64 for float64 inputs, like the reference's.
    """
    args = (u, delta, A, B, C, D, z, delta_bias)
    if u.dtype == torch.float64 or _needs_grad(*args, initial_state) or _off_cpu(u):
        return chunked.selective_scan(*args, delta_softplus=delta_softplus, initial_state=initial_state)
    if u.dim() != 3:
        raise ValueError(f"u must be (B, L, ED), got shape {tuple(u.shape)}")
    batch, _, inner = u.shape
    n_state = A.shape[-1]
    if initial_state is None:
        h = torch.zeros(batch, inner, n_state)
    else:
        h = initial_state.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    y = _run("scan", u, delta, A, B, C, D, z, delta_bias, delta_softplus, h.numpy())
    return y, h


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
    """One decoding step: updates `state` (B, ED, N) in place and returns y (B, ED) in u's dtype.

    u, delta, z are (B, ED); B, C are (B, N). A float32 contiguous state is updated where it lies; any
    other is worked on in a float32 copy, copied back. float64 inputs and calls that need a gradient go
    to `chunked.selective_state_update`.
    """
    if u.dtype == torch.float64 or _needs_grad(state, u, delta, A, B, C, D, z, delta_bias) or _off_cpu(u):
        return chunked.selective_state_update(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if u.dim() != 2:
        raise ValueError(f"u must be (B, ED), got shape {tuple(u.shape)}")
    direct = state.dtype == torch.float32 and state.is_contiguous() and not state.requires_grad
    h = (
        state
        if direct
        else state.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    )
    y = _run("update", u, delta, A, B, C, D, z, delta_bias, delta_softplus, h.numpy())
    if not direct:
        with torch.no_grad():
            state.copy_(h)
    return y
