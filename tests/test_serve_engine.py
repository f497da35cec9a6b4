"""The engine against `generate`: concurrent sequences (more than the slots, chunked prefill) get the
tokens each gets alone, greedy and seeded; prompt logprobs; cancellation; the bounded queue; failure."""

from __future__ import annotations

import functools
import itertools
import queue

import pytest
import torch

from pyjamba.generate import generate
from pyjamba.serve.engine import (
    Engine,
    EngineUnavailable,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    Sequence,
    Token,
)
from pyjamba.serve.sampling import SamplingParams
from pyjamba.testing import PARITY_CONFIGS, random_model

TIMEOUT = 60


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _model():
    return random_model(PARITY_CONFIGS["jamba-pattern-8"])  # eos 2 and 5


@pytest.fixture
def engine():
    engines = []

    def make(**kwargs) -> Engine:
        e = Engine(_model(), **kwargs)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop(TIMEOUT)


def _sequence(prompt: list[int], max_tokens: int, **kwargs) -> tuple[Sequence, queue.Queue]:
    events: queue.Queue = queue.Queue()
    params = SamplingParams(**kwargs.pop("params", {}))
    eos = frozenset(_model().config.eos_token_ids)
    return Sequence(prompt, max_tokens, params, events.put, stop_tokens=eos, **kwargs), events


def _drain(events: queue.Queue) -> tuple[list[Token], list, object]:
    """Tokens, prompt-logprob entries and the last event of a finished sequence."""
    tokens, prompt = [], []
    while True:
        event = events.get(timeout=TIMEOUT)
        if isinstance(event, Token):
            tokens.append(event)
        elif isinstance(event, PromptLogprobs):
            prompt += event.entries
        else:
            return tokens, prompt, event


def _generate_alone(prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    out = generate(_model(), torch.tensor([prompt]), max_new_tokens=max_tokens, **kwargs)[0, len(prompt) :]
    tokens = []
    for t in out.tolist():  # generate pads after EOS; the engine stops there
        tokens.append(t)
        if t in _model().config.eos_token_ids:
            break
    return tokens


def test_concurrent_sequences_get_the_tokens_each_gets_alone(engine):
    # 8 sequences on 4 slots (half wait), prompts longer than the prefill chunk: every sequence joins a
    # running batch between steps, and its tokens must equal generate()'s on it alone.
    e = engine(slots=4, prefill_chunk=3, max_queue=16)
    g = torch.Generator().manual_seed(0)
    settings = [
        {},
        {"params": {"temperature": 0.8, "seed": 1}, "do_sample": True, "temperature": 0.8, "seed": 1},
        {"params": {"temperature": 0.0, "repetition_penalty": 1.3}, "repetition_penalty": 1.3},
        {"params": {"temperature": 1.0, "top_k": 5, "seed": 3}, "do_sample": True, "top_k": 5, "seed": 3},
        {"params": {"temperature": 0.7, "top_p": 0.8, "seed": 4}, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "seed": 4},
        {"params": {"temperature": 1.0, "min_p": 0.05, "seed": 5}, "do_sample": True, "min_p": 0.05, "seed": 5},
        {},
        {"params": {"temperature": 0.0}},
    ]  # fmt: skip
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 7, 11, 4, 6, 1)]
    seqs = []
    pending = []
    for prompt, setting in zip(prompts, settings, strict=True):
        seq, events = _sequence(prompt, 12, params=setting.get("params", {"temperature": 0.0}))
        seqs.append(seq)
        pending.append(events)
    e.submit(seqs)
    for prompt, setting, events in zip(prompts, settings, pending, strict=True):
        tokens, _, last = _drain(events)
        kwargs = {k: v for k, v in setting.items() if k != "params"}
        expected = _generate_alone(prompt, 12, **kwargs)
        assert [t.token for t in tokens] == expected
        assert last == Finished("stop" if expected[-1] in (2, 5) else "length")
    assert e.slots_in_use == 0 and e.queue_length == 0 and e.idle


