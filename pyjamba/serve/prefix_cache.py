"""The prefix cache: a hybrid model's state at each block boundary of the prompts it has read, so
that a prompt sharing a prefix with an earlier one (a long system prompt, the document of a chat's
first turn) resumes after that prefix and prefills only the rest.

A transformer's prefix cache keeps keys and values, which can be reused from any position. A Mamba
layer's state cannot be cut back: it is the whole past folded into one (ED, N) tensor, so it can only
be reused exactly where it was taken. The engine therefore saves a sequence's state after every
`block` prompt tokens (block boundaries are prefill chunk boundaries, so saving costs a copy and no
compute), and a new prompt resumes from the longest run of cached blocks it starts with.

An entry is the state after block k of some prompt, keyed by a hash chained block by block (as
vLLM's prefix caching does): hash_k = H(hash_{k-1}, tokens of block k), rooted in the model's
identity, so a key names the whole prefix and nothing is shared across models, dtypes or kernels.
Each entry holds the Mamba states at its boundary (one fixed size per entry) and the keys/values of
its own block only (grows with the block, not with the prefix): a prefix of P tokens is restored
from its P / block entries, whose keys/values together cover positions 0..P. Whole copies would
hold the keys/values of every earlier block again in each entry, so bytes would grow with the square
of the prompt's length. On the shipped model (1 attention layer and 7 Mamba layers, float32) an entry
of 128 tokens is 96 KiB of keys/values plus 200 KiB of Mamba state; a 2K-token prefix is 4.6 MiB in
blocks, where whole copies would take 16 MiB.

The cache is bounded in bytes and evicts the least recently used entry first. Using or adding an
entry refreshes its ancestors after it, so that a prefix's first blocks (shared by more prompts)
outlive its last ones, and a child never outlives its parent on purpose; an entry whose parent is
gone is never used (a lookup stops at the first missing block) and ages out.

Only the engine thread touches the cache; the counters may be read from any thread.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dtypes import available_memory
from ..model import JambaForCausalLM
from .slots import SlotState

__all__ = ["PrefixCache", "default_capacity", "model_namespace"]

logger = logging.getLogger(__name__)

# By default the cache may take this share of the memory available when the server starts, at most
# _DEFAULT_CAP bytes: room for hundreds of long prefixes of a small model, and a bounded cost for a
# large one.
_DEFAULT_SHARE = 8
_DEFAULT_CAP = 2 * 2**30


def default_capacity(device: torch.device | str) -> int:
    """Bytes for the cache on `device`: 1/8 of its memory available now, at most 2 GiB."""
    device = torch.device(device)
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _host_memory()
    return min(available // _DEFAULT_SHARE, _DEFAULT_CAP)


def _host_memory() -> int:
    """Memory available now (MemAvailable), or free pages where there is no /proc/meminfo."""
    return available_memory() or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_namespace(model: JambaForCausalLM) -> bytes:
    """What makes one model's states differ from another's: its config, dtype, device, kernels and a
    sample of its weights (the final norm, which every checkpoint trains)."""
    norm = model.model.final_layernorm.weight.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{norm.dtype}|{norm.device.type}|{model.kernels.name}".encode())
    h.update(norm.float().cpu().numpy().tobytes())
    return h.digest()


@dataclass(frozen=True)
class _Entry:
    state: SlotState  # keys/values of this block's positions, Mamba states at its end
    nbytes: int


class PrefixCache:
    """States after each `block` prompt tokens, at most `capacity` bytes, least recently used out first."""

    def __init__(self, block: int, capacity: int, namespace: bytes = b"") -> None:
        if block < 1:
            raise ValueError(f"the prefix block must be at least 1 token, got {block}")
        if capacity < 0:
            raise ValueError(f"the prefix cache capacity must not be negative, got {capacity}")
        self.block = block
        self.capacity = capacity
        self._root = hashlib.blake2b(namespace + block.to_bytes(8, "little"), digest_size=16).digest()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_saved = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """The chained key of each full block of `tokens`: keys[k] names tokens[: (k + 1) * block]."""
        keys = []
        parent = self._root
        for end in range(self.block, len(tokens) + 1, self.block):
            ids = array.array("q", tokens[end - self.block : end]).tobytes()
            parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
            keys.append(parent)
        return keys

    def lookup(self, keys: Sequence[bytes]) -> list[SlotState]:
        """The saved parts of the longest run of cached blocks at the start of `keys` (positions
        0 .. len(result) * block), to restore in order; [] on a miss. Counts the lookup."""
        parts = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            parts.append(entry.state)
        self._refresh(keys[: len(parts)])
        self.lookups += 1
        if parts:
            self.hits += 1
            self.tokens_saved += parts[-1].end
        return parts

    def insert(self, keys: Sequence[bytes], state: SlotState) -> bool:
        """Keep `state`, the block ending at len(keys) * block, under keys[-1]; keys[:-1] are its
        ancestors, which must be cached (a block cannot be restored without them). Evicts the least
        recently used entries to make room. False if it was not kept (its parent is missing, or it
        does not fit)."""
        if (state.start, state.end) != ((len(keys) - 1) * self.block, len(keys) * self.block):
            raise ValueError(
                f"block {len(keys)} covers positions {(len(keys) - 1) * self.block}.."
                f"{len(keys) * self.block}, not {state.start}..{state.end}"
            )
        key = keys[-1]
        if key in self._entries:
            self._refresh(keys)
            return True
        nbytes = state.nbytes
        ancestors = keys[:-1]
        if nbytes > self.capacity or not all(k in self._entries for k in ancestors):
            return False
        self._refresh(ancestors)  # keep them through the evictions below if anything else can go
        while self.nbytes + nbytes > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1
        if not all(k in self._entries for k in ancestors):
            return False
        self._entries[key] = _Entry(state, nbytes)
        self.nbytes += nbytes
        self._refresh(ancestors)  # after the new entry: a prefix's first blocks go last
        return True

    def _refresh(self, keys: Sequence[bytes]) -> None:
        """Mark these entries used, the first block last (most recently)."""
        for key in reversed(keys):
            if key in self._entries:
                self._entries.move_to_end(key)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        """Counters and sizes, for /health and logs."""
        return {
            "block": self.block,
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "capacity_bytes": self.capacity,
            "lookups": self.lookups,
            "hits": self.hits,
            "tokens_saved": self.tokens_saved,
            "evictions": self.evictions,
        }
