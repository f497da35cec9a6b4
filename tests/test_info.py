"""pyjamba.accounting and `pyjamba info`: the papers' figures, transformers' parameter count, the CLI."""

from __future__ import annotations

import json

import pytest

from pyjamba import accounting as acc
from pyjamba.__main__ import main as cli
from pyjamba.config import JambaConfig

GIB = 2**30
CTX = 262144  # 256K tokens


def preset(name: str) -> JambaConfig:
    return JambaConfig.from_preset(name)


# ---- parameter counts against the papers ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["jamba-v0.1", "jamba-1.5-mini", "jamba2-mini"])
def test_jamba_52b_params(name: str) -> None:
    c = preset(name)
    assert acc.total_params(c) == 51_570_323_328
    assert 51.5e9 <= acc.total_params(c) <= 52.5e9  # "52B total"
    assert 11.5e9 <= acc.active_params(c) <= 12.5e9  # "12B active"


def test_jamba_large_params() -> None:
    c = preset("jamba-1.5-large")
    assert 397.5e9 <= acc.total_params(c) <= 398.99e9  # "398B total"
    assert 93.5e9 <= acc.active_params(c) <= 94.49e9  # "94B active": needs the embedding counted


def test_jamba2_3b_dense() -> None:
    c = preset("jamba2-3b")
    assert 2.9e9 <= acc.total_params(c) <= 3.3e9
    tied = preset("jamba-reasoning-3b")  # the same, its head the embedding table: 65536 x 2560 fewer
    assert acc.total_params(c) - acc.total_params(tied) == 65536 * 2560
    assert acc.active_params(c) == acc.total_params(c)
    b = acc.param_breakdown(c)
    assert b["experts"] == b["router"] == 0


def test_breakdown_sums_and_active_experts() -> None:
    c = preset("jamba-v0.1")
    full, active = acc.param_breakdown(c), acc.active_breakdown(c)
    assert sum(full.values()) == acc.total_params(c)
    assert active["experts"] * 8 == full["experts"]  # top-2 of 16
    assert {k: v for k, v in active.items() if k != "experts"} == {
        k: v for k, v in full.items() if k != "experts"
    }


