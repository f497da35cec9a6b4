"""The prefix cache for hybrid state: chained block keys, LRU by bytes, slots saved and restored, and
the engine's results with the cache on equal to the bit those with it off (every kernel backend,
greedy and seeded, prompts shorter than a block, one block, several, a shared part); the `n` choices
of a request prefilled once; metrics; the command line's checks."""

from __future__ import annotations

import functools
import queue

import pytest
import torch
from fastapi.testclient import TestClient

from pyjamba.kernels import numba_unavailable
from pyjamba.model import JambaForCausalLM
from pyjamba.serve.app import Backend, create_app
from pyjamba.serve.cli import main as serve_main
from pyjamba.serve.engine import Engine, Finished, Sequence, Token
from pyjamba.serve.metrics import Metrics
from pyjamba.serve.prefix_cache import PrefixCache, default_capacity, model_namespace
from pyjamba.serve.sampling import SamplingParams
from pyjamba.serve.slots import SlotPool
from pyjamba.testing import PARITY_CONFIGS, random_model, tiny_model_folder
from pyjamba.tokenizer import Tokenizer

TIMEOUT = 120
CHUNK, BLOCK = 4, 8
NEVER_EOS = {"2": -100}  # logit_bias keeping the tiny model from stopping early

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = [
    "reference",
    "torch",
    pytest.param("numba", marks=pytest.mark.skipif(numba_unavailable() is not None, reason="no numba")),
]


@functools.cache
def _model(kernels: str = "torch"):
    return random_model(PARITY_CONFIGS["jamba-pattern-8"], kernels=kernels)  # eos 2 and 5


@pytest.fixture
def engine():
    engines = []

    def make(model, **kwargs) -> Engine:
        e = Engine(model, **{"slots": 4, "prefill_chunk": CHUNK, "prefix_block": BLOCK, **kwargs})
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop(TIMEOUT)


def _run(e: Engine, prompt: list[int], n: int = 1, max_tokens: int = 6, **params) -> list[list]:
    """Each choice's (token, logprob) pairs and last event, the `n` choices submitted together."""
    events, seqs = [], []
    never_stop = {2: -100.0, 5: -100.0}
    for i in range(n):
        q: queue.Queue = queue.Queue()
        p = SamplingParams(**{"logit_bias": never_stop, **params}).for_choice(i)
        seqs.append(Sequence(prompt, max_tokens, p, q.put, logprobs=3))
        events.append(q)
    e.submit(seqs)
    out = []
    for q in events:
        choice = []
        while True:
            event = q.get(timeout=TIMEOUT)
            if not isinstance(event, Token):
                break
            choice.append((event.token, event.logprob))
        assert event == Finished("length"), event
        out.append(choice)
    return out


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(6, 97, (30,), generator=g).tolist()
    return [
        base[:5],  # shorter than a block
        base[:8],  # exactly one block: resumes nowhere (one token must be left to prefill)
        base[:9],  # one block and one token: resumes after the block
        base[:26],  # several blocks
        [*base[:13], 7, 8, 9, 10, 11, 12, 13],  # shares its first block only (and five tokens more)
        base[:26],  # the same again: resumes after three blocks
        base[:16],  # exactly two blocks: resumes after the first
        base[:30],
    ]


# ---- the cache alone ---------------------------------------------------------------------------


def _pool(slots: int = 3) -> SlotPool:
    pool = SlotPool(_model().config, slots, capacity=16)
    g = torch.Generator().manual_seed(1)
    for store in (pool.keys, pool.values, pool.conv_states, pool.ssm_states):
        for t in store.values():
            t.copy_(torch.randn(t.shape, generator=g))
    return pool


def test_keys_chain_block_by_block_and_name_the_model():
    cache = PrefixCache(4, 2**20, b"model a")
    tokens = list(range(10, 30))
    keys = cache.hashes(tokens)
    assert len(keys) == 5 and len(set(keys)) == 5
    assert cache.hashes(tokens[:11]) == keys[:2]  # a prefix has its full blocks' keys
    changed = [*tokens[:5], 99, *tokens[6:]]  # a token of block 2 differs: keys differ from block 2 on
    other = cache.hashes(changed)
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:], strict=True))
    assert PrefixCache(4, 2**20, b"model b").hashes(tokens)[0] != keys[0]
    assert PrefixCache(5, 2**20, b"model a").hashes(tokens)[0] != keys[0]
    assert model_namespace(_model()) != model_namespace(
        random_model(PARITY_CONFIGS["jamba-pattern-8"], seed=1)
    )
    assert 0 < default_capacity("cpu") <= 2 * 2**30


