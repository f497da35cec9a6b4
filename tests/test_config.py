"""JambaConfig: HF field names and defaults, legacy keys, validation messages, presets, file I/O."""

from __future__ import annotations

import json
import time

import pytest

from pyjamba.accounting import total_params
from pyjamba.config import MAX_PARAMS, MAX_SIZES, PRESETS, ConfigError, JambaConfig
from pyjamba.testing import PARITY_CONFIGS


def test_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    ours = JambaConfig().to_dict()
    theirs = transformers.JambaConfig().to_dict()
    for key, value in ours.items():
        if key in ("architectures", "mamba_dt_rank"):
            continue
        assert theirs[key] == value, key
    assert JambaConfig().dt_rank == theirs["mamba_dt_rank"] == 256


def test_transformers_config_json_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.JambaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, vocab_size=300
    )
    hf.save_pretrained(tmp_path)
    config = JambaConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (64, 1, 300)
    assert config.dt_rank == 4
    config.save(tmp_path)
    again = transformers.JambaConfig.from_pretrained(tmp_path)
    assert again.hidden_size == 64 and again.mamba_dt_rank == 4 and again.num_key_value_heads == 1


def test_legacy_v01_keys_are_tolerated():
    data = {
        "model_type": "jamba",
        "n_ctx": 262144,
        "mamba_inner_layernorms": True,
        "calc_logits_for_entire_prompt": False,
        "auto_map": {"AutoConfig": "configuration_jamba.JambaConfig"},
        "use_mamba_kernels": True,
        "sliding_window": None,
        "some_future_key": 7,
    }
    config = JambaConfig.from_dict(data)
    assert config.max_position_embeddings == 262144
    assert config.extra == {"sliding_window": None, "some_future_key": 7}
    out = config.to_dict()
    assert out["some_future_key"] == 7 and "auto_map" not in out and "n_ctx" not in out


def test_eos_may_be_a_list():
    config = JambaConfig(eos_token_id=[2, 518])
    assert config.eos_token_ids == [2, 518]
    assert JambaConfig(eos_token_id=None).eos_token_ids == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(attn_layer_offset=8), "attn_layer_offset (8) must be smaller than attn_layer_period (8)"),
        (dict(expert_layer_offset=2), "expert_layer_offset (2) must be smaller than expert_layer_period (2)"),
        (dict(hidden_size=100), "hidden_size (100) must be divisible by num_attention_heads (32)"),
        (
            dict(num_key_value_heads=5),
            "num_attention_heads (32) must be divisible by num_key_value_heads (5)",
        ),
        (dict(num_experts_per_tok=17), "num_experts_per_tok (17) must not exceed num_experts (16)"),
        (dict(vocab_size=0), "vocab_size must be positive"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be positive"),
        (dict(mamba_d_state=0), "mamba_d_state must be positive"),
        (dict(mamba_dt_rank=0), "mamba_dt_rank must be 'auto' or a positive integer"),
        (dict(mamba_dt_rank="big"), "mamba_dt_rank must be 'auto' or a positive integer"),
        (dict(hidden_size=4096.0), "hidden_size must be an integer"),
        (dict(eos_token_id=70000), "eos_token_id (70000) must lie in"),
        (dict(rms_norm_eps=0), "rms_norm_eps must be a positive number"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (dict(pad_token_id="0"), "pad_token_id ('0') must lie in"),
        (dict(eos_token_id=2.0), "eos_token_id must be an integer or a list of them, got 2.0"),
        (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
        (dict(mamba_conv_bias=1), "mamba_conv_bias must be true or false"),
    ],
)
def test_validation_names_field_and_rule(changes, message):
    with pytest.raises(ConfigError) as info:
        JambaConfig(**changes)
    assert message in str(info.value)


def test_not_a_jamba_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type is 'llama', not 'jamba'"):
        JambaConfig.from_pretrained(tmp_path)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        JambaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        JambaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "hidden_size": -4}))
    with pytest.raises(ConfigError, match=r"config\.json: hidden_size must be positive"):
        JambaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "jamba", "mamba_inner_layernorms": False})
    )
    with pytest.raises(ConfigError, match="mamba_inner_layernorms"):
        JambaConfig.from_pretrained(tmp_path)


def test_save_is_atomic_and_readable(tmp_path):
    config = JambaConfig.from_preset("jamba-tiny")
    config.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert JambaConfig.from_pretrained(tmp_path) == config


