"""The architectures each claim compares, built as JambaConfigs of one width and depth.

A pure Transformer is a JambaConfig whose every layer is attention (attn_layer_period=1); a pure
Mamba model one whose attention offset lies past the last layer. pyjamba's attention, like Jamba's,
has no positional encoding, so the Transformers here have none either (Mixtral and Llama use RoPE):
position reaches them only through the causal mask.

Parameter counts are matched by the feed-forward width: a Mamba layer (~6 D^2 with expand 2) is
larger than an attention layer (~2.5 D^2 with 4x grouped KV heads), so each other model gets the
intermediate_size that brings its count (active per token, or total for dense models) closest to
the reference's. accounting.py counts from the config alone, so the matching builds no model.
"""

from __future__ import annotations

from pyjamba import accounting as acc
from pyjamba.config import JambaConfig

__all__ = ["match_intermediate", "recall_family", "throughput_family"]


def match_intermediate(config: JambaConfig, target: int, active: bool = True) -> JambaConfig:
    """`config` with the intermediate_size whose parameter count (active or total) is nearest `target`.

    The count is affine in intermediate_size, so two evaluations give the line to solve.
    """
    count = acc.active_params if active else acc.total_params
    f1 = count(config.replace(intermediate_size=1))
    slope = count(config.replace(intermediate_size=2)) - f1
    size = max(1, round((target - f1) / slope) + 1)
    return config.replace(intermediate_size=size)


def _base(hidden: int, layers: int, vocab: int, heads: int, kv_heads: int, d_state: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        mamba_d_state=d_state,
        tie_word_embeddings=True,
        max_position_embeddings=2**20,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def throughput_family(
    hidden: int = 256,
    layers: int = 8,
    vocab: int = 1024,
    heads: int = 8,
    kv_heads: int = 2,
    experts: int = 8,
    intermediate: int = 512,
    d_state: int = 16,
) -> dict[str, JambaConfig]:
    """Jamba's pattern (attention 1 layer in 8, MoE every other layer, top-2), a Mixtral-like pure
    attention MoE (every layer MoE, top-2) and a Llama-like dense Transformer, at one width and
    depth, the two Transformers' intermediate_size matched to the hybrid's active parameters."""
    if layers % 8:
        raise ValueError(f"layers must be a multiple of 8 for Jamba's 1:7 pattern, got {layers}")
    base = _base(hidden, layers, vocab, heads, kv_heads, d_state)
    moe = dict(num_experts=experts, num_experts_per_tok=2)
    jamba = JambaConfig(
        **base, **moe, intermediate_size=intermediate, attn_layer_period=8, attn_layer_offset=4,
        expert_layer_period=2, expert_layer_offset=1,
    )  # fmt: skip
    target = acc.active_params(jamba)
    mixtral = JambaConfig(
        **base, **moe, intermediate_size=intermediate, attn_layer_period=1, attn_layer_offset=0,
        expert_layer_period=1, expert_layer_offset=0,
    )  # fmt: skip
    llama = JambaConfig(
        **base, num_experts=1, num_experts_per_tok=1, intermediate_size=intermediate,
        attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0,
    )  # fmt: skip
    return {
        "jamba": jamba,
        "mixtral-like": match_intermediate(mixtral, target),
        "llama-like": match_intermediate(llama, target),
    }


def recall_family(
    hidden: int = 128,
    layers: int = 8,
    vocab: int = 256,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 256,
    d_state: int = 16,
) -> dict[str, JambaConfig]:
    """Dense models of one width and depth: pure Mamba, Jamba's 1:7 hybrid (attention at layer 4 of
    8) and pure attention; the other two's intermediate_size matched to the hybrid's parameters."""
    if layers % 8:
        raise ValueError(f"layers must be a multiple of 8 for Jamba's 1:7 pattern, got {layers}")
    base = _base(hidden, layers, vocab, heads, kv_heads, d_state)
    dense = dict(num_experts=1, num_experts_per_tok=1, expert_layer_period=1, expert_layer_offset=0)
    hybrid = JambaConfig(
        **base, **dense, intermediate_size=intermediate, attn_layer_period=8, attn_layer_offset=4
    )
    target = acc.total_params(hybrid)
    mamba = JambaConfig(
        **base, **dense, intermediate_size=intermediate, attn_layer_period=layers + 1,
        attn_layer_offset=layers,
    )  # fmt: skip
    attention = JambaConfig(
        **base, **dense, intermediate_size=intermediate, attn_layer_period=1, attn_layer_offset=0
    )
    return {
        "mamba": match_intermediate(mamba, target, active=False),
        "hybrid": hybrid,
        "attention": match_intermediate(attention, target, active=False),
    }
