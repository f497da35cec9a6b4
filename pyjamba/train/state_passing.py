"""State passing: each Mamba layer starts a training chunk from the state the previous chunk ended with.

Jamba trains on long documents split into consecutive chunks; carrying every Mamba layer's conv and
SSM state from one chunk to the next teaches the state to stay useful past the training length.
`MambaCarry` is an `InferenceCache` (pyjamba/cache.py) that holds only the Mamba states
(attention sees the current chunk alone, as it has no positional state to carry), and between
chunks the trainer detaches it (gradients stop at the chunk boundary: truncated backpropagation
through time) and zeroes the streams that start a new document.
"""

from __future__ import annotations

import torch

from ..cache import mamba_states
from ..config import JambaConfig

__all__ = ["MambaCarry"]


class MambaCarry:
    """The Mamba conv and SSM states of `batch_size` streams, carried across training chunks.

    As an `InferenceCache`: `length` stays 0 (attention has no past), `update_kv` returns the chunk's
    own keys and values, `advance` keeps no count.
    """

    def __init__(
        self,
        config: JambaConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = batch_size
        self.length = 0
        self.conv_states, self.ssm_states = mamba_states(config, batch_size, dtype, device)

    def update_kv(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention keeps nothing across chunks: the chunk's keys and values are all it attends to."""
        return key, value

    def advance(self, n_tokens: int) -> None:
        """Nothing to count: attention never sees a past chunk, so `length` stays 0."""

    def detach_(self, reset: torch.Tensor | None = None) -> None:
        """Cut the graph at the chunk boundary; zero the streams where `reset` (B,) bool is true."""
        keep = None if reset is None else (~reset.to(torch.bool)).view(-1, 1, 1)
        for store in (self.conv_states, self.ssm_states):
            for i, state in store.items():
                state = state.detach()
                store[i] = state if keep is None else state * keep.to(device=state.device, dtype=state.dtype)
