"""The triton backend's kernels against their torch references: the selective scan (values, and its
backward against autograd through the reference), the one-token update (also on slots of a pool), the
conv + SiLU of a prompt and of one token, the fused MoE (float and int8 weights), and a whole model.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
triton is imported) at tiny shapes; with one, on the GPU at realistic shapes. Tiny shapes still
cover odd channel counts, lengths not a multiple of the chunk (16) and of the block, batch > 1,
with and without an initial state, in float32 and bfloat16.
"""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined: before the import
pytest.importorskip(
    "triton", reason="triton is not installed (pip install triton): the triton backend is untested"
)

from pyjamba.kernels import Kernels, ops, reference, resolve_kernels  # noqa: E402
from pyjamba.kernels import triton as tk  # noqa: E402
from pyjamba.kernels.triton import common, moe, scan, state_update  # noqa: E402
from pyjamba.quantize import quantize_rows  # noqa: E402
from pyjamba.testing import PARITY_CONFIGS, random_model, relative_error  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not GPU and not common.interpreting(),
        reason="no GPU, and TRITON_INTERPRET was set to 0 before this module was imported",
    ),
    pytest.mark.usefixtures("one_thread"),  # other processes share this CPU
]
DEVICE = "cuda" if GPU else "cpu"
# (B, L, ED, N): an odd ED over two channel blocks, L over several chunks and not a multiple of one;
# one chunk exactly; a single step. (Interpreted, chunks are 8 steps and blocks 8 channels.)
SCAN_SHAPES = (
    [(2, 1000, 1536, 16), (1, 4096, 4096, 16), (3, 77, 333, 16)]
    if GPU
    else [(2, 21, 11, 3), (1, 8, 8, 4), (1, 1, 7, 3)]
)
SMALL = (2, 21, 11, 3)
# relative error (norm) per dtype: float32 sums in another order; bfloat16 rounds the output once
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _scan_inputs(
    batch: int, length: int, inner: int, n_state: int, dtype: torch.dtype, seed: int = 0
) -> dict:
    """Jamba-like scales: A = -exp(A_log), dt + bias around softplus(-3); z, B, C normal."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "u": randn(batch, length, inner).to(dtype),
        "delta": (0.5 * randn(batch, length, inner)).to(dtype),
        "A": -torch.exp(0.5 * randn(inner, n_state)),
        "B": randn(batch, length, n_state).to(dtype),
        "C": randn(batch, length, n_state).to(dtype),
        "D": randn(inner),
        "z": randn(batch, length, inner).to(dtype),
        "delta_bias": randn(inner) - 3.0,
        "initial_state": randn(batch, inner, n_state),
    }


def _to(inputs: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SCAN_SHAPES)
def test_selective_scan_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    inputs = _scan_inputs(*shape, dtype)
    if shape[0] == 1:  # from zeros, without D
        inputs.update(initial_state=None, D=None)
    y, last = tk.selective_scan(**_to(inputs, DEVICE))
    y_ref, last_ref = reference.selective_scan_ref(**inputs)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert relative_error(y.cpu(), y_ref) < REL[dtype]
    assert relative_error(last.cpu(), last_ref) < REL[torch.float32]


def test_selective_scan_without_gate_or_softplus() -> None:
    """delta_softplus=False, no z, no delta_bias: the plain recurrence."""
    inputs = _scan_inputs(*SMALL, torch.float32, seed=1)
    inputs.update(z=None, delta_bias=None, delta=inputs["delta"].abs())
    with torch.no_grad():
        y, last = tk.selective_scan(**_to(inputs, DEVICE), delta_softplus=False)
        y_ref, last_ref = reference.selective_scan_ref(**inputs, delta_softplus=False)
    assert relative_error(y.cpu(), y_ref) < 1e-5
    assert relative_error(last.cpu(), last_ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_backward_matches_autograd_through_reference(dtype: torch.dtype) -> None:
    shape = (2, 300, 256, 16) if GPU else SMALL
    inputs = _scan_inputs(*shape, dtype, seed=2)
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    g = torch.Generator().manual_seed(3)
    grad_y = torch.randn(shape[:2] + shape[2:3], generator=g)
    grad_last = torch.randn(shape[0], shape[2], shape[3], generator=g)

    y, last = tk.selective_scan(**leaves)
    ((y.float() * grad_y.to(DEVICE)).sum() + (last * grad_last.to(DEVICE)).sum()).backward()
    y_ref, last_ref = reference.selective_scan_ref(**ref_leaves)
    ((y_ref.float() * grad_y).sum() + (last_ref * grad_last).sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == leaf.dtype, name
        assert relative_error(leaf.grad.cpu(), ref_leaves[name].grad) < REL[dtype] * 5, name


def test_custom_ops_have_fakes_that_match() -> None:
    """Each op's fake (meta) kernel, what torch.compile and graph capture trace, gives the shapes and
    dtypes of the real outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = _to(_scan_inputs(1, 8, 8, 4, torch.bfloat16), DEVICE)
    scan_args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    scan_args += [True, inputs["initial_state"], True]
    x, weights, index, stacks = _experts(3, 24, 40, 5, 2, seed=0)
    calls = [
        (torch.ops.pyjamba.scan_fwd, scan_args),
        (
            torch.ops.pyjamba.conv_silu,
            [inputs["u"], torch.zeros(1, 8, 3, dtype=torch.bfloat16), torch.ones(8, 1, 4), None],
        ),
        (torch.ops.pyjamba.fused_moe, [x, weights, index, *stacks, None, None, None]),
    ]
    for op, args in calls:
        args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (r if isinstance(r, (tuple, list)) else (r,) for r in (real, fake))
        assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake], op


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [False, True])
def test_selective_state_update_matches_reference(dtype: torch.dtype, slots: bool) -> None:
    batch, inner, n_state = (8, 3000, 16) if GPU else (3, 19, 5)
    one = _scan_inputs(batch, 1, inner, n_state, dtype, seed=4)
    step = {k: one[k][:, 0] for k in ("u", "delta", "B", "C", "z")}
    step.update(A=one["A"], D=one["D"], delta_bias=one["delta_bias"])
    pool = torch.randn(batch + 2, inner, n_state)
    index = torch.randperm(batch + 2)[:batch] if slots else None
    expected_pool = pool.clone()
    rows = expected_pool[index] if slots else expected_pool[:batch]
    y_ref = reference.selective_state_update_ref(rows, **step)
    expected_pool[index if slots else slice(0, batch)] = rows

    state = pool.to(DEVICE) if slots else pool[:batch].contiguous().to(DEVICE)
    kwargs = {"state_batch_indices": index.to(DEVICE)} if slots else {}
    y = tk.selective_state_update(state, **_to(step, DEVICE), **kwargs)
    assert relative_error(y.cpu(), y_ref) < REL[dtype]
    expected = expected_pool if slots else expected_pool[:batch]
    assert relative_error(state.cpu(), expected) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [2, 21])  # fewer inputs than the past holds; several blocks of L
