"""The Jamba architecture, top to bottom: RMSNorm, Attention, MambaMixer, MLP, SparseMoE, Layer, Jamba.

Module attribute names are the checkpoint's tensor names (`model.layers.3.mamba.in_proj.weight`),
except the experts of a MoE layer, stored stacked (E, out, in) and mapped in checkpoint.py.

Glossary of dimension letters:
    B  batch             L  new tokens in this call    S  tokens attended to (past + new)
    D  hidden size       H  attention heads            Hkv key/value heads    Dh head dim
    E  experts           K  experts per token          I  feed-forward width
    ED Mamba inner       N  SSM state size             W  conv width          R  dt rank
    V  vocabulary

Every op runs through the model's `Kernels` (pyjamba/kernels), chosen once at construction: this
file is the spec, the speed comes from the backend (the numba backend even replaces a Layer's whole
one-token forward with a fused step, `Kernels.layer_step`), and a model runs exactly its backend.

What it computes is what transformers' JambaForCausalLM computes (tests hold the two together), with
one deliberate difference: with `mamba_proj_bias`, padding positions are zeroed after `in_proj` as
well as before it, so that a left-padded sequence gets exactly the logits it gets alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import HybridCache, InferenceCache
from .checkpoint import load_model, save_pretrained
from .config import JambaConfig
from .generate import generate
from .kernels import Kernels, resolve_kernels

__all__ = ["CausalLMOutput", "Jamba", "JambaForCausalLM", "load_balancing_loss"]

_QUERY_BLOCK = 512  # queries per attention call where a mask is needed


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that multiplies through the model's kernels.

    A quantized model (quantize.py) holds an int8 `weight` and its per-output-row float32
    `weight_scale`; otherwise `weight_scale` is None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, kernels: Kernels) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("weight_scale", None)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.bias, self.weight_scale)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query attention with no positional encoding and no biases."""

    def __init__(self, config: JambaConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, False, kernels)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, False, kernels)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, False, kernels)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, False, kernels)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: InferenceCache | None
    ) -> torch.Tensor:
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


