"""Batches for training and evaluation from a folder written by `tokenize_corpus`.

Every batch is `(input_ids, labels)` of int64 tensors (B, L), and `labels[b, t]` is the target of
position t: the next token, or -100 where there is none (padding past a document's end). The
labels are already shifted, so the loss is `cross_entropy(logits.view(-1, V), labels.view(-1),
ignore_index=-100)` with no further shift (do not pass them to a model that shifts its labels).

- `RandomWindows`: windows of L+1 consecutive tokens across document boundaries (BOS/EOS mark
  them), a seeded permutation of non-overlapping windows per epoch; for training without state.
- `StatefulChunks`: B streams, each walking its documents in consecutive chunks of L, for training
  that carries the Mamba state from one batch to the next; `reset` says which streams begin a new
  document (zero that stream's state first). A chunk never crosses a document boundary.
- `eval_batches`: the validation split in order, each document in chunks of L, every next-token
  target exactly once.

Both iterators are infinite, deterministic for a seed, and resumable: `state_dict()` after any batch
and `load_state_dict()` on a fresh iterator give the same batches as not stopping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyjamba.data.files import DataError
from pyjamba.data.tokenize import FORMAT, META_FILE

__all__ = ["IGNORE_INDEX", "RandomWindows", "StatefulChunks", "TokenDataset", "eval_batches"]

IGNORE_INDEX = -100
SPLITS = ("train", "val")


class TokenDataset:
    """One split of a tokenized corpus: the tokens memory-mapped, the document boundaries in memory."""

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        folder = Path(path)
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: missing; tokenize a corpus with `pyjamba data tokenize`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path}: not valid JSON: {e}") from e
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.path = folder
        self.split = split
        try:
            self.dtype = np.dtype(self.meta["dtype"])
            self.vocab_size: int = self.meta["vocab_size"]
            self.bos_token_id: int = self.meta["bos_token_id"]
            self.eos_token_id: int = self.meta["eos_token_id"]
            self.pad_token_id: int | None = self.meta["pad_token_id"]
            n, documents = self.meta["splits"][split]["tokens"], self.meta["splits"][split]["documents"]
        except KeyError as e:
            raise DataError(f"{meta_path}: no {e.args[0]!r} field") from None
        bin_path = folder / f"{split}.bin"
        if not bin_path.is_file() or bin_path.stat().st_size != n * self.dtype.itemsize:
            raise DataError(f"{bin_path}: missing or not {n} {self.dtype.name} tokens as {META_FILE} says")
        # numpy cannot map an empty file; an empty split is an empty array.
        self.tokens = np.memmap(bin_path, self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
        self.doc_starts = np.load(folder / f"{split}.docs.npy")
        self.doc_ends = np.append(self.doc_starts[1:], n).astype(np.int64)
        if len(self.doc_starts) != documents:
            raise DataError(f"{folder / f'{split}.docs.npy'}: document count disagrees with {META_FILE}")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, {self.split!r}: {len(self)} tokens, {self.num_documents} documents)"

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    def document(self, i: int) -> np.ndarray:
        """Document i's tokens, BOS and EOS included (a view of the memory map)."""
        return self.tokens[self.doc_starts[i] : self.doc_ends[i]]


def _check_state(state: dict[str, Any], expected: dict[str, Any], kind: str) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"{kind} state was saved with {key}={state.get(key)!r}, this one has {value!r}: "
                "resuming would not give the same batches"
            )


