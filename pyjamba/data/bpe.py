"""Training a byte-level BPE tokenizer and saving it as a Hugging Face tokenizer folder.

The folder holds `tokenizer.json` (the `tokenizers` model, with a post-processor that puts BOS in
front of every encoded text, as Jamba's does), `tokenizer_config.json` (special tokens, a ChatML
chat template, `model_max_length`) and `special_tokens_map.json`. Both `pyjamba.tokenizer.Tokenizer`
and transformers' `AutoTokenizer` load it and give the same ids (tests/test_data.py holds them to it).

Ids: 0 `<|pad|>`, 1 `<|bos|>`, 2 `<|eos|>`, 3 `<|im_start|>`, 4 `<|im_end|>`, then the 256 byte
symbols, then the merges. Training is deterministic: the same files give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pyjamba.data.files import DataError, atomic_folder, text_files

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "tokenizer_hash", "train_tokenizer"]

logger = logging.getLogger(__name__)

PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START, IM_END)

# ChatML: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`, after one BOS; with tools, Jamba2's
# function calling (chatml.jinja says how). The template writes BOS itself because chat templates are
# encoded without adding special tokens.
CHATML_TEMPLATE = (Path(__file__).parent / "chatml.jinja").read_text(encoding="utf-8")

_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _lines(files: Sequence[Path]) -> Iterator[str]:
    """The files' lines, line ends kept, so that newlines are counted like any other text."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    model_max_length: int = 2048,
    chat_template: str = CHATML_TEMPLATE,
    progress: bool = False,
) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (special tokens and the 256 bytes included) on
    the text `files` (folders: their `*.txt` files) and write the tokenizer folder `out_dir`
    atomically. Returns `out_dir`.

    The vocabulary can come out smaller than `vocab_size` when the text has too few pairs seen
    `min_frequency` times; the log says so.
    """
    paths = text_files(files)
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise DataError(
            f"vocab_size must be at least {minimum} ({len(SPECIAL_TOKENS)} special tokens and 256 bytes), got {vocab_size}"
        )
    if vocab_size > 2**32:
        raise DataError(f"vocab_size must fit in 32 bits, got {vocab_size}")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_lines(paths), trainer)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):  # the trainer puts them first, in order
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[BOS])]
    )
    if tokenizer.get_vocab_size() < vocab_size:
        logger.warning(
            "the text gave %d ids, fewer than the %d asked for", tokenizer.get_vocab_size(), vocab_size
        )

    config = {
        "add_bos_token": True,  # what the post-processor does; transformers 4 reads the flag
        "add_eos_token": False,
        "added_tokens_decoder": {str(ids[t]): _added_token_entry(t) for t in SPECIAL_TOKENS},
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": BOS,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "padding_side": "right",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_map = {
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
    }
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps(special_map, indent=2) + "\n", encoding="utf-8"
        )
    logger.info(
        "trained a %d-id byte-level BPE on %d file(s) into %s", tokenizer.get_vocab_size(), len(paths), out
    )
    return out


def tokenizer_hash(folder: str | os.PathLike) -> str:
    """sha256 over the files that define a tokenizer folder (names and bytes), to tie data to it."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in _FOLDER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
