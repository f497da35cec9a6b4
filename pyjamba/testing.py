"""Tiny random Jamba models for tests and parity reports, and their twin in transformers.

transformers is a test-only dependency: it is imported only when a twin is asked for.
"""

from __future__ import annotations

import warnings

import torch

from .config import JambaConfig
from .model import JambaForCausalLM

__all__ = ["PARITY_CONFIGS", "random_model", "relative_error", "to_transformers"]

_BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_expand=2,
    pad_token_id=0,
    max_position_embeddings=512,
)

# Six-plus tiny architectures that between them cover: MoE and dense; tied and untied heads;
# attention and expert periods/offsets (offset 0 included); one kv head and kv = heads;
# mamba_proj_bias and mamba_conv_bias both ways; dt_rank "auto" and explicit.
PARITY_CONFIGS: dict[str, dict] = {
    "moe-gqa-untied": dict(
        _BASE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_dt_rank="auto",
    ),
    "dense-mha-tied-projbias": dict(
        _BASE, num_key_value_heads=4, attn_layer_period=4, attn_layer_offset=0, num_experts=1,
        num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0, tie_word_embeddings=True,
        mamba_proj_bias=True, mamba_dt_rank=5,
    ),
    "moe-mqa-noconvbias": dict(
        _BASE, num_hidden_layers=5, num_key_value_heads=1, attn_layer_period=3, attn_layer_offset=2,
        expert_layer_period=3, expert_layer_offset=0, num_experts=3, num_experts_per_tok=2,
        mamba_conv_bias=False,
    ),
    "moe-every-layer-tied-bothbias": dict(
        _BASE, attn_layer_period=5, attn_layer_offset=4, num_hidden_layers=5, expert_layer_period=1,
        expert_layer_offset=0, num_experts=5, num_experts_per_tok=1, tie_word_embeddings=True,
        mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=3,
    ),
    "pure-mamba-small-conv": dict(
        _BASE, num_hidden_layers=3, attn_layer_period=8, attn_layer_offset=7, num_experts=1,
        num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0, mamba_d_conv=2,
        mamba_d_state=4, mamba_expand=1,
    ),
    "pure-attention-moe": dict(
        _BASE, num_hidden_layers=3, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=2,
        expert_layer_offset=0, num_experts=4, num_experts_per_tok=3,
    ),
    "jamba-pattern-8": dict(
        _BASE, num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_dt_rank="auto",
        eos_token_id=[2, 5],
    ),
}  # fmt: skip


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def random_model(config_kwargs: dict, seed: int = 0, kernels: str = "auto") -> JambaForCausalLM:
    """A pyjamba model with random weights (not just the init: norms and D perturbed too)."""
    torch.manual_seed(seed)
    model = JambaForCausalLM(JambaConfig(**config_kwargs), kernels=kernels)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Move every parameter off its initial value so that a swapped or ignored tensor shows.
            if name.endswith(("layernorm.weight", ".D")) or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.mul_(3.0)  # larger weights make every sublayer matter in the logits
    return model.eval()


def to_transformers(model: JambaForCausalLM):
    """The same weights in transformers' JambaForCausalLM (its in-memory layout fuses gate and up)."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # use_cache off: transformers' cache fails on a model with no attention layer.
        hf_config = transformers.JambaConfig(**model.config.to_dict(), use_cache=False)
        hf = transformers.JambaForCausalLM(hf_config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.gate_proj"):
            up = model.state_dict()[name.replace("gate_proj", "up_proj")]
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, up], dim=1)
        elif not name.endswith("experts.up_proj"):
            state[name] = tensor
    hf.load_state_dict(state, strict=True)
    return hf.eval()
