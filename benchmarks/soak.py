"""Soak and fault test of `pyjamba serve`: many clients, well-formed and hostile traffic, for minutes.

Starts `pyjamba serve` on a free loopback port (the model shipped in the package unless --model), or
attaches to a running server (--url), and runs --clients concurrent clients for --minutes. Each
client loops over a random mix (seeded by --seed) of:

- well-formed chat and completion requests with small max_tokens, streamed or not: some streams
  closed after a random number of tokens or at their headers, some requests given up before any
  answer came (the server must free their slots);
- malformed requests: invalid JSON, wrong types, unknown and missing fields, empty prompts, lone
  surrogates (escaped in the JSON: "a\\ud800b"), logit_bias keys such as "²", "-1" or "99999999999",
  a JSON array as the body, huge n, absurd max_tokens, a wrong model name, and raw-socket requests
  cut off mid-body or mid-headers;
- hostile sampling values: temperature 1e-40 or 1e30, repetition_penalty 1e-300 and 1e300, top_p
  1e-300, seed 18446744073709551615 with n 2, negative seeds, 1e400 (inf once parsed), ...

A malformed or hostile request must get a 4xx or a 2xx, never a 5xx; a well-formed one a 200 (or a
429 when the queue is full). Every --sample-every seconds the server's RSS and open files (psutil;
not with --url) and /health are sampled. At the end, once in-flight cancellations have settled,
/health must show no slot in use and an empty queue.

The report is one JSON object on stdout (and in --out): requests by kind and by HTTP status, the
5xx (with the first bodies, to debug: `server_errors_5xx`, and `unavailable_503`, which a failed
model step or a dead engine gives every request it held), the requests in flight at such a failure
(`engine_trouble`: the one that caused it is among them), transport errors, streams that ended with
an error event, tokens received, requests/s, the RSS (start, after warm-up, end, max, a downsampled
series), whether /health stayed 200, the slots in use at the end, whether the server is still alive,
and the exceptions in the server's log. The exit code is 0 only if no response was a 5xx, no stream
ended with an error event (a 5xx sent after the status line), no request met a transport error
(refused or reset: the server died, or closed a keep-alive connection after an unhandled exception,
which the report marks "after a 5xx"), /health stayed 200, no slot is left in use and the server is
alive; else 1, with the reasons on stderr. The run stops early once the server or its engine has
died: a request that kills the engine hides the others, so --skip (or --only) its kind to go on.

    python benchmarks/soak.py                                        # 32 clients, 5 minutes
    python benchmarks/soak.py --quick                                # 4 clients, 30 s
    python benchmarks/soak.py --clients 4 --minutes 0.5 --no-hostile --threads 1 --out soak.json
    python benchmarks/soak.py --url http://127.0.0.1:8000 --skip 'hostile.seed*'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import json
import math
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON_HEADERS = {"Content-Type": "application/json"}
EXAMPLES = 5  # bodies kept of each kind of failure
SERIES_POINTS = 60  # the RSS series in the report is downsampled to about this many points

Body = dict[str, Any]


# ---- request bodies ---------------------------------------------------------------------------

_RAW = re.compile(r'"@raw:([^"]*)"')


def raw_number(text: str) -> str:
    """A value written into the JSON as is, unquoted: `1e400` parses as inf, and json.dumps cannot write it."""
    return f"@raw:{text}"


def encode(body: Any) -> bytes:
    """The body as JSON: lone surrogates escaped ("\\ud800", as json.dumps writes them), raw numbers bare."""
    return _RAW.sub(lambda m: m.group(1), json.dumps(body)).encode()


@dataclass(frozen=True)
class Probe:
    """One request a client sends, and how it treats the answer."""

    kind: str  # "normal.chat.stream", "malformed.lone_surrogate_prompt", "hostile.temperature_1e-40", ...
    path: str = COMPLETIONS
    body: bytes = b""
    method: str = "POST"
    stream: bool = False
    cancel_after: int | None = None  # a stream: closed after this many chunks with tokens (0: at the headers)
    give_up_after: float | None = None  # seconds: closed then, whatever is under way
    well_formed: bool = False  # expects a 200 (or 429, the queue full)
    raw: bytes | None = None  # written as is to a socket: the HTTP request itself malformed or cut off
    raw_reply: bool = False  # read the status line back; else close the socket after `hold` seconds
    hold: float = 0.0


_TEXTS = (
    "It is a truth universally acknowledged",
    "Mr. Darcy walked into the room and",
    "Emma Woodhouse, handsome, clever, and rich,",
    "The family of Dashwood had long been settled in Sussex.",
    "She was not in the habit of",
    "Captain Wentworth had no fortune.",
    "Catherine Morland",
)


def _ids(rng: random.Random, low: int, high: int) -> list[int]:
    """A prompt of token ids: BOS, then ids every vocabulary of 256 or more holds."""
    return [1] + [rng.randrange(3, 256) for _ in range(rng.randint(low, high))]


def _prompt(rng: random.Random) -> str | list:
    """One of the four prompt shapes: text, token ids, a batch of texts, a batch of id lists."""
    shape = rng.random()
    if shape < 0.6:
        return rng.choice(_TEXTS)
    if shape < 0.8:
        return _ids(rng, 2, 24)
    if shape < 0.9:
        return rng.sample(_TEXTS, 2)
    return [_ids(rng, 2, 8), _ids(rng, 2, 8)]


def _options(rng: random.Random, model: str, stream: bool) -> Body:
    """Sampling settings of a well-formed request, each present or not."""
    options: Body = {"stream": stream}
    if rng.random() < 0.5:
        options["model"] = model
    if rng.random() < 0.6:
        options["temperature"] = rng.choice([0.0, 0.5, 0.8, 1.0, 1.3])
    if rng.random() < 0.3:
        options["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.2:
        options["top_k"] = rng.choice([0, 1, 10, 50])
    if rng.random() < 0.1:
        options["min_p"] = 0.05
    if rng.random() < 0.1:
        options["repetition_penalty"] = 1.2
    if rng.random() < 0.1:
        options["frequency_penalty"] = options["presence_penalty"] = 0.5
    if rng.random() < 0.5:
        options["seed"] = rng.randrange(2**31)
    if rng.random() < 0.2:
        options["n"] = 2
    if rng.random() < 0.2:
        options["stop"] = rng.choice([".", ["\n", "."], [" the", ","]])
    if rng.random() < 0.2:
        options["logit_bias"] = {"2": -100}  # the shipped model's end-of-sequence token
    if stream and rng.random() < 0.5:
        options["stream_options"] = {"include_usage": True}
    return options


def completion_body(rng: random.Random, model: str, stream: bool) -> Body:
    body: Body = {"prompt": _prompt(rng), "max_tokens": rng.randint(8, 48), **_options(rng, model, stream)}
    if rng.random() < 0.3:
        body["logprobs"] = rng.choice([0, 1, 5])
    if rng.random() < 0.1:
        body["echo"] = True
    return body


def chat_body(rng: random.Random, model: str, stream: bool) -> Body:
    text = rng.choice(_TEXTS)
    content: str | list = (
        text if rng.random() < 0.8 else [{"type": "text", "text": t} for t in text.split(",")]
    )
    messages = [{"role": "user", "content": content}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You write like Jane Austen."})
    limit = "max_tokens" if rng.random() < 0.7 else "max_completion_tokens"
    body: Body = {"messages": messages, limit: rng.randint(8, 48), **_options(rng, model, stream)}
    if rng.random() < 0.3:
        body["logprobs"] = True
        body["top_logprobs"] = rng.choice([0, 2, 5])
    return body


# ---- the traffic: well-formed, malformed, hostile ---------------------------------------------

# How a well-formed request is sent and closed, and how often.
_MODES = {
    "stream": 35,
    "stream_cancel_mid": 12,  # closed after a random number of tokens
    "stream_cancel_at_headers": 8,  # closed once the status line is in, before the first token
    "give_up_early": 5,  # closed within 50 ms, before any answer (streamed or not)
    "whole": 30,
    "whole_given_up": 10,  # a non-streamed request closed before its answer (within 0.5 s)
}


def normal_probe(rng: random.Random, model: str) -> Probe:
    mode = rng.choices(list(_MODES), weights=list(_MODES.values()))[0]
    chat = rng.random() < 0.5
    stream = mode.startswith("stream") or (mode == "give_up_early" and rng.random() < 0.5)
    body = (chat_body if chat else completion_body)(rng, model, stream)
    cancel_after = give_up = None
    if mode == "stream_cancel_mid":
        max_tokens = body.get("max_tokens") or body["max_completion_tokens"]
        cancel_after = rng.randint(1, max_tokens - 1)
    elif mode == "stream_cancel_at_headers":
        cancel_after = 0
    elif mode == "give_up_early":
        give_up = rng.uniform(0.001, 0.05)
    elif mode == "whole_given_up":
        give_up = rng.uniform(0.01, 0.5)
    return Probe(
        f"normal.{'chat' if chat else 'completions'}.{mode}",
        CHAT if chat else COMPLETIONS,
        encode(body),
        stream=stream,
        cancel_after=cancel_after,
        give_up_after=give_up,
        well_formed=True,
    )


def malformed_cases(model: str) -> list[tuple[str, str, str, bytes | Body]]:
    """(name, method, path, body) of requests the server must refuse with a 4xx (or serve: never a 5xx)."""
    c: Body = {"prompt": "It is a truth", "max_tokens": 8}
    h: Body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}

    def say(content: Any, role: Any = "user") -> Body:
        return {**h, "messages": [{"role": role, "content": content}]}

    cases: list[tuple[str, str, bytes | Body | None]] = [
        # Not JSON, or not an object.
        ("invalid_json", COMPLETIONS, b'{"prompt": "It is", "max_tokens": 8'),
        ("trailing_comma", CHAT, b'{"messages": [{"role": "user", "content": "Hi"}],}'),
        ("form_body", COMPLETIONS, b"prompt=hello&max_tokens=8"),
        ("empty_body", COMPLETIONS, b""),
        ("whitespace_body", CHAT, b" \n\t "),
        ("invalid_utf8", COMPLETIONS, b'{"prompt": "\xff\xfe\xfd", "max_tokens": 8}'),
        ("nan_literal", COMPLETIONS, b'{"prompt": "Hi", "max_tokens": 8, "temperature": NaN}'),
        ("infinity_literal", CHAT, encode(h)[:-1] + b', "top_p": -Infinity}'),
        ("deep_nesting", COMPLETIONS, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("array_body", COMPLETIONS, encode([c])),
        ("null_body", CHAT, b"null"),
        ("number_body", COMPLETIONS, b"42"),
        ("string_body", CHAT, b'"Hello"'),
        # Wrong types (nothing is coerced).
        ("max_tokens_string", COMPLETIONS, {**c, "max_tokens": "8"}),
        ("max_tokens_float", CHAT, {**h, "max_tokens": 8.5}),
        ("temperature_string", CHAT, {**h, "temperature": "0.5"}),
        ("stream_string", COMPLETIONS, {**c, "stream": "yes"}),
        ("n_bool", COMPLETIONS, {**c, "n": True}),
        ("seed_float", COMPLETIONS, {**c, "seed": 1.5}),
        ("prompt_object", COMPLETIONS, {**c, "prompt": {"text": "Hi"}}),
        ("prompt_null", COMPLETIONS, {**c, "prompt": None}),
        ("prompt_mixed_list", COMPLETIONS, {**c, "prompt": [1, "a"]}),
        ("prompt_nested_mixed", COMPLETIONS, {**c, "prompt": [[1, 2], "x"]}),
        ("prompt_float_ids", COMPLETIONS, {**c, "prompt": [1.5, 2.0]}),
        ("prompt_bool_ids", COMPLETIONS, {**c, "prompt": [True, False]}),
        ("prompt_ids_out_of_vocab", COMPLETIONS, {**c, "prompt": [1, 10**12]}),
        ("prompt_ids_negative", COMPLETIONS, {**c, "prompt": [-1]}),
        ("prompt_ids_2**70", COMPLETIONS, {**c, "prompt": [2**70]}),
        ("prompt_three_deep", COMPLETIONS, {**c, "prompt": [[[1, 2]]]}),
        ("messages_string", CHAT, {**h, "messages": "Hello"}),
        ("message_not_object", CHAT, {**h, "messages": ["Hello"]}),
        ("message_bad_role", CHAT, say("Hi", role="robot")),
        ("message_role_number", CHAT, say("Hi", role=1)),
        ("message_no_role", CHAT, {**h, "messages": [{"content": "Hi"}]}),
        ("message_content_number", CHAT, say(5)),
        ("message_image_part", CHAT, say([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])),
        ("message_part_no_text", CHAT, say([{"type": "text"}])),
        ("stop_number", COMPLETIONS, {**c, "stop": 5}),
        ("stop_empty_string", COMPLETIONS, {**c, "stop": [""]}),
        ("stop_33_strings", CHAT, {**h, "stop": [str(i) for i in range(33)]}),
        ("logit_bias_list", COMPLETIONS, {**c, "logit_bias": [1, 2]}),
        ("logit_bias_string_value", CHAT, {**h, "logit_bias": {"5": "x"}}),
        ("stream_options_string", COMPLETIONS, {**c, "stream": True, "stream_options": "yes"}),
        # Unknown fields are ignored (a 200); missing ones are a 400.
        (
            "unknown_fields",
            COMPLETIONS,
            {**c, "frobnicate": {"a": [1]}, "metadata": {"x": "y"}, "user": "soak"},
        ),
        ("unknown_fields_chat", CHAT, {**h, "service_tier": "auto", "parallel_tool_calls": False, "x": None}),
        ("missing_prompt", COMPLETIONS, {"max_tokens": 8}),
        ("missing_messages", CHAT, {"max_tokens": 8}),
        ("empty_object", COMPLETIONS, {}),
        # Empty prompts.
        ("empty_prompt", COMPLETIONS, {**c, "prompt": ""}),
        ("empty_prompt_list", COMPLETIONS, {**c, "prompt": []}),
        ("empty_prompt_in_batch", COMPLETIONS, {**c, "prompt": ["Hi", ""]}),
        ("empty_ids_in_batch", COMPLETIONS, {**c, "prompt": [[1, 2], []]}),
        ("empty_messages", CHAT, {**h, "messages": []}),
        ("empty_content", CHAT, say("")),
        ("null_content", CHAT, say(None)),
        # Lone surrogates: valid JSON escapes, not valid Unicode text.
        ("lone_surrogate_prompt", COMPLETIONS, {**c, "prompt": "a\ud800b"}),
        ("lone_surrogate_low", COMPLETIONS, {**c, "prompt": "\udfff"}),
        ("lone_surrogate_batch", COMPLETIONS, {**c, "prompt": ["Hi", "x\udc00"]}),
        ("lone_surrogate_message", CHAT, say("a\ud800b")),
        ("lone_surrogate_part", CHAT, say([{"type": "text", "text": "\ud83d"}])),
        ("lone_surrogate_stop", COMPLETIONS, {**c, "stop": ["\ud800"]}),
        ("lone_surrogate_model", COMPLETIONS, {**c, "model": "\ud800"}),
        ("lone_surrogate_role", CHAT, say("Hi", role="\ud800")),
        (
            "lone_surrogate_name",
            CHAT,
            {**h, "messages": [{"role": "user", "content": "Hi", "name": "\ud800"}]},
        ),
        ("lone_surrogate_logit_bias_key", COMPLETIONS, {**c, "logit_bias": {"\ud800": 1}}),
        ("lone_surrogate_user", CHAT, {**h, "user": "\ud800"}),
        ("lone_surrogate_unknown_field", COMPLETIONS, {**c, "\ud800": "\udfff"}),
        # logit_bias keys that are not token ids (or barely are).
        ("logit_bias_superscript_two", COMPLETIONS, {**c, "logit_bias": {"²": 5}}),
        ("logit_bias_negative_key", COMPLETIONS, {**c, "logit_bias": {"-1": 5}}),
        ("logit_bias_huge_key", CHAT, {**h, "logit_bias": {"99999999999": 5}}),
        ("logit_bias_arabic_digit", COMPLETIONS, {**c, "logit_bias": {"٣": 5}}),
        ("logit_bias_fullwidth_digit", CHAT, {**h, "logit_bias": {"５": 5}}),
        ("logit_bias_empty_key", COMPLETIONS, {**c, "logit_bias": {"": 5}}),
        ("logit_bias_spaced_key", COMPLETIONS, {**c, "logit_bias": {" 5": 5}}),
        ("logit_bias_exponent_key", COMPLETIONS, {**c, "logit_bias": {"1e3": 5}}),
        ("logit_bias_value_1e300", CHAT, {**h, "logit_bias": {"5": 1e300}}),
        # Out of range.
        ("n_huge", COMPLETIONS, {**c, "n": 10**9}),
        ("n_2**70", CHAT, {**h, "n": 2**70}),
        ("n_zero", COMPLETIONS, {**c, "n": 0}),
        ("n_negative", CHAT, {**h, "n": -1}),
        ("max_tokens_huge", COMPLETIONS, {**c, "max_tokens": 10**12}),
        ("max_tokens_2**64", CHAT, {**h, "max_tokens": 2**64}),
        ("max_tokens_negative", COMPLETIONS, {**c, "max_tokens": -5}),
        ("max_tokens_zero_chat", CHAT, {**h, "max_tokens": 0}),
        ("max_tokens_zero_no_echo", COMPLETIONS, {**c, "max_tokens": 0}),
        ("max_completion_tokens_huge", CHAT, {**h, "max_completion_tokens": 10**15}),
        ("logprobs_21", COMPLETIONS, {**c, "logprobs": 21}),
        ("logprobs_negative", COMPLETIONS, {**c, "logprobs": -1}),
        ("top_logprobs_without_logprobs", CHAT, {**h, "top_logprobs": 2}),
        ("top_logprobs_huge", CHAT, {**h, "logprobs": True, "top_logprobs": 10**6}),
        ("batch_over_the_queue", COMPLETIONS, {**c, "prompt": ["Hi"] * 1000}),
        # Unsupported.
        ("suffix", COMPLETIONS, {**c, "suffix": "the end"}),
        ("best_of_3", COMPLETIONS, {**c, "best_of": 3}),
        ("tools", CHAT, {**h, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("response_format_json", CHAT, {**h, "response_format": {"type": "json_object"}}),
        # The model's name.
        ("wrong_model", COMPLETIONS, {**c, "model": "gpt-4"}),
        ("wrong_model_chat", CHAT, {**h, "model": model + "-nope"}),
        ("empty_model", COMPLETIONS, {**c, "model": ""}),
        ("long_model", CHAT, {**h, "model": "m" * 100_000}),
        # Wrong method or path.
        ("get_completions", COMPLETIONS, None),
        ("unknown_path", "/v1/engines/davinci/completions", c),
    ]
    return [
        (name, "GET" if body is None else "POST", path, b"" if body is None else body)
        for name, path, body in cases
    ]


def malformed_probe(rng: random.Random, case: tuple[str, str, str, bytes | Body]) -> Probe:
    name, method, path, body = case
    if isinstance(body, dict):
        if "stream" not in body and rng.random() < 0.3:
            body = {**body, "stream": True}
        return Probe(
            f"malformed.{name}", path, encode(body), method=method, stream=body.get("stream") is True
        )
    return Probe(f"malformed.{name}", path, body, method=method)


def hostile_cases() -> list[tuple[str, str | None, Body]]:
    """(name, path or None for either endpoint, settings): extreme values, each a 2xx or a 4xx."""
    seed_max = 2**64 - 1
    return [
        ("temperature_1e-40", None, {"temperature": 1e-40}),
        ("temperature_1e-9", None, {"temperature": 1e-9}),
        ("temperature_5e-324", None, {"temperature": 5e-324}),
        ("temperature_1e30", None, {"temperature": 1e30}),
        ("temperature_1e400", None, {"temperature": raw_number("1e400")}),
        ("temperature_-1e400", None, {"temperature": raw_number("-1e400")}),
        ("temperature_1e-40_top_k_1", None, {"temperature": 1e-40, "top_k": 1}),
        ("repetition_penalty_1e-300", None, {"repetition_penalty": 1e-300}),
        ("repetition_penalty_1e300", None, {"repetition_penalty": 1e300}),
        ("repetition_penalty_1e400", None, {"repetition_penalty": raw_number("1e400")}),
        ("greedy_repetition_penalty_1e-300", None, {"temperature": 0.0, "repetition_penalty": 1e-300}),
        ("top_p_1e-300", None, {"top_p": 1e-300}),
        ("top_p_5e-324", None, {"top_p": 5e-324}),
        ("min_p_1", None, {"min_p": 1.0}),
        ("min_p_1e-300", None, {"min_p": 1e-300}),
        ("top_k_1", None, {"top_k": 1}),
        ("top_k_2**62", None, {"top_k": 2**62}),
        ("top_k_10**30", None, {"top_k": 10**30}),
        ("seed_2**64-1_n2", None, {"seed": seed_max, "n": 2}),
        ("seed_2**64-1", None, {"seed": seed_max}),
        ("seed_2**64-16_n16", None, {"seed": seed_max - 15, "n": 16, "max_tokens": 4}),
        ("seed_-2**63", None, {"seed": -(2**63)}),
        ("seed_-1", None, {"seed": -1}),
        ("seed_-2_n3", None, {"seed": -2, "n": 3}),
        ("seed_2**64", None, {"seed": 2**64}),
        ("seed_10**30", None, {"seed": 10**30}),
        ("penalties_-2", None, {"frequency_penalty": -2.0, "presence_penalty": -2.0}),
        ("penalties_2", None, {"frequency_penalty": 2.0, "presence_penalty": 2.0}),
        ("frequency_penalty_1e400", None, {"frequency_penalty": raw_number("1e400")}),
        ("logit_bias_eos_100", None, {"logit_bias": {"2": 100}}),
        ("logit_bias_all_-100", None, {"logit_bias": {str(i): -100 for i in range(4096)}}),
        ("logit_bias_1e400", None, {"logit_bias": {"5": raw_number("1e400")}}),
        ("logit_bias_-1e400", None, {"logit_bias": {"5": raw_number("-1e400")}}),
        (
            "all_extremes",
            None,
            {
                "temperature": 1e30,
                "top_p": 1e-300,
                "top_k": 1,
                "min_p": 1.0,
                "repetition_penalty": 1e300,
                "frequency_penalty": -2.0,
                "presence_penalty": 2.0,
                "logit_bias": {"2": -100, "5": 100},
            },
        ),
        ("n16", None, {"n": 16}),
        ("max_tokens_1", None, {"max_tokens": 1}),
        ("stop_32_strings", None, {"stop": list("etaoinshrdlucmfwypvbgkjqxz.,;:!?")}),
        ("stop_long", None, {"stop": ["x" * 10_000]}),
        ("logprobs_20_temperature_1e30", COMPLETIONS, {"logprobs": 20, "temperature": 1e30}),
        ("echo_score_prompt", COMPLETIONS, {"echo": True, "max_tokens": 0, "logprobs": 20}),
        ("prompt_ids_edges", COMPLETIONS, {"prompt": [0, 1, 2, 255]}),
        ("prompt_only_eos", COMPLETIONS, {"prompt": [2]}),
        ("prompt_long", COMPLETIONS, {"prompt": "Elizabeth walked on. " * 300}),
        (
            "prompt_odd_unicode",
            COMPLETIONS,
            {"prompt": "nul \u0000 bom \ufeff rtl \u202e emoji 🎉 ½ 中文 \U0010ffff"},
        ),
        ("chat_top_logprobs_20", CHAT, {"logprobs": True, "top_logprobs": 20, "temperature": 1e-40}),
        (
            "chat_odd_unicode",
            CHAT,
            {"messages": [{"role": "user", "content": "\u0000\ufeff\u202e🎉\U0010ffff"}]},
        ),
        ("chat_many_messages", CHAT, {"messages": [{"role": "user", "content": "Hi"}] * 200}),
    ]


def hostile_probe(rng: random.Random, case: tuple[str, str | None, Body], model: str) -> Probe:
    name, path, settings = case
    path = path or rng.choice([COMPLETIONS, CHAT])
    stream = rng.random() < 0.5
    if path == CHAT:
        body: Body = {"messages": [{"role": "user", "content": rng.choice(_TEXTS)}]}
    else:
        body = {"prompt": rng.choice(_TEXTS)}
    body |= {"max_tokens": rng.randint(8, 32), "stream": stream}
    if rng.random() < 0.5:
        body["model"] = model
    return Probe(f"hostile.{name}", path, encode(body | settings), stream=stream)


def _http_request(path: str, headers: dict[str, str], body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body


def raw_cases() -> list[tuple[str, bytes, bool]]:
    """(name, bytes, read the reply) of HTTP requests cut off or malformed below JSON: over a raw socket."""
    body = encode({"prompt": "It is a truth universally acknowledged", "max_tokens": 8})
    return [
        ("partial_body_disconnect", _http_request(COMPLETIONS, {"Content-Length": "1000"}, body[:20]), False),
        ("headers_only_disconnect", _http_request(CHAT, {"Content-Length": str(len(body))}, b""), False),
        (
            "partial_headers_disconnect",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
            False,
        ),
        (
            "chunked_disconnect",
            _http_request(COMPLETIONS, {"Transfer-Encoding": "chunked"}, b"10\r\n" + body[:16] + b"\r\n"),
            False,
        ),
        ("content_length_short", _http_request(COMPLETIONS, {"Content-Length": "5"}, body), True),
        ("content_length_not_a_number", _http_request(COMPLETIONS, {"Content-Length": "12abc"}, body), True),
        ("content_length_negative", _http_request(COMPLETIONS, {"Content-Length": "-1"}, body), True),
        ("content_length_huge", _http_request(COMPLETIONS, {"Content-Length": str(10**12)}, b""), True),
        ("no_content_length", _http_request(COMPLETIONS, {}, b""), True),
        ("tls_hello", bytes.fromhex("16030100a5010000a10303") + bytes(range(64)), True),
    ]


def raw_probe(rng: random.Random, case: tuple[str, bytes, bool]) -> Probe:
    name, data, reply = case
    return Probe(f"raw.{name}", raw=data, raw_reply=reply, hold=0.0 if reply else rng.uniform(0.0, 0.2))


class Traffic:
    """The mix the clients draw from: well-formed requests, and with `hostile` > 0 that fraction of
    malformed (half, raw-socket ones among them) and hostile (the other half) requests."""

    def __init__(self, model: str, hostile: float, only: list[str], skip: list[str]) -> None:
        self.model = model
        self.hostile = hostile
        self.only = only
        self.skip = skip
        self.malformed = malformed_cases(model)
        self.sampling = hostile_cases()
        self.raw = raw_cases()

    def wanted(self, kind: str) -> bool:
        if self.only and not any(fnmatch.fnmatchcase(kind, p) for p in self.only):
            return False
        return not any(fnmatch.fnmatchcase(kind, p) for p in self.skip)

    def draw(self, rng: random.Random) -> Probe:
        r = rng.random()
        if r >= self.hostile:
            return normal_probe(rng, self.model)
        if r >= self.hostile / 2:
            return hostile_probe(rng, rng.choice(self.sampling), self.model)
        if rng.random() < 0.15:
            return raw_probe(rng, rng.choice(self.raw))
        return malformed_probe(rng, rng.choice(self.malformed))

    def next(self, rng: random.Random) -> Probe:
        """A random probe of a kind --only and --skip let through."""
        for _ in range(10_000):
            probe = self.draw(rng)
            if self.wanted(probe.kind):
                return probe
        raise ValueError("no request kind matches --only and --skip (with this --hostile-fraction)")


# ---- what the clients saw ---------------------------------------------------------------------


def _text(data: bytes | str, limit: int = 400) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _request_text(probe: Probe, limit: int = 300) -> str:
    if probe.raw is not None:
        return _text(probe.raw, limit)
    return f"{probe.method} {probe.path} {_text(probe.body, limit)}"


@dataclass
class Failures:
    """Occurrences of one kind of failure: counted by request kind, the first few kept in full."""

    kinds: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def add(self, probe: Probe, **details: Any) -> None:
        self.kinds[probe.kind] += 1
        if len(self.examples) < EXAMPLES:
            shown = {k: _text(v) if isinstance(v, (bytes, str)) else v for k, v in details.items()}
            self.examples.append({"kind": probe.kind, "request": _request_text(probe), **shown})

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def report(self) -> dict:
        return {"count": self.count, "by_kind": dict(self.kinds.most_common()), "examples": self.examples}


@dataclass
class Tally:
    """Everything the clients saw, by request kind.

    A 503 or an error event in a stream means a model step or the engine failed: every request then
    in the engine fails alike, the one that caused it among them. So the requests in flight at such
    a moment are kept (`trouble`): the cause is one of them.
    """

    start: float = field(default_factory=time.monotonic)
    requests: int = 0
    tokens: int = 0  # tokens received: logprobs entries or text chunks of streams, usage of whole answers
    by_kind: defaultdict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    by_status: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # requests with no status: given up, disconnected
    cancelled: Counter = field(default_factory=Counter)
    server_errors: Failures = field(default_factory=Failures)  # 5xx but 503
    unavailable: Failures = field(default_factory=Failures)  # 503
    stream_errors: Failures = field(default_factory=Failures)  # data: {"error": ...} in a stream
    transport_errors: Failures = field(default_factory=Failures)  # refused, reset, timed out
    transport_types: Counter = field(default_factory=Counter)  # by exception, "... after a 5xx"
    refused_well_formed: Failures = field(default_factory=Failures)  # a 4xx (not 429) for a good request
    invalid: Failures = field(default_factory=Failures)  # a body that is not what the API promises
    truncated: Failures = field(default_factory=Failures)  # a stream that ended without [DONE]
    in_flight: dict[int, tuple[Probe, float]] = field(default_factory=dict)
    troubles: list[dict] = field(default_factory=list)
    last_trouble: float = -math.inf

    def now(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def status(self, probe: Probe, status: int, body: bytes = b"") -> None:
        self.by_kind[probe.kind][str(status)] += 1
        self.by_status[str(status)] += 1
        if status == 503:
            self.unavailable.add(probe, status=status, response=body)
            self.trouble(probe)
        elif status >= 500:
            self.server_errors.add(probe, status=status, response=body)
        elif probe.well_formed and status not in (200, 429):
            self.refused_well_formed.add(probe, status=status, response=body)

    def stream_error(self, probe: Probe, event: str) -> None:
        self.stream_errors.add(probe, event=event)
        self.trouble(probe)

    def trouble(self, probe: Probe) -> None:
        """Keep the requests in flight now, unless this continues a failure seen within the last 2 s."""
        now = self.now()
        new = now - self.last_trouble > 2.0
        self.last_trouble = now
        if new and len(self.troubles) < EXAMPLES:
            in_flight = sorted(self.in_flight.values(), key=lambda pair: pair[1])
            self.troubles.append(
                {
                    "at_s": now,
                    "seen_by": probe.kind,
                    "in_flight": [
                        {"kind": p.kind, "since_s": since, "request": _request_text(p, 200)}
                        for p, since in in_flight
                    ],
                }
            )

    def outcome(self, probe: Probe, label: str) -> None:
        self.by_kind[probe.kind][label] += 1
        self.outcomes[label] += 1


def chunk_tokens(chunk: Body) -> int:
    """Tokens in a stream chunk: its logprobs entries when asked for, else 1 per choice with text."""
    tokens = 0
    for choice in chunk.get("choices") or []:
        logprobs = choice.get("logprobs") or {}
        if logprobs.get("tokens") is not None:  # completions
            tokens += len(logprobs["tokens"])
        elif logprobs.get("content") is not None:  # chat
            tokens += len(logprobs["content"])
        elif choice.get("text") or (choice.get("delta") or {}).get("content"):
            tokens += 1
    return tokens


def _check_body(probe: Probe, status: int, body: bytes, tally: Tally) -> None:
    """A 2xx carries choices (its usage counts the tokens); an error carries OpenAI's error object."""
    try:
        data = json.loads(body)
    except ValueError:
        tally.invalid.add(probe, status=status, response=body)
        return
    if not isinstance(data, dict):
        tally.invalid.add(probe, status=status, response=body)
    elif status < 300:
        if "choices" not in data:
            tally.invalid.add(probe, status=status, response=body)
        tally.tokens += (data.get("usage") or {}).get("completion_tokens", 0)
    elif not isinstance(data.get("error"), dict):
        tally.invalid.add(probe, status=status, response=body)


