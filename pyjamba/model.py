"""The Jamba architecture, top to bottom: RMSNorm, Attention, MambaMixer, MLP, SparseMoE, Layer, Jamba.

Module attribute names are the checkpoint's tensor names (`model.layers.3.mamba.in_proj.weight`),
except the experts of a MoE layer, stored stacked (E, out, in) and mapped in checkpoint.py.

Glossary of dimension letters:
    B  batch             L  new tokens in this call    S  tokens attended to (past + new)
    D  hidden size       H  attention heads            Hkv key/value heads    Dh head dim
    E  experts           K  experts per token          I  feed-forward width
    ED Mamba inner       N  SSM state size             W  conv width          R  dt rank
    V  vocabulary

What it computes is what transformers' JambaForCausalLM computes (tests hold the two together), with
one deliberate difference: with `mamba_proj_bias`, padding positions are zeroed after `in_proj` as
well as before it, so that a left-padded sequence gets exactly the logits it gets alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .cache import HybridCache
from .config import JambaConfig
from .kernels import Kernels, loaded, resolve_kernels

__all__ = ["CausalLMOutput", "Jamba", "JambaForCausalLM", "linear", "load_balancing_loss"]

# How `linear` multiplies on a CPU (measured on a 2-core AVX2 CPU, 2 threads; docs/benchmarks.md).
_ONEDNN = torch.backends.mkldnn.is_available()
# Whether the CPU multiplies bfloat16 natively (AVX512-BF16, AMX); without it torch's bfloat16 GEMM
# is a loop at ~2-4 GFLOP/s, against ~75 in float32.
_CPU_BF16_MATMUL = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_MIN_WEIGHT = 1 << 19  # float32 weights from this many elements up go through oneDNN
_FEW_ROWS = 64  # 2 to this many rows: the weight as the left operand
_BF16_ROWS = 4  # bfloat16 without native support: up to this many rows stay in bfloat16
_GEMV_ROWS = 4  # float32, up to this many rows: the numba matrix-vector product, when loaded
_QUERY_BLOCK = 512  # queries per attention call where a mask is needed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by the fastest route on a CPU; F.linear is its readable twin.

    Inference only (autograd, compilation and other devices take F.linear). x (..., in) has `rows`
    rows in all (tokens times sequences):
    - float32, up to `_GEMV_ROWS` rows, once the numba kernels are loaded (`kernels.loaded`):
      their matrix-vector product, which streams the weight at ~23 GB/s where MKL and oneDNN reach
      11-19 GB/s for the model's shapes (the 65536 x 512 head: 5.8 ms against 7 in oneDNN, 11 in MKL).
    - float32, one row, without numba: oneDNN's inner product for weights of
      `_ONEDNN_MIN_WEIGHT` elements or more. MKL's matrix-vector product runs on one core; for
      small weights oneDNN's fixed cost (~50 us) loses, and F.linear is kept.
    - float32, 2 to `_FEW_ROWS` rows (decoding a batch): weight @ x^T, transposed back. MKL
      parallelises over the weight's rows and streams it once: 2-3x faster than x @ weight^T
      (1024 x 512 weight, 4 rows: 0.16 ms against 0.40 in MKL and 0.30 in oneDNN).
    - float32, more rows (prompts): as for one row; oneDNN is on par with MKL or up to 15% faster.
    - bfloat16 on a CPU without native bfloat16 GEMM: up to `_BF16_ROWS` rows stay in bfloat16
      (a vectorised matrix-vector product per row, half the bytes of float32); more rows are
      multiplied in float32, the weight converted on the fly (a small cost next to the product).
    """
    if (
        x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()  # the compiler picks its own matmuls
    ):
        return F.linear(x, weight, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if weight.dtype == torch.bfloat16 and not _CPU_BF16_MATMUL and rows > _BF16_ROWS:
        bias32 = None if bias is None else bias.float()
        return linear(x.float(), weight.float(), bias32).to(x.dtype)
    if weight.dtype != torch.float32 or rows == 0:
        return F.linear(x, weight, bias)
    if rows <= _GEMV_ROWS and x.dtype == torch.float32 and (decode := loaded("decode")) is not None:
        return decode.gemv(x, weight, bias)
    if 2 <= rows <= _FEW_ROWS:
        # MKL wants x^T as a transposed row-major x, hence the row-major input and output.
        flat = x.reshape(rows, x.shape[-1]).contiguous().t()  # (in, rows)
        out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., out)
    if weight.numel() >= _ONEDNN_MIN_WEIGHT and _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    return F.linear(x, weight, bias)