def test_slot_state_saved_in_blocks_restores_into_another_slot_exactly():
    pool = _pool()
    # Blocks: positions 0..4 from one save, 4..11 from another (the Mamba states are the last's).
    pool.lengths[0] = 4
    first = pool.save(0, 0)
    pool.lengths[0] = 11
    second = pool.save(0, 4)
    assert (first.start, first.end, second.start, second.end) == (0, 4, 4, 11)
    pool.restore(2, [first, second])
    assert pool.lengths[2] == 11 and pool.capacity >= 11
    for store in (pool.keys, pool.values):
        for t in store.values():
            assert torch.equal(t[2, :, :11], t[0, :, :11])
    for store in (pool.conv_states, pool.ssm_states):
        for t in store.values():
            assert torch.equal(t[2], t[0])
    pool.copy(2, 1)
    assert pool.lengths[1] == 11
    assert all(torch.equal(t[1, :, :11], t[0, :, :11]) for t in pool.keys.values())
    with pytest.raises(ValueError, match="gap at position 0"):
        pool.restore(1, [second])
    # A block's keys/values cover its own positions only: the Mamba states are what it adds per entry.
    kv = sum(t.nbytes for store in (second.keys, second.values) for t in store.values())
    assert kv == sum(t[0, :, 4:11].nbytes for store in (pool.keys, pool.values) for t in store.values())


def test_lookup_takes_the_longest_run_of_cached_blocks_and_evicts_least_recent_first():
    pool = _pool()
    cache = PrefixCache(4, 10**9)
    tokens = list(range(20, 36))  # four blocks
    keys = cache.hashes(tokens)
    states = []
    for k in range(1, 5):
        pool.lengths[0] = 4 * k
        states.append(pool.save(0, 4 * (k - 1)))
    with pytest.raises(ValueError, match=r"block 1 covers positions 0..4, not 4..8"):
        cache.insert(keys[1:2], states[1])
    assert not cache.insert(keys[:2], states[1])  # block 2 without block 1 could never be used
    for k in range(1, 5):
        assert cache.insert(keys[:k], states[k - 1])
    assert len(cache) == 4 and cache.nbytes == sum(s.nbytes for s in states)
    other = cache.hashes(tokens[:8] + [1] * 8)
    assert [p.end for p in cache.lookup(other)] == [4, 8]
    assert cache.lookup(cache.hashes([1] * 8)) == []
    assert (cache.lookups, cache.hits, cache.tokens_saved) == (2, 1, 8)
    # Room for three entries: the newest block goes first, the prefix's first blocks stay.
    entry = states[0].nbytes
    cache.capacity = 3 * entry
    extra = cache.hashes(tokens[:4] + [2] * 4)
    pool.lengths[0] = 8
    assert cache.insert(extra, pool.save(0, 4))
    assert len(cache) == 3 and cache.nbytes <= cache.capacity and cache.evictions == 2
    assert keys[0] in cache and extra[1] in cache and keys[3] not in cache
    assert [p.end for p in cache.lookup(keys)] == [4, 8]
    cache.capacity = entry - 1
    assert not cache.insert(cache.hashes([3] * 4), states[0])  # larger than the whole cache


# ---- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", BACKENDS)
def test_results_with_the_cache_equal_those_without_to_the_bit(engine, kernels):
    model = _model(kernels)
    off = engine(model, prefix_cache_bytes=0)
    on = engine(model)
    assert off.prefix_cache is None and on.prefix_cache is not None
    for prompt in _prompts():
        for params in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 3}):
            # Tokens and their logprobs (floats compared exactly), n = 2 choices sharing one prefill.
            assert _run(on, prompt, n=2, **params) == _run(off, prompt, n=2, **params), (len(prompt), params)
    stats = on.prefix_cache.stats()
    # Blocks resumed after, greedy then seeded: 9 tokens 1 and 1; 26: 1 (only the first was cached)
    # and 3; 13+7: 1 and 2 (its own second block, saved by the greedy run); 26: 3 and 3; 16: 1 and 1
    # (one token left to prefill); 30: 3 and 3. Shorter than 9 tokens: nothing to resume after.
    assert stats["hits"] == 12 and stats["tokens_saved"] == BLOCK * (2 + 4 + 3 + 6 + 2 + 6)
    assert stats["entries"] == 4  # the base's three blocks and the 13+7 prompt's second


def test_a_prompt_to_score_is_prefilled_whole_and_still_feeds_the_cache(engine):
    model = _model()
    on = engine(model)
    prompt = _prompts()[3]
    _run(on, prompt, temperature=0.0)
    before = on.prefix_cache.stats()
    events: queue.Queue = queue.Queue()
    seq = Sequence(prompt, 1, SamplingParams(temperature=0.0), events.put, prompt_logprobs=1)
    on.submit([seq])
    while not isinstance(events.get(timeout=TIMEOUT), Finished):
        pass
    assert on.prefix_cache.stats()["lookups"] == before["lookups"]  # never looked up: every logit is needed


