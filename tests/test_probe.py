"""dtype="auto" on a CPU: decided by measuring float32 and bfloat16 here (probe.py), once per machine."""

from __future__ import annotations

import json

import pytest
import torch

from pyjamba import probe
from pyjamba.config import JambaConfig
from pyjamba.dtypes import auto_dtype, resolve_dtype
from pyjamba.probe import DtypeSpeeds

SMALL = JambaConfig.from_preset("jamba-small")
PLENTY = 64 * 2**30


def _speeds(decode: float, prefill: float) -> DtypeSpeeds:
    return DtypeSpeeds(
        prefill_float32=100.0,
        prefill_bfloat16=100.0 * prefill,
        decode_float32=10.0,
        decode_bfloat16=10.0 * decode,
    )


@pytest.mark.parametrize(
    "decode, prefill, expected",
    [
        (2.0, 2.5, torch.bfloat16),  # AVX512-BF16 / AMX: both faster
        (1.6, 1.0, torch.bfloat16),  # half the bytes to decode, prompts as fast
        (1.5, 0.88, torch.float32),  # AVX2: prompts' weights converted on every call, a little slower
        (1.6, 0.5, torch.float32),  # ... or much slower
        (1.02, 3.0, torch.float32),  # decoding no faster: never chosen over float32
        (0.6, 1.5, torch.float32),  # decoding slower (fused kernels float32 only): never
    ],
)
def test_auto_takes_bfloat16_only_where_measured_faster(decode, prefill, expected):
    speeds = _speeds(decode, prefill)
    assert auto_dtype(SMALL, speeds=speeds, available_bytes=PLENTY) == expected
    dtype, why = resolve_dtype("auto", SMALL, speeds=speeds, available_bytes=PLENTY)
    assert dtype == expected
    assert f"decode at {decode:.2f}x and prefill at {prefill:.2f}x float32's speed" in why


def test_memory_still_overrides_a_slower_bfloat16():
    big = JambaConfig.from_preset("jamba2-3b")  # 12.8 GB in float32
    slower = _speeds(0.9, 0.5)
    assert auto_dtype(big, speeds=slower, available_bytes=24 * 2**30) == torch.float32
    dtype, why = resolve_dtype("auto", big, speeds=slower, available_bytes=12 * 2**30)
    assert dtype == torch.bfloat16 and "would not fit" in why


def test_measured_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PYJAMBA_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure() -> DtypeSpeeds:
        calls.append(1)
        return _speeds(1.5, 1.0)

    monkeypatch.setattr(probe, "measure", fake_measure)
    first = probe.dtype_speeds()
    assert probe.dtype_speeds() == first and len(calls) == 1
    kept = json.loads((tmp_path / "dtype-speeds.json").read_text())
    assert list(kept.values()) == [{**vars(first)}]
    # Another machine (threads are part of it) is measured on its own, beside the first.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        probe.dtype_speeds()
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 and len(json.loads((tmp_path / "dtype-speeds.json").read_text())) == 2
    # A damaged file is measured again, not an error.
    (tmp_path / "dtype-speeds.json").write_text("{not json")
    probe.dtype_speeds()
    assert len(calls) == 3


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PYJAMBA_CACHE_DIR", str(blocker / "sub"))  # a folder under a file
    monkeypatch.setattr(probe, "measure", lambda: _speeds(1.5, 1.0))
    assert probe.dtype_speeds().decode_ratio == pytest.approx(1.5)
    assert "could not keep the dtype measurement" in caplog.text


def test_measure_runs_the_model_in_both_dtypes():
    tiny = dict(probe.PROBE_CONFIG, hidden_size=64, intermediate_size=128)
    speeds = probe.measure(tiny, prompt=8, steps=2)
    for value in (
        speeds.prefill_float32,
        speeds.prefill_bfloat16,
        speeds.decode_float32,
        speeds.decode_bfloat16,
    ):
        assert value > 0
    assert "threads" in speeds.machine and "torch" in speeds.machine
