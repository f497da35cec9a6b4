"""Shared test fixtures: a pyjamba model and its transformers twin, on every parity config."""

from __future__ import annotations

import pytest
import torch

from pyjamba.testing import PARITY_CONFIGS, random_model, to_transformers


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
