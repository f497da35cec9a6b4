"""Generation against transformers' generate: greedy and seeded sampling token for token, each logits
processor against transformers' own class, batching, EOS, stop strings, streaming, validation."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

from pyjamba.generate import (
    GenerationConfig,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    stream,
)
from pyjamba.testing import PARITY_CONFIGS, random_model, to_transformers

PROMPT_LEN = 9


@functools.cache
def _model(name: str):
    return random_model(PARITY_CONFIGS[name])


@functools.cache
def _hf(name: str):
    pytest.importorskip("transformers")
    return to_transformers(_model(name))


def _prompts(lengths: list[int], seed: int = 1, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (pad 0) of the given lengths and their attention mask."""
    width = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _hf_generate(name: str, ids: torch.Tensor, mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    kwargs.setdefault("eos_token_id", _model(name).config.eos_token_ids)
    kwargs.setdefault("pad_token_id", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _hf(name).generate(ids, attention_mask=mask, **kwargs)


# ---- greedy and sampling against transformers' generate -------------------------------------------

# MoE + GQA; tied head + projection bias; the Jamba layer pattern with two EOS ids; pure Mamba
# (transformers runs it only without its cache, which is how to_transformers builds it).
GREEDY_CONFIGS = ["moe-gqa-untied", "dense-mha-tied-projbias", "jamba-pattern-8", "pure-mamba-small-conv"]


@pytest.mark.parametrize("name", GREEDY_CONFIGS)
def test_greedy_matches_transformers_single_prompt(name):
    ids, _ = _prompts([PROMPT_LEN], seed=2)
    ours = generate(_model(name), ids, max_new_tokens=12)
    theirs = _hf_generate(name, ids, None, do_sample=False, max_new_tokens=12)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", GREEDY_CONFIGS)
def test_greedy_matches_transformers_left_padded_batch(name):
    if _model(name).config.mamba_proj_bias:
        pytest.skip("transformers lets padding leak through the in_proj bias (see test_model)")
    ids, mask = _prompts([PROMPT_LEN, 4, 7])
    ours = generate(_model(name), ids, mask, max_new_tokens=12)
    theirs = _hf_generate(name, ids, mask, do_sample=False, max_new_tokens=12)
    assert ours.shape == (3, PROMPT_LEN + 12)
    assert torch.equal(ours, theirs)


def test_greedy_eos_mid_batch_matches_transformers():
    """An EOS that one sequence produces midway: it stops there and is padded, in both engines."""
    name = "moe-gqa-untied"
    ids, mask = _prompts([PROMPT_LEN, 5, 8], seed=3)
    free = generate(_model(name), ids, mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[1, PROMPT_LEN + 3])  # the 4th new token of the second prompt
    ours = generate(_model(name), ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    theirs = _hf_generate(name, ids, mask, do_sample=False, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(ours, theirs)
    new = ours[1, PROMPT_LEN:]
    first = int((new == eos).nonzero()[0])
    assert first <= 3 and (new[first + 1 :] == 0).all()


def test_greedy_with_repetition_penalty_matches_transformers():
    name = "jamba-pattern-8"
    ids, mask = _prompts([PROMPT_LEN, 6])
    ours = generate(_model(name), ids, mask, max_new_tokens=10, repetition_penalty=1.8)
    theirs = _hf_generate(name, ids, mask, do_sample=False, max_new_tokens=10, repetition_penalty=1.8)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, generate(_model(name), ids, mask, max_new_tokens=10))


def test_seeded_sampling_matches_transformers():
    """Same processors in the same order, same draws: a fresh Generator seeded s replays torch.manual_seed(s)."""
    name = "moe-gqa-untied"
    ids, mask = _prompts([PROMPT_LEN, 5, 7])
    kwargs = dict(
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        max_new_tokens=12,
    )
    ours = generate(_model(name), ids, mask, seed=7, **kwargs)
    torch.manual_seed(7)
    theirs = _hf_generate(name, ids, mask, **kwargs)
    assert torch.equal(ours, theirs)


# ---- batching, seeds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["moe-gqa-untied", "dense-mha-tied-projbias", "moe-every-layer-tied-bothbias"]
)
def test_batched_greedy_equals_each_prompt_alone(name):
    lengths = [PROMPT_LEN, 3, 6]
    ids, mask = _prompts(lengths, seed=4)
    model = _model(name)
    batched = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[])
    for b, n in enumerate(lengths):
        alone = generate(model, ids[b : b + 1, PROMPT_LEN - n :], max_new_tokens=10, eos_token_id=[])
        assert torch.equal(batched[b, PROMPT_LEN:], alone[0, n:])


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone():
    model = _model("jamba-pattern-8")
    ids, mask = _prompts([PROMPT_LEN, 6])
    kwargs = dict(do_sample=True, max_new_tokens=15, eos_token_id=[])
    state = torch.get_rng_state()
    a = generate(model, ids, mask, seed=123, **kwargs)
    b = generate(model, ids, mask, seed=123, **kwargs)
    c = generate(model, ids, mask, seed=124, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    d = generate(model, ids, mask, generator=torch.Generator().manual_seed(123), **kwargs)
    assert torch.equal(a, d)


def test_temperature_zero_is_greedy():
    model = _model("moe-gqa-untied")
    ids, _ = _prompts([PROMPT_LEN])
    greedy = generate(model, ids, max_new_tokens=8)
    assert torch.equal(generate(model, ids, max_new_tokens=8, do_sample=True, temperature=0.0), greedy)


# ---- each processor against transformers' own class -------------------------------------------


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(4, 50, generator=g)
    scores[0, :5] = scores[0, 5]  # ties
    scores[1, 10] = 40.0  # one token holds nearly all the mass
    return scores


def test_temperature_matches_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    for t in (0.3, 1.7):
        expected = lp.TemperatureLogitsWarper(t)(None, _scores())
        assert torch.equal(apply_temperature(_scores(), t), expected)


@pytest.mark.parametrize("k", [1, 3, 17, 50, 80])
def test_top_k_matches_transformers(k):
    lp = pytest.importorskip("transformers.generation.logits_process")
    assert torch.equal(apply_top_k(_scores(), k), lp.TopKLogitsWarper(k)(None, _scores()))


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.8, 0.95, 1.0])
def test_top_p_matches_transformers(p):
    lp = pytest.importorskip("transformers.generation.logits_process")
    assert torch.equal(apply_top_p(_scores(), p), lp.TopPLogitsWarper(p)(None, _scores()))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.5, 1.0])
