"""The numba backend's reduced-precision paths against their references: the int8 matrix-vector
product and the int8 prompt projection against `ops.linear` with a scale; the fused one-token step on
int8 ("int8", "experts-int8") and bfloat16 weights against the eager forward (the reference backend).
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from pyjamba.kernels import numba_unavailable, ops, resolve_kernels
from pyjamba.quantize import quantize_model, quantize_rows
from pyjamba.testing import _BASE, PARITY_CONFIGS, random_model, relative_error

pytestmark = pytest.mark.skipif(numba_unavailable() is not None, reason="numba is not installed")

METHODS = ["experts-int8", "int8"]
# A spread of the parity configs (MoE and dense, GQA and MQA, biases, offsets 0) and odd widths.
CONFIGS = {
    name: PARITY_CONFIGS[name]
    for name in ("moe-gqa-untied", "dense-mha-tied-projbias", "moe-mqa-noconvbias", "pure-attention-moe")
}
CONFIGS["odd_widths"] = dict(
    _BASE, hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1,
    mamba_d_state=16, mamba_d_conv=3, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
    expert_layer_offset=0, num_experts=6, num_experts_per_tok=2, mamba_proj_bias=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def numba_kernels():
    return resolve_kernels("numba")


def _reference(
    x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """ops.linear in float64 (the int8 weight dequantized exactly: q times its float32 scale)."""
    return ops.linear(x.double(), q, None if bias is None else bias.double(), scale)


def _int8(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, scale = quantize_rows(torch.randn(out_features, in_features, generator=gen))
    scale[0] = 0.0  # an all-zero row (quantize_rows gives scale 0) must give 0, not NaN
    return q, scale


@torch.no_grad()
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 1, 1), (1, 300, 37), (2, 7, 129), (3, 64, 16), (4, 513, 256)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemv_matches_linear(
    numba_kernels, rows: int, out_features: int, in_features: int, bias: bool
) -> None:
    from pyjamba.kernels.numba.decode import gemv

    q, scale = _int8(out_features, in_features, rows + out_features)
    gen = torch.Generator().manual_seed(in_features)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, 1, in_features, generator=gen)
    want = _reference(x, q, b, scale)
    got = gemv(x, q, b, scale)
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.float32
    assert relative_error(got, want) < 1e-6
    assert relative_error(numba_kernels.linear(x, q, b, scale), want) < 1e-6
    strided = torch.randn(in_features, rows, generator=gen).t()  # a transposed view
    assert relative_error(gemv(strided, q, b, scale), _reference(strided, q, b, scale)) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"), [(5, 7, 13), (70, 300, 37), (512, 256, 96), (9, 1024, 640)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_prompt_linear_matches_linear(
    numba_kernels, rows: int, out_features: int, in_features: int, bias: bool
) -> None:
    q, scale = _int8(out_features, in_features, rows)
    gen = torch.Generator().manual_seed(rows + 1)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(2, rows, in_features, generator=gen)
    want = _reference(x, q, b, scale)
    assert relative_error(numba_kernels.linear(x, q, b, scale), want) < 1e-6
    assert relative_error(numba_kernels.linear(x[:, 1:], q, b, scale), want[:, 1:]) < 1e-6  # a view
    # The scratch buffer is reused: a smaller matrix after it, then this one again.
    small, small_scale = _int8(3, in_features, 0)
    assert (
        relative_error(
            numba_kernels.linear(x, small, None, small_scale), _reference(x, small, None, small_scale)
        )
        < 1e-6
    )
    assert relative_error(numba_kernels.linear(x, q, b, scale), want) < 1e-6


@torch.no_grad()
def test_int8_expert_slices(numba_kernels) -> None:
    """Experts call linear on one expert of a stack (E, I, D) and its scales (E, I): views."""
    gen = torch.Generator().manual_seed(7)
    q, scale = quantize_rows(torch.randn(3, 24, 40, generator=gen))
    for rows in (1, 9):
        x = torch.randn(rows, 40, generator=gen)
        got = numba_kernels.linear(x, q[1], None, scale[1])
        assert relative_error(got, _reference(x, q[1], None, scale[1])) < 1e-6


def _quantized(config: dict, method: str | None, kernels: str, seed: int = 1):
    model = random_model(config, seed=seed, kernels=kernels)
    return quantize_model(model, method) if method else model


def _decode(model, prompt: torch.Tensor, steps: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """Prefill `prompt` (B, L), then feed `steps` (B, T) one token at a time; the logits of each step."""
    cache = model.make_cache(prompt.shape[0], 8)
    model(prompt, cache=cache)
    logits = [model(steps[:, t : t + 1], cache=cache).logits[:, -1] for t in range(steps.shape[1])]
    return logits, cache


def _fused_counts_ok(model, counts: dict[str, int], steps: int) -> None:
    kinds = model.config.layer_types
    assert counts["mamba_step"] == steps * kinds.count("mamba")
    assert counts["attention_step"] == steps * kinds.count("attention")
    assert counts["mlp_step"] + counts["moe_step"] == steps * len(kinds)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_fused_decoding_matches_reference(
    name: str, method: str, batch: int, calls: dict[str, int]
) -> None:
    config = CONFIGS[name]
    fused = _quantized(config, method, "numba")
    reference = _quantized(config, method, "reference")
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, config["vocab_size"], (batch, 5), generator=gen)
    steps = torch.randint(0, config["vocab_size"], (batch, 10), generator=gen)  # the cache grows past 8
    with torch.no_grad():
        got, got_cache = _decode(fused, prompt, steps)
        _fused_counts_ok(fused, calls, 10)
        want, want_cache = _decode(reference, prompt, steps)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 2e-5
    for layer, state in got_cache.ssm_states.items():
        assert relative_error(state, want_cache.ssm_states[layer]) < 2e-5
        assert relative_error(got_cache.conv_states[layer], want_cache.conv_states[layer]) < 2e-5


@pytest.mark.parametrize("method", [*METHODS, "int8-head"])  # int8-head: the final norm and an int8 head
@pytest.mark.parametrize("name", ["moe-gqa-untied", "dense-mha-tied-projbias", "jamba-pattern-8"])
def test_int8_generate_same_tokens_and_logits(name: str, method: str) -> None:
    """Whole-model: prefill (the int8 prompt projections) and greedy decoding, numba against reference."""
    config = PARITY_CONFIGS[name]
    models = [_quantized(config, method, kernels, seed=2) for kernels in ("numba", "reference")]
    prompt = torch.randint(3, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    tokens = [m.generate(prompt, max_new_tokens=12, eos_token_id=[]) for m in models]
    assert torch.equal(tokens[0], tokens[1])
    with torch.no_grad():
        logits = [m(tokens[0]).logits for m in models]  # the whole sequence as one prompt
    assert relative_error(logits[0], logits[1]) < 1e-5


def test_mixed_kinds_in_a_sublayer_take_the_eager_path(calls: dict[str, int]) -> None:
    """One int8 projection among float ones in a Mamba sublayer: the fused kernel reads one kind, so
    that sublayer's layer runs eagerly (still right)."""
    config = PARITY_CONFIGS["moe-gqa-untied"]
    models = [random_model(config, seed=4, kernels=k) for k in ("numba", "reference")]
    for model in models:
        linear = model.model.layers[0].mamba.x_proj
        q, scale = quantize_rows(linear.weight.detach())
        linear.weight = torch.nn.Parameter(q, requires_grad=False)
        linear.weight_scale = scale
    prompt = torch.randint(0, config["vocab_size"], (1, 4))
    steps = torch.randint(0, config["vocab_size"], (1, 3))
    with torch.no_grad():
        got, want = (_decode(m, prompt, steps)[0] for m in models)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 2e-5
    kinds = models[0].config.layer_types
    assert calls["mamba_step"] == 3 * (kinds.count("mamba") - 1)


# bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 0.2%. The eager path rounds
# after every op (projections, norms, conv, gate, residual); the fused step computes each sublayer in
# float32 and rounds its output once. Both are held to a float64 run of the same bfloat16 weights (the
# truth): the fused step must be no further from it than the eager path, within a margin of a couple
# of roundings. Over a whole model the MoE routing is discontinuous: a near-tie that bfloat16 rounding
# flips changes a token's experts (seen: 4.5% off the truth on one step, for either path), so there
# the median over the steps is compared; one layer step at a time, every output is.
_BF16_CONFIGS = ["moe-gqa-untied", "dense-mha-tied-projbias", "moe-mqa-noconvbias", "odd_widths"]


def _bf16_models(config: dict, method: str | None, seed: int = 5) -> tuple:
    """The same bfloat16 weights with kernels numba and reference, and in float64 (the truth);
    quantized after the cast where `method` says (int8 projections, everything else bfloat16)."""
    models = [random_model(config, seed=seed, kernels=k).to(torch.bfloat16) for k in ("numba", "reference")]
    models.append(random_model(config, seed=seed, kernels="reference").to(torch.bfloat16).double())
    return tuple(quantize_model(m, method) if method else m for m in models)


@pytest.mark.parametrize("name", _BF16_CONFIGS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method", [None, "int8"])
def test_bf16_fused_decoding_matches_eager(
    name: str, batch: int, method: str | None, calls: dict[str, int]
) -> None:
    config = CONFIGS[name]
    fused, eager, truth = _bf16_models(config, method)
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, config["vocab_size"], (batch, 5), generator=gen)
    steps = torch.randint(0, config["vocab_size"], (batch, 10), generator=gen)
    with torch.no_grad():
        got, got_cache = _decode(fused, prompt, steps)
        _fused_counts_ok(fused, calls, 10)
        want, _ = _decode(eager, prompt, steps)
        exact, _ = _decode(truth, prompt, steps)
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert all(s.dtype == torch.bfloat16 for s in got_cache.conv_states.values())
    fused_errors = torch.tensor([relative_error(g, e) for g, e in zip(got, exact, strict=True)])
    eager_errors = torch.tensor([relative_error(w, e) for w, e in zip(want, exact, strict=True)])
    assert fused_errors.median() < 1.5 * eager_errors.median() + 2e-3
    assert fused_errors.max() < 0.1


