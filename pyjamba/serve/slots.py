"""The slot pool: inference state for a fixed number of sequences, each at its own length.

`HybridCache` gives its whole batch one length (prompts left-padded together); continuous batching
needs sequences that join and leave between steps, so here every slot has its own length:

- per attention layer, keys and values (slots, Hkv, capacity, Dh), the capacity shared by all slots
  and grown by doubling (shrunk back once every slot is free);
- per Mamba layer, the conv inputs (slots, ED, W-1) and the SSM state (slots, ED, N).

A forward call runs on some slots through a `SlotBatch`, an `InferenceCache` (pyjamba/cache.py:
`length`, `batch_size`, `update_kv`, `conv_states`, `ssm_states`, `advance`), so model.py needs no
change. Slots of different lengths decode together: the keys of each row are gathered up to the
longest row, the new keys go last, and `attention_mask()` hides each row's gap between its own length
and the longest one (padding in the middle, which the model's mask accepts).

A slot's state can also be copied out and back in: `save` copies the keys/values of some positions and
the Mamba states (a `SlotState`, what the prefix cache keeps), `restore` writes such copies into a
slot, and `copy` duplicates one slot into another (the `n` choices of a request share one prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import mamba_states
from ..config import JambaConfig

__all__ = ["SlotBatch", "SlotPool", "SlotState"]


@dataclass(frozen=True)
class SlotState:
    """A copy of part of one slot: the keys and values of positions [start, end) per attention layer,
    (Hkv, end - start, Dh), and the Mamba states after position end - 1: conv (ED, W-1), SSM (ED, N).

    A hybrid's Mamba state has one size whatever `end` is, while the keys and values grow with the
    positions they cover: a copy of a long prefix is mostly keys and values unless it holds only a
    slice of them (`start` > 0) and relies on copies of the earlier positions.
    """

    start: int
    end: int
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    conv_states: dict[int, torch.Tensor]
    ssm_states: dict[int, torch.Tensor]

    @property
    def nbytes(self) -> int:
        stores = (self.keys, self.values, self.conv_states, self.ssm_states)
        return sum(t.numel() * t.element_size() for store in stores for t in store.values())


class SlotPool:
    """State for `slots` sequences; `acquire` a free slot, `release` it when its sequence ends."""

    def __init__(
        self,
        config: JambaConfig,
        slots: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if slots <= 0:
            raise ValueError(f"slots must be positive, got {slots}")
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.config = config
        self.slots = slots
        self.dtype = dtype
        self.device = torch.device(device)
        self.initial_capacity = capacity
        self.capacity = capacity
        self.lengths = [0] * slots
        self._free = list(range(slots))
        attention = [i for i, kind in enumerate(config.layer_types) if kind == "attention"]
        self.keys = {i: self._kv_buffer(capacity) for i in attention}
        self.values = {i: self._kv_buffer(capacity) for i in attention}
        # Per Mamba layer: conv inputs (slots, ED, W-1) and SSM state (slots, ED, N).
        self.conv_states, self.ssm_states = mamba_states(config, slots, dtype, self.device)

    def _kv_buffer(self, capacity: int) -> torch.Tensor:
        shape = (self.slots, self.config.num_key_value_heads, capacity, self.config.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)  # (slots, Hkv, S, Dh)

    @property
    def in_use(self) -> int:
        """How many slots hold a sequence."""
        return self.slots - len(self._free)

    def acquire(self) -> int:
        """The lowest free slot, emptied (length 0, zero states); raises if none is free.

        Lowest first keeps the busy slots packed at the front, so a decoding batch is usually one
        contiguous range that `SlotBatch` can use as views instead of gathered copies.
        """
        if not self._free:
            raise RuntimeError("no free slot")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        for store in (self.conv_states, self.ssm_states):
            for state in store.values():
                state[slot].zero_()
        return slot  # its old keys/values stay: everything past its length is masked

    def release(self, slot: int) -> None:
        """Give a slot back; once every slot is free, the attention buffers shrink to their first size."""
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not in use")
        self._free.append(slot)
        if not self.in_use and self.capacity > self.initial_capacity:
            for store in (self.keys, self.values):
                for layer in store:
                    store[layer] = self._kv_buffer(self.initial_capacity)
            self.capacity = self.initial_capacity

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, as HybridCache grows)."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = self._kv_buffer(capacity)
                new[:, :, : self.capacity] = old
                store[layer] = new
        self.capacity = capacity

    def save(self, slot: int, start: int = 0) -> SlotState:
        """A copy of the slot's keys/values from position `start` to its length, and its Mamba states."""
        end = self.lengths[slot]
        if not 0 <= start <= end <= self.capacity:
            raise ValueError(f"cannot save positions {start}..{end} of slot {slot}")
        return SlotState(
            start=start,
            end=end,
            keys={i: t[slot, :, start:end].clone() for i, t in self.keys.items()},
            values={i: t[slot, :, start:end].clone() for i, t in self.values.items()},
            conv_states={i: t[slot].clone() for i, t in self.conv_states.items()},
            ssm_states={i: t[slot].clone() for i, t in self.ssm_states.items()},
        )

    def restore(self, slot: int, parts: list[SlotState]) -> None:
        """Make the slot what it was when the last of `parts` was saved: `parts` cover positions 0 to
        the last one's end without a gap (their keys/values are written in turn), and the Mamba states
        are the last part's."""
        if not parts:
            raise ValueError("nothing to restore")
        expected = 0
        for part in parts:
            if part.start != expected:
                raise ValueError(f"the saved parts leave a gap at position {expected}")
            expected = part.end
        self.reserve(expected)
        for part in parts:
            for store, saved in ((self.keys, part.keys), (self.values, part.values)):
                for i, t in saved.items():
                    store[i][slot, :, part.start : part.end] = t
        last = parts[-1]
        for store, saved in ((self.conv_states, last.conv_states), (self.ssm_states, last.ssm_states)):
            for i, t in saved.items():
                store[i][slot] = t
        self.lengths[slot] = expected

    def copy(self, source: int, target: int) -> None:
        """Make slot `target` a copy of slot `source` (keys/values up to its length, Mamba states)."""
        length = self.lengths[source]
        for store in (self.keys, self.values):
            for t in store.values():
                t[target, :, :length] = t[source, :, :length]
        for store in (self.conv_states, self.ssm_states):
            for t in store.values():
                t[target] = t[source]
        self.lengths[target] = length

    def batch(self, slots: list[int]) -> SlotBatch:
        """A cache view for one forward call on these slots (in this row order)."""
        return SlotBatch(self, slots)

    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        stores = (self.keys, self.values, self.conv_states, self.ssm_states)
        return sum(t.numel() * t.element_size() for store in stores for t in store.values())