def test_min_p_matches_transformers(min_p):
    lp = pytest.importorskip("transformers.generation.logits_process")
    assert torch.equal(apply_min_p(_scores(), min_p), lp.MinPLogitsWarper(min_p)(None, _scores()))


@pytest.mark.parametrize("penalty", [0.6, 1.3])
def test_repetition_penalty_matches_transformers(penalty):
    lp = pytest.importorskip("transformers.generation.logits_process")
    ids = torch.tensor([[1, 4, 4, 9, 49], [0, 0, 2, 2, 2], [7, 8, 9, 10, 11], [3, 3, 3, 3, 3]])
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, _scores())
    assert torch.equal(apply_repetition_penalty(_scores(), seen, penalty), expected)


# ---- stopping -----------------------------------------------------------------------------------


class FakeTokenizer:
    """Token i decodes to a fixed two- or three-letter string."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"{chr(97 + i % 26)}{i}" for i in ids)


def test_eos_stops_a_sequence_and_pads_after_it():
    model = _model("jamba-pattern-8")
    ids, mask = _prompts([PROMPT_LEN, 6, 8], seed=5)
    free = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    new = free[:, PROMPT_LEN:]
    eos_a, eos_b = int(new[0, 2]), int(new[2, 5])
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[eos_a, eos_b], pad_token_id=1)
    for b in range(3):
        row, expected = out[b, PROMPT_LEN:], new[b]
        stops = [i for i, t in enumerate(expected.tolist()) if t in (eos_a, eos_b)]
        end = stops[0] + 1 if stops else len(expected)
        assert torch.equal(row[:end], expected[:end])
        assert (row[end:] == 1).all()
    # Every sequence stopped before max_new_tokens: the output is only as long as the longest one.
    alone = generate(model, ids[:1], max_new_tokens=12, eos_token_id=eos_a)
    assert alone.shape[1] <= PROMPT_LEN + 3 and alone[0, -1] == eos_a


def test_stop_strings_stop_after_the_completing_token():
    model = _model("moe-gqa-untied")
    tokenizer = FakeTokenizer()
    ids, mask = _prompts([PROMPT_LEN, 7], seed=6)
    free = generate(model, ids, mask, max_new_tokens=25, eos_token_id=[])
    new = free[:, PROMPT_LEN:].tolist()
    # A stop string that starts inside new token 14 of row 0 and ends inside token 16: far past the first
    # window, and spanning three tokens.
    text = [tokenizer.decode([t]) for t in new[0]]
    stop = text[14][1:] + text[15] + text[16][:1]
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=25,
        eos_token_id=[],
        pad_token_id=0,
        stop_strings=stop,
        tokenizer=tokenizer,
    )
    expected_end = next(n for n in range(1, 26) if stop in tokenizer.decode(new[0][:n]))
    assert expected_end <= 17
    assert out[0, PROMPT_LEN : PROMPT_LEN + expected_end].tolist() == new[0][:expected_end]
    assert (out[0, PROMPT_LEN + expected_end :] == 0).all()
    if stop not in tokenizer.decode(new[1]):
        assert out[1, PROMPT_LEN:].tolist() == new[1]
    # A list of stop strings: the first one completed counts; one that never appears changes nothing.
    out2 = generate(
        model,
        ids,
        mask,
        max_new_tokens=25,
        eos_token_id=[],
        stop_strings=["zz-never", stop],
        tokenizer=tokenizer,
    )
    assert torch.equal(out2, out)


def test_stop_strings_need_a_tokenizer():
    ids, _ = _prompts([4])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(_model("moe-gqa-untied"), ids, stop_strings=["x"])
    with pytest.raises(ValueError, match="stop_strings"):
        generate(_model("moe-gqa-untied"), ids, stop_strings=[""], tokenizer=FakeTokenizer())
    free = generate(_model("moe-gqa-untied"), ids, max_new_tokens=4)
    assert torch.equal(generate(_model("moe-gqa-untied"), ids, max_new_tokens=4, stop_strings=[]), free)


# ---- streaming, callbacks, edge cases ----------------------------------------------------------


def test_streamed_tokens_equal_generate():
    model = _model("jamba-pattern-8")
    ids, mask = _prompts([PROMPT_LEN, 5], seed=8)
    free = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, PROMPT_LEN + 4])
    kwargs = dict(max_new_tokens=10, eos_token_id=eos, do_sample=True, seed=3, top_k=10)
    out = generate(model, ids, mask, **kwargs)
    steps = list(stream(model, ids, mask, **kwargs))
    assert all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), out[:, PROMPT_LEN:])
    seen = []
    assert torch.equal(generate(model, ids, mask, callback=seen.append, **kwargs), out)
    assert torch.equal(torch.stack(seen, dim=1), out[:, PROMPT_LEN:])


def test_model_generate_entry_point_and_max_new_tokens_zero():
    model = _model("moe-gqa-untied")
    ids, mask = _prompts([PROMPT_LEN, 4])
    assert torch.equal(model.generate(ids, mask, max_new_tokens=0), ids)
    assert list(stream(model, ids, mask, max_new_tokens=0)) == []
    assert torch.equal(
        model.generate(ids, mask, max_new_tokens=5), generate(model, ids, mask, max_new_tokens=5)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(eos_token_id=97), "eos_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(seed=1, generator=torch.Generator()), "seed or generator"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
    model = _model("moe-gqa-untied")
    ids, _ = _prompts([4])
    with pytest.raises(ValueError, match=message):
        generate(model, ids, **kwargs)
    with pytest.raises(ValueError, match=message):
        stream(model, ids, **kwargs)  # raised when called, not at the first step


def test_bad_inputs_raise_clear_errors():
    model = _model("moe-gqa-untied")
    ids, mask = _prompts([5, 3])
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=97\)"):
        generate(model, torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=97\)"):
        generate(model, torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, length\)"):
        generate(model, ids[0])
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, ids.float())
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        generate(model, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, ids, torch.zeros_like(mask))


# ---- generation_config.json ----------------------------------------------------------------------


def test_generation_config_from_pretrained(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()
    data = dict(
        temperature=0.7, top_p=0.9, do_sample=True, eos_token_id=[2, 518], pad_token_id=0, bos_token_id=1,
        max_length=100, transformers_version="4.40.0", top_k=None,
    )  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config == GenerationConfig(
        temperature=0.7, top_p=0.9, do_sample=True, eos_token_id=[2, 518], pad_token_id=0, bos_token_id=1
    )
    assert "bos_token_id" not in config.to_kwargs()
    model = _model("moe-gqa-untied")
    ids, _ = _prompts([4])
    kwargs = GenerationConfig(max_new_tokens=3, eos_token_id=[2]).to_kwargs()
    assert generate(model, ids, **kwargs).shape[1] <= 7

    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig.from_pretrained(tmp_path)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = _model("dense-mha-tied-projbias")
    ids, mask = _prompts([PROMPT_LEN, 5])
    for m in (None, mask):
        eager = generate(model, ids, m, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(generate(model, ids, m, max_new_tokens=12, eos_token_id=[], compile=True), eager)
