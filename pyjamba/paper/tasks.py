"""Synthetic recall tasks: multi-query associative recall (MQAR) and a needle in a haystack.

Token ids (the vocabulary must hold at least 256):

    0            padding (never produced here; kept free as pad_token_id)
    1            the needle's marker
    4 .. 131     keys (MQAR) and the haystack's filler
    132 .. 255   values

MQAR (Zoology, Arora et al. 2023): n distinct keys each followed by its value, then the same n keys
again in a shuffled order, each followed by its value; the model must predict every value of the
second half from the key just before it, so it must recall which value followed that key earlier.
`k1 v1 k2 v2 ... kn vn | kp vp kq vq ...`, length 4n; labelled positions: the values of the second half.

Needle: `length` tokens of random filler with the marker and a random value placed at a random
position, ending with the marker again; the model must predict the value that followed it.
Labelled position: the last token.

Labels follow the model's convention: labels[:, t] is the token predicted from position t - 1,
-100 where nothing is scored.
"""

from __future__ import annotations

import torch

__all__ = ["MARKER", "MIN_VOCAB", "mqar", "needle"]

MARKER = 1
KEYS = range(4, 132)
VALUES = range(132, 256)
MIN_VOCAB = 256
IGNORE = -100


def _values(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(VALUES.start, VALUES.stop, shape, generator=g)


def mqar(batch: int, pairs: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (batch, 4 * pairs)."""
    if not 1 <= pairs <= len(KEYS):
        raise ValueError(f"pairs must be in [1, {len(KEYS)}], got {pairs}")
    keys = torch.argsort(torch.rand(batch, len(KEYS), generator=g), dim=1)[:, :pairs] + KEYS.start
    values = _values((batch, pairs), g)
    order = torch.argsort(torch.rand(batch, pairs, generator=g), dim=1)
    first = torch.stack([keys, values], dim=2).reshape(batch, 2 * pairs)  # k1 v1 k2 v2 ...
    second = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).reshape(batch, 2 * pairs)
    ids = torch.cat([first, second], dim=1)  # (B, 4n)
    labels = torch.full_like(ids, IGNORE)
    labels[:, 2 * pairs + 1 :: 2] = ids[:, 2 * pairs + 1 :: 2]  # the values of the second half
    return ids, labels


def needle(batch: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (batch, length); length >= 5."""
    if length < 5:
        raise ValueError(f"a needle sequence needs at least 5 tokens, got {length}")
    ids = torch.randint(KEYS.start, KEYS.stop, (batch, length), generator=g)
    where = torch.randint(0, length - 3, (batch,), generator=g)  # the needle: ids[where], ids[where + 1]
    value = _values((batch,), g)
    rows = torch.arange(batch)
    ids[rows, where] = MARKER
    ids[rows, where + 1] = value
    ids[:, -2] = MARKER
    ids[:, -1] = value
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = value
    return ids, labels
