"""The cache interface: its three implementations, the one Mamba state allocation and dtype rule."""

from __future__ import annotations

import inspect

import pytest
import torch

from pyjamba.cache import HybridCache, InferenceCache, mamba_states, ssm_state_dtype
from pyjamba.config import JambaConfig
from pyjamba.serve.slots import SlotPool
from pyjamba.testing import PARITY_CONFIGS
from pyjamba.train.state_passing import MambaCarry

CONFIG = JambaConfig(**PARITY_CONFIGS["moe-gqa-untied"])  # layers: mamba, attention, mamba, attention
MAMBA, ATTENTION = [0, 2], [1, 3]


def _implementations(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    pool = SlotPool(CONFIG, slots=4, capacity=8, dtype=dtype)
    return {
        "HybridCache": HybridCache(CONFIG, 3, max_length=8, dtype=dtype),
        "SlotBatch (range)": pool.batch([0, 1, 2]),
        "SlotBatch (gathered)": pool.batch([2, 0, 3]),
        "MambaCarry": MambaCarry(CONFIG, 3, dtype=dtype),
    }


def test_the_config_has_both_layer_types():
    assert [i for i, k in enumerate(CONFIG.layer_types) if k == "mamba"] == MAMBA
    assert [i for i, k in enumerate(CONFIG.layer_types) if k == "attention"] == ATTENTION


@pytest.mark.parametrize("name", sorted(_implementations()))
def test_each_implementation_is_an_inference_cache(name):
    cache = _implementations()[name]
    assert isinstance(cache, InferenceCache)
    assert cache.length == 0 and cache.batch_size == 3
    assert sorted(cache.conv_states) == sorted(cache.ssm_states) == MAMBA
    for method in ("update_kv", "advance"):  # isinstance checks names only; the parameters too
        declared = inspect.signature(getattr(InferenceCache, method)).parameters
        assert list(inspect.signature(getattr(type(cache), method)).parameters) == list(declared)


def test_what_lacks_a_member_is_not_an_inference_cache():
    assert not isinstance(SlotPool(CONFIG, slots=2), InferenceCache)  # the pool is not; its batches are
    assert not isinstance(object(), InferenceCache)


@pytest.mark.parametrize(
    ("dtype", "ssm"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_ssm_state_dtype_is_float32_at_least(dtype, ssm):
    assert ssm_state_dtype(dtype) == ssm
    conv, states = mamba_states(CONFIG, 2, dtype, "cpu")
    assert all(t.dtype == dtype for t in conv.values())
    assert all(t.dtype == ssm for t in states.values())


def test_mamba_states_are_zeros_per_mamba_layer_only():
    conv, ssm = mamba_states(CONFIG, 5, torch.float32, torch.device("cpu"))
    assert sorted(conv) == sorted(ssm) == MAMBA  # attention layers have no Mamba state
    inner, width, n = CONFIG.mamba_inner, CONFIG.mamba_d_conv, CONFIG.mamba_d_state
    for i in MAMBA:
        assert conv[i].shape == (5, inner, width - 1)  # (B, ED, W-1)
        assert ssm[i].shape == (5, inner, n)  # (B, ED, N)
        assert not conv[i].any() and not ssm[i].any()
    assert len({t.data_ptr() for t in [*conv.values(), *ssm.values()]}) == 2 * len(MAMBA)  # no sharing
    pure = JambaConfig(**PARITY_CONFIGS["pure-mamba-small-conv"])  # W = 2: one past input
    conv, ssm = mamba_states(pure, 1, torch.float32, "cpu")
    assert sorted(conv) == list(range(pure.num_hidden_layers))
    assert conv[0].shape == (1, pure.mamba_inner, 1) and ssm[0].shape == (1, pure.mamba_inner, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_every_implementation_allocates_by_the_one_rule(dtype):
    pool = SlotPool(CONFIG, slots=4, capacity=8, dtype=dtype)
    want_conv, want_ssm = mamba_states(CONFIG, 4, dtype, "cpu")
    for conv, ssm in [(pool.conv_states, pool.ssm_states)] + [
        (c.conv_states, c.ssm_states) for c in _implementations(dtype).values()
    ]:
        for i in MAMBA:
            assert conv[i].dtype == dtype and ssm[i].dtype == ssm_state_dtype(dtype)
            assert conv[i].shape[1:] == want_conv[i].shape[1:] and ssm[i].shape[1:] == want_ssm[i].shape[1:]


def test_hybrid_cache_keys_and_values_per_attention_layer_only():
    cache = HybridCache(CONFIG, 2, max_length=6, dtype=torch.bfloat16)
    assert sorted(cache.keys) == sorted(cache.values) == ATTENTION
    shape = (2, CONFIG.num_key_value_heads, 6, CONFIG.head_dim)  # (B, Hkv, S, Dh)
    assert all(
        t.shape == shape and t.dtype == torch.bfloat16 for t in [*cache.keys.values(), *cache.values.values()]
    )
