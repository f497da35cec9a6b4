"""What the trainer reads: token arrays (pretraining, with or without state passing) or chat lines (SFT).

`open_source(data_config)` gives an object with the vocabulary and special token ids, a resumable
training loader, a function turning the loader's next item into a `Batch`, and the validation
batches. The loaders themselves live in `pyjamba.data`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import DataError, RandomWindows, SFTDataset, StatefulChunks, TokenDataset, eval_batches
from .config import DataConfig, RecipeError

__all__ = ["Batch", "SFTBatches", "open_source"]


@dataclass
class Batch:
    """One global batch. `labels[b, t]` is the target of position t (already shifted), -100 where none."""

    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor | None = None  # (B, L), SFT's right padding
    reset: torch.Tensor | None = None  # (B,) bool, state passing: the stream starts a new document

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) of every tensor."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return Batch(cut(self.input_ids), cut(self.labels), cut(self.attention_mask), cut(self.reset))


class TokenSource:
    """Pretraining on a folder written by `pyjamba data tokenize`."""

    def __init__(self, config: DataConfig) -> None:
        try:
            self.train = TokenDataset(config.tokens, "train")
            self.val = TokenDataset(config.tokens, "val")
        except DataError as e:
            raise RecipeError(f"data.tokens: {e}") from None
        self.vocab_size: int = self.train.vocab_size
        self.special_ids = _special_ids(self.train.meta)

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size < self.vocab_size:
            raise RecipeError(
                f"the model's vocab_size {vocab_size} is smaller than the data's {self.vocab_size}"
            )

    def train_loader(self, config: DataConfig, seed: int) -> RandomWindows | StatefulChunks:
        if config.state_passing:
            return StatefulChunks(self.train, config.seq_len, config.batch_size, seed=config.seed)
        return RandomWindows(self.train, config.seq_len, config.batch_size, seed=config.seed)

    def next_batch(self, loader: Any) -> Batch:
        item = next(loader)
        if len(item) == 3:
            inputs, labels, reset = item
            return Batch(inputs, labels, None, reset)
        inputs, labels = item
        return Batch(inputs, labels)

    def eval_batches(self, config: DataConfig) -> Iterator[Batch]:
        for inputs, labels in eval_batches(self.val, config.seq_len, config.batch_size):
            yield Batch(inputs, labels)


class SFTBatches:
    """Shuffled batches of an SFT dataset, epoch after epoch, resumable: the position is (epoch, index)."""

    def __init__(self, dataset: SFTDataset, batch_size: int, seed: int = 0) -> None:
        if len(dataset) == 0:
            raise RecipeError("data.sft holds no usable conversation")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch = self.index = 0

    def __iter__(self) -> SFTBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked: list[int] = []
        while len(picked) < self.batch_size:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            take = order[self.index : self.index + self.batch_size - len(picked)]
            picked.extend(int(i) for i in take)
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return self.dataset.collate([self.dataset[i] for i in picked])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "SFTBatches",
            "seed": self.seed,
            "items": len(self.dataset),
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            state.get("kind") != "SFTBatches"
            or state.get("items") != len(self.dataset)
            or state.get("seed") != self.seed
        ):
            raise RecipeError(f"the checkpoint's SFT position {state} does not fit this data and seed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class SFTSource:
    """Supervised fine-tuning on chat lines: loss on the assistant's tokens only."""

    def __init__(self, config: DataConfig) -> None:
        try:
            self.dataset = SFTDataset(config.sft, config.tokenizer, max_length=config.seq_len)
        except (DataError, OSError) as e:
            raise RecipeError(f"data.sft: {e}") from None
        tokenizer = self.dataset.tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.special_ids = {
            k: v
            for k, v in (
                ("bos_token_id", tokenizer.bos_token_id),
                ("eos_token_id", tokenizer.eos_token_id),
                ("pad_token_id", tokenizer.pad_token_id),
            )
            if v is not None
        }
        # The validation conversations: a fixed tenth (at least one), never trained on.
        n = len(self.dataset)
        order = np.random.default_rng([config.seed, 1 << 20]).permutation(n)
        n_val = max(1, n // 10) if n > 1 else 0
        self.val_items = sorted(int(i) for i in order[:n_val])
        held_out = set(self.val_items)
        self.train_items = [i for i in range(n) if i not in held_out]

    def check_vocab(self, vocab_size: int) -> None:
        if vocab_size < self.vocab_size:
            raise RecipeError(
                f"the model's vocab_size {vocab_size} is smaller than the tokenizer's {self.vocab_size}"
            )

    def train_loader(self, config: DataConfig, seed: int) -> SFTBatches:
        return SFTBatches(_Subset(self.dataset, self.train_items), config.batch_size, seed=config.seed)

    def next_batch(self, loader: SFTBatches) -> Batch:
        batch = next(loader)
        return Batch(batch["input_ids"], batch["labels"], batch["attention_mask"], None)

    def eval_batches(self, config: DataConfig) -> Iterator[Batch]:
        for start in range(0, len(self.val_items), config.batch_size):
            items = [self.dataset[i] for i in self.val_items[start : start + config.batch_size]]
            batch = self.dataset.collate(items)
            yield Batch(batch["input_ids"], batch["labels"], batch["attention_mask"], None)


class _Subset:
    """Some items of an SFTDataset, with its collate."""

    def __init__(self, dataset: SFTDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset[self.indices[i]]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.dataset.collate(items)


def open_source(config: DataConfig) -> TokenSource | SFTSource:
    """The data a recipe names."""
    return SFTSource(config) if config.sft else TokenSource(config)


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    return {k: meta[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if meta.get(k) is not None}