class RandomWindows:
    """Random windows of seq_len+1 tokens as (input_ids, labels), each (batch_size, seq_len).

    Epoch e cuts the tokens into non-overlapping windows from a random offset below seq_len and
    visits them in a random order, both drawn from `numpy.random.default_rng([seed, e])`; batches
    run on across epochs. The position is (epoch, windows taken in it).
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        if len(dataset) < seq_len + 1:
            raise DataError(f"{dataset!r} is shorter than one window of {seq_len + 1} tokens")
        self.dataset = dataset
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._plan: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, window order)

    def _epoch_plan(self) -> tuple[int, np.ndarray]:
        if self._plan is None or self._plan[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            n_tokens, length = len(self.dataset), self.seq_len
            offset = int(rng.integers(min(length, n_tokens - length)))
            n_windows = (n_tokens - 1 - offset) // length
            self._plan = (self.epoch, offset, rng.permutation(n_windows))
        return self._plan[1], self._plan[2]

    def windows_per_epoch(self) -> int:
        return len(self._epoch_plan()[1])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts: list[int] = []
        while len(starts) < self.batch_size:
            offset, order = self._epoch_plan()
            take = order[self.index : self.index + self.batch_size - len(starts)]
            starts.extend((offset + take * self.seq_len).tolist())
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        tokens = self.dataset.tokens
        windows = np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, L+1)
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "RandomWindows",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens": len(self.dataset),
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the dataset, seed and seq_len must be the saved ones
        (batch_size may change: the position counts windows)."""
        expected = {
            "kind": "RandomWindows",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "tokens": len(self.dataset),
        }
        _check_state(state, expected, "RandomWindows")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _chunk(
    dataset: TokenDataset, doc: int, pos: int, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of document `doc` from position `pos`: at most seq_len positions, padded."""
    tokens = dataset.document(doc)
    stop = min(pos + seq_len, len(tokens) - 1)  # the last token (EOS) is a target, never an input
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    inputs[: stop - pos] = tokens[pos:stop]
    labels[: stop - pos] = tokens[pos + 1 : stop + 1]
    return inputs, labels


class StatefulChunks:
    """B streams of consecutive chunks for state passing: (input_ids, labels, reset) per batch.

    Row b of consecutive batches continues one document until it ends, then takes the next document
    of the epoch's order (a permutation from `default_rng([seed, epoch])`, or reading order with
    shuffle=False), from a queue shared by all streams, so no stream idles. `reset[b]` is True when
    row b starts a document in this batch: zero its carried state before the forward. A document's
    last chunk is padded (input pad_id, label -100); the stream's next chunk resets.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        if dataset.num_documents == 0:
            raise DataError(f"{dataset!r} has no documents")
        self.dataset = dataset
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = dataset.pad_token_id if dataset.pad_token_id is not None else dataset.eos_token_id
        self.epoch = 0
        self.next = 0  # position in the epoch's order of the next document to hand out
        self.streams = [[-1, 0] for _ in range(batch_size)]  # (document, position) per row; -1: none yet
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            n = self.dataset.num_documents
            order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (self.epoch, order)
        return self._order[1]

    def _take_document(self) -> int:
        order = self._epoch_order()
        doc = int(order[self.next])
        self.next += 1
        if self.next == len(order):
            self.epoch, self.next = self.epoch + 1, 0
        return doc

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = np.empty((self.batch_size, self.seq_len), dtype=np.int64)  # (B, L)
        labels = np.empty((self.batch_size, self.seq_len), dtype=np.int64)  # (B, L)
        reset = np.zeros(self.batch_size, dtype=bool)  # (B,)
        for b, stream in enumerate(self.streams):
            doc, pos = stream
            if doc < 0 or pos >= len(self.dataset.document(doc)) - 1:  # no targets left in it
                doc, pos = self._take_document(), 0
                reset[b] = True
            inputs[b], labels[b] = _chunk(self.dataset, doc, pos, self.seq_len, self.pad_id)
            stream[:] = [doc, pos + self.seq_len]
        return torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(reset)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "StatefulChunks",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "documents": self.dataset.num_documents,
            "tokens": len(self.dataset),
            "epoch": self.epoch,
            "next": self.next,
            "streams": [list(s) for s in self.streams],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; every setting and the dataset must be the saved ones."""
        expected = {
            "kind": "StatefulChunks",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "documents": self.dataset.num_documents,
            "tokens": len(self.dataset),
        }
        _check_state(state, expected, "StatefulChunks")
        self.epoch, self.next = int(state["epoch"]), int(state["next"])
        self.streams = [[int(doc), int(pos)] for doc, pos in state["streams"]]


def eval_batches(
    dataset: TokenDataset, seq_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split in reading order: each document in chunks of seq_len (the last padded, its
    labels -100), batch_size chunks a batch (the last batch may be smaller). Every next-token target
    of every document appears exactly once; each chunk is scored without earlier context.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    pad_id = dataset.pad_token_id if dataset.pad_token_id is not None else dataset.eos_token_id
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for doc in range(dataset.num_documents):
        for pos in range(0, len(dataset.document(doc)) - 1, seq_len):
            rows.append(_chunk(dataset, doc, pos, seq_len, pad_id))
            if len(rows) == batch_size:
                yield (
                    torch.from_numpy(np.stack([r[0] for r in rows])),
                    torch.from_numpy(np.stack([r[1] for r in rows])),
                )
                rows = []
    if rows:
        yield (
            torch.from_numpy(np.stack([r[0] for r in rows])),
            torch.from_numpy(np.stack([r[1] for r in rows])),
        )