def test_the_choices_of_a_request_share_one_prefill_with_the_cache_off(engine):
    model = _model()
    metrics = Metrics()
    e = engine(model, prefix_cache_bytes=0, observer=metrics)
    prefilled = []
    forward = e._forward

    def counting(slots, ids, **kwargs):
        if kwargs.get("logits_to_keep"):  # a prefill chunk; decode steps keep every row
            prefilled.append((tuple(slots), ids.shape[1]))
        return forward(slots, ids, **kwargs)

    e._forward = counting
    prompt = _prompts()[3]
    choices = _run(e, prompt, n=3, temperature=0.9, seed=7)
    assert sum(n for _, n in prefilled) == len(prompt) and {s for s, _ in prefilled} == {(0,)}
    alone = [_run(e, prompt, temperature=0.9, seed=7 + i)[0] for i in range(3)]
    assert [[t for t, _ in c] for c in choices] == [[t for t, _ in c] for c in alone]
    assert len({tuple(t for t, _ in c) for c in choices}) > 1  # seeded apart: not one choice copied
    text = metrics.render().decode()
    assert f"pyjamba_shared_prefill_tokens_saved_total {2 * len(prompt)}.0" in text


def test_metrics_count_hits_tokens_saved_and_bytes(engine):
    metrics = Metrics()
    e = engine(_model(), observer=metrics)
    prompt = _prompts()[7]  # 30 tokens: three blocks saved, then resumed after them
    _run(e, prompt, temperature=0.0)
    _run(e, prompt, temperature=0.0)
    text = metrics.render().decode()
    held = e.prefix_cache.nbytes
    assert held > 0
    for line in (
        "pyjamba_prefix_cache_queries_total 2.0",
        "pyjamba_prefix_cache_hits_total 1.0",
        f"pyjamba_prefix_cache_tokens_saved_total {3 * BLOCK}.0",
        "pyjamba_prefix_cache_entries 3.0",
        f"pyjamba_prefix_cache_bytes {float(held)}",
    ):
        assert line in text


def test_a_cache_too_small_for_a_block_changes_nothing_but_the_hits(engine):
    model = _model()
    tiny = engine(model, prefix_cache_bytes=1)
    off = engine(model, prefix_cache_bytes=0)
    prompt = _prompts()[3]
    assert _run(tiny, prompt, temperature=0.0) == _run(off, prompt, temperature=0.0)
    assert _run(tiny, prompt, temperature=0.0) == _run(off, prompt, temperature=0.0)
    assert tiny.prefix_cache.stats()["hits"] == 0 and len(tiny.prefix_cache) == 0


def test_the_prefix_block_must_be_a_multiple_of_the_prefill_chunk():
    with pytest.raises(
        ValueError, match=r"prefix block \(6 tokens\) must be a positive multiple of the prefill chunk"
    ):
        Engine(_model(), prefill_chunk=4, prefix_block=6)
    assert Engine(_model(), prefill_chunk=3).prefix_cache.block == 66  # the chunk, at least 64
    assert Engine(_model(), prefill_chunk=128).prefix_cache.block == 128


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prefill-chunk", "4", "--prefix-block", "6"],
            "--prefix-block (6) must be a multiple of --prefill-chunk (4)",
        ),
        (["--prefix-block", "0"], "--prefix-block must be at least 1"),
        (["--prefix-cache-mib", "-1"], "--prefix-cache-mib must be 0 (off) or positive"),
    ],
)
def test_the_command_line_refuses_bad_prefix_cache_options(capsys, args, message):
    assert serve_main(args) == 2
    assert message in capsys.readouterr().err


# ---- through the HTTP API, with the official client -----------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-prefix"))


def test_a_chat_through_the_openai_client_answers_the_same_with_the_cache_on_and_off(model_dir):
    openai = pytest.importorskip("openai")
    answers = {}
    for mode, capacity in (("on", None), ("off", 0)):
        model = JambaForCausalLM.from_pretrained(model_dir, kernels="torch")
        tokenizer = Tokenizer.from_pretrained(model_dir)
        engine = Engine(model, slots=4, prefill_chunk=8, prefix_block=16, prefix_cache_bytes=capacity)
        backend = Backend(engine, tokenizer, "tiny", stop_tokens=frozenset(tokenizer.eos_token_ids))
        with TestClient(create_app(backend)) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
            document = "The engine keeps a state per slot. " * 12
            messages = [{"role": "user", "content": f"Document:\n{document}\nWhat is it about?"}]
            settings = dict(model="tiny", max_tokens=8, logprobs=True, top_logprobs=2, logit_bias=NEVER_EOS)
            turns = []
            for question in ("Which words does it use?", "And how many times?"):
                reply = client.chat.completions.create(messages=messages, n=2, seed=11, **settings)
                turns.append([(c.message.content, c.logprobs.model_dump()) for c in reply.choices])
                messages += [
                    {"role": "assistant", "content": reply.choices[0].message.content},
                    {"role": "user", "content": question},
                ]
            answers[mode] = turns
            health = http.get("/health").json()
            metrics = http.get("/metrics").text
        if mode == "on":
            # The first turn fills the cache (one lookup per request: its choices share a prefill);
            # the second resumes inside the first's prompt.
            cache = health["prefix_cache"]
            assert (cache["lookups"], cache["hits"]) == (2, 1) and cache["tokens_saved"] >= 16
            assert "pyjamba_prefix_cache_hits_total 1.0" in metrics
        else:
            assert "prefix_cache" not in health
        assert "pyjamba_shared_prefill_tokens_saved_total 0.0" not in metrics  # n=2 shared each prefill
    assert answers["on"] == answers["off"]
