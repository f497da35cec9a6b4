"""The fused elementwise kernels for prompts (pyjamba/kernels/numba/elementwise.py) against their PyTorch twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyjamba.kernels import numba_unavailable
from pyjamba.kernels.ops import causal_conv
from pyjamba.testing import relative_error

pytestmark = pytest.mark.skipif(numba_unavailable() is not None, reason="numba is not installed")


@pytest.fixture(scope="module")
def ew():
    from pyjamba.kernels.numba import elementwise

    return elementwise


@pytest.mark.parametrize(
    ("batch", "length", "inner", "width"),
    [(1, 1, 8, 4), (2, 2, 5, 4), (1, 3, 130, 4), (3, 17, 33, 2), (2, 64, 64, 3)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_conv_silu_matches_conv_then_silu(
    ew, batch: int, length: int, inner: int, width: int, bias: bool, strided: bool
) -> None:
    gen = torch.Generator().manual_seed(batch * 1000 + length * 10 + inner)
    both = torch.randn(batch, length, 2 * inner, generator=gen)
    x = both[..., :inner] if strided else both[..., :inner].contiguous()  # in_proj's x half is a strided view
    past = torch.randn(batch, inner, width - 1, generator=gen)
    weight = torch.randn(inner, 1, width, generator=gen)
    b = torch.randn(inner, generator=gen) if bias else None
    want_past = past.double().clone()
    want = F.silu(causal_conv(x.double(), want_past, weight.double(), None if b is None else b.double()))
    got_past = past.clone()
    with torch.no_grad():
        got = ew.conv_silu(x, got_past, weight, b)
    assert got.shape == want.shape and got.is_contiguous()
    assert relative_error(got, want) < 1e-6
    assert torch.equal(got_past, want_past.float())


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 512), (4, 33)])
def test_rms_norm_matches_the_formula(ew, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen) * 3
    weight = torch.randn(shape[-1], generator=gen)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    with torch.no_grad():
        got = ew.rms_norm(x, weight, 1e-6)
        strided = ew.rms_norm(torch.cat([x, x], dim=-1)[..., : shape[-1]], weight, 1e-6)
    assert relative_error(got, want) < 1e-6
    assert relative_error(strided, want) < 1e-6  # rows with a stride (a view)


@pytest.mark.parametrize("shape", [(1, 1), (5, 48), (2, 3, 1024)])
def test_silu_mul_matches_silu_times_up(ew, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    gate, up = torch.randn(*shape, generator=gen) * 4, torch.randn(*shape, generator=gen)
    want = F.silu(gate.double()) * up.double()
    with torch.no_grad():
        got = ew.silu_mul(gate.clone(), up)
        view = ew.silu_mul(
            gate.t() if gate.dim() == 2 else gate.transpose(0, 1),
            up.t() if up.dim() == 2 else up.transpose(0, 1),
        )
    assert relative_error(got, want) < 1e-6
    assert (
        relative_error(view, want.t() if gate.dim() == 2 else want.transpose(0, 1)) < 1e-6
    )  # not contiguous: eager


def test_supported_only_without_autograd(ew) -> None:
    x = torch.randn(2, 3)
    assert not ew.supported(x)  # grad mode is on in tests
    with torch.no_grad():
        assert ew.supported(x)
        assert not ew.supported(x.double())
