"""The slot pool against the model run on each sequence alone: chunked prefill, then decode steps of
slots at different lengths, in contiguous and scattered row orders, on every parity architecture."""

from __future__ import annotations

import functools

import pytest
import torch

from pyjamba.serve.slots import SlotPool
from pyjamba.testing import PARITY_CONFIGS, random_model

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _model(name: str):
    return random_model(PARITY_CONFIGS[name])


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
@torch.no_grad()
def test_slot_batches_give_each_sequence_its_logits_alone(name):
    model = _model(name)
    g = torch.Generator().manual_seed(0)
    lengths = (5, 9, 1, 7, 9)
    prompts = [torch.randint(3, 97, (n,), generator=g) for n in lengths]
    continuations = [torch.randint(3, 97, (6,), generator=g) for _ in prompts]
    expected = []
    for prompt, cont in zip(prompts, continuations, strict=True):
        full = torch.cat([prompt, cont])[None]
        expected.append(model(full).logits[0, len(prompt) - 1 : -1])  # (6, V)

    pool = SlotPool(model.config, slots=6, capacity=4)  # capacity 4: the prompts make it grow
    for _ in range(6):
        pool.acquire()
    slot_of = [4, 1, 3, 0, 2]  # sequence k lives in slot_of[k]
    pool.release(5)
    got = [[] for _ in prompts]
    for k, prompt in enumerate(prompts):
        for start in range(0, len(prompt), 3):  # chunked prefill, 3 tokens a call
            chunk = prompt[start : start + 3][None]
            batch = pool.batch([slot_of[k]])
            logits = model(chunk, attention_mask=batch.attention_mask(chunk.shape[1]), cache=batch).logits
            batch.commit()
        got[k].append(logits[0, -1])
    schedule = [
        [1, 4],  # slots 1, 2 at the same length: views, no mask
        [2, 0, 3, 1, 4],  # scattered slots: gathered states, padded keys
        [3, 1],  # slots 0, 1 at different lengths: views, padded keys
        [0, 1, 2, 3, 4],
        [3, 1, 4, 2, 0],  # slots 0-4 in order
    ]
    for rows in schedule:
        batch = pool.batch([slot_of[k] for k in rows])
        tokens = torch.stack([continuations[k][len(got[k]) - 1] for k in rows])[:, None]
        logits = model(tokens, attention_mask=batch.attention_mask(1), cache=batch).logits
        batch.commit()
        for row, k in enumerate(rows):
            got[k].append(logits[row, -1])
    for k in range(len(prompts)):
        n = len(got[k])
        assert pool.lengths[slot_of[k]] == len(prompts[k]) + n - 1
        torch.testing.assert_close(torch.stack(got[k]), expected[k][:n], rtol=1e-4, atol=1e-5)


def test_pool_grows_for_long_sequences_and_shrinks_once_empty():
    model = _model("jamba-pattern-8")
    pool = SlotPool(model.config, slots=2, capacity=8)
    start_bytes = pool.nbytes()
    a, b = pool.acquire(), pool.acquire()
    assert (a, b) == (0, 1) and pool.in_use == 2
    with pytest.raises(RuntimeError, match="no free slot"):
        pool.acquire()
    pool.reserve(20)
    assert pool.capacity == 20  # more than double: exactly what is needed
    pool.reserve(21)
    assert pool.capacity == 40
    assert pool.nbytes() > start_bytes
    pool.release(a)
    assert pool.capacity == 40  # one slot still busy
    pool.release(b)
    assert pool.capacity == 8 and pool.nbytes() == start_bytes
    with pytest.raises(ValueError, match="not in use"):
        pool.release(b)


@torch.no_grad()
def test_acquire_empties_the_slot_it_hands_out():
    model = _model("jamba-pattern-8")
    pool = SlotPool(model.config, slots=2, capacity=8)
    slot = pool.acquire()
    batch = pool.batch([slot])
    model(torch.tensor([[5, 6, 7]]), cache=batch)
    batch.commit()
    assert pool.lengths[slot] == 3
    assert any(state[slot].abs().sum() > 0 for state in pool.ssm_states.values())
    pool.release(slot)
    assert pool.acquire() == slot
    assert pool.lengths[slot] == 0
    assert all(state[slot].abs().sum() == 0 for state in pool.ssm_states.values())
    assert all(state[slot].abs().sum() == 0 for state in pool.conv_states.values())
