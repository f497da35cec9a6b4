"""The fused one-token decoding kernels (pyjamba/kernels/numba/decode.py) against the eager path they replace.

A model built with kernels="numba" decodes float32 without autograd through the fused sublayers; the
same weights with kernels="torch" take the eager path (MambaMixer.step, MLP, SparseMoE). Both are held
to a float64 eager run of the same weights.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

from pyjamba.kernels import numba_unavailable
from pyjamba.testing import _BASE, PARITY_CONFIGS, random_model, relative_error

pytestmark = pytest.mark.skipif(numba_unavailable() is not None, reason="numba is not installed")

# Beyond the parity configs: Jamba's N = 16, odd widths, a batch of sequences.
CONFIGS = dict(
    PARITY_CONFIGS,
    odd_widths=dict(
        _BASE, hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1,
        mamba_d_state=16, mamba_d_conv=3, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=0, num_experts=6, num_experts_per_tok=2, mamba_proj_bias=True,
    ),
)  # fmt: skip


def _decode(model, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """Prefill `prompt` (B, L), then feed `steps` (B, T) one token at a time; the logits of each step."""
    cache = model.make_cache(prompt.shape[0], 8)
    model(prompt, cache=cache)
    logits = [model(steps[:, t : t + 1], cache=cache).logits[:, -1] for t in range(steps.shape[1])]
    return logits, cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_decoding_matches_eager(name: str, batch: int, calls: dict[str, int]) -> None:
    config = CONFIGS[name]
    fused = random_model(config, seed=1, kernels="numba")
    eager = random_model(config, seed=1, kernels="torch")
    truth = random_model(config, seed=1, kernels="torch").double()
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, config["vocab_size"], (batch, 5), generator=gen)
    steps = torch.randint(0, config["vocab_size"], (batch, 12), generator=gen)  # the cache grows past 8
    with torch.no_grad():
        got, got_cache = _decode(fused, prompt, steps)
        fused_calls = dict(calls)
        want, want_cache = _decode(eager, prompt, steps)
        exact, exact_cache = _decode(truth, prompt, steps)
    kinds = fused.config.layer_types
    assert fused_calls["mamba_step"] == 12 * kinds.count("mamba")
    assert fused_calls["attention_step"] == 12 * kinds.count("attention")
    assert fused_calls["mlp_step"] + fused_calls["moe_step"] == 12 * len(kinds)
    assert fused_calls["norm_gemv"] == 12
    assert calls == fused_calls  # the eager models called none of them
    for g, w, e in zip(got, want, exact, strict=True):
        assert relative_error(g, e) < 2e-5
        assert relative_error(g, w) < 2e-5
    for layer, state in got_cache.ssm_states.items():
        assert relative_error(state, exact_cache.ssm_states[layer]) < 2e-5
        assert relative_error(got_cache.conv_states[layer], want_cache.conv_states[layer]) < 2e-5


def test_router_logits_from_the_fused_moe() -> None:
    config = CONFIGS["moe-gqa-untied"]
    fused = random_model(config, seed=2, kernels="numba")
    eager = random_model(config, seed=2, kernels="torch")
    prompt = torch.randint(0, config["vocab_size"], (2, 4))
    step = torch.randint(0, config["vocab_size"], (2, 1))
    outs = []
    with torch.no_grad():
        for model in (fused, eager):
            cache = model.make_cache(2)
            model(prompt, cache=cache)
            outs.append(model(step, cache=cache, output_router_logits=True))
    assert len(outs[0].router_logits) == len(outs[1].router_logits) > 0
    for got, want in zip(outs[0].router_logits, outs[1].router_logits, strict=True):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-5
    assert abs(outs[0].aux_loss.item() - outs[1].aux_loss.item()) < 1e-5


def test_same_logits_for_any_thread_count() -> None:
    """Each output row is one dot product whichever thread computes it: decoding steps from the same
    cache are bit for bit the same. (No attention layer: SDPA's sums depend on the thread count.)"""
    config = dict(
        _BASE, num_hidden_layers=3, attn_layer_period=8, attn_layer_offset=7, expert_layer_period=2,
        expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16,
    )  # fmt: skip
    model = random_model(config, seed=3, kernels="numba")
    prompt = torch.randint(0, config["vocab_size"], (2, 6))
    steps = torch.randint(0, config["vocab_size"], (2, 5))
    cache = model.make_cache(2, 16)
    with torch.no_grad():
        model(prompt, cache=cache)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            copy = deepcopy(cache)
            with torch.no_grad():
                results.append(torch.stack([model(steps[:, t : t + 1], cache=copy).logits for t in range(5)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_weights_changed_in_place_or_replaced_are_seen(calls: dict[str, int]) -> None:
    """The kernels keep numpy views of the weights: in-place changes show through, replaced ones rebuild."""
    config = CONFIGS["moe-gqa-untied"]
    fused = random_model(config, seed=4, kernels="numba")
    eager = random_model(config, seed=4, kernels="torch")
    prompt = torch.randint(0, config["vocab_size"], (1, 4))
    steps = torch.randint(0, config["vocab_size"], (1, 2))

    def both_equal() -> None:
        with torch.no_grad():
            got, want = _decode(fused, prompt, steps)[0], _decode(eager, prompt, steps)[0]
        for g, w in zip(got, want, strict=True):
            assert relative_error(g, w) < 2e-5

    both_equal()
    with torch.no_grad():
        for model in (fused, eager):
            layer = model.model.layers[0]
            layer.mamba.out_proj.weight.mul_(-2.0)
            layer.mamba.A_log.add_(0.5)  # A log2(e) is cached too
            model.model.layers[1].feed_forward.experts.down_proj.mul_(0.5)
    both_equal()
    replacement = torch.randn_like(fused.model.layers[0].mamba.in_proj.weight)
    for model in (fused, eager):
        model.model.layers[0].mamba.in_proj.weight = torch.nn.Parameter(replacement.clone())
        model.model.layers[0].mamba.A_log = torch.nn.Parameter(
            torch.zeros_like(model.model.layers[0].mamba.A_log)
        )
    both_equal()
    assert calls["mamba_step"] > 0 and calls["moe_step"] > 0


def test_eager_path_under_autograd_padding_or_other_dtypes(calls: dict[str, int]) -> None:
    config = CONFIGS["moe-gqa-untied"]
    model = random_model(config, seed=5, kernels="numba")
    prompt = torch.randint(1, config["vocab_size"], (2, 4))
    cache = model.make_cache(2)
    with torch.no_grad():
        model(prompt, cache=cache)
    out = model(prompt[:, :1], cache=cache)  # grad mode on: autograd needs the eager path
    assert out.logits.requires_grad
    with torch.no_grad():
        # A padded new token: the Mamba padding mask is eager-only.
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
        model(prompt[:, :1], cache=cache, attention_mask=mask)
        model.double()
        cache = model.make_cache(2)
        model(prompt, cache=cache)
        model(prompt[:, :1], cache=cache)
    # Only the padded step's head (float32, no gradient) was fused: the norm and head see no padding.
    assert calls == {"mamba_step": 0, "attention_step": 0, "mlp_step": 0, "moe_step": 0, "norm_gemv": 1}


@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"), [(1, 1, 1), (1, 300, 37), (2, 7, 129), (4, 64, 16)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(rows: int, out_features: int, in_features: int, bias: bool) -> None:
    from pyjamba.kernels.numba.decode import gemv

    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, 1, in_features, generator=gen)
    got = gemv(x, weight, b)
    assert got.shape == (rows, 1, out_features)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert relative_error(got, want) < 1e-6
    strided = torch.randn(in_features, rows, generator=gen).t()  # a transposed view
    assert relative_error(gemv(strided, weight, b), F.linear(strided, weight, b)) < 1e-6


def test_states_must_be_contiguous_float32() -> None:
    from pyjamba.kernels.numba.decode import mamba_step

    model = random_model(CONFIGS["moe-gqa-untied"], kernels="numba")
    mixer = model.model.layers[0].mamba
    cache = model.make_cache(1)
    x = torch.randn(1, model.config.hidden_size)
    weights = (None,) * 15
    with pytest.raises(ValueError, match="contiguous float32 states"):
        mamba_step(mixer, x, 1e-6, weights, cache.conv_states[0].double(), cache.ssm_states[0])


@torch.no_grad()
def test_a_cache_filled_to_capacity_compiles_nothing_new() -> None:
    """Keys and values are views of the cache: strided while it has room, C-contiguous once full. Both
    must run the kernels compiled at import (by conversion to the "A" signature), never a new
    specialisation compiled in the middle of a generation (seconds, or a minute on a first run)."""
    from pyjamba.kernels.numba import decode

    model = random_model(PARITY_CONFIGS["jamba-pattern-8"], kernels="numba")
    ids = torch.randint(1, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    before = {kernel.__name__: len(kernel.overloads) for kernel in decode._SIGNATURES}
    cache = model.make_cache(1, max_length=6)
    model(ids, cache=cache)
    for token in (5, 6):  # the second step fills the cache: every key is then a contiguous view
        model(torch.tensor([[token]]), cache=cache)
    assert cache.length == 6
    assert {kernel.__name__: len(kernel.overloads) for kernel in decode._SIGNATURES} == before
    assert not any(kernel._can_compile for kernel in decode._SIGNATURES if kernel.signatures)
