"""Structured output (serve/constrain.py): grammars compiled from response_format, guided_* and forced
tool calls; the batched mask against its one-row reference; the engine sampling inside the mask;
and the server, through the official `openai` client, returning JSON that validates, even from the
small shipped model."""

from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyjamba.model import JambaForCausalLM
from pyjamba.runtime import SHIPPED_MODEL
from pyjamba.serve.app import Backend, create_app
from pyjamba.serve.constrain import (
    Compiler,
    ConstraintError,
    ConstraintRejected,
    allowed_tokens,
    allowed_tokens_ref,
    spec_from_guided,
    spec_from_response_format,
    tool_call_spec,
)
from pyjamba.serve.engine import Engine, Failed, Finished, Sequence, Token
from pyjamba.serve.sampling import SamplingParams
from pyjamba.serve.tools import JAMBA2_TOOLS, JAMBA15_TOOLS
from pyjamba.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.usefixtures("one_thread")

JAMBA2_TOKENIZER = Path(__file__).parent / "fixtures" / "real" / "jamba2-tokenizer" / "tokenizer.json.gz"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "married": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["kind", "proud", "witty"]}, "maxItems": 3},
    },
    "required": ["name", "age", "married"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return Tokenizer.from_pretrained(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def jamba2_tokenizer(tmp_path_factory):
    if not JAMBA2_TOKENIZER.is_file():
        pytest.skip(f"the real Jamba2 tokenizer is not at {JAMBA2_TOKENIZER}")
    folder = tmp_path_factory.mktemp("jamba2-tokenizer")
    (folder / "tokenizer.json").write_bytes(gzip.decompress(JAMBA2_TOKENIZER.read_bytes()))
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["shipped", "jamba2"])
def compiler(request, shipped_tokenizer):
    tokenizer = (
        shipped_tokenizer if request.param == "shipped" else request.getfixturevalue("jamba2_tokenizer")
    )
    return Compiler(tokenizer, tokenizer.vocab_size)


def _feed(matcher, ids: list[int]) -> None:
    for token in ids:
        matcher.accept(token)


def _text_ids(compiler: Compiler, text: str) -> list[int]:
    return compiler.tokenizer.tokenize_str(text)


# ---- specs and matchers ---------------------------------------------------------------------


def test_json_schema_takes_valid_json_in_its_layout_and_refuses_the_rest(compiler):
    constraint = compiler.compile(spec_from_response_format(_schema_format(PERSON)))
    good = json.dumps({"name": "Eliza", "age": 20, "married": False, "tags": ["witty"]})
    matcher = constraint.matcher()
    _feed(matcher, _text_ids(compiler, good))
    assert matcher.finished and matcher.accepting and matcher.error is None
    for bad in ('{"age": 20', '{"name": "E", "age": 200', '{"name": "E", "age": 2, "x"', '{"name":"E"'):
        matcher = constraint.matcher()
        with pytest.raises(ConstraintRejected):
            _feed(matcher, _text_ids(compiler, bad))
        assert matcher.error


def test_the_same_spec_compiles_once_and_matchers_are_independent(compiler):
    spec = spec_from_guided(guided_json={"type": "object", "properties": {"n": {"type": "integer"}}})
    before = compiler.compiled
    first, again = (
        compiler.compile(spec),
        compiler.compile(spec_from_guided(guided_json=json.loads(spec.source))),
    )
    assert first is again and compiler.compiled == before + 1
    a, b = first.matcher(), first.matcher()
    _feed(a, _text_ids(compiler, '{"n": 1'))
    assert not a.finished and not b.accepting  # b is still at the start
    _feed(b, _text_ids(compiler, '{"n": 22}'))
    assert b.finished and not a.finished


def test_choice_and_regex(compiler):
    choice = compiler.compile(spec_from_guided(guided_choice=["yes", 'say "no"', "día"]))
    for text in ("yes", 'say "no"', "día"):
        matcher = choice.matcher()
        _feed(matcher, _text_ids(compiler, text))
        assert matcher.finished
    with pytest.raises(ConstraintRejected):
        _feed(choice.matcher(), _text_ids(compiler, "no"))
    regex = compiler.compile(spec_from_guided(guided_regex=r"[0-9]{2}-[a-z]+"))
    matcher = regex.matcher()
    _feed(matcher, _text_ids(compiler, "42-abc"))
    assert matcher.accepting and not matcher.finished  # [a-z]+ may go on


@pytest.mark.parametrize(
    "spec, param, words",
    [
        (
            lambda: spec_from_response_format(_schema_format({"type": "wat"})),
            "response_format",
            "Invalid type",
        ),
        (lambda: spec_from_guided(guided_regex="[0-9"), "guided_regex", "unclosed"),
        (
            lambda: spec_from_guided(guided_grammar="start: nothing_defined"),
            "guided_grammar",
            "nothing_defined",
        ),
        (lambda: spec_from_guided(guided_json="{not json"), "guided_json", "not valid JSON"),
        (lambda: spec_from_guided(guided_choice=[]), "guided_choice", "non-empty"),
        (lambda: spec_from_guided(guided_regex="a", guided_choice=["a"]), "guided_regex", "at most one"),
        (lambda: spec_from_response_format({"type": "xml"}), "response_format", "json_schema"),
        (lambda: spec_from_response_format({"type": "json_schema"}), "response_format", "json_schema"),
        (
            lambda: tool_call_spec([WEATHER], {"function": {"name": "nope"}}, JAMBA2_TOOLS, frozenset()),
            "tool_choice",
            "nope",
        ),
        (lambda: tool_call_spec([], "required", JAMBA2_TOOLS, frozenset()), "tool_choice", "no tools"),
        (
            lambda: tool_call_spec([{"type": "function"}], "required", JAMBA2_TOOLS, frozenset()),
            "tools",
            "name",
        ),
    ],
)
def test_invalid_formats_name_the_field(shipped_tokenizer, spec, param, words):
    compiler = Compiler(shipped_tokenizer, shipped_tokenizer.vocab_size)
    with pytest.raises(ConstraintError) as caught:
        compiler.compile(spec())
    assert caught.value.param == param and words in str(caught.value)


def test_strict_refuses_unimplemented_keywords_and_non_strict_ignores_them(shipped_tokenizer):
    compiler = Compiler(shipped_tokenizer, shipped_tokenizer.vocab_size)
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    lenient = spec_from_response_format(_schema_format(schema, strict=False))
    assert lenient == spec_from_response_format(_schema_format(schema))  # OpenAI's default: not strict
    matcher = compiler.compile(lenient).matcher()
    _feed(matcher, _text_ids(compiler, "[1, 1]"))
    assert matcher.finished
    with pytest.raises(ConstraintError, match="uniqueItems") as caught:
        compiler.compile(spec_from_response_format(_schema_format(schema, strict=True)))
    assert caught.value.param == "response_format"


def _schema_format(schema, strict: bool | None = None) -> dict:
    body = {"name": "answer", "schema": schema}
    if strict is not None:
        body["strict"] = strict
    return {"type": "json_schema", "json_schema": body}


# ---- forced tool calls ----------------------------------------------------------------------


def test_jamba2_tool_call_opens_and_closes_with_its_special_tokens(jamba2_tokenizer):
    compiler = Compiler(jamba2_tokenizer, 65536)
    special = compiler.special_tokens([JAMBA2_TOOLS.open, JAMBA2_TOOLS.close, "hello"])
    assert special == {"<tool_call>", "</tool_call>"}
    constraint = compiler.compile(tool_call_spec([WEATHER, TIME], "required", JAMBA2_TOOLS, special))
    matcher = constraint.matcher()
    allowed = allowed_tokens([(matcher, frozenset({519}))], 65536)[0]
    assert allowed.nonzero().flatten().tolist() == [531]  # only the special token, never "<" as text
    _feed(
        matcher, [531, *_text_ids(compiler, json.dumps({"name": "get_time", "arguments": {"zone": "CET"}}))]
    )
    allowed = allowed_tokens([(matcher, frozenset({519}))], 65536)[0]
    assert allowed.nonzero().flatten().tolist() == [532]
    matcher.accept(532)
    assert matcher.accepting and not matcher.finished  # another call may follow on a new line
    assert allowed_tokens([(matcher, frozenset({519}))], 65536)[0, 519]
    one = compiler.compile(tool_call_spec([WEATHER, TIME], "required", JAMBA2_TOOLS, special, parallel=False))
    matcher = one.matcher()
    _feed(
        matcher,
        [531, *_text_ids(compiler, json.dumps({"name": "get_time", "arguments": {"zone": "UTC"}})), 532],
    )
    assert matcher.finished  # the turn ends with its one call
    # A named function: only that one; arguments must fit its parameters.
    named = compiler.compile(
        tool_call_spec(
            [WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, JAMBA2_TOOLS, special
        )
    )
    with pytest.raises(ConstraintRejected):
        _feed(named.matcher(), [531, *_text_ids(compiler, '{"name": "get_time"')])
    with pytest.raises(ConstraintRejected):
        _feed(named.matcher(), [531, *_text_ids(compiler, '{"name": "get_weather", "arguments": {"city": 3')])


def test_a_reasoning_model_thinks_freely_then_answers_in_the_format(jamba2_tokenizer):
    from dataclasses import replace

    compiler = Compiler(jamba2_tokenizer, 65536)
    spec = replace(spec_from_response_format(_schema_format(PERSON)), after="</think>")
    assert spec.key() != replace(spec, after=None).key()
    matcher = compiler.compile(spec).matcher()
    _feed(matcher, _text_ids(compiler, 'Hmm, {"name": no JSON yet, </b> as text.\n'))
    allowed = allowed_tokens([(matcher, frozenset({519}))], 65536)[0]
    assert allowed[542] and allowed.sum() > 1000 and not allowed[519]  # free text, or the end of thinking
    matcher.accept(542)  # </think>, the special token
    with pytest.raises(ConstraintRejected):
        _feed(matcher.__class__(matcher._ll.deep_copy(), 65536, ()), _text_ids(compiler, "Sure"))
    _feed(matcher, _text_ids(compiler, json.dumps({"name": "Darcy", "age": 28, "married": False})))
    assert matcher.finished


def test_jamba15_tool_calls_are_one_array_in_text_tags(shipped_tokenizer):
    compiler = Compiler(shipped_tokenizer, shipped_tokenizer.vocab_size)
    special = compiler.special_tokens([JAMBA15_TOOLS.open, JAMBA15_TOOLS.close])
    assert special == frozenset()  # not in this vocabulary: written as text
    constraint = compiler.compile(tool_call_spec([WEATHER, TIME], "required", JAMBA15_TOOLS, special))
    calls = [
        {"name": "get_weather", "arguments": {"city": "Bath", "unit": "C"}},
        {"name": "get_time", "arguments": {"zone": "UTC"}},
    ]
    matcher = constraint.matcher()
    _feed(matcher, _text_ids(compiler, "<tool_calls>" + json.dumps(calls) + "</tool_calls>"))
    assert matcher.finished
    with pytest.raises(ConstraintRejected):
        _feed(constraint.matcher(), _text_ids(compiler, "<tool_calls>[]"))


def test_tool_parameters_are_strict_only_when_the_function_says_so(shipped_tokenizer):
    compiler = Compiler(shipped_tokenizer, shipped_tokenizer.vocab_size)
    tool = json.loads(json.dumps(WEATHER))
    tool["function"]["parameters"]["properties"]["days"] = {"type": "array", "uniqueItems": True}
    compiler.compile(tool_call_spec([tool], "required", JAMBA2_TOOLS, frozenset()))
    tool["function"]["strict"] = True
    with pytest.raises(ConstraintError, match="uniqueItems") as caught:
        compiler.compile(tool_call_spec([tool], "required", JAMBA2_TOOLS, frozenset()))
    assert caught.value.param == "tools"


def test_no_forced_call_without_a_forcing_tool_choice():
    for choice in (None, "none", "auto"):
        assert tool_call_spec([WEATHER], choice, JAMBA2_TOOLS, frozenset()) is None


# ---- the batched mask -----------------------------------------------------------------------


def test_batched_mask_is_the_reference_along_random_walks(compiler):
    specs = [
        spec_from_response_format(_schema_format(PERSON)),
        spec_from_response_format({"type": "json_object"}),
        spec_from_guided(guided_regex=r"(ab|cd)+[0-9]*"),
        spec_from_guided(guided_choice=["Pemberley", "Longbourn", "Netherfield Park"]),
    ]
    stops = [frozenset({2}), frozenset(), frozenset({2, 3}), frozenset({2})]
    vocab = compiler.vocab_size + 7  # a model's vocabulary may be padded past the tokenizer's
    rng = random.Random(0)
    matchers = [compiler.compile(s).matcher() for s in specs]
    for _ in range(12):
        rows = [(m, stop) for m, stop in zip(matchers, stops, strict=True) if not m.finished]
        if not rows:
            break
        fast, ref = allowed_tokens(rows, vocab), allowed_tokens_ref(rows, vocab)
        assert torch.equal(fast, ref)
        assert not fast[:, compiler.vocab_size :].any()
        for i, (matcher, stop) in enumerate(rows):
            ids = fast[i].nonzero().flatten().tolist()
            assert ids
            assert all(e not in ids for e in matcher._eos if e not in stop)
            if stop:  # allowed exactly where the text so far is complete
                assert all(t in ids for t in stop) == matcher.accepting
            token = rng.choice([t for t in ids if t not in stop] or ids)
            if token not in stop:
                matcher.accept(token)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0),
        dict(temperature=0.0, logit_bias={7: 50.0}, repetition_penalty=1.5, frequency_penalty=1.0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.7, top_k=3, top_p=0.5, min_p=0.1, seed=2),
        dict(temperature=1.5, logit_bias={7: 100.0}, presence_penalty=2.0, seed=3),
    ],
)
def test_every_sampler_setting_picks_inside_the_mask(settings):
    from pyjamba.serve.sampling import Sampler

    generator = torch.Generator().manual_seed(0)
    sampler = Sampler(SamplingParams(**settings), prompt=[1, 7, 9], vocab_size=64)
    for _ in range(40):
        logits = torch.randn(1, 64, generator=generator) * 5
        allowed = torch.rand(1, 64, generator=generator) < 0.1
        allowed[0, 7] = False  # the token logit_bias pushes hardest is never allowed
        allowed[0, int(torch.randint(64, (1,), generator=generator))] = True
        token = sampler(logits, allowed)
        assert allowed[0, token]
        if settings["temperature"] == 0.0 and len(settings) == 1:
            assert token == int(logits.masked_fill(~allowed, float("-inf")).argmax())
        sampler.observe(token)
    with pytest.raises(ValueError, match="allows no token"):
        sampler(logits, torch.zeros(1, 64, dtype=torch.bool))


