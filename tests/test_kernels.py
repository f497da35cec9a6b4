"""The selective-scan kernels: the chunked fast path held to the reference (values and gradients),
the fused numba kernels held to the reference on the same sweeps, the one-token update, chaining
through the state, kernel resolution, and transformers' scan as an outside oracle."""

from __future__ import annotations

import logging

import pytest
import torch

import pyjamba.kernels as kernels_module
from pyjamba.kernels import KERNEL_NAMES, Kernels, chunked, numba_unavailable, reference, resolve_kernels

NUMBA = numba_unavailable() is None
needs_numba = pytest.mark.skipif(not NUMBA, reason="numba is not installed")

# Per-dtype tolerances for y and the state. float64 is computed in float64 by both kernels; bfloat16
# inputs are computed in float32 by both, so only the final rounding of y to bfloat16 differs.
TOL = {
    torch.float64: {"atol": 1e-11, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}
STATE_TOL = {torch.float64: TOL[torch.float64], torch.float32: TOL[torch.float32]}
OPTIONS = ("D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch: int,
    length: int,
    inner: int,
    n_state: int,
    dtype: torch.dtype = torch.float32,
    options: tuple[str, ...] = OPTIONS,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random scan inputs on realistic scales: A < 0 as -exp(A_log), dt around softplus(-1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = {
        "u": randn(batch, length, inner),
        "delta": randn(batch, length, inner, scale=0.5, shift=-1.0),
        "A": -torch.exp(randn(inner, n_state, scale=0.5, shift=0.5)).to(state_dtype),
        "B": randn(batch, length, n_state),
        "C": randn(batch, length, n_state),
        "D": randn(inner).to(state_dtype),
        "z": randn(batch, length, inner),
        "delta_bias": randn(inner, scale=0.2).to(state_dtype),
        "initial_state": randn(batch, inner, n_state).to(state_dtype),
    }
    return {k: v for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") or k in options}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected, **TOL[dtype])


def assert_state_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = STATE_TOL.get(dtype, STATE_TOL[torch.float32])
    torch.testing.assert_close(actual, expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize(
    ("batch", "inner", "n_state", "chunk"), [(1, 8, 4, None), (2, 5, 3, 7), (3, 4, 16, 64)]
)
def test_scan_matches_reference(
    dtype: torch.dtype, length: int, batch: int, inner: int, n_state: int, chunk: int | None
) -> None:
    inputs = make_inputs(batch, length, inner, n_state, dtype)
    y_ref, h_ref = reference.selective_scan_ref(**inputs)
    y, h = chunked.selective_scan(**inputs, chunk_size=chunk)
    assert y.dtype == dtype and y.shape == (batch, length, inner)
    assert h.shape == (batch, inner, n_state)
    assert h.dtype == h_ref.dtype
    assert_close(y, y_ref, dtype)
    assert_state_close(h, h_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("options", [(), ("D",), ("z",), ("delta_bias",), ("initial_state",), OPTIONS])
@pytest.mark.parametrize("chunk", [None, 1, 16])
def test_scan_options(
    dtype: torch.dtype, delta_softplus: bool, options: tuple[str, ...], chunk: int | None
) -> None:
    inputs = make_inputs(2, 37, 6, 5, dtype, options, seed=1)
    if not delta_softplus:  # without softplus the step must already be positive
        inputs["delta"] = inputs["delta"].abs()
    y_ref, h_ref = reference.selective_scan_ref(**inputs, delta_softplus=delta_softplus)
    y, h = chunked.selective_scan(**inputs, delta_softplus=delta_softplus, chunk_size=chunk)
    assert_close(y, y_ref, dtype)
    assert_state_close(h, h_ref, dtype)


def test_scan_empty_sequence() -> None:
    inputs = make_inputs(2, 0, 4, 3)
    y, h = chunked.selective_scan(**inputs)
    assert y.shape == (2, 0, 4)
    torch.testing.assert_close(h, inputs["initial_state"])


@pytest.mark.parametrize(("inner", "n_state"), [(4, 3), (1, 3), (4, 1)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_scan_leaves_inputs_alone(inner: int, n_state: int, requires_grad: bool) -> None:
    """In particular the initial state, whose transpose is contiguous when ED or N is 1."""
    inputs = make_inputs(2, 20, inner, n_state)
    inputs["initial_state"].requires_grad_(requires_grad)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    chunked.selective_scan(**inputs, chunk_size=6)
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [(), OPTIONS])
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_state_update_matches_reference(
    dtype: torch.dtype, options: tuple[str, ...], delta_softplus: bool
) -> None:
    inputs = make_inputs(3, 1, 8, 4, dtype, (*options, "initial_state"), seed=2)
    state = inputs.pop("initial_state")
    if not delta_softplus:
        inputs["delta"] = inputs["delta"].abs()
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    state_ref = state.clone()
    y_ref = reference.selective_state_update_ref(state_ref, **step, delta_softplus=delta_softplus)
    y = chunked.selective_state_update(state, **step, delta_softplus=delta_softplus)
    assert y.shape == (3, 8) and y.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_state_close(state, state_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chained_scan_equals_prefix_then_updates(dtype: torch.dtype) -> None:
    length, prefix = 50, 37
    inputs = make_inputs(2, length, 6, 4, dtype, seed=3)
    y_full, h_full = chunked.selective_scan(**inputs, chunk_size=16)

    def part(lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {
            k: v[:, lo:hi] if v.dim() == 3 and k not in ("initial_state",) else v for k, v in inputs.items()
        }

    y_pre, state = chunked.selective_scan(**part(0, prefix), chunk_size=16)
    ys = [y_pre]
    step_args = {k: v for k, v in inputs.items() if k != "initial_state"}
    for t in range(prefix, length):
        step = {k: v[:, t] if v.dim() == 3 else v for k, v in step_args.items()}
        ys.append(chunked.selective_state_update(state, **step)[:, None])
    assert_close(torch.cat(ys, dim=1), y_full, dtype)
    assert_state_close(state, h_full, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("split", [1, 20, 33])
def test_chained_scan_equals_two_halves(dtype: torch.dtype, split: int) -> None:
    length = 66
    inputs = make_inputs(2, length, 6, 4, dtype, seed=4)
    y_full, h_full = chunked.selective_scan(**inputs, chunk_size=16)
    first = {k: v[:, :split] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    second = {k: v[:, split:] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    y1, h1 = chunked.selective_scan(**first, chunk_size=16)
    y2, h2 = chunked.selective_scan(**{**second, "initial_state": h1}, chunk_size=16)
    assert_close(torch.cat([y1, y2], dim=1), y_full, dtype)
    assert_state_close(h2, h_full, dtype)


def _grads(
    scan: object,
    inputs: dict[str, torch.Tensor],
    weights: tuple[torch.Tensor, torch.Tensor],
    **kwargs: object,
) -> dict[str, torch.Tensor]:
    """Gradients of a fixed random linear function of (y, h_L) wrt every input tensor."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, h = scan(**leaves, **kwargs)
    loss = (y * weights[0]).sum() + (h * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize(("batch", "length", "chunk"), [(1, 1, None), (2, 65, 16), (3, 40, 7), (2, 30, None)])
@pytest.mark.parametrize("options", [(), OPTIONS])
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_gradients_match_reference(
    batch: int, length: int, chunk: int | None, options: tuple[str, ...], delta_softplus: bool
) -> None:
    inner, n_state = 5, 4
    inputs = make_inputs(batch, length, inner, n_state, torch.float64, options, seed=5)
    if not delta_softplus:
        inputs["delta"] = inputs["delta"].abs()
    g = torch.Generator().manual_seed(6)
    weights = (
        torch.randn(batch, length, inner, generator=g, dtype=torch.float64),
        torch.randn(batch, inner, n_state, generator=g, dtype=torch.float64),
    )
    expected = _grads(reference.selective_scan_ref, inputs, weights, delta_softplus=delta_softplus)
    actual = _grads(chunked.selective_scan, inputs, weights, delta_softplus=delta_softplus, chunk_size=chunk)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-10, rtol=1e-9, msg=name)


def test_gradients_float32_match_reference() -> None:
    inputs = make_inputs(2, 50, 6, 4, torch.float32, seed=7)
    g = torch.Generator().manual_seed(8)
    weights = (torch.randn(2, 50, 6, generator=g), torch.randn(2, 6, 4, generator=g))
    expected = _grads(reference.selective_scan_ref, inputs, weights)
    actual = _grads(chunked.selective_scan, inputs, weights, chunk_size=16)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_gradients_bfloat16_inputs() -> None:
    """bfloat16 inputs are computed in float32 by both kernels; their gradients come back in bfloat16."""
    inputs = make_inputs(2, 40, 6, 4, torch.bfloat16, seed=13)
    g = torch.Generator().manual_seed(14)
    weights = (torch.randn(2, 40, 6, generator=g).bfloat16(), torch.randn(2, 6, 4, generator=g))
    expected = _grads(reference.selective_scan_ref, inputs, weights)
    actual = _grads(chunked.selective_scan, inputs, weights, chunk_size=16)
    for name in expected:
        assert actual[name].dtype == inputs[name].dtype, name
        torch.testing.assert_close(actual[name], expected[name], atol=5e-2, rtol=2e-2, msg=name)


def test_gradcheck() -> None:
    inputs = make_inputs(2, 9, 3, 2, torch.float64, seed=9)
    names = list(inputs)

    def scan(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked.selective_scan(**dict(zip(names, tensors, strict=True)), chunk_size=4)

    leaves = tuple(v.clone().requires_grad_() for v in inputs.values())
    assert torch.autograd.gradcheck(scan, leaves)


def test_only_some_inputs_require_grad() -> None:
    inputs = make_inputs(2, 20, 4, 3, torch.float64, seed=10)
    u = inputs.pop("u").requires_grad_()
    y, h = chunked.selective_scan(u, **inputs, chunk_size=8)
    (g_u,) = torch.autograd.grad(y.sum() + h.sum(), [u])
    y_ref, h_ref = reference.selective_scan_ref(u, **inputs)
    (g_ref,) = torch.autograd.grad(y_ref.sum() + h_ref.sum(), [u])
    torch.testing.assert_close(g_u, g_ref, atol=1e-10, rtol=1e-9)


def test_grad_and_no_grad_paths_agree() -> None:
    inputs = make_inputs(3, 45, 6, 4, seed=11)
    with torch.no_grad():
        y0, h0 = chunked.selective_scan(**inputs, chunk_size=8)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y1, h1 = chunked.selective_scan(**leaves, chunk_size=8)
    assert y1.requires_grad and h1.requires_grad
    assert_close(y1.detach(), y0, torch.float32)
    assert_state_close(h1.detach(), h0, torch.float32)


def test_matches_transformers_scan() -> None:
    """transformers' Jamba `mamba_selective_scan` takes channel-first (B, ED, L) and (B, N, L)."""
    jamba = pytest.importorskip("transformers.models.jamba.modeling_jamba")
    inputs = make_inputs(2, 70, 16, 8, torch.float32, ("D", "z", "delta_bias"), seed=12)
    y, h = chunked.selective_scan(**inputs)
    y_hf, h_hf = jamba.mamba_selective_scan(
        inputs["u"].transpose(1, 2),
        inputs["delta"].transpose(1, 2),
        inputs["A"],
        inputs["B"].transpose(1, 2),
        inputs["C"].transpose(1, 2),
        D=inputs["D"],
        z=inputs["z"].transpose(1, 2),
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
    )
    torch.testing.assert_close(y, y_hf.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_hf, atol=1e-5, rtol=1e-5)


def test_chunk_length_bounds_memory() -> None:
    """The default chunk keeps each (T, B, ED, N) buffer near a fixed size, whatever L is."""
    for batch, inner, n_state in [(1, 1024, 16), (8, 1024, 16), (1, 8192, 16), (1, 4, 2)]:
        for length in (1, 100, 16384):
            t = chunked._chunk_length(batch, inner, n_state, length)
            assert 1 <= t <= min(length, chunked._MAX_CHUNK)
            assert t * batch * inner * n_state <= max(chunked._CHUNK_ELEMENTS, batch * inner * n_state)


def test_resolve_kernels() -> None:
    assert resolve_kernels("torch").selective_scan is chunked.selective_scan
    assert resolve_kernels("reference").selective_scan is reference.selective_scan_ref
    custom = Kernels(
        "mine", selective_scan=chunked.selective_scan, selective_state_update=chunked.selective_state_update
    )
    assert resolve_kernels(custom) is custom
    assert set(KERNEL_NAMES) == {"auto", "torch", "numba", "triton", "reference"}
    with pytest.raises(ValueError, match="unknown kernels"):
        resolve_kernels("triton-please")


def test_auto_resolution_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pyjamba.kernels"):
        kernels = resolve_kernels("auto")
    assert kernels.name == ("numba" if NUMBA else "torch")
    assert f"resolved to '{kernels.name}'" in caplog.text
    with caplog.at_level(logging.INFO, logger="pyjamba.kernels"):
        on_cuda = resolve_kernels("auto", device="cuda")  # resolving needs no GPU
    assert on_cuda.name == ("torch" if kernels_module.triton_unavailable() else "triton")
    with caplog.at_level(logging.INFO, logger="pyjamba.kernels"):
        assert resolve_kernels("auto", device="mps").name == "torch"
    assert "CPU only" in caplog.text


def test_without_numba_auto_picks_torch_and_numba_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernels_module, "numba_unavailable", lambda: "numba is not importable (test)")
    with caplog.at_level(logging.INFO, logger="pyjamba.kernels"):
        assert resolve_kernels("auto").name == "torch"
    assert "numba is not importable (test)" in caplog.text
    with pytest.raises(RuntimeError, match="kernels='numba' is unavailable"):
        resolve_kernels("numba")


def test_numba_kernels_refuse_other_devices() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        resolve_kernels("numba", device="cuda")


# The fused numba kernels (pyjamba/kernels/numba/scan.py), on the sweeps above. ED = 130 and 300 cover a block
# of W = 128 channels plus a partial one; N = 16 is Jamba's, which the update unrolls.


@pytest.fixture(scope="module")
def fused() -> Kernels:
    if not NUMBA:
        pytest.skip("numba is not installed")
    return resolve_kernels("numba")


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("length", [1, 2, 31, 32, 33, 63, 64, 65, 200])
@pytest.mark.parametrize(
    ("batch", "inner", "n_state"), [(1, 8, 4), (2, 5, 3), (3, 4, 16), (2, 130, 16), (1, 300, 5)]
)
def test_fused_scan_matches_reference(
    fused: Kernels, dtype: torch.dtype, length: int, batch: int, inner: int, n_state: int
) -> None:
    inputs = make_inputs(batch, length, inner, n_state, dtype)
    y_ref, h_ref = reference.selective_scan_ref(**inputs)
    y, h = fused.selective_scan(**inputs)
    assert y.dtype == dtype and y.shape == (batch, length, inner)
    assert h.shape == (batch, inner, n_state) and h.dtype == h_ref.dtype
    assert_close(y, y_ref, dtype)
    assert_state_close(h, h_ref, dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("options", [(), ("D",), ("z",), ("delta_bias",), ("initial_state",), OPTIONS])
def test_fused_scan_options(
    fused: Kernels, dtype: torch.dtype, delta_softplus: bool, options: tuple[str, ...]
) -> None:
    inputs = make_inputs(2, 37, 6, 5, dtype, options, seed=1)
    if not delta_softplus:  # without softplus the step must already be positive
        inputs["delta"] = inputs["delta"].abs()
    y_ref, h_ref = reference.selective_scan_ref(**inputs, delta_softplus=delta_softplus)
    y, h = fused.selective_scan(**inputs, delta_softplus=delta_softplus)
    assert_close(y, y_ref, dtype)
    assert_state_close(h, h_ref, dtype)


@needs_numba
@pytest.mark.parametrize("case", ["positive A", "negative dt", "strong decay", "float16"])
def test_fused_scan_outside_the_usual_range(fused: Kernels, case: str) -> None:
    """Exponents dt A that may be positive take the clamped path; very negative ones underflow alike."""
    dtype = torch.float16 if case == "float16" else torch.float32
    inputs = make_inputs(2, 45, 140, 16, dtype, seed=15)
    softplus = case != "negative dt"
    if case == "positive A":
        inputs["A"][3, :4] = 0.05
    if case == "negative dt":
        inputs["delta"] = inputs["delta"] * 0.02  # some steps negative: exp(dt A) > 1, still finite
        inputs["delta_bias"] = inputs["delta_bias"] * 0.02
    if case == "strong decay":
        inputs["A"][:, :8] = -150.0  # exp(dt A) underflows for any dt above ~0.6
    y_ref, h_ref = reference.selective_scan_ref(**inputs, delta_softplus=softplus)
    y, h = fused.selective_scan(**inputs, delta_softplus=softplus)
    assert y.dtype == dtype
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else TOL[torch.float32]
    torch.testing.assert_close(y, y_ref, **tol)
    assert_state_close(h, h_ref, torch.float32)


@needs_numba
def test_fused_scan_takes_views(fused: Kernels) -> None:
    """The model's u is a transposed (B, ED, L) tensor, z and B, C slices of projections."""
    inputs = make_inputs(2, 70, 140, 16, seed=16)
    y_ref, h_ref = reference.selective_scan_ref(**inputs)
    views = dict(inputs)
    views["u"] = inputs["u"].transpose(1, 2).contiguous().transpose(1, 2)
    views["z"] = torch.cat([inputs["z"], inputs["u"]], dim=-1)[..., :140]
    views["B"] = torch.cat([inputs["B"], inputs["C"]], dim=-1)[..., :16]
    views["C"] = inputs["C"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not views["u"].is_contiguous() and not views["z"].is_contiguous()
    y, h = fused.selective_scan(**views)
    assert_close(y, y_ref, torch.float32)
    assert_state_close(h, h_ref, torch.float32)


@needs_numba
def test_fused_scan_same_result_for_any_thread_count(fused: Kernels) -> None:
    inputs = make_inputs(3, 50, 300, 16, seed=17)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, h1 = fused.selective_scan(**inputs)
        torch.set_num_threads(2)
        y2, h2 = fused.selective_scan(**inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


@needs_numba
def test_fused_scan_empty_sequence_and_inputs_left_alone(fused: Kernels) -> None:
    inputs = make_inputs(2, 0, 4, 3)
    y, h = fused.selective_scan(**inputs)
    assert y.shape == (2, 0, 4)
    torch.testing.assert_close(h, inputs["initial_state"])
    inputs = make_inputs(2, 20, 4, 3)
    before = {k: v.clone() for k, v in inputs.items()}
    fused.selective_scan(**inputs)
    for k, v in inputs.items():
        assert torch.equal(v, before[k]), k


@needs_numba
def test_fused_scan_rejects_mismatched_shapes(fused: Kernels) -> None:
    inputs = make_inputs(2, 20, 8, 4)
    inputs["B"] = inputs["B"][:, :10]
    with pytest.raises(ValueError, match="shapes do not match"):
        fused.selective_scan(**inputs)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [(), OPTIONS])
@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize(("batch", "inner", "n_state"), [(3, 8, 4), (1, 300, 16), (8, 130, 5)])
def test_fused_state_update_matches_reference(
    fused: Kernels,
    dtype: torch.dtype,
    options: tuple[str, ...],
    delta_softplus: bool,
    batch: int,
    inner: int,
    n_state: int,
) -> None:
    inputs = make_inputs(batch, 1, inner, n_state, dtype, (*options, "initial_state"), seed=2)
    state = inputs.pop("initial_state")
    if not delta_softplus:
        inputs["delta"] = inputs["delta"].abs()
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    state_ref = state.clone()
    y_ref = reference.selective_state_update_ref(state_ref, **step, delta_softplus=delta_softplus)
    y = fused.selective_state_update(state, **step, delta_softplus=delta_softplus)
    assert y.shape == (batch, inner) and y.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_state_close(state, state_ref, dtype)


@needs_numba
def test_fused_state_update_on_a_strided_state(fused: Kernels) -> None:
    inputs = make_inputs(2, 1, 8, 4, seed=18)
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    state_ref = step.pop("initial_state")
    state = state_ref.transpose(1, 2).contiguous().transpose(1, 2)  # (B, ED, N), not contiguous
    y_ref = reference.selective_state_update_ref(state_ref, **step)
    y = fused.selective_state_update(state, **step)
    assert_close(y, y_ref, torch.float32)
    assert_state_close(state, state_ref, torch.float32)


@needs_numba
def test_fused_chained_scan_equals_prefix_then_updates(fused: Kernels) -> None:
    length, prefix = 80, 37
    inputs = make_inputs(2, length, 140, 16, seed=3)
    y_full, h_full = fused.selective_scan(**inputs)
    first = {k: v[:, :prefix] if v.dim() == 3 and k != "initial_state" else v for k, v in inputs.items()}
    y_pre, state = fused.selective_scan(**first)
    ys = [y_pre]
    step_args = {k: v for k, v in inputs.items() if k != "initial_state"}
    for t in range(prefix, length):
        step = {k: v[:, t] if v.dim() == 3 else v for k, v in step_args.items()}
        ys.append(fused.selective_state_update(state, **step)[:, None])
    assert_close(torch.cat(ys, dim=1), y_full, torch.float32)
    assert_state_close(state, h_full, torch.float32)


@needs_numba
def test_fused_under_autograd_is_the_chunked_scan(fused: Kernels) -> None:
    """The fused kernels have no backward: with a gradient to compute they hand the call to chunked.py."""
    inputs = make_inputs(2, 30, 6, 4, torch.float64, seed=19)
    g = torch.Generator().manual_seed(20)
    weights = (
        torch.randn(2, 30, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 4, generator=g, dtype=torch.float64),
    )
    expected = _grads(reference.selective_scan_ref, inputs, weights)
    actual = _grads(fused.selective_scan, {k: v.float() for k, v in inputs.items()}, weights=(weights[0].float(), weights[1].float()))  # fmt: skip
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name], atol=1e-4, rtol=1e-4, msg=name)