def _tensors(
    module: nn.Module, names: tuple[str, ...], norm: RMSNorm | None = None
) -> tuple[torch.Tensor | None, ...]:
    """The parameters of `module` by dotted name ("in_proj.weight"; None for an absent bias), after
    norm's weight if given, read from the modules' dicts: nn.Module's attribute lookup costs about a
    microsecond, and a fused decoding step makes a hundred of them."""
    out = [] if norm is None else [norm._parameters["weight"]]
    for name in names:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = owner._modules[part]
        out.append(owner._parameters[leaf])
    return tuple(out)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = loaded("elementwise")
        if fast is not None and fast.supported(x, self.weight):
            return fast.rms_norm(x, self.weight, self.eps)  # one pass (F.rms_norm is six on a CPU)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One call instead of seven small ones: the same arithmetic (x * rsqrt(mean(x^2) + eps) * w).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with no positional encoding and no biases."""

    def __init__(self, config: JambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: HybridCache | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k = (
            self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B, Hkv, L, Dh)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update_kv(self.layer_idx, k, v)  # (B, Hkv, S, Dh)
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and (past == 0 or length == 1):
            # Plain causal attention: over the new keys alone, or one query that sees every key.
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=length > 1, enable_gqa=gqa
            )  # (B, H, L, Dh)
        else:
            # A mask is needed (padding, or queries after a past): blocks of queries, each with the keys
            # up to its last query, so that the mask (and the float copy SDPA makes of it) is at most
            # _QUERY_BLOCK x S, not L x S (0.7 GB for 4096 new tokens after 28K).
            blocks = []
            for start in range(0, length, _QUERY_BLOCK):
                end = min(length, start + _QUERY_BLOCK)
                keys = past + end
                if mask is None:  # no padding: causal, aligned to the last key
                    block_mask = torch.ones(end - start, keys, dtype=torch.bool, device=x.device)
                    block_mask = block_mask.tril(past + start)  # (L', S')
                else:
                    block_mask = mask[:, :, start:end, :keys]  # (B, 1, L', S')
                blocks.append(
                    F.scaled_dot_product_attention(
                        q[:, :, start:end],
                        k[:, :, :keys],
                        v[:, :, :keys],
                        attn_mask=block_mask,
                        enable_gqa=gqa,
                    )
                )  # (B, H, L', Dh)
            out = torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0]  # (B, H, L, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def fused_step(
        self, x: torch.Tensor, norm: RMSNorm, cache: HybridCache, decode: ModuleType
    ) -> torch.Tensor:
        """x + self(norm(x)) for one token per sequence, x (B, D) float32, no mask, by the fused kernels."""
        weights = _tensors(self, ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"), norm)
        return decode.attention_step(
            self, x, norm.eps, weights, self.head_dim, lambda k, v: cache.update_kv(self.layer_idx, k, v)
        )


class MambaMixer(nn.Module):
    """The Mamba-1 selective SSM block with Jamba's inner RMSNorms on dt, B and C.

    in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> x_proj -> (dt, B, C), each RMS-normed;
    dt -> dt_proj (its bias and softplus inside the scan); A = -exp(A_log) in float32;
    y = scan(x, dt, A, B, C) + D x, gated by SiLU(z); out_proj.
    """

    # What `fused_step` hands the decode kernel, in its order (after the input norm's weight).
    _FUSED_WEIGHTS = (
        "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_layernorm.weight",
        "b_layernorm.weight", "c_layernorm.weight", "dt_proj.weight", "dt_proj.bias",
    )  # fmt: skip

    def __init__(self, config: JambaConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kernels = kernels
        d, inner, n, r = config.hidden_size, config.mamba_inner, config.mamba_d_state, config.dt_rank
        self.inner, self.n_state, self.dt_rank = inner, n, r
        self.conv_width = config.mamba_d_conv
        self.in_proj = Linear(d, 2 * inner, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            inner, inner, config.mamba_d_conv, groups=inner, bias=config.mamba_conv_bias, padding=0
        )
        self.x_proj = Linear(inner, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = Linear(inner, d, bias=config.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, config.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, config.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, config.rms_norm_eps)
        self._a_log2: tuple[tuple[int, int, int], torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: HybridCache | None
    ) -> torch.Tensor:
        if cache is not None and x.shape[1] == 1 and cache.length > 0:
            return self.step(x, pad_mask, cache)
        batch, _, _ = x.shape
        dtype = x.dtype
        if pad_mask is not None:
            x = x * pad_mask
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, ED) each
        if pad_mask is not None:
            xs = xs * pad_mask
        # Zeros stand for "no past" before the first token.
        past = (
            cache.conv_states[self.layer_idx]
            if cache is not None
            else x.new_zeros(batch, self.inner, self.conv_width - 1)
        )
        fast = loaded("elementwise") if self.kernels.name == "numba" else None
        if fast is not None and fast.supported(xs, past, self.conv1d.weight):
            xs = fast.conv_silu(xs, past, self.conv1d.weight, self.conv1d.bias)  # one pass
        else:
            xs = F.silu(causal_conv(xs, past, self.conv1d.weight, self.conv1d.bias))  # (B, L, ED)
        if pad_mask is not None:
            xs = xs * pad_mask
        dt, B, C = self._dt_b_c(xs)  # (B, L, R), (B, L, N), (B, L, N)
        delta = linear(dt, self.dt_proj.weight)  # (B, L, ED); its bias is added in float32 by the scan
        A = -torch.exp(self.A_log.float())  # (ED, N)
        initial = cache.ssm_states[self.layer_idx] if cache is not None else None
        y, last = self.kernels.selective_scan(
            xs, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, initial_state=initial,
        )  # fmt: skip
        if cache is not None:
            cache.ssm_states[self.layer_idx].copy_(last)
        return self.out_proj(y.to(dtype))

    def step(self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: HybridCache) -> torch.Tensor:
        """One new token per sequence, x (B, 1, D): the conv and the SSM advance their cached state."""
        dtype = x.dtype
        x = x[:, 0]  # (B, D)
        pad = pad_mask[:, 0] if pad_mask is not None else None  # (B, 1)
        if pad is not None:
            x = x * pad
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, ED) each
        if pad is not None:
            xs = xs * pad
        xs = F.silu(
            causal_conv_update(xs, cache.conv_states[self.layer_idx], self.conv1d.weight, self.conv1d.bias)
        )
        if pad is not None:
            xs = xs * pad
        dt, B, C = self._dt_b_c(xs)  # (B, R), (B, N), (B, N)
        delta = linear(dt, self.dt_proj.weight)  # (B, ED)
        A = -torch.exp(self.A_log.float())  # (ED, N)
        y = self.kernels.selective_state_update(
            cache.ssm_states[self.layer_idx], xs, delta, A, B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )  # fmt: skip
        return self.out_proj(y.to(dtype))[:, None]  # (B, 1, D)

    def fused_step(self, x: torch.Tensor, norm: RMSNorm, cache: HybridCache) -> torch.Tensor:
        """x + self(norm(x)) for one token per sequence, x (B, D) float32, by `kernels.decode`: what
        `norm`, then `step`, compute, in one call."""
        first = _tensors(self, self._FUSED_WEIGHTS, norm)
        weights = (*first, self.a_log2(), *_tensors(self, ("D", "out_proj.weight", "out_proj.bias")))
        return self.kernels.decode.mamba_step(
            self, x, norm.eps, weights, cache.conv_states[self.layer_idx], cache.ssm_states[self.layer_idx]
        )

    def a_log2(self) -> torch.Tensor:
        """A log2(e) = -exp(A_log) log2(e) in float32 (ED, N), as the fused kernels use it; kept until
        A_log changes (in place or replaced), since a decoding step would otherwise spend more on it than
        on the SSM update."""
        (a_log,) = _tensors(self, ("A_log",))
        key = (id(a_log), a_log.data_ptr(), a_log._version)
        if self._a_log2 is None or self._a_log2[0] != key:
            a = -torch.exp(a_log.detach().double())
            self._a_log2 = (key, (a * math.log2(math.e)).float().contiguous())
        return self._a_log2[1]

    def _dt_b_c(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj, split into dt (R), B (N), C (N), each RMS-normed."""
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.n_state, self.n_state], dim=-1)
        return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)


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


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate, F.silu(gate) * up; in one pass, into gate, by the numba kernels when loaded."""
    fast = loaded("elementwise")
    if fast is not None and fast.supported(gate, up):
        return fast.silu_mul(gate, up)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, i, bias=False)
        self.up_proj = Linear(d, i, bias=False)
        self.down_proj = Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    def fused_step(self, x: torch.Tensor, norm: RMSNorm, decode: ModuleType) -> torch.Tensor:
        """x + self(norm(x)) for x (B, D) float32, in one call of the fused decode kernels."""
        weights = _tensors(self, ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), norm)
        return decode.mlp_step(self, x, norm.eps, weights)