# ---- the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_model():
    return JambaForCausalLM.from_pretrained(SHIPPED_MODEL)


def _run(engine: Engine, sequences: list[Sequence], events: dict) -> None:
    engine.submit(sequences)
    deadline = time.monotonic() + 120
    while not all(any(isinstance(e, Finished | Failed) for e in events[id(s)]) for s in sequences):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_engine_samples_inside_each_rows_grammar(shipped_model, shipped_tokenizer):
    compiler = Compiler(shipped_tokenizer, shipped_model.config.vocab_size)
    schema = compiler.compile(spec_from_response_format(_schema_format(PERSON)))
    choice = compiler.compile(spec_from_guided(guided_choice=["Elizabeth", "Jane", "Lydia"]))
    eos = frozenset(shipped_tokenizer.eos_token_ids)
    prompt = shipped_tokenizer.encode("Tell me about Miss Bennet.")
    events: dict[int, list] = {}
    broken = schema.matcher()
    with pytest.raises(ConstraintRejected):
        broken.accept(shipped_tokenizer.encode("x", add_special_tokens=False)[0])  # left in error

    def sequence(constraint, params, logit_bias=None) -> Sequence:
        seq = Sequence(prompt, 60, params, lambda e: events[id(seq)].append(e), eos, constraint=constraint)
        events[id(seq)] = []
        return seq

    greedy = SamplingParams(temperature=0.0)
    sampled = SamplingParams(
        temperature=1.2, top_p=0.9, top_k=40, seed=5, repetition_penalty=1.3, logit_bias={2: 5.0}
    )
    seqs = [
        sequence(schema.matcher(), greedy),
        sequence(schema.matcher(), sampled),
        sequence(choice.matcher(), sampled),
        sequence(None, greedy),
        sequence(broken, greedy),
    ]
    engine = Engine(shipped_model, slots=8, prefill_chunk=64, max_queue=16)
    engine.start()
    try:
        _run(engine, seqs, events)
    finally:
        engine.stop(10)
    texts = []
    for seq in seqs:
        tokens = [e.token for e in events[id(seq)] if isinstance(e, Token)]
        texts.append((shipped_tokenizer.decode(tokens), events[id(seq)][-1]))
    for text, end in texts[:2]:
        assert end == Finished("stop")
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[2][0] in ("Elizabeth", "Jane", "Lydia") and texts[2][1] == Finished("stop")
    assert isinstance(texts[3][1], Finished)  # the unconstrained row is untouched
    assert isinstance(texts[4][1], Failed) and texts[4][1].status == 500  # alone