async def _read_stream(response: httpx.Response, probe: Probe, tally: Tally) -> None:
    if probe.cancel_after == 0:
        tally.cancelled["at_headers"] += 1
        return
    seen = 0
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            tally.invalid.add(probe, status=200, response=data)
            continue
        if "error" in chunk:
            tally.stream_error(probe, data)
            continue
        tokens = chunk_tokens(chunk)
        tally.tokens += tokens
        seen += tokens > 0
        if probe.cancel_after is not None and seen >= probe.cancel_after:
            tally.cancelled["mid_stream"] += 1
            return  # leaving the block closes the connection mid-stream
    if not done:
        tally.truncated.add(probe)


async def _exchange(http: httpx.AsyncClient, probe: Probe, tally: Tally) -> int:
    """One request over the client's connection pool; its HTTP status."""
    async with http.stream(probe.method, probe.path, content=probe.body, headers=JSON_HEADERS) as response:
        if probe.stream and response.status_code == 200:
            tally.status(probe, 200)
            await _read_stream(response, probe, tally)
            return 200
        body = await response.aread()
        tally.status(probe, response.status_code, body)
        _check_body(probe, response.status_code, body, tally)
        return response.status_code


def _status_of(line: bytes) -> int | None:
    parts = line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


async def _send_raw(address: tuple[str, int], probe: Probe, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError as exc:  # refused: the server is gone
        tally.transport_errors.add(probe, error=f"{type(exc).__name__}: {exc}")
        tally.transport_types[type(exc).__name__] += 1
        tally.outcome(probe, "transport_error")
        return
    try:
        writer.write(probe.raw or b"")
        await writer.drain()
        if not probe.raw_reply:
            await asyncio.sleep(probe.hold)
            tally.outcome(probe, "disconnected")
            return
        status = _status_of(await asyncio.wait_for(reader.readline(), 30))
        if status is None:
            tally.outcome(probe, "no_reply")
            return
        rest = await asyncio.wait_for(reader.read(4096), 5) if status >= 500 else b""
        tally.status(probe, status, rest)
    except (OSError, asyncio.TimeoutError):  # the server may close a connection it cannot make sense of
        tally.outcome(probe, "no_reply")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send(
    http: httpx.AsyncClient, address: tuple[str, int], probe: Probe, tally: Tally, after_5xx: bool = False
) -> int | None:
    """Send one probe and record what came back; the HTTP status of a request over `http` (else None).

    `after_5xx`: the previous answer on this client was a 5xx. uvicorn closes a keep-alive connection
    after an exception escaped the app, without saying so, and the next request on it is reset.
    """
    tally.requests += 1
    token = tally.requests
    tally.in_flight[token] = (probe, tally.now())
    try:
        if probe.raw is not None:
            await _send_raw(address, probe, tally)
        elif probe.give_up_after is not None:
            return await asyncio.wait_for(_exchange(http, probe, tally), probe.give_up_after)
        else:
            return await _exchange(http, probe, tally)
    except asyncio.TimeoutError:
        tally.outcome(probe, "given_up")
        tally.cancelled["given_up"] += 1
    except (httpx.HTTPError, OSError) as exc:
        tally.transport_errors.add(probe, error=f"{type(exc).__name__}: {exc}", after_5xx=after_5xx)
        tally.transport_types[type(exc).__name__ + (" after a 5xx" if after_5xx else "")] += 1
        tally.outcome(probe, "transport_error")
    finally:
        del tally.in_flight[token]
    return None


# ---- the server and its health ----------------------------------------------------------------


@dataclass
class Run:
    """The run's clock, and why it stopped early (the server or its engine died)."""

    start: float
    deadline: float
    stop_reason: str | None = None

    def over(self) -> bool:
        return self.stop_reason is not None or time.monotonic() >= self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    status: int | str  # /health's HTTP status, or the transport error's name
    body: Body
    latency_ms: float
    rss_mib: float | None = None
    fds: int | None = None


def usage(process: psutil.Process | None) -> tuple[float | None, int | None]:
    """The server's RSS in MiB and its open file descriptors (None without a process to look at)."""
    if process is None:
        return None, None
    try:
        with process.oneshot():
            return round(process.memory_info().rss / 2**20, 1), process.num_fds()
    except psutil.Error:
        return None, None


async def health(admin: httpx.AsyncClient) -> tuple[int | str, Body, float]:
    """GET /health: (status or transport error's name, body, latency in ms)."""
    start = time.perf_counter()
    try:
        response = await admin.get("/health")
        body = (
            response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        )
        status: int | str = response.status_code
    except (httpx.HTTPError, ValueError) as exc:
        status, body = type(exc).__name__, {}
    return status, body, round((time.perf_counter() - start) * 1000, 1)


async def watch(
    admin: httpx.AsyncClient,
    process: psutil.Process | None,
    server: subprocess.Popen | None,
    every: float,
    run: Run,
    samples: list[Sample],
) -> None:
    """Sample /health and the server's memory every `every` s; stop the run if the server dies."""
    unreachable = 0
    while True:
        tick = time.monotonic()
        status, body, latency = await health(admin)
        rss, fds = usage(process)
        samples.append(Sample(round(run.elapsed(), 2), status, body, latency, rss, fds))
        unreachable = unreachable + 1 if isinstance(status, str) else 0
        if server is not None and server.poll() is not None:
            run.stop_reason = run.stop_reason or f"the server process exited (code {server.returncode})"
        elif body.get("status") == "failed":
            run.stop_reason = run.stop_reason or f"the engine failed: {body.get('error')}"
        elif unreachable >= 3:
            run.stop_reason = run.stop_reason or f"/health unreachable ({status}) 3 times in a row"
        await asyncio.sleep(max(0.0, every - (time.monotonic() - tick)))


async def settle(admin: httpx.AsyncClient, timeout: float) -> float | None:
    """Seconds until /health shows no slot in use and an empty queue (None: not within `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        status, body, _ = await health(admin)
        if status == 200 and body.get("slots_in_use") == 0 and body.get("queue_length") == 0:
            return round(time.monotonic() - start, 2)
        await asyncio.sleep(0.1)
    return None


_METRIC = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


async def metrics(admin: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    """/metrics as {(name, ((label, value), ...)): value}; empty if it cannot be read."""
    try:
        text = (await admin.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match and not line.startswith("#"):
            labels = tuple(sorted(_LABEL.findall(match.group(2) or "")))
            with contextlib.suppress(ValueError):
                values[(match.group(1), labels)] = float(match.group(3))
    return values


def metrics_summary(before: dict, after: dict) -> dict:
    """What the server counted during the run: requests by endpoint and status, tokens, steps."""
    if not after:
        return {}
    requests: dict[str, dict[str, int]] = defaultdict(dict)
    for (name, labels), value in after.items():
        if name == "pyjamba_requests_total":
            label = dict(labels)
            delta = int(value - before.get((name, labels), 0.0))
            if delta:
                requests[label.get("endpoint", "?")][label.get("status", "?")] = delta

    def delta(name: str) -> int:
        return int(after.get((name, ()), 0.0) - before.get((name, ()), 0.0))

    return {
        "requests": dict(requests),
        "prompt_tokens": delta("pyjamba_prompt_tokens_total"),
        "generation_tokens": delta("pyjamba_generation_tokens_total"),
        "engine_steps": delta("pyjamba_engine_steps_total"),
        "slots_in_use": after.get(("pyjamba_slots_in_use", ())),
        "queue_length": after.get(("pyjamba_queue_length", ())),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `pyjamba serve` this script started."""

    process: subprocess.Popen
    url: str
    command: list[str]
    log: Path
    started_in_s: float = 0.0  # from the command to /health 200

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the server drains, then exits 0); killed past `timeout`. Its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_server(args: argparse.Namespace) -> Server:
    """`python -m pyjamba serve` on a free loopback port, its output in a log file; returns once /health is 200."""
    port = _free_port()
    command = [sys.executable, "-m", "pyjamba", "serve", "--port", str(port)]
    for flag, value in (
        ("--model", args.model),
        ("--slots", args.slots),
        ("--threads", args.threads),
        ("--max-context", args.max_context),
    ):
        if value is not None:
            command += [flag, str(value)]
    command += shlex.split(args.server_args)
    if args.server_log:
        log = Path(args.server_log)
    else:
        fd, name = tempfile.mkstemp(prefix="pyjamba-soak-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", command, log)
    start = time.monotonic()
    while time.monotonic() < start + args.start_timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}:\n{_log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                server.started_in_s = round(time.monotonic() - start, 1)
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(
        f"the server on {server.url} was not up within {args.start_timeout} s:\n{_log_tail(log)}"
    )


def log_exceptions(path: Path, limit: int = 10) -> list[dict]:
    """The exceptions in the server's log (each traceback's last line), most frequent first."""
    counts: Counter = Counter()
    in_traceback = False
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line.startswith(" "):
            counts[line[:300]] += 1
            in_traceback = False
    return [{"line": line, "count": n} for line, n in counts.most_common(limit)]


# ---- the run ----------------------------------------------------------------------------------


def downsample(points: list, limit: int = SERIES_POINTS) -> list:
    """About `limit` evenly spaced points, the last one kept."""
    if len(points) <= limit:
        return points
    step = math.ceil(len(points) / limit)
    kept = points[::step]
    return kept if kept[-1] is points[-1] else [*kept, points[-1]]


async def _client(
    url: str, address: tuple[str, int], traffic: Traffic, rng: random.Random, tally: Tally, run: Run
) -> None:
    # Connections idle for 2 s are dropped here before the server's keep-alive (5 s) drops them
    # under a request; a read waits up to 2 minutes (longer: the server hangs).
    timeout = httpx.Timeout(120.0, connect=10.0)
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        previous: int | None = None  # the status of the last answer on this client's connection
        while not run.over():
            probe = traffic.next(rng)
            status = await send(
                http, address, probe, tally, after_5xx=previous is not None and previous >= 500
            )
            if probe.raw is None:  # raw probes have sockets of their own
                previous = status
            if status in (429, 503):  # busy or failing: back off a little, as a client would
                await asyncio.sleep(0.2)


def _rss_report(samples: list[Sample], warmup: float) -> dict:
    rss = [(s.t, s.rss_mib) for s in samples if s.rss_mib is not None]
    if not rss:  # a server at --url: its process is not ours to look at
        return {"rss_mib": None, "rss_series": [], "open_fds": None}
    warm = next((mib for t, mib in rss if t >= warmup), None)
    fds = [s.fds for s in samples if s.fds is not None]
    return {
        "rss_mib": {
            "start": rss[0][1],
            "after_warmup": warm,
            "warmup_s": warmup,
            "end": rss[-1][1],
            "max": max(mib for _, mib in rss),
            "growth_after_warmup": None if warm is None else round(rss[-1][1] - warm, 1),
        },
        "rss_series": [list(point) for point in downsample(rss)],
        "open_fds": {"start": fds[0], "end": fds[-1], "max": max(fds)} if fds else None,
    }


def _health_report(samples: list[Sample]) -> dict:
    bad = [s for s in samples if s.status != 200]
    return {
        "always_200": not bad,
        "samples": len(samples),
        "non_200_count": len(bad),
        "non_200": [{"t": s.t, "status": s.status, "body": s.body} for s in bad[:20]],
        "max_slots_in_use": max((s.body.get("slots_in_use", 0) for s in samples), default=None),
        "max_queue_length": max((s.body.get("queue_length", 0) for s in samples), default=None),
        "max_latency_ms": max((s.latency_ms for s in samples), default=None),
    }


async def soak(url: str, server: Server | None, args: argparse.Namespace) -> dict:
    """Run the clients against the server at `url` and return the report (without the verdict)."""
    process = psutil.Process(server.process.pid) if server is not None else None
    parsed = httpx.URL(url)
    address = (parsed.host, parsed.port or 80)
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as admin:
        model = (await admin.get("/v1/models")).json()["data"][0]["id"]
        traffic = Traffic(model, args.hostile_fraction, args.only, args.skip)
        traffic.next(random.Random(args.seed))  # fails at once if --only and --skip leave nothing
        before = await metrics(admin)
        samples: list[Sample] = []
        start = time.monotonic()
        tally = Tally(start)
        run = Run(start, start + args.minutes * 60)
        watcher = asyncio.create_task(
            watch(admin, process, server and server.process, args.sample_every, run, samples)
        )
        rng = random.Random(args.seed)
        seeds = [rng.randrange(2**63) for _ in range(args.clients)]
        clients = (_client(url, address, traffic, random.Random(s), tally, run) for s in seeds)
        await asyncio.gather(*clients)
        elapsed = run.elapsed()
        settled_in = await settle(admin, args.settle)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        end_status, end_body, _ = await health(admin)
        after = await metrics(admin)
    # Alive: the process runs (a server this script started), or /health answered (one at --url).
    alive = server.process.poll() is None if server is not None else not isinstance(end_status, str)
    answered = sum(n for status, n in tally.by_status.items() if status.isdigit())
    return {
        "bench": "soak",
        "url": url,
        "model": model,
        "server_command": server.command if server is not None else None,
        "server_started_in_s": server.started_in_s if server is not None else None,
        "clients": args.clients,
        "minutes": args.minutes,
        "seed": args.seed,
        "hostile_fraction": args.hostile_fraction,
        "only": args.only,
        "skip": args.skip,
        "elapsed_s": round(elapsed, 1),
        "stopped_early": run.stop_reason,
        "requests": tally.requests,
        "requests_per_s": round(tally.requests / elapsed, 2),
        "answered_per_s": round(answered / elapsed, 2),
        "tokens_received": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed, 1),
        "by_status": dict(sorted(tally.by_status.items())),
        "no_status": dict(tally.outcomes),
        "cancelled": dict(tally.cancelled),
        "count_5xx": tally.server_errors.count + tally.unavailable.count,
        "server_errors_5xx": tally.server_errors.report(),
        "unavailable_503": tally.unavailable.report(),
        "stream_error_events": tally.stream_errors.report(),
        "engine_trouble": tally.troubles,
        "transport_errors": {**tally.transport_errors.report(), "by_type": dict(tally.transport_types)},
        "well_formed_refused": tally.refused_well_formed.report(),
        "invalid_responses": tally.invalid.report(),
        "truncated_streams": tally.truncated.report(),
        "by_kind": {kind: dict(sorted(c.items())) for kind, c in sorted(tally.by_kind.items())},
        **_rss_report(samples, args.warmup),
        "health": _health_report(samples),
        "end": {
            "health_status": end_status,
            "slots_in_use": end_body.get("slots_in_use"),
            "queue_length": end_body.get("queue_length"),
            "settled_in_s": settled_in,
        },
        "settle_s": args.settle,
        "metrics": metrics_summary(before, after),
        "server_alive": alive,
    }


