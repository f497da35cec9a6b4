"""Tokenizing a text corpus into memory-mapped token arrays, with document boundaries and a
train/validation split.

The output folder (written atomically):
- `train.bin`, `val.bin`: every document's ids, `[BOS] text [EOS]`, one after another, as raw
  little-endian `uint16` (vocabularies up to 65536 ids) or `uint32`; `numpy.memmap` reads them;
- `train.docs.npy`, `val.docs.npy`: int64 start offset of each document in its `.bin`;
- `meta.json`: dtype, token and document counts, vocabulary size, the special ids, the tokenizer's
  path and hash, and each source file with its sha256 and which of its documents went to validation.

Whole documents go to one split. The choice is seeded and depends on the text alone: documents are
ranked by sha256(seed, text) and the first `round(val_fraction * documents)` go to validation, so
the split does not move when files are renamed or reordered, and identical documents share a side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pyjamba.data.bpe import tokenizer_hash
from pyjamba.data.files import DataError, atomic_folder, sha256_file, text_files
from pyjamba.tokenizer import Tokenizer, TokenizerError

__all__ = ["DOC_SPLITS", "META_FILE", "split_documents", "token_dtype", "tokenize_corpus"]

META_FILE = "meta.json"
FORMAT = "pyjamba-tokens/1"
DOC_SPLITS = ("blank", "line", "file")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_BATCH_CHARS = 1 << 20  # characters per encode_batch call: big enough for its threads, bounded in memory


def split_documents(text: str, doc_split: str = "blank") -> list[str]:
    """The documents of a text: blocks between blank lines ('blank': the chapters of data/austen),
    non-empty lines ('line'), or the whole text ('file'). Each is stripped; empty ones are dropped.
    """
    if doc_split == "blank":
        parts = _BLANK_LINES.split(text.replace("\r\n", "\n"))
    elif doc_split == "line":
        parts = text.splitlines()
    elif doc_split == "file":
        parts = [text]
    else:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {doc_split!r}")
    return [part.strip() for part in parts if part.strip()]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from e


def _rank_key(seed: int, document: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{document}".encode()).digest()


def _batches(files: Sequence[Path], doc_split: str) -> Iterator[list[tuple[int, int, str]]]:
    """(file index, document index, text) in reading order, grouped to about _BATCH_CHARS."""
    batch: list[tuple[int, int, str]] = []
    chars = 0
    for f, path in enumerate(files):
        for d, document in enumerate(split_documents(_read(path), doc_split)):
            batch.append((f, d, document))
            chars += len(document)
            if chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def tokenize_corpus(
    files_or_dirs: Sequence[str | os.PathLike],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.05,
    seed: int = 0,
    doc_split: str = "blank",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text files (folders: their `*.txt`, sorted) into `out_dir`; returns its meta.json.

    Every document becomes `[BOS] ids [EOS]`; `val_fraction` of the documents (at least one when
    positive) go to `val.bin`, the rest to `train.bin`.
    """
    if doc_split not in DOC_SPLITS:
        raise DataError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {doc_split!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = text_files(files_or_dirs)
    try:
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    except TokenizerError as e:
        raise DataError(str(e)) from e
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None:
        raise DataError(
            f"{tokenizer_dir}: the tokenizer needs a bos_token and an eos_token to mark documents"
        )
    dtype = token_dtype(tokenizer.vocab_size)

    # Pass 1: rank every document to choose the validation ones, holding only hashes.
    keys = [
        (_rank_key(seed, document), f, d)
        for f, path in enumerate(files)
        for d, document in enumerate(split_documents(_read(path), doc_split))
    ]
    total = len(keys)
    if total == 0:
        raise DataError(f"no documents in {', '.join(map(str, files))} (doc_split={doc_split!r})")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * total))
    if n_val >= total:
        raise DataError(
            f"{total} document(s) cannot be split with val_fraction={val_fraction}: none would be left to "
            "train on (use doc_split='blank' or 'line' for more documents, or val_fraction=0)"
        )
    val = {(f, d) for _, f, d in sorted(keys)[:n_val]}

    # Pass 2: encode in batches and append each document to its split.
    out = Path(out_dir)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    starts: dict[str, list[int]] = {"train": [], "val": []}
    with atomic_folder(out) as tmp:
        with contextlib.ExitStack() as stack:
            sinks = {split: stack.enter_context(open(tmp / f"{split}.bin", "wb")) for split in counts}
            bar = stack.enter_context(tqdm(total=total, unit="doc", desc="tokenize", disable=not progress))
            for batch in _batches(files, doc_split):
                encoded = tokenizer.encode_batch([text for _, _, text in batch], add_special_tokens=False)
                for (f, d, _), ids in zip(batch, encoded, strict=True):
                    split = "val" if (f, d) in val else "train"
                    tokens = np.array([bos, *ids, eos], dtype=dtype)
                    starts[split].append(counts[split][0])
                    counts[split][0] += len(tokens)
                    counts[split][1] += 1
                    tokens.tofile(sinks[split])
                bar.update(len(batch))
        if sum(c[1] for c in counts.values()) != total:
            raise DataError("the input files changed while they were being tokenized")
        for split in ("train", "val"):
            np.save(tmp / f"{split}.docs.npy", np.array(starts[split], dtype=np.int64))
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "tokenizer": {"path": str(tokenizer_dir), "sha256": tokenizer_hash(tokenizer_dir)},
            "doc_split": doc_split,
            "val_fraction": val_fraction,
            "seed": seed,
            "splits": {
                split: {"tokens": tokens, "documents": documents}
                for split, (tokens, documents) in counts.items()
            },
            "sources": [
                {
                    "path": str(path),
                    "sha256": sha256_file(path),
                    "documents": sum(1 for _, f, _ in keys if f == i),
                    "val_documents": sorted(d for f, d in val if f == i),
                }
                for i, path in enumerate(files)
            ],
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