class Experts(nn.Module):
    """E SwiGLU experts, their weights stacked: gate/up (E, I, D), down (E, D, I).

    Two routes to the same sum: `grouped` (a prompt: tokens sorted by expert, each expert run once on
    all its rows) and `gathered` (a few tokens: each (token, expert) pair on that expert's weights).
    """

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (T, D); weights and index (T, K): the sum over each token's K experts, weighted.

        `gathered` while (token, expert) pairs seldom share an expert: for one token (none can), and
        for up to E/4 pairs; beyond that, reading each shared expert once (`grouped`) wins, despite
        its sort and scatter (measured on a CPU: docs/benchmarks.md).
        """
        if x.shape[0] == 1 or 4 * index.numel() <= self.gate_proj.shape[0]:
            return self.gathered(x, weights, index)
        return self.grouped(x, weights, index)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e applied to rows h (n, D) -> (n, D)."""
        return linear(silu_mul(linear(h, self.gate_proj[e]), linear(h, self.up_proj[e])), self.down_proj[e])

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Tokens sorted by expert, each expert run once on all its tokens, results scattered back."""
        top_k = index.shape[1]
        flat = index.reshape(-1)  # (T*K,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // top_k  # the token each sorted assignment belongs to
        weight_of = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            h = self.expert(e, x[rows]) * weight_of[start : start + count, None]  # (count, D)
            out.index_add_(0, rows, h.to(out.dtype))
            start += count
        return out

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`grouped` for a few tokens: each token's K experts in turn, on views of their weights.

        No sort, no scatter, no copy of the routed experts' weights: gathering them into a
        (T*K, I, D) batch for one bmm, as GPU decoders do, copies every routed weight before reading
        it again, and measured slower on a CPU (docs/benchmarks.md).
        """
        rows = []
        for t, experts in enumerate(index.tolist()):
            h = x[t : t + 1]  # (1, D)
            out = None
            for e, w in zip(experts, weights[t], strict=True):
                y = self.expert(e, h) * w  # (1, D)
                out = y if out is None else out.add_(y)
            rows.append(out)
        return torch.cat(rows) if len(rows) > 1 else rows[0]  # (T, D)


