"""The HTTP API in process (FastAPI's TestClient): answers against the Python API, streaming against
non-streaming, echo scoring, and the error matrix: every bad request gets a 4xx with the OpenAI error
body, and the next request is served."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from pyjamba.generate import generate
from pyjamba.model import JambaForCausalLM
from pyjamba.runtime import load
from pyjamba.serve.app import Backend, Settings, create_app
from pyjamba.serve.engine import Engine, Sequence
from pyjamba.serve.sampling import SamplingParams
from pyjamba.testing import tiny_model_folder
from pyjamba.tokenizer import Tokenizer

NEVER_EOS = {"2": -100}  # logit_bias keeping the tiny model from stopping early


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-serve"), max_position_embeddings=128)


def _backend(folder, **engine_kwargs) -> Backend:
    model = JambaForCausalLM.from_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    engine = Engine(model, **{"slots": 4, "prefill_chunk": 8, "max_queue": 8, **engine_kwargs})
    eos = frozenset(tokenizer.eos_token_ids) | frozenset(model.config.eos_token_ids)
    return Backend(engine, tokenizer, "tiny", stop_tokens=eos)


@pytest.fixture(scope="module")
def served(model_dir):
    backend = _backend(model_dir)
    with TestClient(create_app(backend)) as client:
        yield client, backend


@pytest.fixture
def client(served):
    return served[0]


def _events(response) -> list:
    """The JSON payloads of a server-sent-event body, and "[DONE]"."""
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]) for line in lines]


def _metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


# ---- answers ----------------------------------------------------------------------------------


def test_health_models_metrics(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 128
    text = client.get("/metrics").text
    for name in (
        "pyjamba_requests_total",
        "pyjamba_queue_length",
        "pyjamba_slots_in_use",
        "pyjamba_time_to_first_token_seconds_bucket",
        "pyjamba_inter_token_latency_seconds_bucket",
        "pyjamba_generation_tokens_total",
        "pyjamba_engine_steps_total",
        "pyjamba_decode_batch_size_bucket",
    ):
        assert name in text


def test_greedy_completion_is_the_python_apis(client, model_dir):
    body = {"prompt": "It is a truth", "max_tokens": 12, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    expected = load(model_dir).complete("It is a truth", max_new_tokens=12, do_sample=False)
    choice = answer["choices"][0]
    assert choice["text"] == expected
    assert choice["finish_reason"] in ("stop", "length")
    tokenizer = Tokenizer.from_pretrained(model_dir)
    prompt_tokens = len(tokenizer.encode("It is a truth"))
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert answer["usage"]["total_tokens"] == prompt_tokens + answer["usage"]["completion_tokens"]


def test_seeded_sampling_is_generates_and_choices_differ(client, model_dir):
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = JambaForCausalLM.from_pretrained(model_dir)
    ids = [1, 40, 50, 60]
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0.9, "top_k": 50, "seed": 11, "n": 3}
    first = client.post("/v1/completions", json=body).json()
    again = client.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]  # reproducible
    assert len(set(texts)) > 1  # choice i draws from seed + i
    # Choice 0 draws what generate(seed=11) draws with the same settings.
    eos = sorted(set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids))
    out = generate(
        model,
        torch.tensor([ids]),
        max_new_tokens=8,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        seed=11,
        eos_token_id=eos,
    )[0, len(ids) :].tolist()
    tokens = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
    assert texts[0] == tokenizer.decode(tokens)
    assert first["choices"][0]["finish_reason"] == ("stop" if len(tokens) < 8 else "length")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_joined_stream_is_the_non_streamed_answer(client, path):
    body = {"max_tokens": 20, "temperature": 0, "n": 2, "logprobs": 2 if "chat" not in path else True}
    if "chat" in path:
        body |= {"messages": [{"role": "user", "content": "Tell me a story"}], "top_logprobs": 2}
    else:
        body |= {"prompt": "Once upon a time"}
    whole = client.post(path, json=body).json()
    streamed = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for index in (0, 1):
        chunks = [c for e in events[:-2] for c in e["choices"] if c["index"] == index]
        if "chat" in path:
            assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
            text = "".join(c["delta"].get("content", "") for c in chunks)
            want = whole["choices"][index]["message"]["content"]
            tokens = [t["token"] for c in chunks if c["logprobs"] for t in c["logprobs"]["content"]]
            assert tokens == [t["token"] for t in whole["choices"][index]["logprobs"]["content"]]
        else:
            text = "".join(c["text"] for c in chunks)
            want = whole["choices"][index]["text"]
            tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
            assert tokens == whole["choices"][index]["logprobs"]["tokens"]
        assert text == want
        assert chunks[-1]["finish_reason"] == whole["choices"][index]["finish_reason"]
    # Greedy: both choices alike (logprobs to rounding: a batch of 1 and of 2 multiply differently).
    first, second = whole["choices"]
    key = "message" if "chat" in path else "text"
    assert first[key] == second[key] and first["finish_reason"] == second["finish_reason"]


def test_streams_without_include_usage_have_no_usage(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
    events = _events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


def test_echo_scores_the_prompt_as_the_model_does(client, model_dir):
    model = JambaForCausalLM.from_pretrained(model_dir)
    ids = [1, 17, 80, 33, 120, 7, 45, 99, 64, 12, 5, 77]  # longer than the prefill chunk (8)
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    lp = answer["choices"][0]["logprobs"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        assert max(top.values()) == pytest.approx(logp[i - 1].max().item(), abs=1e-4)
    # lm-evaluation-harness' local-completions: echo with max_tokens=1, the last entry dropped.
    harness = client.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    lp1 = harness["choices"][0]["logprobs"]
    assert len(lp1["token_logprobs"]) == len(ids) + 1
    assert lp1["token_logprobs"][: len(ids)] == lp["token_logprobs"]


def test_chat_renders_the_template(client, model_dir):
    tokenizer = Tokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    answer = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4}).json()
    rendered = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_stop_strings_cut_the_text(client):
    body = {"prompt": "The Jamba models", "max_tokens": 24, "temperature": 0, "logit_bias": NEVER_EOS}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    visible = [i for i, ch in enumerate(full) if ch.isprintable() and ch != "\ufffd" and i > 2]
    stop = full[visible[0] : visible[0] + 1]
    cut = client.post("/v1/completions", json={**body, "stop": [stop, "never"]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    streamed = _events(client.post("/v1/completions", json={**body, "stop": stop, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut["text"]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_defaults_to_the_rest_of_the_context(client):
    ids = [1] + [40] * 119  # 120 of the 128 positions
    answer = client.post("/v1/completions", json={"prompt": ids, "logit_bias": NEVER_EOS}).json()
    assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["finish_reason"] == "length"


# ---- errors -----------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (path, raw body or JSON object, status, param, words in the message)
    (C, "{bad json", 400, None, "not valid JSON"),
    (C, b"\xff\xfe\x00garbage", 400, None, "not valid JSON"),
    (C, "", 400, None, "empty"),
    (C, '"a string"', 400, None, "got a string"),
    (C, "[1, 2]", 400, None, "got an array"),
    (C, "42", 400, None, "got a number"),
    (C, "null", 400, None, "got null"),
    (C, {}, 400, "prompt", "required"),
    (C, {"prompt": 5}, 400, "prompt", "prompt must be"),
    (C, {"prompt": None}, 400, "prompt", "prompt must be"),
    (C, {"prompt": ""}, 400, "prompt", "empty"),
    (C, {"prompt": []}, 400, "prompt", "empty list"),
    (C, {"prompt": [[]]}, 400, "prompt", "empty"),
    (C, {"prompt": [1, -3]}, 400, "prompt", "-3 is not a token id"),
    (C, {"prompt": [1, 300]}, 400, "prompt", "300 is not a token id"),
    (C, {"prompt": [1, 2.5]}, 400, "prompt", "must be a token id"),
    (C, {"prompt": [1, True]}, 400, "prompt", "must be a token id"),
    (C, {"prompt": ["a", [1]]}, 400, "prompt", "not a mix"),
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    (C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "valid integer"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    (C, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "at least 1"),
    (C, {"prompt": "hi", "max_tokens": 126}, 400, "max_tokens", "3 tokens and max_tokens is 126"),
    (C, {"prompt": [1] * 128}, 400, "prompt", "128 tokens"),
    (C, {"prompt": [1] * 129, "max_tokens": 0, "echo": True}, 400, "max_tokens", "129 tokens and max_tokens is 0"),
    (C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", ">= 0"),
    (C, '{"prompt": "hi", "temperature": NaN}', 400, "temperature", "finite"),
    (C, '{"prompt": "hi", "temperature": Infinity}', 400, "temperature", "finite"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "valid number"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0.0, 1.0]"),
    (C, {"prompt": "hi", "top_k": -2}, 400, "top_k", ">= 0"),
    (C, {"prompt": "hi", "min_p": 2}, 400, "min_p", "[0.0, 1.0]"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "[0.0001, 10000.0]"),
    (C, {"prompt": "hi", "repetition_penalty": 1e-300}, 400, "repetition_penalty", "[0.0001, 10000.0]"),
    (C, {"prompt": "hi", "repetition_penalty": 1e300}, 400, "repetition_penalty", "[0.0001, 10000.0]"),
    (C, '{"prompt": "hi", "top_p": 1e400}', 400, "top_p", "finite"),
    (C, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", "[-2.0, 2.0]"),
    (C, {"prompt": "hi", "n": 0}, 400, "n", "between 1 and 16"),
    (C, {"prompt": "hi", "n": 17}, 400, "n", "between 1 and 16"),
    (C, {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}, 400, "n", "more than the queue holds"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    (C, {"prompt": "hi", "logprobs": -1}, 400, "logprobs", "between 0 and 20"),
    (C, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    (C, {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias", "[-100.0, 100.0]"),
    (C, {"prompt": "hi", "logit_bias": {"²": 1}}, 400, "logit_bias", "token ids"),
    (C, {"prompt": "hi", "logit_bias": {"١": 1}}, 400, "logit_bias", "token ids"),
    (C, {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias", "token ids"),
    (C, {"prompt": "hi", "logit_bias": {"99999999999999999999999": 1}}, 400, "logit_bias", "token ids"),
    (C, '{"prompt": "a\\ud800b"}', 400, "prompt", "not valid Unicode at 'prompt'"),
    (C, '{"prompt": ["ok", "\\udfff"]}', 400, "prompt", "not valid Unicode at 'prompt[1]'"),
    (C, '{"prompt": "hi", "stop": ["\\ud83d"]}', 400, "stop", "lone surrogate"),
    (C, '{"prompt": "hi", "\\ud800": 1}', 400, None, "in the body: a key holds a lone surrogate"),
    (C, {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed", "seed must lie"),
    (C, {"prompt": "hi", "seed": 2**70}, 400, "seed", "seed must lie"),
    (C, {"prompt": "hi", "stop": 5}, 400, "stop", "valid string"),
    (C, {"prompt": "hi", "stop": [""]}, 400, "stop", "not be empty"),
    (C, {"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    (C, {"prompt": "hi", "suffix": "x"}, 400, "suffix", "not supported"),
    (C, {"prompt": "hi", "best_of": 3}, 400, "best_of", "must equal n"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    (CHAT, {}, 400, "messages", "required"),
    (CHAT, {"messages": "hi"}, 400, "messages", "valid list"),
    (CHAT, {"messages": []}, 400, "messages", "empty"),
    (CHAT, {"messages": ["hi"]}, 400, "messages[0]", "valid dictionary"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "required"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "'user'"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "valid string"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0].type", "'text'"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages", "no 'content'"),
    (CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    (CHAT, {"messages": OK_MESSAGES, "max_completion_tokens": 1000}, 400, "max_completion_tokens", "max_completion_tokens is 1000"),
    (CHAT, {"messages": OK_MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    (CHAT, {"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs", "between 0 and 20"),
    (CHAT, {"messages": OK_MESSAGES, "tools": [{"type": "function"}]}, 400, "tools", "tools[0].function must be"),
    (CHAT, {"messages": OK_MESSAGES, "response_format": {"type": "yaml"}}, 400, "response_format", "'json_schema'"),
    (CHAT, {"messages": OK_MESSAGES, "model": "other"}, 404, "model", "does not exist"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "messages", "at 'messages[0].content'"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_requests_get_the_openai_error_body(client, path, body, status, param, words):
    if isinstance(body, dict):
        response = client.post(path, json=body)
    else:
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_after_bad_requests_the_next_one_is_served(client):
    for body in ("{bad", "null", '{"prompt": [1, -1]}'):
        assert client.post(C, content=body).status_code == 400
    ok = client.post(C, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_unknown_paths_and_methods(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "Unknown path" in missing.json()["error"]["message"]
    wrong = client.get(C)
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_oversized_bodies_get_413_before_they_are_read(model_dir):
    backend = _backend(model_dir)
    with TestClient(create_app(backend, Settings(max_body_bytes=1000))) as client:
        big = json.dumps({"prompt": "x" * 2000})
        by_header = client.post(C, content=big, headers={"content-type": "application/json"})
        assert by_header.status_code == 413 and by_header.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: the size is counted as the body arrives
            for i in range(0, len(big), 100):
                yield big[i : i + 100].encode()

        streamed = client.post(C, content=chunks(), headers={"content-type": "application/json"})
        assert (
            streamed.status_code == 413
            and "larger than the limit of 1000 bytes" in streamed.json()["error"]["message"]
        )
        assert client.post(C, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_api_key(model_dir):
    with TestClient(create_app(_backend(model_dir), Settings(api_key="s3cret"))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = client.post(C, json={"prompt": "hi", "max_tokens": 1}, headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200  # open, for load balancers
        ok = client.post(
            C, json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200


def test_cors_is_off_unless_origins_are_given(model_dir, served):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    off = served[0].options(C, headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    settings = Settings(api_key="k", cors_origins=("http://app.example",))
    with TestClient(create_app(_backend(model_dir), settings)) as client:
        on = client.options(C, headers=preflight)
        assert on.status_code == 200 and on.headers["access-control-allow-origin"] == "http://app.example"


def test_a_full_queue_gets_429(model_dir):
    backend = _backend(model_dir, slots=1, max_queue=1)
    with TestClient(create_app(backend)) as client:
        never_stop = SamplingParams(temperature=0.0, logit_bias={2: -100.0})
        running = Sequence([1, 40], 120, never_stop, lambda event: None)
        waiting = Sequence([1, 40], 120, never_stop, lambda event: None)
        backend.engine.submit([running])
        deadline = time.monotonic() + 30
        while backend.engine.queue_length and time.monotonic() < deadline:
            time.sleep(0.01)
        backend.engine.submit([waiting])
        refused = client.post(C, json={"prompt": "hi", "max_tokens": 1})
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        backend.engine.cancel([running, waiting])
        assert client.post(C, json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        assert _metric(client, "pyjamba_slots_in_use") == 0


def test_503_while_loading_draining_or_after_the_engine_died(model_dir, monkeypatch):
    release = threading.Event()
    backend = _backend(model_dir, max_model_failures=2)

    def slow_load() -> Backend:
        release.wait(30)
        return backend

    with TestClient(create_app(slow_load)) as client:
        assert client.get("/health").json() == {"status": "loading"}
        loading = client.post(C, json={"prompt": "hi"})
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.post(C, json={"prompt": "hi", "max_tokens": 1}).status_code == 200

        client.app.state.server.draining = True
        assert client.get("/health").status_code == 503
        assert client.post(C, json={"prompt": "hi", "max_tokens": 1}).status_code == 503
        client.app.state.server.draining = False

        def broken(*args, **kwargs):
            raise RuntimeError("device lost")

        monkeypatch.setattr(backend.engine.model, "forward", broken)
        failed = client.post(C, json={"prompt": "hi", "max_tokens": 1})
        assert failed.status_code == 503 and "can be retried" in failed.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # one failed step: the engine recovered
        failed = client.post(C, json={"prompt": "hi", "max_tokens": 1})
        assert failed.status_code == 503 and "device lost" in failed.json()["error"]["message"]
        backend.engine._thread.join(30)  # two in a row: it gave up, and `pyjamba serve` exits
        assert client.app.state.server.engine_error is not None
        health = client.get("/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        assert client.post(C, json={"prompt": "hi", "max_tokens": 1}).status_code == 503


# ---- reliability: hostile values, broken templates, clients that leave ---------------------------


def _assert_still_serving(client) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text
    ok = client.post(C, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    deadline = time.monotonic() + 10
    while client.get("/health").json()["slots_in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/health").json()["slots_in_use"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "Hi", "n": 2, "seed": 18446744073709551615, "max_tokens": 3},
        {"prompt": "Hi", "n": 3, "seed": -(2**63), "max_tokens": 3},
        {"prompt": "Hi", "temperature": 1e-40, "max_tokens": 3},
        {"prompt": "Hi", "temperature": 1e30, "max_tokens": 3},
        {"prompt": "Hi", "top_p": 1e-300, "max_tokens": 3},
        {"prompt": "Hi", "repetition_penalty": 1e-4, "temperature": 1e-5, "max_tokens": 3},
        {"prompt": "Hi", "frequency_penalty": -2, "presence_penalty": 2, "max_tokens": 3, "seed": 1},
        {"prompt": "Hi", "logit_bias": {"3": 100, "4": -100}, "temperature": 2, "max_tokens": 3},
    ],
)
def test_hostile_sampling_values_are_served_and_hurt_nobody(model_dir, body):
    with TestClient(create_app(_backend(model_dir, slots=1))) as client:  # one slot: a leak would hang
        for stream in (False, True):
            response = client.post(C, json={**body, "stream": stream})
            assert response.status_code == 200, response.text
            if stream:
                assert _events(response)[-1] == "[DONE]"
                assert all("error" not in e for e in _events(response)[:-1])
        _assert_still_serving(client)


def test_seeds_past_the_top_wrap_around_as_torch_wraps_negative_seeds(client):
    top = {"prompt": "Hi", "n": 2, "seed": 2**64 - 1, "max_tokens": 6, "logit_bias": NEVER_EOS}
    wrapped = {"prompt": "Hi", "n": 1, "seed": 0, "max_tokens": 6, "logit_bias": NEVER_EOS}
    negative = {"prompt": "Hi", "n": 1, "seed": -1, "max_tokens": 6, "logit_bias": NEVER_EOS}
    choices = client.post(C, json=top).json()["choices"]
    assert choices[1]["text"] == client.post(C, json=wrapped).json()["choices"][0]["text"]
    assert choices[0]["text"] == client.post(C, json=negative).json()["choices"][0]["text"]


def test_a_tiny_temperature_is_greedy(client):
    greedy = client.post(C, json={"prompt": "Hi", "temperature": 0, "max_tokens": 8}).json()
    tiny = client.post(C, json={"prompt": "Hi", "temperature": 1e-40, "max_tokens": 8, "seed": 3}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ raise_exception('no system messages here') }}", "no system messages here"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
        ("{{ messages[0].nothing.deeper }}", "UndefinedError"),
    ],
)
def test_a_chat_template_that_fails_gets_a_400_naming_it(served, monkeypatch, template, words):
    client, backend = served
    monkeypatch.setitem(backend.tokenizer.chat_templates, "default", template)
    response = client.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 1})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "chat template 'default'" in error["message"] and words in error["message"]
    assert error["param"] == "messages" and error["code"] == "chat_template_error"


def _raw_asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: list[dict]) -> list:
    """Call the ASGI app directly with these exact header bytes and receive messages (TestClient
    re-encodes headers, and cannot leave mid-body); returns what the app sent."""
    sent: list[dict] = []
    messages = iter(body)

    async def receive() -> dict:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    return sent


def _status(sent: list[dict]) -> int | None:
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), None)


def test_a_client_that_leaves_mid_body_is_not_a_server_error(served):
    client, _ = served
    name = 'pyjamba_requests_total{endpoint="/v1/completions",status="499"}'
    before = _metric(client, name) if 'status="499"' in client.get("/metrics").text else 0.0
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    partial = {"type": "http.request", "body": b'{"prompt": "a long pro', "more_body": True}
    sent = _raw_asgi(client.app, "POST", C, headers, [partial, {"type": "http.disconnect"}])
    assert _status(sent) is None  # nobody to answer
    assert _metric(client, name) == before + 1
    assert 'status="500"' not in client.get("/metrics").text
    _assert_still_serving(client)


def test_the_api_key_is_compared_as_utf8_bytes(model_dir):
    key = "clé-secrète"
    with TestClient(create_app(_backend(model_dir), Settings(api_key=key))) as client:

        def status(token: bytes) -> int | None:
            headers = [(b"authorization", b"Bearer " + token)]
            return _status(_raw_asgi(client.app, "GET", "/v1/models", headers, []))

        assert status(key.encode("utf-8")) == 200
        for token in (key.encode("latin-1"), key.encode("utf-8")[:-1], b"\xff\xfe", b"", key.encode() * 2):
            assert status(token) == 401


def test_a_choice_whose_text_cannot_be_decoded_fails_its_request_alone(served, monkeypatch):
    client, _ = served

    def broken(self, token, logprob=None):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with monkeypatch.context() as patch:
        patch.setattr("pyjamba.serve.job.ChoiceText.push", broken)
        whole = client.post(C, json={"prompt": "hi", "max_tokens": 4})
        assert whole.status_code == 500, whole.text
        error = whole.json()["error"]
        assert error["code"] == "decoding_failed" and "could not be decoded" in error["message"]
        streamed = _events(client.post(C, json={"prompt": "hi", "max_tokens": 4, "stream": True}))
        assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "decoding_failed"
    _assert_still_serving(client)


def test_an_unexpected_error_is_a_500_with_the_openai_body_and_the_server_goes_on(served, monkeypatch):
    client, _ = served

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr("pyjamba.serve.app.completion_plan", bug)
        response = client.post(C, json={"prompt": "hi", "max_tokens": 1})
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "Internal server error: KeyError",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert _metric(client, 'pyjamba_requests_total{endpoint="/v1/completions",status="500"}') >= 1
    _assert_still_serving(client)
