"""Inference state of a hybrid model: attention keys/values, and each Mamba layer's conv and SSM state.

Attention layers keep every past key and value, so their cache grows with the context; a Mamba
layer keeps a fixed-size state per sequence whatever the context: the last W-1 conv inputs and the
(ED, N) SSM state.

`InferenceCache` declares what a forward call of the model uses of such a state. Three classes
implement it:

- `HybridCache` (here): generation. Buffers are preallocated for `max_length` tokens and grow
  (doubling) past it. All sequences of a batch share one length: a batch of different prompts is
  left-padded, and the padding is masked through the `attention_mask` passed with every forward call.
- `SlotBatch` (serve/slots.py): some slots of the serving pool, each sequence at its own length.
- `MambaCarry` (train/state_passing.py): Mamba states only, carried from one training chunk to the next.

`mamba_states` allocates the Mamba states for all three, and `ssm_state_dtype` is the one rule for the
SSM state's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from .config import JambaConfig

__all__ = ["HybridCache", "InferenceCache", "mamba_states", "ssm_state_dtype"]


@runtime_checkable
class InferenceCache(Protocol):
    """What the model uses of its inference state: `model(input_ids, cache=cache)`.

    B is `batch_size`, ED the Mamba inner width (`config.mamba_inner`), W the conv width
    (`config.mamba_d_conv`), N the SSM state size (`config.mamba_d_state`), Hkv and Dh the attention
    key/value heads and head size. The model changes the state tensors in place and never replaces an
    entry of `conv_states` or `ssm_states`. (`isinstance` checks only that the members exist.)
    """

    @property
    def length(self) -> int:
        """Tokens already in the cache (the past): the new tokens of a call sit at positions
        [length, length + L). 0 means no past; with a past, a single new token per sequence takes
        the Mamba one-step update."""
        ...

    @property
    def batch_size(self) -> int:
        """Sequences B held; a forward call must bring B rows."""
        ...

    @property
    def conv_states(self) -> Mapping[int, torch.Tensor]:
        """Per Mamba layer index: the last W-1 conv inputs (B, ED, W-1) in the model's dtype
        (zeros: no past), updated in place."""
        ...

    @property
    def ssm_states(self) -> Mapping[int, torch.Tensor]:
        """Per Mamba layer index: the SSM state (B, ED, N) in `ssm_state_dtype(model dtype)`, updated
        in place."""
        ...

    def update_kv(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store attention layer `layer`'s L new keys and values (B, Hkv, L, Dh) after the past ones;
        return every key and value it attends to, (B, Hkv, length + L, Dh)."""
        ...

    def advance(self, n_tokens: int) -> None:
        """Count `n_tokens` more as seen; called once per forward, after every layer has run."""
        ...


def ssm_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state's dtype for a model in `dtype`: the state accumulates over the whole context,
    so float32 at least (for float32, bfloat16, float16), float64 for a float64 model."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mamba_states(
    config: JambaConfig, batch_size: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Zero Mamba states for `batch_size` sequences, keyed by Mamba layer index (attention layers
    have none): conv states (B, ED, W-1) in `dtype`, SSM states (B, ED, N) in `ssm_state_dtype(dtype)`."""
    inner, width, n = config.mamba_inner, config.mamba_d_conv, config.mamba_d_state
    ssm_dtype = ssm_state_dtype(dtype)
    mamba = [i for i, kind in enumerate(config.layer_types) if kind == "mamba"]
    conv = {i: torch.zeros(batch_size, inner, width - 1, dtype=dtype, device=device) for i in mamba}
    ssm = {i: torch.zeros(batch_size, inner, n, dtype=ssm_dtype, device=device) for i in mamba}
    return conv, ssm


class HybridCache:
    """Per-layer inference state for a batch of `batch_size` sequences (an `InferenceCache`).

    `length` counts the tokens already seen; a forward call writes its L new positions at
    [length, length + L) in every attention layer, then `advance(L)` moves the count on once.
    """

    def __init__(
        self,
        config: JambaConfig,
        batch_size: int,
        max_length: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.capacity = max_length
        kv_shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)  # (B, Hkv, S, Dh)
        attention = [i for i, kind in enumerate(config.layer_types) if kind == "attention"]
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=self.device) for i in attention}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=self.device) for i in attention}
        self.conv_states, self.ssm_states = mamba_states(config, batch_size, dtype, self.device)

    def update_kv(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store L new keys/values (B, Hkv, L, Dh) after the past ones; return all (B, Hkv, length+L, Dh)."""
        end = self.length + key.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Count n_tokens more as seen (called once per forward, after every layer has written)."""
        self.length += n_tokens

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[layer] = new
        self.capacity = capacity