def test_presets():
    assert set(PRESETS) >= {"jamba-v0.1", "jamba-1.5-mini", "jamba-1.5-large", "jamba2-mini", "jamba2-3b"}
    three_b = JambaConfig.from_preset("jamba2-3b")
    assert [i for i, kind in enumerate(three_b.layer_types) if kind == "attention"] == [7, 21]
    assert not any(three_b.is_moe_layer(i) for i in range(three_b.num_hidden_layers))
    assert (three_b.num_hidden_layers, three_b.hidden_size, three_b.num_key_value_heads) == (28, 2560, 1)
    v01 = JambaConfig.from_preset("jamba-v0.1")
    assert [i for i, kind in enumerate(v01.layer_types) if kind == "attention"] == [4, 12, 20, 28]
    assert [i for i in range(32) if v01.is_moe_layer(i)] == list(range(1, 32, 2))
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        JambaConfig.from_preset("nope")


def test_presets_end_turns_as_the_real_models_do():
    """Jamba 1.5 stops at <|endoftext|> or <|eom|> (518); Jamba2's ChatML at <|im_end|> (519)."""
    eos = {name: JambaConfig.from_preset(name).eos_token_ids for name in PRESETS}
    assert eos["jamba-1.5-mini"] == eos["jamba-1.5-large"] == [2, 518]
    assert eos["jamba2-mini"] == eos["jamba2-3b"] == [519]
    assert eos["jamba-reasoning-3b"] == [2, 519]
    reasoning, three_b = JambaConfig.from_preset("jamba-reasoning-3b"), JambaConfig.from_preset("jamba2-3b")
    assert reasoning.tie_word_embeddings and reasoning.mamba_dt_rank == reasoning.dt_rank == 160
    assert reasoning.layer_types == three_b.layer_types and reasoning.hidden_size == three_b.hidden_size


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 10**9),
        ("hidden_size", 2**40),
        ("intermediate_size", 2**21),
        ("num_hidden_layers", 10**6),
        ("vocab_size", 2**40),
        ("mamba_d_state", 2**20),
        ("mamba_d_conv", 2**20),
        ("mamba_expand", 2**20),
        ("max_position_embeddings", 2**40),
    ],
)
def test_absurd_sizes_name_the_field_and_bound(field, value):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        JambaConfig(**{field: value})
    assert f"{field} ({value}) exceeds its bound {MAX_SIZES[field]}" in str(info.value)
    assert time.perf_counter() - start < 1


def test_explicit_dt_rank_is_bounded_by_the_mamba_width():
    assert (
        JambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_dt_rank=128).dt_rank
        == 128
    )
    with pytest.raises(
        ConfigError, match=r"mamba_dt_rank \(129\) exceeds its bound mamba_expand \* hidden_size \(128\)"
    ):
        JambaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mamba_dt_rank=129)


def test_total_parameters_are_bounded():
    # Every field within its bound, the product not: 4096 layers of 4096 experts of 3 x 8192 x 2**20.
    huge = dict(hidden_size=8192, intermediate_size=2**20, num_hidden_layers=4096, num_experts=4096)
    with pytest.raises(ConfigError) as info:
        JambaConfig(**huge)
    message = str(info.value)
    assert f"more than the bound of {MAX_PARAMS:,}" in message and "experts" in message
    count = int(message.split(" parameters")[0].split()[-1].replace(",", ""))
    assert count > MAX_PARAMS


def test_presets_and_test_configs_are_within_bounds():
    for name in PRESETS:
        assert total_params(JambaConfig.from_preset(name)) < MAX_PARAMS / 10, name
    for fields in PARITY_CONFIGS.values():
        JambaConfig(**fields)  # validates
    widest = JambaConfig(**dict(PRESETS["jamba-1.5-large"], hidden_size=MAX_SIZES["hidden_size"]))
    assert total_params(widest) < MAX_PARAMS  # Jamba 1.5 Large at the bound of the width: 4.7T


def test_absurd_config_json_is_refused_with_the_file_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "hidden_size": 2**40}))
    with pytest.raises(
        ConfigError, match=r"config\.json: hidden_size \(1099511627776\) exceeds its bound 65536"
    ):
        JambaConfig.from_pretrained(tmp_path)
    for text in ('{"hidden_size": ' + "9" * 5000 + "}", "[" * 100_000):  # too many digits, too deep
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
            JambaConfig.from_pretrained(tmp_path)
