"""benchmarks/soak.py: its traffic (deterministic, well-typed bodies), its verdict, and a short run."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("psutil")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("pyjamba_soak_script", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _draws(soak, traffic, seed: int, count: int) -> list:
    rng = random.Random(seed)
    return [traffic.next(rng) for _ in range(count)]


def test_traffic_is_seeded_and_mixes_every_category(soak):
    traffic = soak.Traffic("model", 0.4, [], [])
    probes = _draws(soak, traffic, 0, 3000)
    assert probes == _draws(soak, traffic, 0, 3000)
    assert probes != _draws(soak, traffic, 1, 3000)
    categories = Counter(p.kind.split(".")[0] for p in probes)
    assert set(categories) == {"normal", "malformed", "hostile", "raw"}
    assert 0.5 < categories["normal"] / len(probes) < 0.7
    modes = {p.kind.split(".")[-1] for p in probes if p.kind.startswith("normal.")}
    assert modes == set(soak._MODES)


def test_bodies_say_what_their_kind_says(soak):
    traffic = soak.Traffic("model", 1.0, [], [])
    for probe in _draws(soak, traffic, 2, 2000):
        if probe.kind.startswith("hostile."):
            body = json.loads(probe.body)  # 1e400 parses (as inf): valid JSON for Python, as for the server
            assert isinstance(body, dict) and body["stream"] is probe.stream
        if probe.kind.startswith("raw."):
            assert probe.raw and not probe.body
    surrogate = soak.malformed_probe(
        random.Random(0), next(c for c in traffic.malformed if "surrogate" in c[0])
    )
    assert b"\\ud" in surrogate.body and surrogate.body.isascii()  # escaped, as a client would send it
    inf = soak.encode({"temperature": soak.raw_number("1e400")})
    assert inf == b'{"temperature": 1e400}' and json.loads(inf)["temperature"] == float("inf")


def test_well_formed_only_and_filters(soak):
    normal = soak.Traffic("model", 0.0, [], [])
    assert all(p.well_formed and p.kind.startswith("normal.") for p in _draws(soak, normal, 0, 500))
    only = soak.Traffic("model", 0.4, ["hostile.seed*"], ["*n2"])
    kinds = {p.kind for p in _draws(soak, only, 0, 200)}
    assert kinds and all(k.startswith("hostile.seed") and not k.endswith("n2") for k in kinds)
    with pytest.raises(ValueError, match="no request kind"):
        soak.Traffic("model", 0.0, ["hostile.*"], []).next(random.Random(0))


def _report(**changes) -> dict:
    empty = {"count": 0, "by_kind": {}, "examples": []}
    report = {
        "stopped_early": None,
        "elapsed_s": 30.0,
        "server_errors_5xx": empty,
        "unavailable_503": empty,
        "stream_error_events": empty,
        "transport_errors": {**empty, "by_type": {}},
        "health": {"always_200": True, "non_200": [], "non_200_count": 0, "samples": 30},
        "end": {"health_status": 200, "slots_in_use": 0, "queue_length": 0},
        "settle_s": 10.0,
        "server_alive": True,
    }
    return report | changes


def test_verdict(soak):
    assert soak.verdict(_report()) == []
    errors = {"count": 2, "by_kind": {"malformed.lone_surrogate_prompt": 2}, "examples": []}
    reasons = soak.verdict(
        _report(
            server_errors_5xx=errors,
            transport_errors={"count": 1, "by_kind": {"normal.chat.stream": 1}, "by_type": {"ReadError": 1}},
            end={"health_status": 200, "slots_in_use": 1, "queue_length": 0},
            server_alive=False,
        )
    )
    assert len(reasons) == 4
    assert "malformed.lone_surrogate_prompt x2" in reasons[0]
    assert "ReadError x1" in reasons[1]
    assert "1 slots were in use" in reasons[2]


def test_downsample_keeps_the_ends(soak):
    points = list(range(1000))
    kept = soak.downsample(points, 60)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) <= 61
    assert soak.downsample(points[:10], 60) == points[:10]


@pytest.mark.slow
def test_short_run_of_well_formed_traffic_passes(soak, tmp_path):
    """The shipped model served for 6 s to 2 clients: every request answered, no slot left in use."""
    out = tmp_path / "soak.json"
    argv = ["--clients", "2", "--minutes", "0.1", "--no-hostile", "--threads", "1", "--settle", "5"]
    assert soak.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["requests"] > 0 and report["by_status"].get("200", 0) > 0
    assert report["end"] == {**report["end"], "health_status": 200, "slots_in_use": 0, "queue_length": 0}
    assert report["rss_mib"]["start"] > 0 and report["server_exit_code"] == 0