# ---- the server, through the openai client --------------------------------------------------


@pytest.fixture(scope="module")
def api(shipped_model, shipped_tokenizer):
    engine = Engine(shipped_model, slots=4, prefill_chunk=64, max_queue=16)
    eos = frozenset(shipped_tokenizer.eos_token_ids) | frozenset(shipped_model.config.eos_token_ids)
    backend = Backend(engine, shipped_tokenizer, "shipped", stop_tokens=eos)
    with TestClient(create_app(backend)) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )
        yield client, http


MESSAGES = [{"role": "user", "content": "Describe Mr Darcy as JSON."}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate(api, stream, temperature):
    client, _ = api
    kwargs = dict(
        model="shipped",
        messages=MESSAGES,
        max_tokens=80,
        temperature=temperature,
        seed=7,
        n=2,
        response_format=_schema_format(PERSON, strict=True),
    )
    if stream:
        texts, finish = ["", ""], [None, None]
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish[choice.index]
    else:
        answer = client.chat.completions.create(**kwargs)
        texts = [c.message.content for c in answer.choices]
        finish = [c.finish_reason for c in answer.choices]
    assert finish == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_guided_choice_and_regex(api):
    client, _ = api
    answer = client.chat.completions.create(
        model="shipped",
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = answer.choices[0].message.content
    assert text.startswith("{")
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    choices = ["Pemberley", "Longbourn", "Netherfield"]
    done = client.completions.create(
        model="shipped",
        prompt="She went to",
        max_tokens=10,
        n=3,
        temperature=1.0,
        seed=3,
        extra_body={"guided_choice": choices},
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in done.choices)
    done = client.completions.create(
        model="shipped", prompt="In the year", max_tokens=10, extra_body={"guided_regex": "1[78][0-9]{2}"}
    )
    assert done.choices[0].text[:2] in ("17", "18") and len(done.choices[0].text) == 4


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": _schema_format({"type": "wat"})}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar"),
        (
            {"extra_body": {"guided_choice": ["a"]}, "response_format": {"type": "json_object"}},
            "guided_choice",
        ),
    ],
)
def test_an_invalid_format_is_a_400_that_names_it(api, extra, param):
    client, http = api
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="shipped", messages=MESSAGES, max_tokens=5, **extra)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_is_a_valid_call(api, choice, stream):
    client, _ = api
    kwargs = dict(model="shipped", messages=MESSAGES, max_tokens=120, temperature=1.0, seed=4, n=2)
    # One call: the small model would rather go on with a second than end its turn.
    kwargs.update(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    calls: dict[int, list] = {0: [], 1: []}
    if stream:
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                for delta in c.delta.tool_calls or []:
                    if delta.function and delta.function.name:
                        calls[c.index].append([delta.function.name, ""])
                    if delta.function and delta.function.arguments:
                        calls[c.index][-1][1] += delta.function.arguments
    else:
        answer = client.chat.completions.create(**kwargs)
        for c in answer.choices:
            assert c.finish_reason == "tool_calls" and not c.message.content
            calls[c.index] = [[t.function.name, t.function.arguments] for t in c.message.tool_calls]
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for made in calls.values():
        assert len(made) == 1
        for name, arguments in made:
            assert name == "get_weather" or (choice == "required" and name in tools)
            jsonschema.validate(json.loads(arguments), tools[name])


# ---- anything a client sends is a format or a ConstraintError (a 400), never a crash --------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_keyword = st.sampled_from(
    [
        "type",
        "properties",
        "items",
        "required",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "pattern",
        "minimum",
        "maxLength",
        "minItems",
        "additionalProperties",
        "format",
        "$defs",
        "not",
        "prefixItems",
    ]
)
_schema = st.recursive(
    st.sampled_from([{}, {"type": "string"}, {"type": "integer"}, True, False]) | _json,
    lambda inner: st.dictionaries(_keyword, inner | st.lists(inner, max_size=2) | _json, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(
        [
            "json_schema",
            "json_object",
            "text",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "raw",
        ]
    ),
    schema=_schema,
    text=st.text(max_size=12),
    strict=st.none() | st.booleans() | _json,
    raw=_json,
)
def test_any_format_compiles_or_is_a_constraint_error(shipped_compiler, kind, schema, text, strict, raw):
    try:
        if kind == "raw":
            spec = spec_from_response_format(raw if isinstance(raw, dict) else {"type": raw})
        elif kind.startswith("guided_"):
            value = {
                "guided_json": schema,
                "guided_regex": text,
                "guided_choice": [text, *([raw] if raw else [])],
                "guided_grammar": "start: " + text,
            }[kind]
            spec = spec_from_guided(**{kind: value})
        else:
            spec = spec_from_response_format(
                {"type": kind, "json_schema": {"name": "x", "schema": schema, "strict": strict}}
            )
        if spec is not None:
            shipped_compiler.compile(spec).matcher()
    except ConstraintError as exc:
        assert exc.param in (
            "response_format",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
        )
        assert str(exc)


@pytest.fixture(scope="module")
def shipped_compiler(shipped_tokenizer):
    return Compiler(shipped_tokenizer, shipped_tokenizer.vocab_size)


def test_a_tokenizer_the_grammar_library_cannot_read_costs_formats_only(monkeypatch):
    from pyjamba.serve import constrain
    from pyjamba.serve.errors import APIError
    from pyjamba.serve.requests import Limits, chat_plan
    from pyjamba.serve.schemas import ChatCompletionRequest

    tokenizer = Tokenizer.from_pretrained(SHIPPED_MODEL)  # a fresh one: no compiler built for it yet
    tries = []

    def unreadable(*args, **kwargs):
        tries.append(1)
        raise ValueError("unsupported pre-tokenizer")

    monkeypatch.setattr(constrain.llguidance, "LLTokenizer", unreadable)
    limits = Limits(max_context=512, vocab_size=tokenizer.vocab_size)
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for _ in range(2):  # refused at once the second time: the failure is kept, not retried
        with pytest.raises(APIError) as caught:
            chat_plan(
                ChatCompletionRequest.model_validate({**ask, "response_format": {"type": "json_object"}}),
                tokenizer,
                limits,
                {},
            )
        assert caught.value.status == 400 and "not available" in str(caught.value)
    assert len(tries) == 1
    assert chat_plan(ChatCompletionRequest.model_validate(ask), tokenizer, limits, {}).constraint is None
