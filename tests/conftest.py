"""Shared test fixtures: a pyjamba model and its transformers twin, on every parity config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the triton backend's kernels run in Triton's CPU interpreter (test_triton_kernels):
    # the variable must be set before triton is first imported, and torch._dynamo imports it while
    # other test modules are collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyjamba import folders
from pyjamba.testing import PARITY_CONFIGS, random_model, to_transformers


@pytest.fixture(scope="session", autouse=True)
def _dtype_measurements(tmp_path_factory):
    """dtype="auto" measures this CPU once (probe.py) and keeps the result: here, in a folder of this
    test session (its subprocesses inherit the variable), never in the user's cache."""
    os.environ["PYJAMBA_CACHE_DIR"] = str(tmp_path_factory.mktemp("pyjamba-cache"))


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def parity_pair(request):
    """(name, pyjamba model, transformers model) with the same random weights, float32."""
    pytest.importorskip("transformers")
    model = random_model(PARITY_CONFIGS[request.param])
    return request.param, model, to_transformers(model)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: other processes share this CPU, and torch's second
    thread spinning against them slows engine steps ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _exchange_works(where: Path) -> bool:
    a, b = where / "probe-a", where / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return folders._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture(params=["exchange", "two renames"])
def replace_mode(request, tmp_path, monkeypatch) -> str:
    """Each way a folder is replaced: the atomic exchange, and the fallback forced."""
    if request.param == "exchange" and not _exchange_works(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    if request.param == "two renames":
        monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    return request.param


@pytest.fixture
def needs_exchange(tmp_path) -> None:
    """Skip where this system or file system has no atomic exchange of two paths."""
    if not _exchange_works(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")


# Kills the process (SIGKILL: no handler runs) at one step of replacing a folder, then runs `body`.
_KILL_AT = """
import os, signal, sys
from pathlib import Path
from pyjamba import folders

step, folder = sys.argv[1], Path(sys.argv[2])

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if step == "between the two renames":
    folders._exchange = lambda a, b: False
    rename = os.rename
    def rename_then_die(src, dst):
        rename(src, dst)
        if ".old-" in os.fspath(dst):
            die()
    os.rename = rename_then_die
else:  # after the exchange, before the previous version is deleted
    folders._remove_previous = die
"""


def kill_while_replacing(folder: Path, step: str, body: str, *args: str) -> None:
    """Run `body` (Python, with `folder` and `sys.argv[3:]` = args) in a process that is killed at
    `step` ("between the two renames" or "after the exchange") of replacing `folder`."""
    script = _KILL_AT + body
    command = [sys.executable, "-c", script, step, str(folder), *args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the fused sublayer calls, so that a test knows the fused path ran (or did not)."""
    from pyjamba.kernels.numba import decode

    counts = {"mamba_step": 0, "attention_step": 0, "mlp_step": 0, "moe_step": 0, "norm_gemv": 0}
    for name in counts:
        original = getattr(decode, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(decode, name, counted)
    return counts
