"""The model against transformers' JambaForCausalLM: full forward, prefill + decode, left padding, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyjamba.model as model_module
from pyjamba.config import JambaConfig
from pyjamba.kernels import resolve_kernels
from pyjamba.kernels.cpu import linear
from pyjamba.kernels.ops import causal_conv, causal_conv_ref, causal_conv_update
from pyjamba.model import Experts, JambaForCausalLM
from pyjamba.testing import PARITY_CONFIGS, random_model, relative_error, to_transformers

TOL = 1e-4  # float32, relative to the logits' norm


def _ids(config: JambaConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, config.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def test_full_forward_matches_transformers(parity_pair):
    _, model, hf = parity_pair
    ids = _ids(model.config, 2, 23)
    expected = hf(ids).logits
    actual = model(ids).logits
    assert actual.shape == expected.shape == (2, 23, model.config.vocab_size)
    assert relative_error(actual, expected) < TOL


@torch.no_grad()
def test_prefill_then_decode_matches_full_forward(parity_pair):
    _, model, hf = parity_pair
    ids = _ids(model.config, 2, 20)
    expected = hf(ids).logits
    cache = model.make_cache(batch_size=2, max_length=8)  # small: the attention cache must grow
    steps = [model(ids[:, :9], cache=cache).logits]
    for t in range(9, 20):  # 11 decoding steps
        steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 20
    assert relative_error(torch.cat(steps, dim=1), expected) < TOL


@torch.no_grad()
def test_chunked_prefill_matches_full_forward(parity_pair):
    _, model, _ = parity_pair
    ids = _ids(model.config, 2, 21)
    expected = model(ids).logits
    cache = model.make_cache(batch_size=2)
    chunks = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 16), (16, 21))]
    assert relative_error(torch.cat(chunks, dim=1), expected) < TOL


@torch.no_grad()
def test_attention_in_query_blocks_matches_one_call(parity_pair, monkeypatch):
    """Queries after a past, or under a padding mask, go through SDPA in blocks: the same logits."""
    _, model, _ = parity_pair
    ids = _ids(model.config, 2, 21)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :5] = 0
    expected = model(ids).logits
    expected_padded = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(model_module, "_QUERY_BLOCK", 3)
    cache = model.make_cache(batch_size=2)
    chunks = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 8), (8, 16), (16, 21))]
    assert relative_error(torch.cat(chunks, dim=1), expected) < TOL
    padded = model(ids, attention_mask=mask).logits
    assert relative_error(padded[0], expected_padded[0]) < TOL
    assert relative_error(padded[1, 5:], expected_padded[1, 5:]) < TOL


@torch.no_grad()
def test_left_padded_batch_gives_each_sequence_its_own_logits(parity_pair):
    _, model, hf = parity_pair
    lengths = [15, 9, 12]
    ids = _ids(model.config, 3, 15)
    mask = torch.zeros(3, 15, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, 15 - n :] = 1
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    batched = model(ids, attention_mask=mask).logits
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, 15 - n :]).logits[0]
        assert relative_error(batched[b, 15 - n :], alone) < TOL
    if not model.config.mamba_proj_bias:
        # transformers zeroes padding before in_proj only; with a projection bias it lets the bias
        # through the conv into the first real tokens, so it is compared only without one.
        reference = hf(ids, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            assert relative_error(batched[b, 15 - n :], reference[b, 15 - n :]) < TOL


@torch.no_grad()
def test_left_padded_prefill_then_decode(parity_pair):
    _, model, _ = parity_pair
    ids = _ids(model.config, 2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :6] = 0
    full = model(ids, attention_mask=mask).logits
    cache = model.make_cache(batch_size=2)
    steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache).logits]
    for t in range(8, 16):
        steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    incremental = torch.cat(steps, dim=1)
    assert relative_error(incremental[0], full[0]) < TOL
    assert relative_error(incremental[1, 6:], full[1, 6:]) < TOL


@torch.no_grad()
def test_losses_match_transformers(parity_pair):
    _, model, hf = parity_pair
    ids = _ids(model.config, 2, 13)
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    # Padding positions' logits mean nothing in either engine: nothing may be predicted from them.
    labels[1, :4] = -100
    has_moe = any(layer.is_moe for layer in model.model.layers)
    # With a projection bias transformers lets padding leak into real tokens (see the padding test).
    for attention_mask in (None,) if model.config.mamba_proj_bias else (None, mask):
        ours = model(ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
        # transformers' aux loss fails on a model with no MoE layer: ask it only where there is one.
        theirs = hf(ids, attention_mask=attention_mask, labels=labels, output_router_logits=has_moe)
        assert torch.allclose(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
        if has_moe:
            assert ours.aux_loss is not None
            assert torch.allclose(ours.aux_loss, theirs.aux_loss, rtol=1e-5, atol=1e-7)
        else:
            assert ours.aux_loss is None


@torch.no_grad()
def test_logits_to_keep():
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"])
    ids = _ids(model.config, 2, 10)
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    assert torch.allclose(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    picked = torch.tensor([0, 4, 9])
    assert torch.allclose(model(ids, logits_to_keep=picked).logits, full[:, picked], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("name", ["moe-gqa-untied", "dense-mha-tied-projbias", "jamba-pattern-8"])
def test_fast_kernels_match_reference_kernels_through_the_model(name):
    fast = random_model(PARITY_CONFIGS[name], kernels="torch")
    slow = random_model(PARITY_CONFIGS[name], kernels="reference")
    ids = _ids(fast.config, 2, 70)  # longer than one scan chunk
    assert relative_error(fast(ids).logits, slow(ids).logits) < 1e-5


@torch.no_grad()
def test_float64_model_agrees_with_float32():
    model = random_model(PARITY_CONFIGS["jamba-pattern-8"])
    ids = _ids(model.config, 2, 17)
    logits32 = model(ids).logits
    logits64 = model.double()(ids).logits
    assert logits64.dtype == torch.float64
    assert relative_error(logits32, logits64) < 1e-5
    cache = model.make_cache(batch_size=2)
    assert all(state.dtype == torch.float64 for state in cache.ssm_states.values())
    steps = [model(ids[:, :10], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 17)]
    assert relative_error(torch.cat(steps, dim=1), logits64) < 1e-12


def test_gradients_flow_to_every_parameter():
    model = random_model(PARITY_CONFIGS["jamba-pattern-8"]).train()
    ids = _ids(model.config, 2, 12)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Experts that no token was routed to get no gradient, legitimately.
    assert all(".experts." in n for n in no_grad), no_grad


def test_gradients_match_transformers():
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"]).train()
    hf = to_transformers(model).train()
    ids = _ids(model.config, 2, 11)
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    hf(ids, labels=ids, output_router_logits=True).loss.backward()
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        if name.endswith("gate_up_proj"):
            g = torch.cat([ours[name.replace("gate_up_proj", "gate_proj")].grad,
                           ours[name.replace("gate_up_proj", "up_proj")].grad], dim=1)  # fmt: skip
        else:
            g = ours[name].grad
        assert relative_error(g, p.grad) < 1e-4, name


def test_bad_inputs_raise_clear_errors():
    model = random_model(PARITY_CONFIGS["moe-gqa-untied"])
    ids = _ids(model.config, 2, 5)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cache holds 3 sequences"):
        model(ids, cache=model.make_cache(batch_size=3))


def test_model_builds_on_meta_device_without_memory():
    config = JambaConfig.from_preset("jamba-v0.1")
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert 51e9 < total < 53e9
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.slow
@torch.no_grad()
def test_small_preset_matches_transformers_at_realistic_width():
    """The 77M `jamba-small` shape (hidden 512, dt rank 32, 4 experts) over several scan chunks."""
    config = JambaConfig.from_preset("jamba-small").replace(max_position_embeddings=4096)
    torch.manual_seed(0)
    model = JambaForCausalLM(config)
    model.init_weights()
    model.eval()
    hf = to_transformers(model)
    ids = _ids(config, 2, 300)
    expected = hf(ids).logits
    assert relative_error(model(ids).logits, expected) < TOL
    cache = model.make_cache(batch_size=2)
    steps = [model(ids[:, :290], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(290, 300)]
    assert relative_error(torch.cat(steps, dim=1), expected) < TOL


# ---- fast paths against their readable twins -------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("shape", [(24, 16), (1024, 512)])  # below and above the oneDNN threshold
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    b = torch.randn(shape[0], generator=g) if bias else None
    x = torch.randn(2, rows, shape[1], generator=g)
    assert relative_error(linear(x, w, b), F.linear(x, w, b)) < 1e-6
    assert relative_error(linear(x[:, -1], w, b), F.linear(x[:, -1], w, b)) < 1e-6  # a strided input
    # bfloat16: one row stays in bfloat16, more rows are multiplied in float32; both round the same
    expected = F.linear(
        x.bfloat16().float(), w.bfloat16().float(), None if b is None else b.bfloat16().float()
    )
    actual = linear(x.bfloat16(), w.bfloat16(), None if b is None else b.bfloat16())
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) < 1e-2


def test_linear_under_autograd_is_f_linear():
    w = torch.randn(1024, 512, requires_grad=True)
    x = torch.randn(3, 512)
    y = linear(x, w)
    y.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(1024, 512))


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 2, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_causal_conv_matches_conv1d(length, bias):
    g = torch.Generator().manual_seed(0)
    inner, width = 12, 4
    weight = torch.randn(inner, 1, width, generator=g)
    b = torch.randn(inner, generator=g) if bias else None
    x = torch.randn(2, length, inner, generator=g)  # (B, L, ED)
    past = torch.randn(2, inner, width - 1, generator=g)
    past_ref = past.clone()
    expected = causal_conv_ref(x, past_ref, weight, b)
    assert relative_error(causal_conv(x, past, weight, b), expected) < 1e-6
    assert torch.equal(past, past_ref)
    if length == 1:
        past_step = past_ref.clone()
        expected = causal_conv_ref(x, past_ref, weight, b)
        assert relative_error(causal_conv_update(x[:, 0], past_step, weight, b), expected[:, 0]) < 1e-6
        assert torch.equal(past_step, past_ref)


@torch.no_grad()
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("seed", range(6))
def test_gathered_experts_match_grouped(dtype, tol, seed):
    """The decoding route (each token's experts in turn) sums what the prompt route (sorted) sums."""
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=g))

    num_experts = draw(2, 16)
    config = JambaConfig(
        vocab_size=64, hidden_size=8 * draw(1, 8), intermediate_size=8 * draw(1, 12),
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=num_experts, num_experts_per_tok=draw(1, num_experts),
    )  # fmt: skip
    experts = Experts(config, resolve_kernels("torch")).to(dtype)
    for p in experts.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.1)
    router = torch.randn(config.hidden_size, num_experts, generator=g, dtype=dtype)
    for tokens in (1, draw(2, 5)):
        x = torch.randn(tokens, config.hidden_size, generator=g, dtype=dtype)
        probs = torch.softmax(x @ router, dim=-1)
        weights, index = torch.topk(probs, config.num_experts_per_tok, dim=-1)
        expected = experts.grouped(x, weights, index)
        assert relative_error(experts.gathered(x, weights, index), expected) < tol
        assert relative_error(experts(x, weights, index), expected) < tol


