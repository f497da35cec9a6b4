"""State passing: each Mamba layer starts a training chunk from the state the previous chunk ended with.

Jamba trains on long documents split into consecutive chunks; carrying every Mamba layer's conv and
SSM state from one chunk to the next teaches the state to stay useful past the training length.
`MambaCarry` is a cache the model accepts in place of `HybridCache`: it holds only the Mamba states
(attention sees the current chunk alone, as it has no positional state to carry), and between
chunks the trainer detaches it (gradients stop at the chunk boundary: truncated backpropagation
through time) and zeroes the streams that start a new document.
"""

from __future__ import annotations

import torch

from ..config import JambaConfig

__all__ = ["MambaCarry"]


class MambaCarry:
    """The Mamba conv and SSM states of `batch_size` streams, carried across training chunks.

    It implements the part of `HybridCache`'s interface the model uses: `length` stays 0 (attention
    has no past), `update_kv` returns the chunk's own keys and values, `advance` keeps no count.
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
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        inner, width, n = config.mamba_inner, config.mamba_d_conv, config.mamba_d_state
        mamba = [i for i, kind in enumerate(config.layer_types) if kind == "mamba"]
        self.conv_states = {
            i: torch.zeros(batch_size, inner, width - 1, dtype=dtype, device=device) for i in mamba
        }
        self.ssm_states = {
            i: torch.zeros(batch_size, inner, n, dtype=ssm_dtype, device=device) for i in mamba
        }

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
