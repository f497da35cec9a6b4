"""The fused one-token decoding step, built from a model's modules: which calls take decode.py's
kernels, and which of a sublayer's weights each kernel reads, in its order.

`layer_step(layer, x, attn_mask, pad_mask, cache)` is the `Kernels.layer_step` of the numba backend:
a Layer's forward for one new token per sequence after a past, with no padding among the new tokens,
float32 on CPU, no autograd, not compiling; None for any other call, which then runs the Layer's
eager forward (its readable twin, held together with this by tests/test_decode_kernels.py). What it
keeps between calls (numpy views of the weights, A log2(e)) is held here, weakly keyed by the module.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import torch

from . import decode

if TYPE_CHECKING:
    from ...cache import InferenceCache

__all__ = ["layer_step"]

# What each fused kernel reads of a sublayer, after its input norm's weight, in the kernel's order.
_MAMBA_IN = (
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_layernorm.weight",
    "b_layernorm.weight", "c_layernorm.weight", "dt_proj.weight", "dt_proj.bias",
)  # fmt: skip
_MAMBA_OUT = ("D", "out_proj.weight", "out_proj.bias")
_ATTENTION = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
_MOE = ("router.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj")

_A_LOG2: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensors(module: Any, names: tuple[str, ...], norm: Any = None) -> tuple[torch.Tensor | None, ...]:
    """The parameters of `module` by dotted name ("in_proj.weight"; None for an absent bias), after
    norm's weight if given, read from the modules' dicts: nn.Module's attribute lookup costs about a
    microsecond, and a decoding step makes a hundred of them."""
    out = [] if norm is None else [norm._parameters["weight"]]
    for name in names:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = owner._modules[part]
        out.append(owner._parameters[leaf])
    return tuple(out)


def _a_log2(mixer: Any) -> torch.Tensor:
    """A log2(e) = -exp(A_log) log2(e) in float32 (ED, N), as the fused kernels use it; kept until
    A_log changes (in place or replaced), since a decoding step would otherwise spend more on it than
    on the SSM update."""
    (a_log,) = _tensors(mixer, ("A_log",))
    key = (id(a_log), a_log.data_ptr(), a_log._version)
    cached = _A_LOG2.get(mixer)
    if cached is None or cached[0] != key:
        a = -torch.exp(a_log.detach().double())
        cached = _A_LOG2[mixer] = (key, (a * math.log2(math.e)).float().contiguous())
    return cached[1]


def _takes(layer: Any, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: InferenceCache | None) -> bool:
    """Whether the fused kernels take this call of the layer (see the module docstring)."""
    if cache is None or x.shape[1] != 1 or cache.length == 0 or pad_mask is not None:
        return False
    if any(name.endswith("scale") for name, _ in layer.named_buffers()):  # int8 weights: eager
        return False
    if layer.kind == "mamba" and not all(
        s[layer.layer_idx].is_contiguous() and s[layer.layer_idx].dtype == torch.float32
        for s in (cache.conv_states, cache.ssm_states)
    ):
        return False
    return decode.supported(x)


def layer_step(
    layer: Any,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    pad_mask: torch.Tensor | None,
    cache: InferenceCache | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`Layer.forward` for one token per sequence through the fused kernels, or None if they don't
    take this call. x (B, 1, D); returns (x + both sublayers, the router logits or None)."""
    if not _takes(layer, x, pad_mask, cache):
        return None
    batch, _, dim = x.shape
    flat = x.reshape(batch, dim)
    norm = layer.input_layernorm
    if layer.kind == "attention" and attn_mask is None:
        attention = layer.self_attn
        flat = decode.attention_step(
            attention, flat, norm.eps, _tensors(attention, _ATTENTION, norm), attention.head_dim,
            lambda k, v: cache.update_kv(attention.layer_idx, k, v),
        )  # fmt: skip
    elif layer.kind == "attention":  # padding between past keys (the serving slots): eager, masked
        flat = flat + layer.self_attn(norm(x), attn_mask, cache).reshape(batch, dim)
    else:
        mixer = layer.mamba
        weights = (*_tensors(mixer, _MAMBA_IN, norm), _a_log2(mixer), *_tensors(mixer, _MAMBA_OUT))
        i = mixer.layer_idx
        flat = decode.mamba_step(mixer, flat, norm.eps, weights, cache.conv_states[i], cache.ssm_states[i])
    norm, ff = layer.pre_ff_layernorm, layer.feed_forward
    router_logits = None
    if layer.is_moe:
        flat, router_logits = decode.moe_step(ff, flat, norm.eps, _tensors(ff, _MOE, norm), ff.top_k)
    else:
        flat = decode.mlp_step(ff, flat, norm.eps, _tensors(ff, _MLP, norm))
    return flat.view(batch, 1, dim), router_logits
