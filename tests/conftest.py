"""Shared test fixtures: a pyjamba model and its transformers twin, on every parity config."""

from __future__ import annotations

import pytest

from pyjamba.testing import PARITY_CONFIGS, random_model, to_transformers


@pytest.fixture(params=sorted(PARITY_CONFIGS))
def parity_pair(request):
    """(name, pyjamba model, transformers model) with the same random weights, float32."""
    pytest.importorskip("transformers")
    model = random_model(PARITY_CONFIGS[request.param])
    return request.param, model, to_transformers(model)