@torch.no_grad()
def test_attention_mask_of_ones_is_no_mask():
    model = random_model(PARITY_CONFIGS["jamba-pattern-8"])
    ids = _ids(model.config, 2, 12)
    ones = torch.ones(2, 12, dtype=torch.long)
    assert torch.equal(model(ids, attention_mask=ones).logits, model(ids).logits)
    cache = model.make_cache(batch_size=2)
    steps = [model(ids[:, :6], attention_mask=ones[:, :6], cache=cache).logits]
    steps += [
        model(ids[:, t : t + 1], attention_mask=ones[:, : t + 1], cache=cache).logits for t in range(6, 12)
    ]
    assert relative_error(torch.cat(steps, dim=1), model(ids).logits) < TOL


@torch.no_grad()
def test_bfloat16_model_is_as_close_to_float32_as_transformers(parity_pair):
    """bfloat16 (matmuls in float32 where the CPU lacks bfloat16) errs no more than transformers' does."""
    _, model, hf = parity_pair
    ids = _ids(model.config, 2, 14)
    expected = model(ids).logits
    theirs = relative_error(hf.to(torch.bfloat16)(ids).logits, expected)
    model = model.to(torch.bfloat16)
    ours = relative_error(model(ids).logits, expected)
    assert ours < 1.5 * theirs + 5e-3
    cache = model.make_cache(batch_size=2)
    steps = [model(ids[:, :8], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 14)]
    assert relative_error(torch.cat(steps, dim=1), expected) < 2 * theirs + 5e-3
