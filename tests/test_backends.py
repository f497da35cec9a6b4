"""Every op of every backend's kernel table against its torch reference (kernels/ops.py), one op at a
time, on random shapes (odd widths, lengths off any block, batch > 1) in float32, bfloat16 and
float64; the numba backend's fused layer step against a Layer's eager forward; and the promise that
a model runs exactly the backend it was built with."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

from pyjamba.kernels import Kernels, numba_unavailable, ops, resolve_kernels
from pyjamba.testing import PARITY_CONFIGS, random_model, relative_error

NUMBA = numba_unavailable() is None
BACKENDS = ["torch", *(["numba"] if NUMBA else [])]
REFERENCE = resolve_kernels("reference")
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> Kernels:
    return resolve_kernels(request.param)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert relative_error(got.double(), want.double()) < TOL[dtype]


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 5, 70])
@pytest.mark.parametrize(("out_features", "in_features"), [(7, 13), (300, 37), (1024, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(backend, dtype, rows, out_features, in_features, bias):
    x = _randn(2, rows, in_features, dtype=dtype, seed=rows)
    w = _randn(out_features, in_features, dtype=dtype, seed=1)
    b = _randn(out_features, dtype=dtype, seed=2) if bias else None
    # bfloat16 may be multiplied in float32 and rounded once: the reference rounds the same inputs.
    want = ops.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype)
    _close(backend.linear(x, w, b), want, dtype)
    _close(backend.linear(x[:, -1], w, b), want[:, -1], dtype)  # a strided view


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 40), (2, 33, 129)])
def test_rms_norm(backend, dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=3)
    w = _randn(shape[-1], dtype=dtype, seed=4)
    _close(backend.rms_norm(x, w, 1e-6), REFERENCE.rms_norm(x, w, 1e-6), dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 13), (3, 5, 72), (2, 33, 129)])
def test_silu_mul(backend, dtype, shape):
    gate, up = _randn(*shape, dtype=dtype, seed=5), _randn(*shape, dtype=dtype, seed=6)
    want = REFERENCE.silu_mul(gate, up)
    _close(backend.silu_mul(gate.clone(), up), want, dtype)  # a backend may write into gate


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 5, 33])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_silu(backend, dtype, length, width, bias):
    batch, inner = 3, 13
    projected = _randn(batch, length, 2 * inner, dtype=dtype, seed=length)
    x = projected[..., :inner]  # half of in_proj's output: a view with a row stride of 2 * inner
    weight = _randn(inner, 1, width, dtype=dtype, seed=7)
    b = _randn(inner, dtype=dtype, seed=8) if bias else None
    past = _randn(batch, inner, width - 1, dtype=dtype, seed=9)
    want_past = past.clone()
    want = REFERENCE.conv_silu(x, want_past, weight, b)
    _close(backend.conv_silu(x, past, weight, b), want, dtype)
    _close(past, want_past, dtype)  # the past moved on by the same inputs


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_silu_step_is_the_prompt_conv_of_one_token(backend, dtype, width, bias):
    batch, inner = 3, 13
    x = _randn(batch, inner, dtype=dtype, seed=10)
    weight = _randn(inner, 1, width, dtype=dtype, seed=11)
    b = _randn(inner, dtype=dtype, seed=12) if bias else None
    state = _randn(batch, inner, width - 1, dtype=dtype, seed=13)
    want_state = state.clone()
    want = REFERENCE.conv_silu(x[:, None], want_state, weight, b)[:, 0]
    _close(backend.conv_silu_step(x, state, weight, b), want, dtype)
    _close(state, want_state, dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4, 6])
def test_norm_linear(backend, dtype, rows):
    x = _randn(rows, 1, 40, dtype=dtype, seed=rows)
    norm_w, w = _randn(40, dtype=dtype, seed=14), _randn(301, 40, dtype=dtype, seed=15)
    want = REFERENCE.norm_linear(x.double(), norm_w.double(), 1e-6, w.double()).to(dtype)
    _close(backend.norm_linear(x, norm_w, 1e-6, w), want, dtype)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 4, 6])
def test_norm_linear_int8_head(backend, dtype, rows):
    """The final norm and an int8 head (quantize.py's int8-head): dequantized, then as a float head."""
    from pyjamba.quantize import quantize_rows

    x = _randn(rows, 1, 40, dtype=dtype, seed=rows)
    norm_w = _randn(40, dtype=dtype, seed=14)
    q, scale = quantize_rows(_randn(301, 40, dtype=torch.float32, seed=15))
    dequantized = ops.dequantize(q, scale, torch.float64)  # the product in float32, as the spec has it
    want = REFERENCE.norm_linear(x.double(), norm_w.double(), 1e-6, dequantized).to(dtype)
    _close(backend.norm_linear(x, norm_w, 1e-6, q, scale), want, dtype)
    _close(REFERENCE.norm_linear(x, norm_w, 1e-6, q, scale), want, dtype)


@pytest.mark.skipif(not NUMBA, reason="numba is not installed")
@torch.no_grad()
@pytest.mark.parametrize("name", ["moe-gqa-untied", "dense-mha-tied-projbias"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_fused_layer_step_is_the_layers_forward(name, batch):
    """The numba backend's layer_step against the same layer's eager forward, layer by layer, from
    the same cache (after a prompt), outputs and advanced states."""
    config = PARITY_CONFIGS[name]
    fused = random_model(config, seed=3, kernels="numba")
    eager = random_model(config, seed=3, kernels="torch")
    prompt = torch.randint(0, config["vocab_size"], (batch, 6), generator=torch.Generator().manual_seed(0))
    cache = eager.make_cache(batch, 16)
    eager(prompt, cache=cache)
    x = torch.randn(batch, 1, eager.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for fused_layer, eager_layer in zip(fused.model.layers, eager.model.layers, strict=True):
        got_cache, want_cache = copy.deepcopy(cache), copy.deepcopy(cache)
        got = fused.kernels.layer_step(fused_layer, x, None, None, got_cache)
        assert got is not None, "the fused step must take a one-token call after a past"
        want = eager_layer(x, None, None, want_cache)
        assert relative_error(got[0], want[0]) < 1e-5
        if want[1] is not None:
            assert relative_error(got[1], want[1]) < 1e-5
        for i in got_cache.ssm_states:
            assert relative_error(got_cache.ssm_states[i], want_cache.ssm_states[i]) < 1e-5
            assert relative_error(got_cache.conv_states[i], want_cache.conv_states[i]) < 1e-6
        x = want[0]
    # Calls it does not take: a prompt, padding, autograd.
    layer = fused.model.layers[0]
    assert fused.kernels.layer_step(layer, torch.randn(batch, 2, x.shape[-1]), None, None, cache) is None
    pad = torch.ones(batch, 1, 1)
    assert fused.kernels.layer_step(layer, x, None, pad, cache) is None
    with torch.enable_grad():
        assert fused.kernels.layer_step(layer, x, None, None, copy.deepcopy(cache)) is None


def _numba_frames(run) -> list[str]:
    """The numba-backend functions entered while `run()` runs: Python code under kernels/numba, and
    numba-compiled dispatchers called from anywhere."""
    entered: list[str] = []

    def profile(frame, event, arg) -> None:
        if event == "call" and "kernels/numba" in frame.f_code.co_filename.replace("\\", "/"):
            entered.append(frame.f_code.co_name)
        elif event == "c_call" and type(arg).__module__.startswith("numba"):
            entered.append(repr(arg))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


@pytest.mark.skipif(not NUMBA, reason="numba is not installed")
@torch.no_grad()
@pytest.mark.parametrize("kernels", ["reference", "torch"])
def test_a_model_runs_only_the_backend_it_was_built_with(kernels):
    config = PARITY_CONFIGS["moe-gqa-untied"]
    prompt = torch.randint(0, config["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    numba_model = random_model(config, kernels="numba")  # the numba kernels are loaded in this process
    assert _numba_frames(lambda: numba_model.generate(prompt, max_new_tokens=3))  # the probe sees them
    model = random_model(config, kernels=kernels)
    assert model.kernels.name == kernels
    assert _numba_frames(lambda: model.generate(prompt, max_new_tokens=3)) == []


@pytest.mark.skipif(not NUMBA, reason="numba is not installed")
def test_a_slow_compilation_says_so_on_stderr(monkeypatch, capsys):
    """A newcomer's first run compiles for a minute: it must not sit there without a word."""
    import time

    backend = importlib.import_module("pyjamba.kernels.numba")
    monkeypatch.setattr(backend, "_NOTICE_AFTER_S", 0.05)
    with backend._notice("compiling the numba CPU kernels"):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "pyjamba: compiling the numba CPU kernels (the first run on this machine" in err
    assert "pyjamba: done in" in err
    with backend._notice("compiling the numba CPU kernels"):
        pass  # fast (numba's cache): silent
    assert capsys.readouterr().err == ""
