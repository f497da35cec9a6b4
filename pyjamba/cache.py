"""Inference state of a hybrid model: attention keys/values, and each Mamba layer's conv and SSM state.

Attention layers keep every past key and value, so their cache grows with the context; a Mamba
layer keeps a fixed-size state per sequence whatever the context: the last W-1 conv inputs and the
(ED, N) SSM state. Buffers are preallocated for `max_length` tokens and grow (doubling) past it.

All sequences of a batch share one length: a batch of different prompts is left-padded, and the
padding is masked through the `attention_mask` passed with every forward call.
"""

from __future__ import annotations

import torch

from .config import JambaConfig

__all__ = ["HybridCache"]


class HybridCache:
    """Per-layer inference state for a batch of `batch_size` sequences.

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
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv_states: dict[int, torch.Tensor] = {}
        self.ssm_states: dict[int, torch.Tensor] = {}
        # The SSM state accumulates over the whole context: float32 at least, float64 for a float64 model.
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        kv_shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)  # (B, Hkv, S, Dh)
        for i, kind in enumerate(config.layer_types):
            if kind == "attention":
                self.keys[i] = torch.zeros(kv_shape, dtype=dtype, device=self.device)
                self.values[i] = torch.zeros(kv_shape, dtype=dtype, device=self.device)
            else:
                inner, width = config.mamba_inner, config.mamba_d_conv
                self.conv_states[i] = torch.zeros(
                    batch_size, inner, width - 1, dtype=dtype, device=self.device
                )
                self.ssm_states[i] = torch.zeros(
                    batch_size, inner, config.mamba_d_state, dtype=ssm_dtype, device=self.device
                )

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

    def reset(self) -> None:
        """Forget every sequence: length 0, states zeroed."""
        self.length = 0
        for store in (self.conv_states, self.ssm_states):
            for state in store.values():
                state.zero_()

    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (attention buffers at their current capacity)."""
        stores = (self.keys, self.values, self.conv_states, self.ssm_states)
        return sum(t.numel() * t.element_size() for store in stores for t in store.values())
