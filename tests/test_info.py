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