def verdict(report: dict) -> list[str]:
    """Why the run failed (empty: it passed)."""

    def kinds(section: dict) -> str:
        return ", ".join(f"{kind} x{n}" for kind, n in list(section["by_kind"].items())[:8])

    reasons = []
    if report["stopped_early"]:
        reasons.append(f"stopped early after {report['elapsed_s']} s: {report['stopped_early']}")
    for key, what in (
        ("server_errors_5xx", "responses with a 5xx status other than 503"),
        ("unavailable_503", "503 responses (a model step or the engine failed; see engine_trouble)"),
        ("stream_error_events", "streams that ended with an error event"),
    ):
        if report[key]["count"]:
            reasons.append(f"{report[key]['count']} {what}: {kinds(report[key])}")
    transport = report["transport_errors"]
    if transport["count"]:
        types = ", ".join(f"{name} x{n}" for name, n in transport["by_type"].items())
        reasons.append(f"{transport['count']} transport errors (refused, reset or timed out): {types}")
    health = report["health"]
    if not health["always_200"]:
        first = health["non_200"][0]
        reasons.append(
            f"/health was not 200 in {health['non_200_count']} of {health['samples']} samples "
            f"(first at {first['t']} s: {first['status']} {json.dumps(first['body'])[:200]})"
        )
    end = report["end"]
    if end["health_status"] != 200:
        reasons.append(f"at the end /health answered {end['health_status']}")
    elif end["slots_in_use"] != 0 or end["queue_length"] != 0:
        reasons.append(
            f"at the end {end['slots_in_use']} slots were in use and {end['queue_length']} sequences queued "
            f"(after waiting {report['settle_s']} s for them to settle)"
        )
    if not report["server_alive"]:
        reasons.append("the server is not alive at the end")
    return reasons


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="attach to a running server (no RSS then), e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--model", help="the model folder to serve (default: the model shipped in the package)"
    )
    started = parser.add_argument_group("the server this script starts (not with --url)")
    started.add_argument("--slots", type=int, help="pyjamba serve --slots (default: its own, 8)")
    started.add_argument("--threads", type=int, help="pyjamba serve --threads (default: torch's)")
    started.add_argument("--max-context", type=int, help="pyjamba serve --max-context")
    started.add_argument("--server-args", default="", help="more arguments for pyjamba serve, one string")
    started.add_argument("--server-log", help="where the server's output goes (default: a temporary file)")
    started.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for /health")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 32; 4 with --quick)")
    parser.add_argument("--minutes", type=float, help="length of the run (default 5; 0.5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: 4 clients, 30 s")
    parser.add_argument("--seed", type=int, default=0, help="seeds every client's random choices")
    parser.add_argument(
        "--hostile-fraction",
        type=float,
        default=0.4,
        help="the fraction of requests malformed or hostile (default 0.4)",
    )
    parser.add_argument("--no-hostile", action="store_true", help="well-formed requests only")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="only request kinds (by_kind keys) matching; repeatable",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out request kinds matching; repeatable",
    )
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between /health samples")
    parser.add_argument("--warmup", type=float, help="seconds before the warm RSS (default: a fifth, <= 30)")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds to wait for free slots at the end"
    )
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = 4 if args.quick else 32
    if args.minutes is None:
        args.minutes = 0.5 if args.quick else 5.0
    if args.no_hostile:
        args.hostile_fraction = 0.0
    if args.warmup is None:
        args.warmup = round(min(30.0, args.minutes * 60 / 5), 1)
    if args.clients < 1 or args.minutes <= 0 or not 0 <= args.hostile_fraction <= 1:
        parser.error("--clients must be >= 1, --minutes > 0, --hostile-fraction in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    server = None if args.url else start_server(args)
    exit_code = None
    try:
        report = asyncio.run(soak(args.url.rstrip("/") if args.url else server.url, server, args))
    finally:
        if server is not None:
            exit_code = server.stop()
    if server is not None:
        report["server_exit_code"] = exit_code
        report["server_log"] = str(server.log)
        report["server_exceptions"] = log_exceptions(server.log)
    reasons = verdict(report)
    report["passed"] = not reasons
    report["failures"] = reasons
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for reason in reasons:
        print(f"soak: FAIL: {reason}", file=sys.stderr)
    if not reasons:
        print(f"soak: passed ({report['requests']} requests in {report['elapsed_s']} s)", file=sys.stderr)
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
