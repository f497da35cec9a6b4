"""`pyjamba bench`: its accounting, and a quick run on jamba-tiny with tiny lengths."""

from __future__ import annotations

import json

import pytest

from pyjamba.__main__ import main as pyjamba_main
from pyjamba.bench import decode_bytes_per_step, prefill_flops, variant_config


def test_variants():
    hybrid = variant_config("jamba-small", "hybrid")
    pure = variant_config("jamba-small", "transformer")
    assert hybrid.layer_types.count("attention") == 1
    assert pure.layer_types == ["attention"] * 8
    assert (pure.hidden_size, pure.num_experts) == (hybrid.hidden_size, hybrid.num_experts)


def test_prefill_flops_of_jamba_small_by_hand():
    c = variant_config("jamba-small", "hybrid")  # D 512, ED 1024, N 16, R 32, I 1024, 4 experts top-2
    mamba = 512 * 2048 + 1024 * 64 + 32 * 1024 + 1024 * 512
    attention = 512 * 512 * 2 + 512 * 128 * 2
    per_token = 7 * mamba + attention + 4 * 3 * 512 * 1024 + 4 * (4 * 512 + 2 * 3 * 512 * 1024)
    length = 100
    expected = 2 * per_token * length + 4 * 512 * length * (length + 1) // 2 + 2 * 512 * 65536
    assert prefill_flops(c, length) == expected


def test_decode_bytes_count_routed_experts_and_the_head():
    c = variant_config("jamba-small", "hybrid")  # tied: the head is the embedding, read in full
    expert = 3 * 512 * 1024
    one = decode_bytes_per_step(c, 4, batch=1)
    everything = sum(p.numel() for p in _meta_model(c).parameters())  # the table counted once
    assert one == 4 * (everything + 512 - 4 * 2 * expert)  # 2 of 4 experts unread in 4 layers
    # Many sequences read (almost) every expert, and one embedding row each.
    assert decode_bytes_per_step(c, 4, batch=64) == pytest.approx(4 * (everything + 64 * 512), rel=1e-6)


def _meta_model(config):
    import torch

    from pyjamba.model import JambaForCausalLM

    with torch.device("meta"):
        return JambaForCausalLM(config)


def _run(tmp_path, capsys, engines: str, *extra: str) -> list[dict]:
    argv = ["bench", "--model-preset", "jamba-tiny", "--lengths", "16", "--batches", "1", "2", *extra]
    argv += ["--decode-prompt", "8", "--decode-steps", "2", "--repeats", "1", "--variants", "hybrid"]
    argv += ["--engines", engines, "--no-machine", "--checkpoint-dir", str(tmp_path)]
    assert pyjamba_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not [row for row in rows if "error" in row]
    assert (tmp_path / "jamba-tiny-hybrid-float32" / "config.json").is_file()
    return [row for row in rows if row["bench"] in ("prefill", "decode")]


@pytest.mark.parametrize("paired", [False, True])
def test_bench_verb_on_a_tiny_model(tmp_path, capsys, paired):
    measured = _run(tmp_path, capsys, "ours", *(["--paired"] if paired else []))
    assert [(row["bench"], row.get("length"), row.get("batch")) for row in measured] == [
        ("prefill", 16, None),
        ("decode", None, 1),
        ("decode", None, 2),
    ]
    for row in measured:
        assert row["engine"] == "ours" and row["tokens_per_s"] > 0 and row["peak_rss_gb"] > 0


def test_bench_loads_ours_with_the_kernels_asked_for(tmp_path, capfd):
    """--kernels reaches pyjamba's engine (its rows name the kernels); --verbose says what was chosen."""
    argv = ["bench", "--model-preset", "jamba-tiny", "--lengths", "16", "--batches", "1", "--decode-prompt"]
    argv += ["8", "--decode-steps", "2", "--repeats", "1", "--variants", "hybrid", "--engines", "ours"]
    argv += ["--no-machine", "--checkpoint-dir", str(tmp_path), "--kernels", "torch", "--verbose"]
    assert pyjamba_main([*argv, "--dtype", "float32"]) == 0
    out, err = capfd.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    measured = [row for row in rows if row.get("bench") in ("load", "prefill", "decode")]
    assert len(measured) == 3 and all(row["kernels"] == "torch" for row in measured)
    assert "pyjamba bench: kernels torch (asked for), dtype float32 (asked for), " in err


@pytest.mark.slow
def test_bench_verb_compares_with_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    measured = _run(tmp_path, capsys, "ours,transformers")
    assert len(measured) == 6  # one length, two batch sizes, two engines
    assert [row["engine"] for row in measured] == ["transformers"] * 3 + ["ours"] * 3
    assert all(row["speed_vs_transformers"] > 0 for row in measured if row["engine"] == "ours")


@pytest.mark.slow
def test_paired_bench_alternates_the_engines(tmp_path, capsys):
    pytest.importorskip("transformers")
    measured = _run(tmp_path, capsys, "ours,transformers", "--paired", "--dtype", "float32")
    # Measurement by measurement, theirs then ours, each with its round-by-round times.
    assert [(row["engine"], row["bench"]) for row in measured] == [
        (engine, bench) for bench in ("prefill", "decode", "decode") for engine in ("transformers", "ours")
    ]
    assert all(row["paired"] and len(row["times_s"]) == 1 for row in measured)
    ours = [row for row in measured if row["engine"] == "ours"]
    assert all(row["speed_vs_transformers_round_median"] > 0 for row in ours)