class MambaMixer(nn.Module):
    """The Mamba-1 selective SSM block with Jamba's inner RMSNorms on dt, B and C.

    in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> x_proj -> (dt, B, C), each RMS-normed;
    dt -> dt_proj (its bias and softplus inside the scan); A = -exp(A_log) in float32;
    y = scan(x, dt, A, B, C) + D x, gated by SiLU(z); out_proj.
    """

    def __init__(self, config: JambaConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kernels = kernels
        d, inner, n, r = config.hidden_size, config.mamba_inner, config.mamba_d_state, config.dt_rank
        self.inner, self.n_state, self.dt_rank = inner, n, r
        self.conv_width = config.mamba_d_conv
        self.in_proj = Linear(d, 2 * inner, config.mamba_proj_bias, kernels)
        self.conv1d = nn.Conv1d(
            inner, inner, config.mamba_d_conv, groups=inner, bias=config.mamba_conv_bias, padding=0
        )
        self.x_proj = Linear(inner, r + 2 * n, False, kernels)
        self.dt_proj = Linear(r, inner, True, kernels)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = Linear(inner, d, config.mamba_proj_bias, kernels)
        self.dt_layernorm = RMSNorm(r, config.rms_norm_eps, kernels)
        self.b_layernorm = RMSNorm(n, config.rms_norm_eps, kernels)
        self.c_layernorm = RMSNorm(n, config.rms_norm_eps, kernels)

    def forward(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: InferenceCache | None
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
        xs = self.kernels.conv_silu(xs, past, self.conv1d.weight, self.conv1d.bias)  # (B, L, ED)
        if pad_mask is not None:
            xs = xs * pad_mask
        dt, B, C = self._dt_b_c(xs)  # (B, L, R), (B, L, N), (B, L, N)
        delta = self.kernels.linear(
            dt, self.dt_proj.weight, None, self.dt_proj.weight_scale
        )  # (B, L, ED); bias: in the scan, float32
        A = -torch.exp(self.A_log.float())  # (ED, N)
        initial = cache.ssm_states[self.layer_idx] if cache is not None else None
        y, last = self.kernels.selective_scan(
            xs, delta, A, B, C, D=self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, initial_state=initial,
        )  # fmt: skip
        if cache is not None:
            cache.ssm_states[self.layer_idx].copy_(last)
        return self.out_proj(y.to(dtype))

    def step(self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: InferenceCache) -> torch.Tensor:
        """One new token per sequence, x (B, 1, D): the conv and the SSM advance their cached state."""
        dtype = x.dtype
        x = x[:, 0]  # (B, D)
        pad = pad_mask[:, 0] if pad_mask is not None else None  # (B, 1)
        if pad is not None:
            x = x * pad
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, ED) each
        if pad is not None:
            xs = xs * pad
        conv_state = cache.conv_states[self.layer_idx]
        xs = self.kernels.conv_silu_step(xs, conv_state, self.conv1d.weight, self.conv1d.bias)  # (B, ED)
        if pad is not None:
            xs = xs * pad
        dt, B, C = self._dt_b_c(xs)  # (B, R), (B, N), (B, N)
        delta = self.kernels.linear(dt, self.dt_proj.weight, None, self.dt_proj.weight_scale)  # (B, ED)
        A = -torch.exp(self.A_log.float())  # (ED, N)
        y = self.kernels.selective_state_update(
            cache.ssm_states[self.layer_idx], xs, delta, A, B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )  # fmt: skip
        return self.out_proj(y.to(dtype))[:, None]  # (B, 1, D)

    def _dt_b_c(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj, split into dt (R), B (N), C (N), each RMS-normed."""
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.n_state, self.n_state], dim=-1)
        return self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: JambaConfig, kernels: Kernels) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, i, False, kernels)
        self.up_proj = Linear(d, i, False, kernels)
        self.down_proj = Linear(i, d, False, kernels)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """E SwiGLU experts, their weights stacked: gate/up (E, I, D), down (E, D, I).

    Quantized (quantize.py): the stacks are int8 and `<stack>_scale` hold their per-row float32
    scales, (E, I) and (E, D); otherwise those are None.

    Two routes to the same sum: `grouped` (a prompt: tokens sorted by expert, each expert run once on
    all its rows) and `gathered` (a few tokens: each (token, expert) pair on that expert's weights).
    """

    def __init__(self, config: JambaConfig, kernels: Kernels) -> None:
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        for name in ("gate_proj_scale", "up_proj_scale", "down_proj_scale"):
            self.register_buffer(name, None)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x (T, D); weights and index (T, K): the sum over each token's K experts, weighted.

        `gathered` while (token, expert) pairs seldom share an expert: for one token (none can), and
        for up to E/4 pairs; beyond that, reading each shared expert once (`grouped`) wins, despite
        its sort and scatter (measured on a CPU: docs/benchmarks.md). A backend's fused MoE
        (`Kernels.experts`, the triton backend's) takes the call where it can.
        """
        if self.kernels.experts is not None:
            stacks = (self.gate_proj, self.up_proj, self.down_proj)
            scales = (self.gate_proj_scale, self.up_proj_scale, self.down_proj_scale)
            fused = self.kernels.experts(x, weights, index, *stacks, *scales)
            if fused is not None:
                return fused
        if x.shape[0] == 1 or 4 * index.numel() <= self.gate_proj.shape[0]:
            return self.gathered(x, weights, index)
        return self.grouped(x, weights, index)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e applied to rows h (n, D) -> (n, D)."""
        k = self.kernels
        gate = k.linear(h, self.gate_proj[e], None, _row(self.gate_proj_scale, e))
        up = k.linear(h, self.up_proj[e], None, _row(self.up_proj_scale, e))
        return k.linear(k.silu_mul(gate, up), self.down_proj[e], None, _row(self.down_proj_scale, e))

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


def _row(scales: torch.Tensor | None, e: int) -> torch.Tensor | None:
    """Expert e's scales of a quantized stack, or None for a float one."""
    return None if scales is None else scales[e]


class SparseMoE(nn.Module):
    """Top-K Mixture of Experts: float32 softmax router, top-K without renormalisation."""

    def __init__(self, config: JambaConfig, kernels: Kernels) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_experts, False, kernels)
        self.experts = Experts(config, kernels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the output (B, L, D) and the router logits (B*L, E)."""
        batch, length, d = x.shape
        flat = x.reshape(-1, d)  # (T, D)
        logits = self.router(flat)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (T, K)
        out = self.experts(flat, weights.to(x.dtype), index)
        return out.view(batch, length, d), logits


class Layer(nn.Module):
    """Pre-norm residual block: a mixer (attention or Mamba), then a feed-forward (MLP or MoE)."""

    def __init__(self, config: JambaConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.kind = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        if self.kind == "attention":
            self.self_attn = Attention(config, layer_idx, kernels)
        else:
            self.mamba = MambaMixer(config, layer_idx, kernels)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.feed_forward = SparseMoE(config, kernels) if self.is_moe else MLP(config, kernels)
        self.layer_idx = layer_idx
        self.kernels = kernels

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        pad_mask: torch.Tensor | None,
        cache: InferenceCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kernels.layer_step is not None:  # a backend's fused one-token step, where it applies
            fused = self.kernels.layer_step(self, x, attn_mask, pad_mask, cache)
            if fused is not None:
                return fused
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


class Jamba(nn.Module):
    """The decoder stack: embeddings, layers, final norm."""

    def __init__(self, config: JambaConfig, kernels: Kernels) -> None:
        super().__init__()
        # _weight skips reset_parameters, whose normal_ on the meta device costs a second of imports;
        # init_weights() or a checkpoint sets the values.
        embedding = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=embedding)
        self.layers = nn.ModuleList(Layer(config, i, kernels) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)


@dataclass
class CausalLMOutput:
    """What a forward call returns, as in transformers: `.logits` is (B, L, V) (or fewer positions)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    cache: InferenceCache | None = None


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

    `kernels` picks the backend every op runs through ("auto", "torch", "numba", "triton", "reference",
    or a `Kernels`), once, at construction, for `device` (default: the CPU; "auto" takes numba there,
    triton on a CUDA device).
    Construction does not initialise the weights (so that building on the meta device is free):
    call `init_weights()` for random ones, or load them with `from_pretrained`.
    """

    def __init__(
        self, config: JambaConfig, kernels: str | Kernels = "auto", device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.kernels = resolve_kernels(kernels, device)
        self.model = Jamba(config, self.kernels)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, self.kernels)
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
        quantize: str | None = None,
    ) -> JambaForCausalLM:
        """Load a Hugging Face Jamba folder (see `checkpoint.load_model`); `quantize`: None,
        "experts-int8" or "int8" (quantize.py), quantized while read."""
        return load_model(cls, path, dtype=dtype, device=device, kernels=kernels, quantize=quantize)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        copy_files_from: str | os.PathLike | None = None,
    ) -> None:
        """Write the Hugging Face layout, atomically (see `checkpoint.save_pretrained`)."""
        save_pretrained(
            self, path, max_shard_size=max_shard_size, dtype=dtype, copy_files_from=copy_files_from
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """The prompt and the new tokens (B, prompt + new), as transformers' generate; see `generate.generate`."""
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

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
        """An empty inference cache in the model's dtype and device (its final norm's: an int8 head is not)."""
        param = self.model.final_layernorm.weight
        return HybridCache(self.config, batch_size, max_length, dtype=param.dtype, device=param.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
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
        norm = self.model.final_layernorm
        head = self.lm_head
        logits = self.kernels.norm_linear(
            x, norm.weight, norm.eps, head.weight, head.weight_scale
        )  # (B, L', V)

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