def test_conv_silu_matches_reference(dtype: torch.dtype, length: int) -> None:
    batch, inner, width = (2, 3000, 4) if GPU else (2, 19, 4)
    g = torch.Generator().manual_seed(length)
    x = torch.randn(batch, length * (50 if GPU else 1), 2 * inner, generator=g)[..., :inner].to(
        dtype
    )  # strided
    past = torch.randn(batch, inner, width - 1, generator=g).to(dtype)
    weight = torch.randn(inner, 1, width, generator=g).to(dtype)
    bias = torch.randn(inner, generator=g).to(dtype)
    past_ref = past.float().clone()
    y_ref = ops.conv_silu_ref(x.float(), past_ref, weight.float(), bias.float())
    past_dev = past.to(DEVICE)
    y = tk.conv_silu(x.to(DEVICE), past_dev, weight.to(DEVICE), bias.to(DEVICE))
    assert y.dtype == dtype
    assert relative_error(y.cpu(), y_ref) < REL[dtype]
    assert torch.equal(past_dev.cpu(), past_ref.to(dtype))  # the last W-1 inputs, exactly


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [False, True])
def test_conv_silu_step_matches_reference(dtype: torch.dtype, slots: bool) -> None:
    batch, inner, width = (8, 3000, 4) if GPU else (3, 19, 4)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, inner, generator=g).to(dtype)
    pool = torch.randn(batch + 2, inner, width - 1, generator=g).to(dtype)
    weight = torch.randn(inner, 1, width, generator=g).to(dtype)
    index = torch.randperm(batch + 2, generator=g)[:batch] if slots else torch.arange(batch)
    rows = pool[index].float()
    y_ref = ops.conv_silu_step(x.float(), rows, weight.float(), None)
    expected = pool.clone()
    expected[index] = rows.to(dtype)
    state = pool.to(DEVICE) if slots else pool[:batch].contiguous().to(DEVICE)
    kwargs = {"state_batch_indices": index.to(DEVICE)} if slots else {}
    y = tk.conv_silu_step(x.to(DEVICE), state, weight.to(DEVICE), None, **kwargs)
    assert relative_error(y.cpu(), y_ref) < REL[dtype]
    assert torch.equal(state.cpu(), expected if slots else expected[:batch])


