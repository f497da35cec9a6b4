"""The fused one-token decoding step, built from a model's modules: which calls take decode.py's
kernels, and which of a sublayer's weights each kernel reads, in its order.

`layer_step(layer, x, attn_mask, pad_mask, cache)` is the `Kernels.layer_step` of the numba backend:
a Layer's forward for one new token per sequence after a past, with no padding among the new tokens,
float32 or bfloat16 on CPU, no autograd, not compiling, each sublayer's projections of one kind
(float32, bfloat16, or int8 with scales: an "experts-int8" model mixes float Mamba and attention
with int8 feed-forwards); None for any other call, which then runs the Layer's eager forward (its
readable twin, held together with this by tests/test_decode_kernels.py and
tests/test_quantized_kernels.py). What it keeps between calls (numpy views of the weights,
A log2(e)) is held here and in decode.py, weakly keyed by the module.
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

# What each fused kernel reads of a sublayer, after its input norm's weight, in the kernel's order: a
# projection's `weight_scale` (experts' `<stack>_scale`) is None unless it is int8 (quantize.py).
_MAMBA_IN = (
    "in_proj.weight", "in_proj.weight_scale", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight",
    "x_proj.weight_scale", "dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight", "dt_proj.weight",
    "dt_proj.weight_scale", "dt_proj.bias",
)  # fmt: skip
_MAMBA_OUT = ("D", "out_proj.weight", "out_proj.weight_scale", "out_proj.bias")
_ATTENTION = (
    "q_proj.weight", "q_proj.weight_scale", "k_proj.weight", "k_proj.weight_scale", "v_proj.weight",
    "v_proj.weight_scale", "o_proj.weight", "o_proj.weight_scale",
)  # fmt: skip
_MLP = (
    "gate_proj.weight", "gate_proj.weight_scale", "up_proj.weight", "up_proj.weight_scale", "down_proj.weight",
    "down_proj.weight_scale",
)  # fmt: skip
_MOE = (
    "router.weight", "experts.gate_proj", "experts.gate_proj_scale", "experts.up_proj", "experts.up_proj_scale",
    "experts.down_proj", "experts.down_proj_scale",
)  # fmt: skip
# The activations' dtypes the fused step takes (a bfloat16 model's residual stream is converted to
# float32 at each kernel's boundary), and the weight matrices' (int8 with its scales).
_ACTIVATIONS = (torch.float32, torch.bfloat16)
_MATRICES = (torch.float32, torch.bfloat16, torch.int8)

_A_LOG2: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensors(module: Any, names: tuple[str, ...], norm: Any = None) -> tuple[torch.Tensor | None, ...]:
    """The parameters or buffers of `module` by dotted name ("in_proj.weight"; None for an absent bias
    or scale), after norm's weight if given, read from the modules' dicts: nn.Module's attribute
    lookup costs about a microsecond, and a decoding step makes a hundred of them."""
    out = [] if norm is None else [norm._parameters["weight"]]
    for name in names:
        *path, leaf = name.split(".")
        owner = module
        for part in path:
            owner = owner._modules[part]
        params = owner._parameters
        out.append(params[leaf] if leaf in params else owner._buffers[leaf])
    return tuple(out)


def _one_kind(weights: tuple[torch.Tensor | None, ...], *matrices: int) -> bool:
    """Whether the matrices at these positions of `weights`, each followed by its scale, share one kind
    a kernel reads: all float32, all bfloat16, or all int8 with scales."""
    dtype = weights[matrices[0]].dtype
    for i in matrices:
        w, scale = weights[i], weights[i + 1]
        if w.dtype != dtype or dtype not in _MATRICES or (scale is None) == (dtype == torch.int8):
            return False
    return True


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
    """Whether the fused kernels take this call of the layer, as far as its activations and cache
    tell (see the module docstring; `layer_step` checks the weights)."""
    if cache is None or x.shape[1] != 1 or cache.length == 0 or pad_mask is not None:
        return False
    if x.dtype not in _ACTIVATIONS or x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if layer.kind == "mamba":
        conv, ssm = cache.conv_states[layer.layer_idx], cache.ssm_states[layer.layer_idx]
        return (
            conv.is_contiguous()
            and conv.dtype in _ACTIVATIONS
            and ssm.is_contiguous()
            and ssm.dtype == torch.float32
        )
    return True


def layer_step(
    layer: Any,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    pad_mask: torch.Tensor | None,
    cache: InferenceCache | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """`Layer.forward` for one token per sequence through the fused kernels, or None if they don't
    take this call. x (B, 1, D); returns (x + both sublayers, the router logits or None), in x's dtype.

    A bfloat16 x goes into each kernel as float32 and comes out rounded to bfloat16, as the eager
    path rounds the residual stream after each sublayer.
    """
    if not _takes(layer, x, pad_mask, cache):
        return None
    norm, ff_norm, ff = layer.input_layernorm, layer.pre_ff_layernorm, layer.feed_forward
    if layer.is_moe:
        ff_weights = _tensors(ff, _MOE, ff_norm)
        ff_ok = _one_kind(ff_weights, 2, 4, 6)
    else:
        ff_weights = _tensors(ff, _MLP, ff_norm)
        ff_ok = _one_kind(ff_weights, 1, 3, 5)
    if layer.kind == "attention":
        mixer = layer.self_attn
        weights = _tensors(mixer, _ATTENTION, norm)
        mixer_ok = _one_kind(weights, 1, 3, 5) and _one_kind(weights, 7)
    else:
        mixer = layer.mamba
        weights = (*_tensors(mixer, _MAMBA_IN, norm), _a_log2(mixer), *_tensors(mixer, _MAMBA_OUT))
        mixer_ok = _one_kind(weights, 1, 6, 11, 16)
    if not (ff_ok and mixer_ok):  # a sublayer with projections of mixed kinds: eager
        return None
    batch, _, dim = x.shape
    dtype = x.dtype
    flat = x.reshape(batch, dim)
    if layer.kind == "attention" and attn_mask is None:
        flat = decode.attention_step(
            mixer, flat, norm.eps, weights, mixer.head_dim,
            lambda k, v: cache.update_kv(mixer.layer_idx, k, v),
        ).to(dtype)  # fmt: skip
    elif layer.kind == "attention":  # padding between past keys (the serving slots): eager, masked
        flat = flat + mixer(norm(x), attn_mask, cache).reshape(batch, dim)
    else:
        i = mixer.layer_idx
        flat = decode.mamba_step(
            mixer, flat, norm.eps, weights, cache.conv_states[i], cache.ssm_states[i]
        ).to(dtype)
    router_logits = None
    if layer.is_moe:
        flat, router_logits = decode.moe_step(ff, flat, ff_norm.eps, ff_weights, ff.top_k)
        flat, router_logits = flat.to(dtype), router_logits.to(dtype)
    else:
        flat = decode.mlp_step(ff, flat, ff_norm.eps, ff_weights).to(dtype)
    return flat.view(batch, 1, dim), router_logits