@pytest.mark.parametrize("name", _BF16_CONFIGS)
@pytest.mark.parametrize("method", [None, "experts-int8"])
def test_bf16_layer_step_matches_eager(name: str, method: str | None) -> None:
    """Each layer's fused step against its eager forward on the same bfloat16 input and cache: the
    output, the conv state and the new key and value."""
    from pyjamba.kernels.numba.step import layer_step

    config = CONFIGS[name]
    fused, eager, truth = _bf16_models(config, method, seed=6)
    batch = 2
    prompt = torch.randint(0, config["vocab_size"], (batch, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = eager.make_cache(batch, 16)
        eager(prompt, cache=cache)
        x = torch.randn(batch, 1, config["hidden_size"], generator=torch.Generator().manual_seed(7))
        x = x.to(torch.bfloat16)
        for i in range(len(fused.model.layers)):
            caches = [deepcopy(cache) for _ in range(3)]
            caches[2].conv_states = {k: v.double() for k, v in caches[2].conv_states.items()}
            caches[2].ssm_states = {k: v.double() for k, v in caches[2].ssm_states.items()}
            caches[2].keys = {k: v.double() for k, v in caches[2].keys.items()}
            caches[2].values = {k: v.double() for k, v in caches[2].values.items()}
            got = layer_step(fused.model.layers[i], x, None, None, caches[0])
            assert got is not None
            want = eager.model.layers[i](x, None, None, caches[1])
            exact = truth.model.layers[i](x.double(), None, None, caches[2])
            assert got[0].dtype == torch.bfloat16
            assert relative_error(got[0], exact[0]) <= 1.5 * relative_error(want[0], exact[0]) + 2e-3
            if got[1] is not None:
                assert relative_error(got[1], exact[1]) <= 1.5 * relative_error(want[1], exact[1]) + 2e-3
            for store in ("conv_states", "ssm_states", "keys", "values"):
                for k, state in getattr(caches[0], store).items():
                    other, truest = getattr(caches[1], store)[k], getattr(caches[2], store)[k]
                    assert relative_error(state, truest) <= 1.5 * relative_error(other, truest) + 2e-3


@torch.no_grad()
def test_bf16_head(numba_kernels) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 1, 48, generator=gen).to(torch.bfloat16)
    norm = (1 + 0.1 * torch.randn(48, generator=gen)).to(torch.bfloat16)
    head = torch.randn(101, 48, generator=gen).to(torch.bfloat16)
    got = numba_kernels.norm_linear(x, norm, 1e-6, head)
    want = ops.linear(ops.rms_norm(x.double(), norm.double(), 1e-6), head.double())
    assert got.dtype == torch.bfloat16 and got.shape == (3, 1, 101)
    assert relative_error(got, want) < 4e-3  # float32 sums, one rounding to bfloat16 (2^-9)
