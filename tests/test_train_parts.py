"""The trainer's parts: recipes and overrides, the schedule, decay groups, state passing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pyjamba.testing import random_model
from pyjamba.train.config import RecipeError, TrainRecipe, apply_override
from pyjamba.train.optim import lr_at, param_groups
from pyjamba.train.state_passing import MambaCarry

BASE = {"model": {"preset": "jamba-tiny"}, "data": {"tokens": "t"}}


def test_recipe_defaults_and_types():
    recipe = TrainRecipe.from_dict(BASE)
    assert recipe.optim.betas == (0.9, 0.95)
    assert recipe.train.max_bad_steps == 5
    assert recipe.to_dict()["optim"]["betas"] == [0.9, 0.95]
    recipe = TrainRecipe.from_dict({**BASE, "optim": {"lr": 1}})  # an int where a float is expected
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {}, "data": {"tokens": "t"}}, "exactly one of preset, config, init_from"),
        ({"model": {"preset": "a", "config": "b"}, "data": {"tokens": "t"}}, "exactly one of preset"),
        ({"model": {"preset": "a"}, "data": {}}, "exactly one of tokens"),
        ({**BASE, "optim": {"lr": "fast"}}, "optim.lr must be a number"),
        ({**BASE, "optim": {"lr": float("nan")}}, "optim.lr must be a finite"),
        ({**BASE, "optim": {"lr": 1e-4, "min_lr": 1e-3}}, "must not exceed"),
        ({**BASE, "optim": {"betas": [0.9]}}, "optim.betas must be a list of 2"),
        ({**BASE, "optim": {"betas": [0.9, 1.0]}}, "optim.betas must be two numbers"),
        ({**BASE, "train": {"max_steps": 0}}, "train.max_steps must be a positive integer"),
        ({**BASE, "train": {"max_steps": True}}, "train.max_steps must be an integer"),
        ({**BASE, "train": {"max_bad_steps": 0}}, "train.max_bad_steps must be a positive integer"),
        ({**BASE, "train": {"max_bad_steps": 2.5}}, "train.max_bad_steps must be an integer"),
        ({**BASE, "train": {"dtype": "int8"}}, "train.dtype"),
        ({**BASE, "train": {"colour": "red"}}, "unknown key(s) ['train.colour']"),
        ({**BASE, "trian": {}}, "unknown section"),
        ({**BASE, "data": {"tokens": "t", "batch_size": 6}, "optim": {"grad_accum": 4}}, "multiple of"),
        (
            {
                **BASE,
                "data": {"tokens": "t", "state_passing": True},
                "train": {"activation_checkpointing": True},
            },
            "cannot be combined",
        ),
        ({"model": {"preset": "a"}, "data": {"sft": "x.jsonl"}}, "data.tokenizer is required"),
    ],
)
def test_recipe_errors_name_the_field(data, message):
    with pytest.raises(RecipeError, match=None) as info:
        TrainRecipe.from_dict(data)
    assert message in str(info.value)


def test_overrides_parse_toml_values(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[model]\npreset = "jamba-tiny"\n[data]\ntokens = "t"\n')
    recipe = TrainRecipe.from_toml(
        path,
        ["optim.lr=2e-3", "train.out_dir=runs/x", "model.overrides.hidden_size=32", "optim.betas=[0.8, 0.9]"],
    )
    assert recipe.optim.lr == 2e-3
    assert recipe.train.out_dir == "runs/x"
    assert recipe.model.overrides == {"hidden_size": 32}
    assert recipe.optim.betas == (0.8, 0.9)
    with pytest.raises(RecipeError, match=r"section\.key=value"):
        apply_override({}, "lr=1")
    with pytest.raises(RecipeError, match="not found"):
        TrainRecipe.from_toml(tmp_path / "missing.toml")
    path.write_text("[model\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        TrainRecipe.from_toml(path)


def test_schedule_warms_up_then_decays_to_min_lr():
    optim = TrainRecipe.from_dict({**BASE, "optim": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}}).optim
    lrs = [lr_at(s, optim, 110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)


def test_decay_groups():
    model = random_model(dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                              attn_layer_period=2, attn_layer_offset=1, tie_word_embeddings=True))  # fmt: skip
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "model.layers.0.mamba.in_proj.weight" in decayed
    assert "model.layers.1.feed_forward.experts.gate_proj" in decayed
    assert {"model.layers.0.mamba.A_log", "model.layers.0.mamba.D", "model.embed_tokens.weight"} <= kept
    assert not any("norm" in n for n in decayed)
    assert len(decayed) + len(kept) == len(list(model.parameters()))  # the tied head counted once


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_passing_reproduces_the_full_sequence(dtype):
    """Pure Mamba: chunks with the carried state give the full-sequence outputs, and gradients flow."""
    config = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=1, num_experts_per_tok=1, attn_layer_period=100,
                  attn_layer_offset=99, mamba_d_state=8)  # fmt: skip
    model = random_model(config, kernels="torch").to(dtype).train()
    ids = torch.randint(0, 97, (3, 45), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    carry = MambaCarry(model.config, 3, dtype=dtype)
    pieces = []
    for start, stop in [(0, 16), (16, 17), (17, 40), (40, 45)]:
        out = model(ids[:, start:stop], cache=carry).logits
        out.square().mean().backward()  # gradients stop at the boundary; the next chunk still runs
        carry.detach_()
        pieces.append(out.detach())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.cat(pieces, 1), full.detach(), rtol=tol, atol=tol)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_carry_reset_zeroes_only_the_new_documents():
    model = random_model(dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                              attn_layer_period=4, attn_layer_offset=3))  # fmt: skip
    carry = MambaCarry(model.config, 2)
    model(torch.randint(0, 50, (2, 8)), cache=carry)
    carry.detach_(torch.tensor([True, False]))
    for store in (carry.conv_states, carry.ssm_states):
        assert store[0][0].abs().sum() == 0 and store[0][1].abs().sum() > 0
        assert not store[0].requires_grad
    # A stream that starts fresh matches a model run with no carried state at all.
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model(ids, cache=carry).logits[0], model(ids[:1]).logits[0])