class SparseMoE(nn.Module):
    """Top-K Mixture of Experts: float32 softmax router, top-K without renormalisation."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the output (B, L, D) and the router logits (B*L, E)."""
        batch, length, d = x.shape
        flat = x.reshape(-1, d)  # (T, D)
        logits = self.router(flat)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        out = self.experts(flat, weights.to(x.dtype), index)
        return out.view(batch, length, d), logits

    def fused_step(
        self, x: torch.Tensor, norm: RMSNorm, decode: ModuleType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x + self(norm(x)) for x (B, D) float32, and the router logits, in one call of the fused kernels."""
        names = ("router.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj")
        weights = _tensors(self, names, norm)
        return decode.moe_step(self, x, norm.eps, weights, self.top_k)


class Layer(nn.Module):
    """Pre-norm residual block: a mixer (attention or Mamba), then a feed-forward (MLP or MoE)."""

    def __init__(self, config: JambaConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.kind == "attention":
            self.self_attn = Attention(config, layer_idx)
        else:
            self.mamba = MambaMixer(config, layer_idx, kernels)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.feed_forward = SparseMoE(config) if self.is_moe else MLP(config)
        self.layer_idx = layer_idx
        self.kernels = kernels

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        cache: HybridCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        decode = self._fused_decode(x, pad_mask, cache)
        if decode is not None:
            return self._fused_step(x, attn_mask, cache, decode)
        h = self.input_layernorm(x)
        if self.kind == "attention":
            h = self.self_attn(h, attn_mask, cache)
        else:
            h = self.mamba(h, pad_mask, cache)
        x = x + h
        h = self.pre_ff_layernorm(x)
        router_logits = None
        if self.is_moe:
            h, router_logits = self.feed_forward(h)
        else:
            h = self.feed_forward(h)
        return x + h, router_logits

    def _fused_decode(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: HybridCache | None
    ) -> ModuleType | None:
        """The fused decode kernels if this call is one they take: one new token per sequence after a
        past, no padding among the new tokens, float32 on CPU, no autograd (`decode.supported`)."""
        decode = self.kernels.decode
        if decode is None or cache is None or x.shape[1] != 1 or cache.length == 0 or pad_mask is not None:
            return None
        if self.kind == "mamba" and not all(
            s[self.layer_idx].is_contiguous() and s[self.layer_idx].dtype == torch.float32
            for s in (cache.conv_states, cache.ssm_states)
        ):
            return None
        return decode if decode.supported(x) else None

    def _fused_step(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: HybridCache, decode: ModuleType
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` for one token per sequence through the fused kernels."""
        batch, _, dim = x.shape
        flat = x.reshape(batch, dim)
        if self.kind == "attention" and attn_mask is None:
            flat = self.self_attn.fused_step(flat, self.input_layernorm, cache, decode)
        elif self.kind == "attention":  # padding between past keys (the serving slots): eager, masked
            flat = flat + self.self_attn(self.input_layernorm(x), attn_mask, cache).reshape(batch, dim)
        else:
            flat = self.mamba.fused_step(flat, self.input_layernorm, cache)
        router_logits = None
        if self.is_moe:
            flat, router_logits = self.feed_forward.fused_step(flat, self.pre_ff_layernorm, decode)
        else:
            flat = self.feed_forward.fused_step(flat, self.pre_ff_layernorm, decode)
        return flat.view(batch, 1, dim), router_logits


class Jamba(nn.Module):
    """The decoder stack: embeddings, layers, final norm."""

    def __init__(self, config: JambaConfig, kernels: Kernels) -> None:
        super().__init__()
        # _weight skips reset_parameters, whose normal_ on the meta device costs a second of imports;
        # init_weights() or a checkpoint sets the values.
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(Layer(config, i, kernels) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """What a forward call returns, as in transformers: `.logits` is (B, L, V) (or fewer positions)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    cache: HybridCache | None = None


def _masks(
    attention_mask: torch.Tensor | None, length: int, past: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The attention mask (B, 1, L, S) bool and the Mamba padding mask (B, L, 1) for L new tokens.

    None where there is no padding: causal attention, the new tokens after the past ones, is implied
    (`Attention` builds what it needs of that mask itself, a block at a time).
    """
    if attention_mask is None:
        return None, None
    total = past + length
    if attention_mask.dim() != 2 or attention_mask.shape[1] != total:
        raise ValueError(
            f"attention_mask must be (batch, past + new tokens) = (B, {total}), "
            f"got {tuple(attention_mask.shape)}"
        )
    keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
    if bool(keep.all()):  # no padding anywhere: the cheaper masks of an unpadded batch
        return _masks(None, length, past, device)
    causal = torch.ones(length, total, dtype=torch.bool, device=device).tril(past)  # (L, S)
    mask = causal[None] & keep[:, None, :]  # (B, L, S)
    # A padding query would attend to nothing (NaN rows); let it see itself, its output is unused.
    diagonal = torch.zeros(length, total, dtype=torch.bool, device=device)
    diagonal[:, past:] = torch.eye(length, dtype=torch.bool, device=device)
    mask = mask | diagonal[None]
    # Decoding steps of a left-padded batch have only real new tokens: nothing for Mamba to mask.
    pad_mask = keep[:, past:, None] if not bool(keep[:, past:].all()) else None  # (B, L, 1)
    return mask[:, None], pad_mask


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch Transformer's load-balancing loss (eq. 4-6), summed over MoE layers as transformers does.

    E * sum_e (fraction of top-K assignments to e) * (mean router probability of e), where both means
    run over all MoE layers' tokens (padding excluded when a mask is given).
    """
    logits = torch.cat([r.float() for r in router_logits], dim=0)  # (layers*T, E)
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    assigned = F.one_hot(selected, num_experts).sum(1).float()  # (layers*T, E)
    if attention_mask is None:
        weight = torch.ones(logits.shape[0], device=logits.device)
    else:
        weight = attention_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    total = weight.sum()
    tokens_per_expert = (assigned * weight[:, None]).sum(0) / total
    prob_per_expert = (probs * weight[:, None]).sum(0) / total
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


class JambaForCausalLM(nn.Module):
    """A Jamba language model: the decoder stack and its language-model head (tied or not).

    `kernels` picks the selective scan ("auto", "torch", "numba" or "reference"), once, at construction.
    Construction does not initialise the weights (so that building on the meta device is free):
    call `init_weights()` for random ones, or load them with `from_pretrained`.
    """

    def __init__(self, config: JambaConfig, kernels: str | Kernels = "auto") -> None:
        super().__init__()
        self.config = config
        self.kernels = resolve_kernels(kernels)
        self.model = Jamba(config, self.kernels)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        kernels: str | Kernels = "auto",
    ) -> JambaForCausalLM:
        """Load a Hugging Face Jamba folder (see `checkpoint.from_pretrained`)."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device, kernels=kernels)

    def save_pretrained(
        self, path: str | os.PathLike, *, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None
    ) -> None:
        """Write the Hugging Face layout, atomically (see `checkpoint.save_pretrained`)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """The prompt and the new tokens (B, prompt + new), as transformers' generate; see `generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def use_kernels(self, kernels: str | Kernels) -> None:
        """Switch every Mamba mixer to other kernels (e.g. the reference, for testing)."""
        self.kernels = resolve_kernels(kernels)
        for layer in self.model.layers:
            layer.kernels = self.kernels
            if layer.kind == "mamba":
                layer.mamba.kernels = self.kernels

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random weights as transformers initialises them, with Mamba's dt and A initialisation."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                bound = 1.0 / math.sqrt(module.weight.shape[-1])
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    p.normal_(0.0, std, generator=generator)
        for module in self.modules():
            if isinstance(module, MambaMixer):
                n = module.n_state
                a = torch.arange(1, n + 1, dtype=torch.float32).expand(module.inner, n)
                module.A_log.copy_(torch.log(a))
                module.D.fill_(1.0)
                # dt initialised log-uniform in [1e-3, 1e-1], stored as its inverse softplus (Mamba's init).
                bound = module.dt_rank**-0.5
                module.dt_proj.weight.uniform_(-bound, bound, generator=generator)
                dt = torch.exp(
                    torch.rand(module.inner, generator=generator) * (math.log(0.1) - math.log(1e-3))
                    + math.log(1e-3)
                ).clamp(min=1e-4)
                module.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def make_cache(self, batch_size: int, max_length: int = 256) -> HybridCache:
        """An empty inference cache in the model's dtype and device."""
        param = self.lm_head.weight
        return HybridCache(self.config, batch_size, max_length, dtype=param.dtype, device=param.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool = False,
    ) -> CausalLMOutput:
        """Logits for `input_ids` (B, L); with a cache, continue the sequences it holds.

        attention_mask: (B, past + L), 1 for tokens, 0 for (left) padding.
        labels: (B, L) token ids, -100 to ignore; the loss is next-token cross-entropy, plus
            router_aux_loss_coef times the load-balancing loss when `output_router_logits`.
        logits_to_keep: an int n keeps the last n positions (0: all); a tensor keeps those indices.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"the cache holds {cache.batch_size} sequences, input_ids has {batch}")
        attn_mask, pad_mask = _masks(attention_mask, length, past, input_ids.device)

        x = self.model.embed_tokens(input_ids)  # (B, L, D)
        if pad_mask is not None:
            pad_mask = pad_mask.to(x.dtype)
        all_router_logits = []
        for layer in self.model.layers:
            x, router_logits = layer(x, attn_mask, pad_mask, cache)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        if cache is not None:
            cache.advance(length)
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        else:
            x = x[:, logits_to_keep]
        decode = self.kernels.decode
        if decode is not None and x.shape[0] * x.shape[1] <= _GEMV_ROWS and decode.supported(x):
            norm = self.model.final_layernorm
            logits = decode.norm_gemv(self, x, norm.eps, (norm.weight, self.lm_head.weight))  # (B, L', V)
        else:
            logits = self.lm_head(self.model.final_layernorm(x))  # (B, L', V)

        loss = aux_loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        router = tuple(all_router_logits) if output_router_logits and all_router_logits else None
        if router is not None:
            key_mask = attention_mask[:, past:] if attention_mask is not None else None
            aux_loss = load_balancing_loss(
                router, self.config.num_experts, self.config.num_experts_per_tok, key_mask
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, router_logits=router, cache=cache)