def _experts(tokens: int, d: int, inner: int, num_experts: int, top_k: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    gate = 0.2 * torch.randn(num_experts, inner, d, generator=g)
    up = 0.2 * torch.randn(num_experts, inner, d, generator=g)
    down = 0.2 * torch.randn(num_experts, d, inner, generator=g)
    x = torch.randn(tokens, d, generator=g)
    probs = torch.softmax(torch.randn(tokens, num_experts, generator=g), dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    return x, weights, index, (gate, up, down)


def _moe_reference(x, weights, index, stacks, scales=(None, None, None)) -> torch.Tensor:
    """Each token's experts in turn, in float32: the Experts module's arithmetic, written out."""
    gate, up, down = (
        s.float() if sc is None else ops.dequantize(s, sc, torch.float32)
        for s, sc in zip(stacks, scales, strict=True)
    )
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            h = ops.silu_mul(gate[e] @ x[t].float(), up[e] @ x[t].float())
            out[t] += weights[t, k].float() * (down[e] @ h)
    return out


MOE_SHAPES = (
    [(1, 1536, 3072, 16, 2), (300, 1536, 3072, 16, 2)] if GPU else [(1, 24, 40, 5, 2), (7, 24, 40, 5, 2)]
)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", MOE_SHAPES)
def test_fused_moe_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x, weights, index, stacks = _experts(*shape, seed=8)
    x, stacks = x.to(dtype), tuple(s.to(dtype) for s in stacks)
    expected = _moe_reference(x, weights, index, stacks)
    dev = [t.to(DEVICE) for t in (x, weights.to(dtype), index, *stacks)]
    y = tk.experts(*dev)
    assert y.dtype == dtype
    assert (
        relative_error(y.cpu(), expected)
        < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    )


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_int8_weights(dtype: torch.dtype) -> None:
    """ExpertsInt8 (W8A16): int8 stacks and their per-row scales, as quantize.py stores them."""
    x, weights, index, stacks = _experts(*MOE_SHAPES[-1], seed=9)
    quantized = [quantize_rows(s) for s in stacks]
    q, scales = [q for q, _ in quantized], [s for _, s in quantized]
    scales[0][0, 0] = 0.0  # an all-zero row
    q[0][0, 0] = 0
    x = x.to(dtype)
    expected = _moe_reference(x, weights, index, q, scales)
    y = tk.experts(*(t.to(DEVICE) for t in (x, weights.to(dtype), index, *q, *scales)))
    assert relative_error(y.cpu(), expected) < REL[dtype]


def test_align_sorts_by_expert_in_padded_blocks() -> None:
    index = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 0]])
    sorted_ids, block_expert = moe.align(index, num_experts=5, block_m=4)
    flat = index.reshape(-1)
    real = sorted_ids[sorted_ids < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every assignment once
    for block, e in enumerate(block_expert.tolist()):
        ids = sorted_ids[4 * block : 4 * block + 4]
        ids = ids[ids < flat.numel()]
        assert e == 5 or (flat[ids] == e).all()  # one expert per block; 5: past the last run
    assert (block_expert < 5).sum() == 4  # experts 0 (3 rows), 1, 2, 3 (3 rows): one block each


@torch.no_grad()
def test_model_with_triton_kernels_matches_reference() -> None:
    """A whole MoE hybrid through the triton table: a prompt, then decoding steps, against the reference."""
    config = dict(
        PARITY_CONFIGS["moe-gqa-untied"], hidden_size=12, intermediate_size=20, mamba_expand=1, mamba_d_state=4,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    triton_model = random_model(config, kernels=tk.kernels("test")).to(DEVICE)
    reference_model = random_model(config, kernels="reference")
    ids = torch.randint(0, config["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    expected = reference_model(ids).logits
    cache = triton_model.make_cache(batch_size=2)
    steps = [triton_model(ids[:, :7].to(DEVICE), cache=cache).logits]
    steps += [triton_model(ids[:, t : t + 1].to(DEVICE), cache=cache).logits for t in range(7, 10)]
    assert relative_error(torch.cat(steps, dim=1).cpu(), expected) < 1e-5


def test_triton_kernels_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA devices only, not on cpu"):
        resolve_kernels("triton", device="cpu")
    chosen = resolve_kernels("auto", device="cuda")  # resolving needs no GPU
    assert isinstance(chosen, Kernels) and chosen.name == "triton"
    assert "triton is installed" in chosen.why
    assert chosen.experts is moe.experts and chosen.selective_scan is scan.selective_scan
    assert chosen.selective_state_update is state_update.selective_state_update


def test_without_triton_auto_picks_torch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyjamba.kernels as kernels_module

    monkeypatch.setattr(kernels_module, "triton_unavailable", lambda: "triton is not importable (test)")
    chosen = resolve_kernels("auto", device="cuda")
    assert chosen.name == "torch" and "triton is not importable (test)" in chosen.why
    with pytest.raises(RuntimeError, match="kernels='triton' is unavailable"):
        resolve_kernels("triton", device="cuda")
