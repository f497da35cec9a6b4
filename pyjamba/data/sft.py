"""Supervised fine-tuning data: chat conversations rendered with the tokenizer's chat template,
with a loss only on what the assistant says.

Input is JSON lines, one conversation a line: `{"messages": [{"role": ..., "content": ...}, ...]}`.
Each conversation is rendered once with `Tokenizer.apply_chat_template` (the string transformers
renders) and tokenized with offsets. The assistant's turns are found without reading the template:
turn i spans the characters between the rendering of messages[:i] with the generation prompt and
the rendering of messages[:i+1]; the tokens that overlap those characters are the assistant's. Where
the span ends in a special token (ChatML's `<|im_end|>`) followed only by whitespace, the whitespace
is template layout and is left out: the model learns to say its end-of-turn token and stop.

Batches follow `pyjamba.data.dataset`'s convention: `labels[b, t]` is the target of position t
(already shifted), -100 except where the next token is the assistant's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pyjamba.data.dataset import IGNORE_INDEX
from pyjamba.data.files import DataError
from pyjamba.tokenizer import Tokenizer, TokenizerError

__all__ = ["ROLES", "SFTDataset", "encode_conversation", "read_conversations", "sft_collate"]

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


def read_conversations(path: str | os.PathLike, roles: Sequence[str] = ROLES) -> list[list[dict[str, str]]]:
    """The conversations of a JSON-lines file (blank lines skipped); DataError names the line of
    any malformed one."""
    return [messages for _, messages in _read_numbered(Path(path), roles)]


def _read_numbered(path: Path, roles: Sequence[str]) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for every non-blank line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read: {e}") from e
    conversations = [
        (number, _conversation(line, f"{path}:{number}", roles))
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not conversations:
        raise DataError(f"{path}: no conversations")
    return conversations


def _conversation(line: str, where: str, roles: Sequence[str]) -> list[dict[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON (column {e.colno}: {e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f'{where}: expected an object {{"messages": [...]}}')
    messages = record["messages"]
    if not messages:
        raise DataError(f"{where}: messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] is a {type(message).__name__}, expected an object")
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise DataError(f"{where}: messages[{i}] has role {role!r}, expected one of {', '.join(roles)}")
        if not isinstance(content, str):
            what = "has no 'content'" if content is None else f"'content' is a {type(content).__name__}"
            raise DataError(f"{where}: messages[{i}] ({role}) {what}, expected a string")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: messages[0] is the assistant's; a conversation opens with system or user")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, nothing to learn from")
    return out


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], chat_template: str | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is the assistant's.

    Raises DataError when the template does not render each conversation prefix as a prefix of the
    whole (a template that rewrites earlier turns), as the spans cannot then be found this way.
    """

    def render(part: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            part, add_generation_prompt=generation_prompt, chat_template=chat_template
        )

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("messages[0] is the assistant's; a conversation opens with system or user")
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(start) and text.startswith(end) and len(start) < len(end)):
            raise DataError(
                f"messages[{i}]: the chat template does not render the conversation up to this turn as a "
                "prefix of the whole, so the assistant's tokens cannot be found by rendering prefixes"
            )
        spans.append((len(start), len(end)))

    # pyjamba's Tokenizer has no public offsets yet; its backend is the tokenizers object it encodes with.
    encoding = tokenizer._backend.encode(text, add_special_tokens=False)
    ids, offsets = encoding.ids, encoding.offsets
    special = tokenizer.special_ids
    mask = [False] * len(ids)
    for first_char, end_char in spans:
        inside = [t for t, (a, b) in enumerate(offsets) if a < end_char and b > first_char and b > a]
        specials = [k for k, t in enumerate(inside) if ids[t] in special]
        if specials:
            last = specials[-1]
            tail = [ids[t] for t in inside[last + 1 :]]
            if not tokenizer.decode(tail, skip_special_tokens=False).strip():
                inside = inside[: last + 1]  # the whitespace after the end-of-turn token is layout
        for t in inside:
            mask[t] = True
    return ids, mask


class SFTDataset(torch.utils.data.Dataset):
    """Conversations from a JSON-lines file, tokenized and masked; items are dicts of int64 tensors
    `input_ids`, `labels` (shifted targets, -100 off the assistant's tokens) and the bool
    `assistant_mask` (per input token). `collate` pads a list of items into a batch.

    Conversations longer than `max_length` tokens are cut to it; one with no assistant token left
    is dropped (`dropped` counts them, with a warning).
    """

    def __init__(
        self,
        jsonl: str | os.PathLike,
        tokenizer: Tokenizer | str | os.PathLike,
        max_length: int,
        chat_template: str | None = None,
        roles: Sequence[str] = ROLES,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if not isinstance(tokenizer, Tokenizer):
            try:
                tokenizer = Tokenizer.from_pretrained(tokenizer)
            except TokenizerError as e:
                raise DataError(str(e)) from e
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError(
                f"{tokenizer.path}: the tokenizer has neither a pad_token nor an eos_token to pad with"
            )
        self.pad_id = pad
        self.items: list[tuple[list[int], list[bool]]] = []
        self.dropped = 0
        path = Path(jsonl)
        for number, messages in _read_numbered(path, roles):
            try:
                ids, mask = encode_conversation(tokenizer, messages, chat_template)
            except (DataError, TokenizerError) as e:
                raise DataError(f"{path}:{number}: {e}") from e
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):  # position 0 is never a target
                self.dropped += 1
                continue
            self.items.append((ids, mask))
        if self.dropped:
            logger.warning(
                "%s: dropped %d conversation(s) with no assistant token in the first %d tokens",
                path,
                self.dropped,
                max_length,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.items[i]
        input_ids = torch.tensor(ids, dtype=torch.long)  # (L,)
        assistant = torch.tensor(mask, dtype=torch.bool)  # (L,)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = torch.where(assistant[1:], input_ids[1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "assistant_mask": assistant}

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest: input_ids with the pad id, labels with -100, attention_mask 0."""
        return sft_collate(items, self.pad_id)


def sft_collate(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, Any]:
    """A batch (B, L) from SFT items of different lengths, right-padded to the longest."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
        "assistant_mask": torch.zeros((len(items), length), dtype=torch.bool),
    }
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][b, :n] = item["input_ids"]
        batch["labels"][b, :n] = item["labels"]
        batch["attention_mask"][b, :n] = 1
        batch["assistant_mask"][b, :n] = item["assistant_mask"]
    return batch