class SlotBatch:
    """The slots of one forward call, an `InferenceCache` of `len(slots)` sequences for the model.

    `length` is the longest row's length (the model's `past`); rows shorter than it need the mask of
    `attention_mask(L)`. Mamba states are views of the pool when the slots are one ascending range,
    gathered copies otherwise (then `commit()` writes them back). Call `commit()` after the forward.
    """

    def __init__(self, pool: SlotPool, slots: list[int]) -> None:
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"a batch needs distinct slots, got {slots}")
        self.pool = pool
        self.slots = list(slots)
        self.batch_size = len(slots)
        self.row_lengths = [pool.lengths[s] for s in slots]
        self.length = max(self.row_lengths)
        self._padded = min(self.row_lengths) != self.length
        start = slots[0]
        self._range = slots == list(range(start, start + len(slots)))
        self._index = torch.tensor(slots, device=pool.device)
        self._advanced = 0
        if self._range:
            rows = slice(start, start + len(slots))
            self.conv_states = {i: t[rows] for i, t in pool.conv_states.items()}
            self.ssm_states = {i: t[rows] for i, t in pool.ssm_states.items()}
        else:
            self.conv_states = {i: t[self._index] for i, t in pool.conv_states.items()}
            self.ssm_states = {i: t[self._index] for i, t in pool.ssm_states.items()}

    def attention_mask(self, new_tokens: int) -> torch.Tensor | None:
        """(B, length + L) 1 for each row's real keys, 0 for its gap; None when all rows share a length."""
        if not self._padded:
            return None
        total = self.length + new_tokens
        position = torch.arange(total, device=self.pool.device)
        lengths = torch.tensor(self.row_lengths, device=self.pool.device)
        keep = (position[None] < lengths[:, None]) | (position[None] >= self.length)  # (B, S)
        return keep.long()

    def update_kv(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store L new keys/values (B, Hkv, L, Dh) after each row's own past; return (B, Hkv, length+L, Dh).

        The returned keys are each row's first `length` positions followed by the new ones: a row
        shorter than `length` has stale positions in between, which `attention_mask` hides.
        """
        new = key.shape[2]
        self.pool.reserve(self.length + new)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        offsets = torch.arange(new, device=key.device)
        if self._range and not self._padded:
            rows = slice(self.slots[0], self.slots[0] + self.batch_size)
            keys[rows, :, self.length : self.length + new] = key
            values[rows, :, self.length : self.length + new] = value
            return keys[rows, :, : self.length + new], values[rows, :, : self.length + new]
        starts = torch.tensor(self.row_lengths, device=key.device)
        positions = starts[:, None] + offsets  # (B, L)
        index = self._index[:, None]  # (B, 1), broadcast against positions
        keys[index, :, positions] = key.transpose(1, 2)  # indexed (B, L, Hkv, Dh)
        values[index, :, positions] = value.transpose(1, 2)
        if not self._padded:
            return keys[self._index, :, : self.length + new], values[self._index, :, : self.length + new]
        past_k, past_v = keys[self._index, :, : self.length], values[self._index, :, : self.length]
        return torch.cat([past_k, key], dim=2), torch.cat([past_v, value], dim=2)  # (B, Hkv, S, Dh)

    def advance(self, n_tokens: int) -> None:
        """Count n_tokens more in every row (the model calls this once per forward)."""
        self._advanced += n_tokens

    def commit(self) -> None:
        """Write gathered Mamba states back to the pool and move each slot's length on."""
        if not self._range:
            for store, states in (
                (self.pool.conv_states, self.conv_states),
                (self.pool.ssm_states, self.ssm_states),
            ):
                for i, state in states.items():
                    store[i].index_copy_(0, self._index, state)
        for slot in self.slots:
            self.pool.lengths[slot] += self._advanced
        self._advanced = 0
