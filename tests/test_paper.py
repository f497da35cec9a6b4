"""`pyjamba paper`: the matched families, the recall tasks, and smoke runs of each claim at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyjamba import accounting as acc
from pyjamba.__main__ import main as pyjamba_main
from pyjamba.paper import memory, recall, tasks, throughput
from pyjamba.paper.families import recall_family, throughput_family

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


# ---- the matched architectures --------------------------------------------------------------------------
def test_throughput_family_matches_active_params_and_layouts():
    family = throughput_family()
    target = acc.active_params(family["jamba"])
    for c in family.values():
        assert abs(acc.active_params(c) - target) / target < 0.005
        assert (c.hidden_size, c.num_hidden_layers) == (256, 8)
    assert family["jamba"].layer_types.count("attention") == 1
    assert sum(family["jamba"].is_moe_layer(i) for i in range(8)) == 4
    assert family["mixtral-like"].layer_types == ["attention"] * 8
    assert all(family["mixtral-like"].is_moe_layer(i) for i in range(8))
    assert family["llama-like"].num_experts == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        throughput_family(layers=4)


def test_recall_family_matches_total_params():
    family = recall_family()
    target = acc.total_params(family["hybrid"])
    assert [c.layer_types.count("attention") for c in family.values()] == [0, 1, 8]
    for c in family.values():
        assert abs(acc.total_params(c) - target) / target < 0.005


# ---- the recall tasks -----------------------------------------------------------------------------------
def test_mqar_queries_ask_for_the_value_that_followed_the_key():
    ids, labels = tasks.mqar(8, 5, torch.Generator().manual_seed(0))
    assert ids.shape == labels.shape == (8, 20)
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        pairs = dict(zip(row[0:10:2], row[1:10:2], strict=True))
        assert len(pairs) == 5  # distinct keys
        assert sorted(row[10::2]) == sorted(pairs)  # every key asked once
        for t in range(10, 20, 2):
            assert lab[t + 1] == pairs[row[t]] == row[t + 1]
        assert sum(v != tasks.IGNORE for v in lab) == 5


def test_needle_asks_for_the_value_after_the_marker():
    ids, labels = tasks.needle(16, 40, torch.Generator().manual_seed(1))
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        where = row.index(tasks.MARKER)
        assert where < 37 and row[-2] == tasks.MARKER and row[-1] == row[where + 1] == lab[-1]
        assert row.count(tasks.MARKER) == 2 and sum(v != tasks.IGNORE for v in lab) == 1
    with pytest.raises(ValueError, match="at least 5"):
        tasks.needle(1, 4, torch.Generator())


# ---- the three commands, tiny ---------------------------------------------------------------------------
def test_recall_smoke(tmp_path):
    s = recall.RecallSettings(hidden=32, steps=4, batch=4, train_pairs=(2, 4), train_length=16,
                              eval_pairs=(2, 8), eval_lengths=(16, 32), eval_sequences=4, seeds=(0,))  # fmt: skip
    rows = recall.run(s, tmp_path, jobs=1, progress=False)
    written = _jsonl(tmp_path / "recall.jsonl")
    assert written[0]["task"] == "settings" and written[1:] == json.loads(json.dumps(rows))
    train = [r for r in rows if r["task"] == "train"]
    assert sorted((r["arch"], r["seed"]) for r in train) == sorted((a, 0) for a in recall.ARCHS)
    scored = [r for r in rows if r["task"] in ("mqar", "needle")]
    assert len(scored) == 3 * 4 and all(0.0 <= r["accuracy"] <= 1.0 for r in scored)
    assert {r["past_training"] for r in scored if r["task"] == "needle"} == {False, True}
    table = recall.table(rows, s)
    assert table.count("\n") == 4 and "MQAR 8*" in table and "needle 32*" in table
    assert _is_png(tmp_path / "recall.png")
    (tmp_path / "recall.png").unlink()
    assert recall.main(["--replot", "--out", str(tmp_path), "--no-progress"]) == 0
    assert _is_png(tmp_path / "recall.png")


def test_memory_real_configs_reproduce_the_papers_kv_table():
    rows = {r["model"]: r for r in memory.real_rows(80 * 2**30, 8)}
    jamba, mixtral, llama = rows["Jamba v0.1 (52B)"], rows["Mixtral 8x7B"], rows["Llama-2 70B"]
    assert jamba["kv_bytes_256k"] == 4 * 2**30 and mixtral["kv_bytes_256k"] == 32 * 2**30
    assert llama["kv_bytes_256k"] == 80 * 2**30  # the papers say 128 GB: flagged by `info --compare`
    assert jamba["max_context_bfloat16"] == 0  # 96 GiB of bf16 weights do not fit 80 GiB
    assert jamba["max_context_experts-int8"] == 262144
    assert jamba["max_context_experts-int8_with_runtime"] == 140 * 1024  # by construction of the runtime
    assert mixtral["max_context_experts-int8_with_runtime"] < 140 * 1024
    assert rows["Jamba 1.5 Large (398B)"]["max_context_experts-int8"] == 262144  # on 8 x 80 GiB
    assert "Jamba v0.1" in memory.real_table(list(rows.values()))


def test_memory_measured_transformer_holds_more_than_the_hybrid():
    rows = memory.measured_rows(
        [2048], hidden=64, chunk=1024, threads=1, progress=False, models=("jamba", "llama-like")
    )
    jamba, llama = rows
    assert llama["kv_bytes"] == 8 * jamba["kv_bytes"] == 8 * 2048 * 2 * 32 * 4  # 8 attention layers to 1
    assert llama["held"] > jamba["held"] + llama["kv_bytes"] // 2
    assert all(r["peak"] >= r["held"] > 0 for r in rows)


@pytest.mark.slow
def test_memory_command_measures_the_hybrid_growing_slower(tmp_path, capsys):
    argv = ["paper", "memory", "--quick", "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert pyjamba_main(argv) == 0
    out = capsys.readouterr().out
    assert "| Jamba v0.1 (52B) | 1 | 4 | 16.00 KiB | 4.00 GiB |" in out
    rows = _jsonl(tmp_path / "memory.jsonl")
    assert [r["kind"] for r in rows] == ["settings"] + ["real"] * 4 + ["measured"] * 4
    by = {(r["model"], r["length"]): r for r in rows if r["kind"] == "measured"}
    growth = {m: by[(m, 2048)]["held"] - by[(m, 1024)]["held"] for m in ("jamba", "llama-like")}
    kv = {m: by[(m, 2048)]["kv_bytes"] - by[(m, 1024)]["kv_bytes"] for m in ("jamba", "llama-like")}
    assert kv["llama-like"] == 8 * kv["jamba"]  # 8 attention layers against 1
    assert growth["llama-like"] > growth["jamba"] + kv["llama-like"] // 2
    assert all(r["peak"] >= r["held"] > 0 for r in by.values())
    assert _is_png(tmp_path / "memory.png")


def test_throughput_smoke(tmp_path, capsys):
    argv = ["paper", "throughput", "--quick", "--kernels", "torch",
            "--threads", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert pyjamba_main(argv) == 0
    rows = [r for r in _jsonl(tmp_path / "throughput.jsonl") if r["kind"] == "measurement"]
    keys = {(r["model"], r["phase"], r["batch"], r["length"]) for r in rows}
    assert keys == {(m, p, b, n) for m in ("jamba", "mixtral-like", "llama-like")
                    for p, b in (("prefill", 1), ("decode", 1), ("decode", 4)) for n in (128, 256, 512)}  # fmt: skip
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert "crossover" in out and "~3x (vs Mixtral)" in out
    assert _is_png(tmp_path / "throughput.png")


def test_crossover_is_the_start_of_the_final_winning_run():
    assert throughput.crossover([(1, 0.5), (2, 1.2), (4, 0.9), (8, 1.5), (16, 2.0)]) == 8
    assert throughput.crossover([(1, 0.5), (2, 0.8)]) is None
    assert throughput.crossover([(1, 1.1), (2, 1.3)]) == 1


def test_cli_usage_and_errors(capsys, tmp_path):
    assert pyjamba_main(["paper"]) == 2
    assert "throughput" in capsys.readouterr().out
    assert pyjamba_main(["paper", "speed"]) == 2
    assert "unknown claim 'speed'" in capsys.readouterr().err
    assert pyjamba_main(["paper", "throughput", "--hidden", "48", "--out", str(tmp_path)]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert pyjamba_main(["paper", "recall", "--train-pairs", "8,4", "--out", str(tmp_path)]) == 2
    assert "LO <= HI" in capsys.readouterr().err
    assert pyjamba_main(["paper", "memory", "--budget", "lots", "--out", str(tmp_path)]) == 2
    assert "not a memory size" in capsys.readouterr().err
