"""Property-based fuzzing of the request layer (hypothesis): whatever a client sends, the answer is a
2xx or a 4xx with the OpenAI error body, never a 5xx, and the server goes on serving afterwards.

Bodies are drawn two ways: arbitrary JSON (any shape, any value), and objects with the API's own
fields set to values from a hostile pool (boundaries, huge and tiny floats, NaN and infinities, lone
surrogates, wrong types), so that most draws get past the schema and reach the sampler and the engine.
PYJAMBA_FUZZ_EXAMPLES sets the number of draws per test (default 120).
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("hypothesis")

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyjamba.model import JambaForCausalLM
from pyjamba.serve.app import Backend, create_app
from pyjamba.serve.engine import Engine
from pyjamba.testing import tiny_model_folder
from pyjamba.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

C, CHAT = "/v1/completions", "/v1/chat/completions"
EXAMPLES = int(os.environ.get("PYJAMBA_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("fuzz"), max_position_embeddings=48)
    model = JambaForCausalLM.from_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    engine = Engine(model, slots=2, prefill_chunk=16, max_queue=16)
    eos = frozenset(tokenizer.eos_token_ids) | frozenset(model.config.eos_token_ids)
    with TestClient(create_app(Backend(engine, tokenizer, "tiny", stop_tokens=eos))) as client:
        yield client


# ---- values -----------------------------------------------------------------------------------

# Any code point, lone surrogates included (hypothesis leaves them out unless told).
text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["a\ud800b", "\udc00", "hi", ""]
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 1e-40, 1e-300, 1e300, 1e400, -0.0, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
token_ids = st.lists(st.integers(min_value=-5, max_value=300), min_size=0, max_size=6)
prompts = st.one_of(text, st.lists(text, max_size=3), token_ids, st.lists(token_ids, max_size=3), json_values)
messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"])},
            optional={
                "content": st.one_of(
                    text, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))
                ),
                "name": text,
                "tool_calls": json_values,
                "tool_call_id": text,
                "reasoning_content": text,
            },
        ),
        max_size=4,
    )
    | json_values
)

SAMPLING = {
    "n": st.one_of(st.integers(min_value=-2, max_value=20), numbers),
    "max_tokens": st.one_of(st.integers(min_value=-2, max_value=60), numbers),
    "temperature": numbers,
    "top_p": numbers,
    "top_k": st.one_of(st.integers(min_value=-3, max_value=500), numbers),
    "min_p": numbers,
    "repetition_penalty": numbers,
    "frequency_penalty": numbers,
    "presence_penalty": numbers,
    "seed": numbers,
    "logit_bias": st.dictionaries(
        st.one_of(text, st.integers(min_value=-5, max_value=400).map(str), st.just("²")), numbers, max_size=3
    )
    | json_values,
    "stop": st.one_of(text, st.lists(text, max_size=3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "model": st.one_of(st.just("tiny"), text),
    "user": json_values,
}
COMPLETION = {
    **SAMPLING,
    "prompt": prompts,
    "echo": st.one_of(st.booleans(), json_values),
    "logprobs": st.one_of(st.integers(min_value=-2, max_value=25), json_values),
    "best_of": st.one_of(st.integers(min_value=-1, max_value=3), json_values),
    "suffix": st.one_of(st.none(), text),
}
CHAT_FIELDS = {
    **SAMPLING,
    "messages": messages,
    "logprobs": st.one_of(st.booleans(), json_values),
    "top_logprobs": st.one_of(st.integers(min_value=-2, max_value=25), json_values),
    "max_completion_tokens": st.one_of(st.integers(min_value=-2, max_value=60), numbers),
    "tools": json_values,
    "tool_choice": json_values,
    "response_format": json_values,
    "documents": json_values,
    "chat_template_kwargs": json_values,
}


# Well-typed values at and past the edges of what is allowed: these get past the schema and reach
# the sampler and the engine, where a value the sampler cannot honour used to kill the engine.
edgy_floats = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.floats(min_value=0, max_value=1e-6),
    st.sampled_from([0.0, 1e-45, 1e-40, 1e-300, 1e-5, 1e-4, 1.0, 2.0, 100.0, 1e4, 1e30, 1e300]),
)
EDGES = {
    "n": st.integers(min_value=1, max_value=3),
    "max_tokens": st.integers(min_value=1, max_value=12),
    "temperature": edgy_floats,
    "top_p": edgy_floats,
    "top_k": st.integers(min_value=-1, max_value=10**6),
    "min_p": edgy_floats,
    "repetition_penalty": edgy_floats,
    "frequency_penalty": edgy_floats,
    "presence_penalty": edgy_floats,
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.sampled_from([-(2**63), 2**64 - 1]),
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=120).map(str), st.floats(min_value=-100, max_value=100), max_size=4
    ),
    "stop": st.lists(text.filter(bool), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
NEARLY_VALID = {
    C: st.fixed_dictionaries(
        {"prompt": st.sampled_from(["hi", "Once upon a time", [1, 5, 9], ["a", "b"]])},
        optional={**EDGES, "echo": st.booleans(), "logprobs": st.integers(min_value=0, max_value=5)},
    ),
    CHAT: st.fixed_dictionaries(
        {"messages": st.just([{"role": "user", "content": "hi"}])},
        optional={**EDGES, "logprobs": st.booleans(), "top_logprobs": st.integers(min_value=0, max_value=5)},
    ),
}


def _bodies(path: str, fields: dict, required: str) -> st.SearchStrategy:
    """Nearly valid objects with edge values (half the draws), objects with a random subset of the
    API's fields set to anything, and arbitrary JSON."""
    optional = {k: v for k, v in fields.items() if k != required}
    anything = st.fixed_dictionaries({required: fields[required]}, optional=optional)
    return st.one_of(NEARLY_VALID[path], NEARLY_VALID[path], anything, json_values)


def _encode(body: object) -> bytes:
    # ensure_ascii writes a lone surrogate as its \ud800 escape, as a client would; NaN as NaN.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def _post(client: TestClient, path: str, body: object) -> None:
    response = client.post(path, content=_encode(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        failures = [e for e in events[:-1] if "error" in json.loads(e)]
        assert not failures, (body, failures)


def _assert_serving(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/health").json().get("slots_in_use") and time.monotonic() < deadline:
        time.sleep(0.01)
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["slots_in_use"] == 0, health.text
    ok = client.post(C, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@FUZZ
@given(body=_bodies(C, COMPLETION, "prompt"))
def test_completions_never_answer_5xx(client, body):
    _post(client, C, body)


@FUZZ
@given(body=_bodies(CHAT, CHAT_FIELDS, "messages"))
def test_chat_completions_never_answer_5xx(client, body):
    _post(client, CHAT, body)


@FUZZ
@given(raw=st.binary(max_size=64) | text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_raw_bytes_never_answer_5xx(client, raw):
    for path in (C, CHAT):
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (raw, response.text)


def test_the_server_still_serves_after_the_fuzzing(client):
    _assert_serving(client)