def test_prompt_and_token_logprobs_are_the_models(engine):
    e = engine(slots=2, prefill_chunk=4)
    model = _model()
    prompt = torch.randint(3, 97, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    seq, events = _sequence(prompt, 3, params={"temperature": 0.0}, logprobs=2, prompt_logprobs=3)
    e.submit([seq])
    tokens, prompt_entries, last = _drain(events)
    assert last == Finished("length") or last == Finished("stop")
    full = torch.tensor([prompt + [t.token for t in tokens]])
    logp = torch.log_softmax(model(full).logits[0].float(), dim=-1)  # (L, V)
    assert prompt_entries[0] is None and len(prompt_entries) == len(prompt)
    for i, entry in enumerate(prompt_entries[1:], start=1):
        assert entry.token == prompt[i]
        assert entry.logprob == pytest.approx(logp[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == torch.topk(logp[i - 1], 3).indices.tolist()
    for j, token in enumerate(tokens):
        row = logp[len(prompt) - 1 + j]
        assert token.logprob.token == token.token == int(row.argmax())
        assert token.logprob.logprob == pytest.approx(row.max().item(), abs=1e-4)
        assert len(token.logprob.top) == 2


def test_max_tokens_zero_scores_the_prompt_only(engine):
    e = engine(slots=1)
    seq, events = _sequence([7, 8, 9], 0, prompt_logprobs=0)
    e.submit([seq])
    tokens, entries, last = _drain(events)
    assert tokens == [] and len(entries) == 3 and last == Finished("length")


def test_logit_bias_forces_a_token(engine):
    e = engine(slots=1)
    seq, events = _sequence([7, 8, 9], 5, params={"temperature": 1.0, "logit_bias": {42: 100.0}, "seed": 0})
    e.submit([seq])
    tokens, _, _ = _drain(events)
    assert [t.token for t in tokens] == [42] * 5


def test_cancel_frees_the_slot_for_the_next_sequence(engine):
    e = engine(slots=1, max_queue=4)
    never_stop = {"temperature": 0.0, "logit_bias": {2: -100.0, 5: -100.0}}
    long, long_events = _sequence([3, 4], 500, params=never_stop)
    short, short_events = _sequence([5, 6], 2, params={"temperature": 0.0})
    e.submit([long, short])
    assert isinstance(long_events.get(timeout=TIMEOUT), Token)
    assert e.queue_length == 1  # the short one waits for the only slot
    e.cancel([long])
    tokens, _, last = _drain(short_events)
    assert len(tokens) <= 2 and isinstance(last, Finished)
    assert e.slots_in_use == 0 and e.idle


def test_the_queue_is_bounded(engine):
    e = engine(slots=1, max_queue=2)
    never_stop = {"temperature": 0.0, "logit_bias": {2: -100.0, 5: -100.0}}
    running, events = _sequence([3, 4], 500, params=never_stop)
    e.submit([running])
    events.get(timeout=TIMEOUT)  # running: the queue is empty again
    waiting = [_sequence([3], 5)[0] for _ in range(2)]
    e.submit(waiting)
    with pytest.raises(QueueFull, match="at most 2"):
        e.submit([_sequence([3], 5)[0]])
    with pytest.raises(ValueError, match="exceeds the context"):
        e.submit([_sequence([3] * 10, e.max_context)[0]])
    e.cancel([running, *waiting])


def test_a_failing_model_step_fails_the_running_sequences_and_the_engine_recovers(engine, monkeypatch):
    e = engine(slots=2)
    model = _model()
    real = model.forward
    fail = {"left": 1}

    def flaky(*args, **kwargs):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    seq, events = _sequence([3, 4], 5)
    e.submit([seq])
    failed = events.get(timeout=TIMEOUT)
    assert isinstance(failed, Failed) and failed.status == 503 and "out of memory" in failed.message
    # Fresh slot state, nothing leaked, and the next request is served as if nothing had happened.
    assert e.alive and e.slots_in_use == 0
    seq, events = _sequence([3, 4], 5, params=dict(temperature=0.0))
    e.submit([seq])
    tokens, _, end = _drain(events)
    assert isinstance(end, Finished)
    assert [t.token for t in tokens] == _generate_alone([3, 4], 5)


def test_a_model_that_keeps_failing_stops_the_engine(engine, monkeypatch):
    e = engine(slots=2, max_model_failures=2)
    model = _model()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "forward", broken)
    first, events = _sequence([3, 4], 5)
    e.submit([first])
    assert "device lost" in events.get(timeout=TIMEOUT).message
    assert e.alive
    second, events = _sequence([3, 4], 5)
    e.submit([second])
    assert isinstance(events.get(timeout=TIMEOUT), Failed)
    e._thread.join(TIMEOUT)
    assert not e.alive and "failed 2 times in a row" in e.error and "device lost" in e.error
    with pytest.raises(EngineUnavailable, match="device lost"):
        e.submit([_sequence([3], 1)[0]])


def test_a_sampler_that_cannot_be_built_fails_its_sequence_alone_without_taking_a_slot(engine):
    e = engine(slots=1)
    bad, bad_events = _sequence([3, 4], 5, params=dict(logit_bias={10**6: 1.0}))  # beyond the vocabulary
    good, good_events = _sequence([3, 4], 3, params=dict(temperature=0.0))
    e.submit([bad, good])
    failed = bad_events.get(timeout=TIMEOUT)
    assert isinstance(failed, Failed) and failed.status == 500 and "logit_bias" in failed.message
    tokens, _, end = _drain(good_events)  # the one slot was not leaked: the next sequence runs
    assert isinstance(end, Finished) and [t.token for t in tokens] == _generate_alone([3, 4], 3)
    assert e.alive and e.slots_in_use == 0 and e.idle


def test_a_failure_while_sampling_fails_that_sequence_and_the_batch_goes_on(engine):
    e = engine(slots=2)
    never_stop = dict(temperature=0.0, logit_bias={2: -100.0, 5: -100.0})
    victim, victim_events = _sequence([3, 4], 30, params=never_stop)
    other, other_events = _sequence([6, 7], 30, params=never_stop)
    e.submit([victim, other])
    assert isinstance(victim_events.get(timeout=TIMEOUT), Token)

    victim.sampler = _Broken(victim.sampler)  # only this sequence's sampler breaks, mid-run
    while True:
        event = victim_events.get(timeout=TIMEOUT)
        if not isinstance(event, Token):
            break
    assert isinstance(event, Failed) and event.status == 500 and "a logits processor broke" in event.message
    tokens, _, end = _drain(other_events)
    assert isinstance(end, Finished) and len(tokens) == 30
    assert e.alive and e.slots_in_use == 0


class _Broken:
    """A sampler whose every call raises."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, logits, allowed=None):
        raise ValueError("a logits processor broke")

    def observe(self, token: int) -> None:
        self.inner.observe(token)


def test_nan_logits_fail_the_sequence_with_a_clear_error(engine, monkeypatch):
    e = engine(slots=2)
    model = _model()
    real = model.forward

    def nan_forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits.fill_(float("nan"))
        return out

    monkeypatch.setattr(model, "forward", nan_forward)
    seq, events = _sequence([3, 4], 5, params=dict(temperature=0.0))
    e.submit([seq])
    failed = events.get(timeout=TIMEOUT)
    assert isinstance(failed, Failed) and "NaN logits" in failed.message
    assert e.alive and e.slots_in_use == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine):
    e = engine(slots=2, prefill_chunk=4)
    events: queue.Queue = queue.Queue()
    never_stop = SamplingParams(temperature=0.0, logit_bias={2: -100.0, 5: -100.0})
    running = Sequence([3, 4], 60, never_stop, lambda ev: events.put(("running", ev)))
    e.submit([running])
    assert isinstance(events.get(timeout=TIMEOUT)[1], Token)
    long_prompt = [(7 * i) % 90 + 3 for i in range(40)]  # 10 chunks of 4
    reading = Sequence(long_prompt, 1, never_stop, lambda ev: events.put(("reading", ev)), prompt_logprobs=0)
    e.submit([reading])
    order = []
    while not (order and order[-1] == ("reading", "Finished")):
        who, event = events.get(timeout=TIMEOUT)
        order.append((who, type(event).__name__))
    chunks = [i for i, item in enumerate(order) if item == ("reading", "PromptLogprobs")]
    assert len(chunks) == 10
    # Between two prefill chunks, the running sequence got a token: its stream never stalled.
    for a, b in itertools.pairwise(chunks):
        assert ("running", "Token") in order[a:b]
    e.cancel([running])


def test_a_failure_gathering_the_slots_is_a_failed_model_step_too(engine):
    e = engine(slots=2)

    def no_memory(slots):
        raise MemoryError("cannot gather the slots")

    e.pool.batch = no_memory  # this pool only: the engine replaces it when it recovers
    seq, events = _sequence([3, 4], 3)
    e.submit([seq])
    failed = events.get(timeout=TIMEOUT)
    assert isinstance(failed, Failed) and failed.status == 503 and "cannot gather" in failed.message
    seq, events = _sequence([3, 4], 3, params=dict(temperature=0.0))
    e.submit([seq])
    tokens, _, end = _drain(events)
    assert isinstance(end, Finished) and [t.token for t in tokens] == _generate_alone([3, 4], 3)
    assert e.alive and e.slots_in_use == 0
