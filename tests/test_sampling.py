"""One validation of sampling settings (pyjamba.sampling) for generate, the CLI and the server, and
samplers that never meet a NaN probability from valid settings (a property test over the ranges)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from pyjamba.cli import generate_main
from pyjamba.generate import GenerationConfig, generate
from pyjamba.sampling import (
    GREEDY_BELOW,
    REPETITION_PENALTY_RANGE,
    NonFiniteLogits,
    SamplingError,
    SamplingParams,
    check_logits,
    choice_seed,
)
from pyjamba.serve.sampling import Sampler
from pyjamba.testing import PARITY_CONFIGS, random_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@functools.cache
def _model():
    return random_model(PARITY_CONFIGS["moe-gqa-untied"])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (dict(temperature=float("nan")), "temperature", "finite"),
        (dict(temperature=-1.0), "temperature", ">= 0"),
        (dict(temperature="hot"), "temperature", "a number"),
        (dict(temperature=True), "temperature", "a number"),
        (dict(top_p=0.0), "top_p", "(0.0, 1.0]"),
        (dict(top_p=float("inf")), "top_p", "finite"),
        (dict(top_k=-1), "top_k", ">= 0"),
        (dict(top_k=2.5), "top_k", "an integer"),
        (dict(min_p=1.5), "min_p", "[0.0, 1.0]"),
        (dict(repetition_penalty=1e-300), "repetition_penalty", "[0.0001, 10000.0]"),
        (dict(repetition_penalty=1e300), "repetition_penalty", "[0.0001, 10000.0]"),
        (dict(frequency_penalty=2.5), "frequency_penalty", "[-2.0, 2.0]"),
        (dict(logit_bias={-1: 1.0}), "logit_bias", ">= 0"),
        (dict(logit_bias={3: 101.0}), "logit_bias", "[-100.0, 100.0]"),
        (dict(logit_bias={3: float("nan")}), "logit_bias", "finite"),
        (dict(seed=2**64), "seed", "seed must lie"),
        (dict(seed=-(2**63) - 1), "seed", "seed must lie"),
    ],
)
def test_out_of_range_settings_raise_naming_the_parameter(fields, param, words):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**fields)
    assert info.value.param == param and words in str(info.value)
    assert isinstance(info.value, ValueError)  # what generate and the CLI have always raised


def test_tiny_temperatures_are_greedy_and_seeds_wrap_as_torch_wraps():
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-40).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    assert choice_seed(2**64 - 1, 1) == 0 and choice_seed(-1, 0) == 2**64 - 1
    base = SamplingParams(seed=2**64 - 1)
    assert [p.seed for p in (base.for_choice(0), base.for_choice(2))] == [2**64 - 1, 1]
    negative = torch.Generator().manual_seed(-5)
    assert negative.initial_seed() == choice_seed(-5, 0)  # choice 0 draws what generate(seed=-5) draws


def test_check_logits_names_nan_and_inf():
    check_logits(torch.zeros(2, 5))
    bad = torch.zeros(3, 5)
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteLogits, match=r"NaN logits \(batch rows \[1\]\)"):
        check_logits(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteLogits, match="infinite logits"):
        check_logits(bad)


valid_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e30)),
    top_p=st.floats(min_value=1e-300, max_value=1.0),
    top_k=st.integers(min_value=0, max_value=10**6),
    min_p=st.floats(min_value=0.0, max_value=1.0),
    repetition_penalty=st.floats(*REPETITION_PENALTY_RANGE),
    frequency_penalty=st.floats(-2.0, 2.0),
    presence_penalty=st.floats(-2.0, 2.0),
    logit_bias=st.dictionaries(st.integers(0, 31), st.floats(-100.0, 100.0), max_size=4),
    seed=st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
logits = st.lists(
    st.floats(min_value=-1e4, max_value=1e4, width=32) | st.sampled_from([-1e4, 0.0, 1e4]),
    min_size=32,
    max_size=32,
)


@settings(max_examples=300, deadline=None)
@given(params=valid_params, row=logits, seen=st.lists(st.integers(0, 31), max_size=6))
def test_valid_settings_always_give_a_token(params, row, seen):
    """Any valid settings and any finite logits (|logit| up to 1e4: far beyond a working model's) give
    a token of the vocabulary: no NaN probability, no error."""
    sampler = Sampler(params, prompt=seen or [0], vocab_size=32)
    scores = torch.tensor([row], dtype=torch.float32)
    for _ in range(3):
        token = sampler(scores)
        assert 0 <= token < 32
        sampler.observe(token)


def test_generate_refuses_nan_logits_instead_of_picking_token_0(monkeypatch):
    model = _model()
    real = model.forward

    def nan_forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits.fill_(math.nan)
        return out

    monkeypatch.setattr(model, "forward", nan_forward)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, seed=0)):
        with pytest.raises(NonFiniteLogits, match="NaN logits"):
            generate(model, torch.tensor([[3, 4]]), max_new_tokens=3, **kwargs)


def test_generate_treats_a_tiny_temperature_as_greedy_and_checks_seeds():
    model = _model()
    ids = torch.tensor([[3, 4, 5]])
    greedy = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    tiny = generate(model, ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1e-40, seed=1)
    assert torch.equal(tiny, greedy)
    top = generate(model, ids, max_new_tokens=4, eos_token_id=[], do_sample=True, seed=2**64 - 1)
    assert torch.equal(top, generate(model, ids, max_new_tokens=4, eos_token_id=[], do_sample=True, seed=-1))
    with pytest.raises(ValueError, match="seed must lie"):
        generate(model, ids, seed=2**64)


def test_generation_config_values_are_checked_by_the_same_rules(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"repetition_penalty": 1e-300}')
    with pytest.raises(ValueError, match=r"generation_config\.json: repetition_penalty must lie"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"temperature": 1e-40, "do_sample": true}')
    assert GenerationConfig.from_pretrained(tmp_path).temperature == 1e-40  # valid: greedy


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--temperature", "nan"], "--temperature: temperature must be a finite number"),
        (["--repetition-penalty", "1e-300"], "--repetition-penalty: repetition_penalty must lie"),
        (["--seed", str(2**64)], "--seed: seed must lie"),
        (["--top-p", "0"], "--top-p: top_p must lie"),
    ],
)
def test_the_cli_checks_sampling_options_before_loading_anything(capsys, option, words):
    code = generate_main(["hi", "--model", "/nonexistent/model/folder", *option])
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "nonexistent" not in err  # refused before looking for the model


def test_the_cli_reports_a_model_that_produces_nan(tmp_path, capsys):
    from pyjamba.model import JambaForCausalLM
    from pyjamba.testing import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "nan-model")
    model = JambaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    model.save_pretrained(folder)
    code = generate_main(["hi", "--model", str(folder), "--max-new-tokens", "3", "--temperature", "0"])
    assert code == 1
    assert "NaN logits" in capsys.readouterr().err