# ---- parameter counts against transformers' JambaForCausalLM ------------------------------------------
TINY_VARIANTS = {
    "moe-untied": {},
    "tied": dict(tie_word_embeddings=True),
    "proj-bias-no-conv-bias": dict(mamba_proj_bias=True, mamba_conv_bias=False),
    "dense": dict(num_experts=1, num_experts_per_tok=1),
    "top1-of-3": dict(num_experts=3, num_experts_per_tok=1),
    "periods-offsets": dict(
        num_hidden_layers=7,
        attn_layer_period=3,
        attn_layer_offset=0,
        expert_layer_period=3,
        expert_layer_offset=2,
        mamba_dt_rank="auto",
        mamba_d_conv=3,
        mamba_expand=3,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("changes", TINY_VARIANTS.values(), ids=TINY_VARIANTS.keys())
def test_total_params_equal_transformers(changes: dict) -> None:
    transformers = pytest.importorskip("transformers")
    c = preset("jamba-tiny").replace(**changes)
    fields = {k: v for k, v in c.to_dict().items() if k not in ("architectures", "model_type")}
    model = transformers.JambaForCausalLM(transformers.JambaConfig(**fields))
    assert acc.total_params(c) == sum(p.numel() for p in model.parameters())


# ---- inference state -----------------------------------------------------------------------------------
def test_kv_cache_at_256k() -> None:
    assert acc.kv_cache_bytes(preset("jamba-v0.1"), CTX) == 4 * GIB
    assert acc.kv_cache_bytes(preset("jamba-1.5-large"), CTX) == 9 * GIB
    assert acc.kv_cache_bytes(preset("jamba-v0.1"), CTX, bytes_per_element=4) == 8 * GIB


def test_mamba_state() -> None:
    c = preset("jamba-v0.1")  # 28 Mamba layers, ED 8192, N 16, W 4
    per_layer = 8192 * 3 * 2 + 8192 * 16 * 4  # conv (W - 1 inputs, bf16) + SSM (fp32)
    assert acc.mamba_state_bytes(c) == 28 * per_layer
    assert acc.mamba_state_bytes(c, 4) == 28 * (8192 * 3 * 4 + 8192 * 16 * 4)


def test_memory_at_context() -> None:
    c = preset("jamba-v0.1")
    m = acc.memory_at_context(c, CTX)
    assert m.weights == 2 * acc.total_params(c)
    assert m.total == m.weights + 4 * GIB + acc.mamba_state_bytes(c)


def test_paper_kv_table() -> None:
    table = {m.name: m for m in acc.paper_kv_table()}
    expected_gib = {
        "Jamba v0.1 / 1.5 Mini": 4,
        "Jamba 1.5 Large": 9,
        "Mixtral 8x7B": 32,
        "Mistral 7B": 32,
        "Llama-2 70B": 80,
        "Llama 3.1 70B": 80,
        "Llama 3.1 405B": 126,
        "Mistral Large 2": 88,
    }
    assert {name: m.kv_bytes(CTX, 2) for name, m in table.items()} == {
        name: gib * GIB for name, gib in expected_gib.items()
    }
    assert {name for name, m in table.items() if m.flagged} == {"Llama-2 70B", "Llama 3.1 405B"}
    for m in table.values():  # every unflagged figure is the formula's, exactly
        assert m.flagged or m.paper_gb == m.formula_gib


# ---- the command line ----------------------------------------------------------------------------------
def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", "jamba-v0.1", "--context", "262144", "--compare"]) == 0
    out = capsys.readouterr().out
    for needle in (
        "32 layers: 4 attention, 28 mamba; 16 MoE (16 experts, top-2)",
        "51.57B total",
        "12.11B active",
        "16.00 KiB per token",
        "262,144 tokens",
        "4.00 GiB",
        "Mixtral 8x7B",
        "128 GB  FLAGGED",
        "252 GB  FLAGGED",
    ):
        assert needle in out
    assert out.count("FLAGGED") == 2


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", "jamba-1.5-large", "--context", "256K", "--json", "--compare"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["memory"]["context"] == CTX
    assert r["memory"]["kv_cache"] == 9 * GIB
    assert r["params"]["total"] == acc.total_params(preset("jamba-1.5-large"))
    assert [row["name"] for row in r["compare"] if row["flagged"]] == ["Llama-2 70B", "Llama 3.1 405B"]


def test_cli_folder(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    preset("jamba-tiny").save(tmp_path)
    assert cli(["info", str(tmp_path), "--json", "--dtype", "float32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["memory"]["context"] == 4096  # default: max_position_embeddings
    assert r["memory"]["weights"] == 4 * acc.total_params(preset("jamba-tiny"))


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli(["info", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return captured.err.strip()


def test_cli_errors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["jamba-9000"], capsys)
    assert "jamba-9000" in err and "jamba-v0.1" in err and len(err.splitlines()) == 1
    err = _error([str(tmp_path / "missing")], capsys)
    assert "missing" in err and len(err.splitlines()) == 1
    err = _error([str(tmp_path)], capsys)  # a folder without config.json
    assert "config.json" in err and len(err.splitlines()) == 1
    (tmp_path / "config.json").write_text('{"model_type": "jamba", "hidden_size": -1}')
    err = _error([str(tmp_path)], capsys)
    assert "hidden_size" in err and len(err.splitlines()) == 1
    assert "--context" in _error(["jamba-v0.1", "--context", "0"], capsys)


# ---- weight bytes per precision --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["jamba-tiny", "jamba-v0.1", "jamba-1.5-large", "jamba2-3b", "jamba-small"])
def test_weight_bytes_float_formats(name: str) -> None:
    c = preset(name)
    assert acc.weight_bytes(c, "float32") == 4 * acc.total_params(c)
    assert acc.weight_bytes(c, "bfloat16") == 2 * acc.total_params(c)
    assert acc.weight_breakdown(c, "bfloat16") == {k: 2 * n for k, n in acc.param_breakdown(c).items()}


def test_weight_bytes_int8_by_hand() -> None:
    # jamba-tiny: D 64, I 128, V 512 untied; layers mamba, mamba+MoE, attention, mamba+MoE; 4 experts;
    # 4 heads of 16, 2 kv heads; Mamba ED 128, N 8, R 4, W 4, conv bias, no proj bias.
    c = preset("jamba-tiny")
    bf16 = acc.weight_breakdown(c, "bfloat16")
    mlp = 3 * 64 * 128 + 4 * (128 + 128 + 64)  # gate, up, down in int8 + a float32 scale per output row
    assert mlp == 25856
    ei8 = acc.weight_breakdown(c, "experts-int8")
    assert ei8["mlp"] == 2 * mlp  # layers 0 and 2
    assert ei8["experts"] == 2 * 4 * mlp  # layers 1 and 3, 4 experts each
    assert {k: v for k, v in ei8.items() if k not in ("mlp", "experts")} == {
        k: v for k, v in bf16.items() if k not in ("mlp", "experts")
    }
    assert acc.weight_bytes(c, "experts-int8") == 593_912

    i8 = acc.weight_breakdown(c, "int8")
    # q (64 -> 64), k, v (64 -> 32), o (64 -> 64): int8 plus 4 bytes per output row
    assert i8["attention"] == (64 * 64 + 2 * 64 * 32 + 64 * 64) + 4 * (64 + 32 + 32 + 64)
    # in_proj 64 -> 256, x_proj 128 -> 4 + 2*8, dt_proj 4 -> 128, out_proj 128 -> 64 in int8 with scales;
    # conv1d (128 x 4 + bias 128), dt_proj bias (128), A_log (128 x 8), D (128) in bfloat16
    linear = 64 * 256 + 128 * 20 + 4 * 128 + 128 * 64 + 4 * (256 + 20 + 128 + 64)
    other = 2 * (128 * 4 + 128 + 128 + 128 * 8 + 128)
    assert i8["mamba"] == 3 * (linear + other) == 100_080
    assert i8["mlp"] == ei8["mlp"] and i8["experts"] == ei8["experts"]
    for key in ("embedding", "head", "norms", "router"):  # stay bfloat16, the head and router included
        assert i8[key] == bf16[key] and bf16[key] > 0
    # The router (2 x 4 x 64) in bfloat16, not int8 with scales: 505,064 bytes in all.
    assert acc.weight_bytes(c, "int8") == 505_064 == sum(i8.values())


def test_weight_bytes_tied_and_proj_bias() -> None:
    c = preset("jamba-tiny").replace(tie_word_embeddings=True, mamba_proj_bias=True)
    i8, bf16 = acc.weight_breakdown(c, "int8"), acc.weight_breakdown(c, "bfloat16")
    assert i8["head"] == 0
    # the in_proj/out_proj biases (256 + 64 per layer) stay bfloat16: 2 bytes more each than without
    assert i8["mamba"] - acc.weight_breakdown(preset("jamba-tiny"), "int8")["mamba"] == 3 * 2 * (256 + 64)
    assert bf16["head"] == 0


def test_weight_bytes_unknown_precision() -> None:
    with pytest.raises(ValueError, match="float16"):
        acc.weight_bytes(preset("jamba-tiny"), "float16")


def test_experts_int8_covers_most_parameters() -> None:
    for name in ("jamba-1.5-mini", "jamba-1.5-large"):  # "over 85% of the parameters"
        b = acc.param_breakdown(preset(name))
        assert (b["mlp"] + b["experts"]) / sum(b.values()) > 0.85


# ---- what fits a budget ------------------------------------------------------------------------------------
def test_budget_arithmetic() -> None:
    c = preset("jamba-tiny")  # 1 attention layer, 2 kv heads of 16: 128 bytes per token; 4096 max
    w = acc.weight_bytes(c, "experts-int8")
    state = 3 * (128 * 3 * 2 + 128 * 8 * 4)  # 3 Mamba layers: conv bf16 + SSM float32
    assert acc.budget_fit(c, "experts-int8", 10**9).mamba_state == state
    below = acc.budget_fit(c, "experts-int8", w - 1)
    assert not below.weights_fit and below.max_context == 0
    just = acc.budget_fit(c, "experts-int8", w)
    assert just.weights_fit and just.max_context == 0  # the Mamba state does not fit
    assert acc.budget_fit(c, "experts-int8", w + state + 127).max_context == 0
    ten = acc.budget_fit(c, "experts-int8", w + state + 10 * 128 + 127)
    assert ten.max_context == 10 and not ten.capped and ten.free_at_max_context == 127
    cap = acc.budget_fit(c, "experts-int8", w + state + 4096 * 128 + 10**6)
    assert cap.max_context == 4096 and cap.capped  # max_position_embeddings
    assert acc.budget_fit(c, "experts-int8", w + state + 4095 * 128).max_context == 4095
    no_attn = c.replace(attn_layer_period=8, attn_layer_offset=5)  # pure Mamba: length is free
    fit = acc.budget_fit(no_attn, "bfloat16", acc.weight_bytes(no_attn, "bfloat16") + 4 * state)
    assert fit.kv_bytes_per_token == 0 and fit.max_context == 4096
    with pytest.raises(ValueError):
        acc.budget_fit(c, "int8", -1)


def test_budget_papers_claims() -> None:
    gpu = 80 * GIB
    large, mini = preset("jamba-1.5-large"), preset("jamba-1.5-mini")
    # "ExpertsInt8 ... allows fitting Jamba-1.5-Large on a machine with 8 80GB GPUs ... 256K-token contexts"
    assert acc.budget_fit(large, "experts-int8", 8 * gpu).max_context == CTX
    assert not acc.budget_fit(large, "bfloat16", 8 * gpu).weights_fit  # 742 GiB: why it needs int8
    # Jamba (52B) on one 80 GB GPU: only with 8-bit weights
    assert not acc.budget_fit(mini, "bfloat16", gpu).weights_fit
    assert acc.budget_fit(mini, "experts-int8", gpu).max_context == CTX


# ---- the command line: precisions and budget ----------------------------------------------------------------
def test_parse_size() -> None:
    from pyjamba.info import parse_size

    assert parse_size("80GiB") == 80 * GIB == parse_size("80 gib") == parse_size("85899345920")
    assert parse_size("640GB") == 640 * 10**9
    assert parse_size("1.5TiB") == 3 * 2**39
    assert parse_size("512MiB") == 2**29 and parse_size("2KB") == 2000 and parse_size("7B") == 7
    for bad in ("80XB", "GiB", "", "-1GiB", "0GB", "80 GiB extra", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cli_budget_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", "jamba-1.5-large", "--budget", "80GiB", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "51.57B" not in out and "398.56B total" in out  # the existing report is still there
    assert "budget 8 x 80.00 GiB = 640.00 GiB, batch 1" in out
    assert "  bfloat16        742.37 GiB  no    none (the weights alone exceed the budget)" in out
    assert "  experts-int8    398.25 GiB  yes   262,144 tokens (the model's maximum)" in out
    assert "not counted: activations" in out


def test_cli_precisions_always_and_budget_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", "jamba-tiny", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "budget" not in r
    assert {p: w["total"] for p, w in r["weights_by_precision"].items()} == {
        "float32": 1_653_744,
        "bfloat16": 826_872,
        "experts-int8": 593_912,
        "int8": 505_064,
    }
    assert cli(["info", "jamba-tiny", "--json", "--budget", "600000"]) == 0
    b = json.loads(capsys.readouterr().out)["budget"]
    assert b["total"] == 600_000 and b["gpus"] == 1 and b["kv_cache_bytes_per_token"] == 128
    fits = b["precisions"]
    assert [p for p, f in fits.items() if f["weights_fit"]] == ["experts-int8", "int8"]
    assert fits["experts-int8"]["max_context"] == 0  # 6,088 bytes left: less than the Mamba state
    assert fits["int8"]["max_context"] == (600_000 - 505_064 - 14_592) // 128 == 627
    assert not fits["int8"]["capped"]
    assert cli(["info", "jamba-tiny", "--json", "--budget", "2MiB", "--gpus", "2"]) == 0
    b = json.loads(capsys.readouterr().out)["budget"]
    assert b["total"] == 4 * 2**20 and b["precisions"]["float32"]["max_context"] == 4096


def test_cli_budget_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in (
        (["--budget", "80XB"], "80XB"),
        (["--budget", "lots"], "lots"),
        (["--budget", "0GiB"], "positive"),
        (["--gpus", "8"], "--budget"),
        (["--budget", "80GiB", "--gpus", "0"], "--gpus"),
        (["--budget", "80GiB", "--gpus", "eight"], "eight"),
    ):
        err = _error(["jamba-1.5-mini", *argv], capsys)
        assert needle in err and len(err.splitlines()) == 1
