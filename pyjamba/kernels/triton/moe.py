"""The fused Mixture of Experts in Triton: `experts` (the op `pyjamba::fused_moe`).

The model's `Experts` module (model.py) is the spec: each token's K experts, SwiGLU each, weighted
by the router and summed. Here, as in vLLM's fused_moe:

1. `align`: the T*K (token, expert) assignments sorted by expert, each expert's run padded to a
   multiple of BLOCK_M rows, so that every block of BLOCK_M rows belongs to one expert. Done with
   torch ops on the device and sized by an upper bound, never by a count read back to the host,
   so the step can be captured in a CUDA graph.
2. `_up_kernel`: one grouped GEMM for gate and up, (rows, D) x (D, I) per block on its expert's
   weights, with silu(gate) * up applied before anything is written: (padded rows, I).
3. `_down_kernel`: the grouped GEMM of down, (rows, I) x (I, D), times the router weight, written
   to the assignment's own row (T*K, D) in float32; the K rows of a token are then summed.

Weights: stacks (E, I, D) and (E, D, I) in the activations' dtype, or int8 with float32 scales per
output row ((E, I), (E, D): quantize.py's ExpertsInt8, W8A16): the int8 tile is converted in
registers and the scale applied to the accumulated product, which it factors out of.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .scan import sigmoid

__all__ = ["align", "experts"]


@triton.jit
def _up_kernel(
    x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, sorted_ptr, block_expert_ptr, h_ptr,
    n_assign, K, D, INNER, E, s_xt,
    HAS_SCALE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= E:  # a block past the last expert's rows
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + rows)
    am = assign < n_assign
    tok = assign // K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < INNER
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_off = e * INNER * D + cols[None, :] * D
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < D
        a = tl.load(x_ptr + tok[:, None] * s_xt + kk[None, :], mask=am[:, None] & km[None, :], other=0.0)
        wmask = km[:, None] & cm[None, :]
        wg = tl.load(wg_ptr + w_off + kk[:, None], mask=wmask, other=0.0)  # (BLOCK_K, BLOCK_N)
        wu = tl.load(wu_ptr + w_off + kk[:, None], mask=wmask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        else:
            wg = wg.to(a.dtype)
            wu = wu.to(a.dtype)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
    if HAS_SCALE:
        acc_g = acc_g * tl.load(sg_ptr + e * INNER + cols, mask=cm, other=0.0)[None, :]
        acc_u = acc_u * tl.load(su_ptr + e * INNER + cols, mask=cm, other=0.0)[None, :]
    h = acc_g * sigmoid(acc_g) * acc_u
    tl.store(
        h_ptr + rows[:, None] * INNER + cols[None, :],
        h.to(h_ptr.dtype.element_ty),
        mask=am[:, None] & cm[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, sd_ptr, topk_ptr, sorted_ptr, block_expert_ptr, out_ptr,
    n_assign, D, INNER, E,
    HAS_SCALE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    assign = tl.load(sorted_ptr + rows)
    am = assign < n_assign
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_off = e * D * INNER + cols[None, :] * INNER
    for k0 in range(0, INNER, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < INNER
        a = tl.load(h_ptr + rows[:, None] * INNER + kk[None, :], mask=am[:, None] & km[None, :], other=0.0)
        w = tl.load(wd_ptr + w_off + kk[:, None], mask=km[:, None] & cm[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(sd_ptr + e * D + cols, mask=cm, other=0.0)[None, :]
    acc = acc * tl.load(topk_ptr + assign, mask=am, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + assign[:, None] * D + cols[None, :], acc, mask=am[:, None] & cm[None, :])


def align(index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignments of `index` (T, K) sorted by expert, each expert's run padded to `block_m` rows.

    Returns sorted_ids (P,): assignment ids t*K+k, the padding holding T*K; and block_expert
    (P / block_m,): each block's expert, `num_experts` for blocks past the last run. P is the upper
    bound T*K + min(E, T*K) * (block_m - 1), so nothing depends on the routing but the values.
    """
    flat = index.reshape(-1)
    n_assign = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its size back to the host
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    sorted_expert = flat[order]
    rank = torch.arange(n_assign, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    length = n_assign + min(num_experts, n_assign) * (block_m - 1)
    length = -(-length // block_m) * block_m
    sorted_ids = torch.full((length,), n_assign, dtype=torch.long, device=flat.device)
    sorted_ids[(ends - padded)[sorted_expert] + rank] = order
    starts = torch.arange(0, length, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, starts, right=True)
    return sorted_ids, block_expert


def _blocks(rows: int, interpreting: bool) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K for `rows` assignments: small blocks for decoding, larger for prompts."""
    if interpreting:
        return 16, 32, 16
    return (16, 64, 64) if rows <= 64 else (64, 128, 64)


@torch.library.custom_op("pyjamba::fused_moe", mutates_args=())
def fused_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_scale: torch.Tensor | None,
    up_scale: torch.Tensor | None,
    down_scale: torch.Tensor | None,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{index[t, k]}(x[t]), (T, D) in x's dtype."""
    tokens, d = x.shape
    top_k = index.shape[1]
    num_experts, inner, _ = gate.shape
    n_assign = tokens * top_k
    interp = common.interpreting()
    block_m, block_n, block_k = _blocks(n_assign, interp)
    sorted_ids, block_expert = align(index, num_experts, block_m)
    h = torch.empty(sorted_ids.numel(), inner, dtype=x.dtype, device=x.device)
    out = torch.empty(n_assign, d, dtype=torch.float32, device=x.device)
    has_scale = gate_scale is not None
    # The interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584): there it
    # multiplies in float32. fp32 activations: IEEE products, as torch's float32 matmul.
    dot_f32 = x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16)
    precision = "ieee" if dot_f32 else "tf32"
    flags = {"HAS_SCALE": has_scale, "DOT_F32": dot_f32, "PRECISION": precision}
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}
    n_blocks = block_expert.numel()
    _up_kernel[(n_blocks, triton.cdiv(inner, block_n))](
        x, gate, up, common.or_(gate_scale, out), common.or_(up_scale, out), sorted_ids, block_expert, h,
        n_assign, top_k, d, inner, num_experts, x.stride(0), **flags, **blocks,
    )  # fmt: skip
    _down_kernel[(n_blocks, triton.cdiv(d, block_n))](
        h, down, common.or_(down_scale, out), weights.reshape(-1).float().contiguous(), sorted_ids,
        block_expert, out, n_assign, d, inner, num_experts, **flags, **blocks,
    )  # fmt: skip
    return out.view(tokens, top_k, d).sum(1).to(x.dtype)


@fused_moe.register_fake
def _(x, weights, index, gate, up, down, gate_scale, up_scale, down_scale):
    return torch.empty_like(x)


def experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`Kernels.experts`: the fused MoE of x (T, D) routed by weights and index (T, K), or None for a
    call it does not take (autograd, float64, tensors it cannot read): then the Experts module's own
    loop runs."""
    tensors = (x, weights, index, gate, up, down, gate_scale, up_scale, down_scale)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if wants_grad or x.dtype == torch.float64 or x.shape[0] == 0 or not common.takes(*tensors):
        return None
    quantized = gate.dtype == torch.int8
    if not quantized and gate.dtype != x.dtype:
        return None
    return fused_moe(
        common.last_contiguous(x), weights, index, gate.contiguous(), up.contiguous(), down.contiguous(),
        gate_scale, up_scale, down_scale,
    )  # fmt: skip
