"""Tools, documents with citations, and reasoning through the official `openai` client against the app.

The model is a tiny random one whose tokenizer has each scripted piece of text as one token; a
logit_bias ranks the pieces (100, 96, 92, ...) and a strong repetition penalty takes each out once
written, so greedy decoding writes them in order, then the end-of-sequence token. The chat templates
are the test fixtures that render the Jamba families' formats (tests/fixtures/templates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from pyjamba.config import JambaConfig
from pyjamba.model import JambaForCausalLM
from pyjamba.runtime import SHIPPED_MODEL
from pyjamba.serve.app import Backend as Served
from pyjamba.serve.app import create_app
from pyjamba.serve.chat_output import OutputSpec
from pyjamba.serve.engine import Engine
from pyjamba.serve.requests import Limits, chat_plan
from pyjamba.serve.schemas import ChatCompletionRequest
from pyjamba.serve.text import ChoiceText
from pyjamba.serve.tools import JAMBA2_TOOLS, JAMBA15_TOOLS
from pyjamba.testing import tiny_tokenizer
from pyjamba.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATES = {
    p.stem: p.read_text(encoding="utf-8")
    for p in (Path(__file__).parent / "fixtures" / "templates").glob("*.jinja")
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# No piece may occur in the prompt (the repetition penalty would take it out): the tools' system
# turn holds "\n<tool_call>\n" and "}\n</tool_call>", so the tags ride inside longer pieces here.
J2_CALL = [
    'I will check.\n<tool_call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>',
]
J2_BROKEN = ['Checking.\n<tool_call>\n{"name": "get_weather", ', "oops\n</tool_call>"]
J15_CALL = ['<tool_calls>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n]</tool_calls>"]
ANSWER = ["It is 18°C in Paris."]
CITED = ["The capital is Paris.", " <citations>[0]</citations>"]
THOUGHT = ["Two and two make four.", "</think>", "\n\nFour."]
PIECES = sorted({*J2_CALL, *J2_BROKEN, *J15_CALL, *ANSWER, *CITED, *THOUGHT})
DOCUMENTS = [{"title": "France", "text": "Paris is the capital of France."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tiny_tokenizer(tmp_path_factory.mktemp("tools-serve"))
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p in PIECES])
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_pretrained(folder)
    config = JambaConfig.from_preset("jamba-tiny").replace(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = JambaForCausalLM(config)
    model.init_weights()
    engine = Engine(model.eval(), slots=4, prefill_chunk=64, max_queue=8)
    app = create_app(Served(engine, tokenizer, "tiny", stop_tokens=frozenset(tokenizer.eos_token_ids)))
    with TestClient(app) as http:
        yield (
            openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0),
            tokenizer,
        )


@pytest.fixture
def client(served):
    return served[0]


@pytest.fixture
def tokenizer(served):
    return served[1]


@pytest.fixture
def template(served, monkeypatch):
    """Serve with one of the fixture templates: `template("jamba2")`."""

    def use(name: str) -> str:
        monkeypatch.setitem(served[1].chat_templates, "default", TEMPLATES[name])
        return TEMPLATES[name]

    return use


def script(tokenizer: Tokenizer, pieces: list[str]) -> dict:
    """Request settings under which greedy decoding writes `pieces` in order, then ends."""
    bias = {str(tokenizer.token_to_id(p)): 100 - 4 * i for i, p in enumerate(pieces)}
    bias[str(tokenizer.eos_token_id)] = 100 - 4 * len(pieces)
    return {
        "temperature": 0,
        "logit_bias": bias,
        "max_tokens": len(pieces) + 1,
        "extra_body": {"repetition_penalty": 50.0},
    }


def stream(client, **kwargs) -> list:
    return [c for c in client.chat.completions.create(model="tiny", stream=True, **kwargs) if c.choices]


def joined(chunks: list) -> dict:
    """A stream's deltas joined into a message, calls by index (the openai client's own way)."""
    out = {"content": "", "reasoning_content": "", "calls": {}, "citations": None, "finish": None}
    for chunk in chunks:
        choice = chunk.choices[0]
        delta = choice.delta
        out["content"] += delta.content or ""
        out["reasoning_content"] += (delta.model_extra or {}).get("reasoning_content") or ""
        if (delta.model_extra or {}).get("citations") is not None:
            assert out["citations"] is None and choice.finish_reason is not None  # once, at the end
            out["citations"] = delta.model_extra["citations"]
        for call in delta.tool_calls or []:
            entry = out["calls"].setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            if call.id:
                assert entry["id"] is None and call.type == "function"
                entry["id"] = call.id
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        if choice.finish_reason is not None:
            out["finish"] = choice.finish_reason
    return out


def test_a_tool_call_round_trip(client, tokenizer, template):
    source = template("jamba2")
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], **script(tokenizer, J2_CALL)
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # Cut by max_tokens: "length" says so, even though the call itself was complete.
    cut = {**script(tokenizer, J2_CALL), "max_tokens": len(J2_CALL)}
    truncated = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], **cut)
    assert truncated.choices[0].finish_reason == "length" and truncated.choices[0].message.tool_calls
    assert joined(stream(client, messages=ASK, tools=[WEATHER], **cut))["finish"] == "length"
    # The prompt was the template's, tools included, as transformers renders it.
    rendered = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tools=[WEATHER], tokenize=True)
    assert first.usage.prompt_tokens == len(rendered)

    # Streamed: the content, then the call as OpenAI streams it (id, type and name; then arguments).
    chunks = stream(client, messages=ASK, tools=[WEATHER], **script(tokenizer, J2_CALL))
    pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert [(p[0].index, p[0].function.name, p[0].function.arguments) for p in pieces] == [
        (0, "get_weather", ""),
        (0, None, '{"city": "Paris"}'),
    ]
    whole = joined(chunks)
    assert whole["content"] == "I will check." and whole["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in whole["calls"].values()] == [
        ("get_weather", call.function.arguments)
    ]

    # The call and its result go back into the history, rendered by the template.
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"},
    ]
    second = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], **script(tokenizer, ANSWER)
    )
    assert second.choices[0].message.content == ANSWER[0]
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    expected = (
        "<|im_start|>assistant\nI will check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18°C, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}  # as vLLM hands it over
    text = tokenizer.apply_chat_template(
        history, add_generation_prompt=True, tools=[WEATHER], chat_template=source
    )
    assert text.endswith(expected)
    assert second.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


def test_the_jamba_1_5_format(client, tokenizer, template):
    template("jamba-1.5")
    first = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], **script(tokenizer, J15_CALL)
    )
    [call] = first.choices[0].message.tool_calls
    assert first.choices[0].message.content is None and first.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    whole = joined(stream(client, messages=ASK, tools=[WEATHER], **script(tokenizer, J15_CALL)))
    assert whole["content"] == "" and [c["name"] for c in whole["calls"].values()] == ["get_weather"]


def test_malformed_calls_and_tool_choice_none_stay_content(client, tokenizer, template):
    template("jamba2")
    broken = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], **script(tokenizer, J2_BROKEN)
    )
    assert broken.choices[0].message.content == "".join(J2_BROKEN)
    assert broken.choices[0].message.tool_calls is None and broken.choices[0].finish_reason == "stop"
    whole = joined(stream(client, messages=ASK, tools=[WEATHER], **script(tokenizer, J2_BROKEN)))
    assert whole["content"] == "".join(J2_BROKEN) and not whole["calls"] and whole["finish"] == "stop"
    # tool_choice "none": no tools in the prompt, and the text is not read for calls.
    none = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none", **script(tokenizer, J2_CALL)
    )
    assert none.choices[0].message.content == "".join(J2_CALL) and none.choices[0].finish_reason == "stop"
    assert none.usage.prompt_tokens == len(
        tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True)
    )


def test_documents_and_citations(client, tokenizer, template):
    template("jamba-1.5")
    kwargs = {"messages": ASK, **script(tokenizer, CITED)}
    kwargs["extra_body"] |= {"documents": DOCUMENTS, "chat_template_kwargs": {"citation_mode": True}}
    answer = client.chat.completions.create(model="tiny", **kwargs)
    message = answer.choices[0].message
    assert message.content == CITED[0] and message.model_extra["citations"] == [0]
    text = tokenizer.apply_chat_template(
        ASK, add_generation_prompt=True, documents=DOCUMENTS, citation_mode=True
    )
    assert "## Document ID: 0\nTitle: France\nText: Paris is the capital of France.\n</documents>" in text
    assert answer.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    chunks = stream(client, **kwargs)
    whole = joined(chunks)
    assert whole["content"] == CITED[0] and whole["citations"] == [0] and whole["finish"] == "stop"


def test_reasoning_is_split_from_the_answer(client, tokenizer, template):
    template("jamba-reasoning")
    answer = client.chat.completions.create(model="tiny", messages=ASK, **script(tokenizer, THOUGHT))
    message = answer.choices[0].message
    assert message.model_extra["reasoning_content"] == THOUGHT[0] and message.content == "Four."
    chunks = stream(client, messages=ASK, **script(tokenizer, THOUGHT))
    whole = joined(chunks)
    assert (whole["reasoning_content"], whole["content"]) == (THOUGHT[0], "Four.")
    kinds = [
        k
        for c in chunks
        for k in ("reasoning_content", "content")
        if (c.choices[0].delta.model_dump().get(k))
    ]
    assert kinds == ["reasoning_content", "content"]  # the thinking first, then the answer
    # Cut short while thinking: all reasoning, no content.
    short = client.chat.completions.create(
        model="tiny", messages=ASK, **{**script(tokenizer, THOUGHT), "max_tokens": 1}
    )
    assert short.choices[0].message.content is None and short.choices[0].finish_reason == "length"
    assert short.choices[0].message.model_extra["reasoning_content"] == THOUGHT[0]


CALL_ID = "call_1"
CALLED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ],
}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
        ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "'f', which is not among the tools (get_weather)",
        ),
        (
            {"messages": [*ASK, CALLED, {"role": "tool", "content": "1"}]},
            "messages",
            "needs the tool_call_id",
        ),
        (
            {"messages": [*ASK, {**CALLED, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
            "messages",
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        ({"messages": [{**CALLED, "role": "user"}]}, "messages", "only assistant messages carry tool_calls"),
        ({"documents": [{"title": "t"}]}, "documents", 'documents[0] must be an object with a string "text"'),
        ({"documents": "Paris"}, "documents", None),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "cannot set messages"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(client, template, extra, param, words):
    template("jamba2")
    body = {"messages": ASK, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny", max_tokens=2, extra_body=body, messages=body.pop("messages")
        )
    error = info.value.body
    assert error["param"] == param or (words is None and error["type"] == "invalid_request_error"), error
    if words:
        assert words in error["message"]


def test_tools_need_a_template_that_renders_them(client, served):
    # The tiny tokenizer's plain ChatML template has no tools in it: calling them cannot work.
    with pytest.raises(openai.BadRequestError, match="does not render tools"):
        client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=2)
    plain = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=2
    )
    assert plain.choices[0].message.tool_calls is None


def test_a_tool_use_template_beside_the_default_one_serves_tools(client, tokenizer, monkeypatch):
    # Folders may name a second template `tool_use` (transformers renders it when tools are given):
    # its format is the one parsed, though the default template knows nothing of tools.
    monkeypatch.setitem(tokenizer.chat_templates, "tool_use", TEMPLATES["jamba2"])
    answer = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], **script(tokenizer, J2_CALL)
    )
    assert [c.function.name for c in answer.choices[0].message.tool_calls] == ["get_weather"]
    assert answer.choices[0].finish_reason == "tool_calls"


# ---- the plan: what reaches the engine and the parser ------------------------------------------


def _plan(tokenizer: Tokenizer, **body):
    request = ChatCompletionRequest.model_validate({"messages": ASK, "max_tokens": 4, **body})
    return chat_plan(request, tokenizer, Limits(max_context=2048, vocab_size=tokenizer.vocab_size), {})


def test_the_plan_carries_tools_tool_choice_and_what_to_parse(tokenizer, template):
    template("jamba2")
    plan = _plan(tokenizer, tools=[WEATHER])
    assert (plan.tools, plan.tool_choice) == ([WEATHER], "auto")
    assert plan.output == OutputSpec(tools=JAMBA2_TOOLS) and plan.skip_special_tokens
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert _plan(tokenizer, tools=[WEATHER], tool_choice=named).tool_choice == named
    assert _plan(tokenizer, tools=[WEATHER], tool_choice="none").output == OutputSpec()
    template("jamba-reasoning")
    assert _plan(tokenizer).output == OutputSpec(reasoning=True)
    template("jamba-1.5")
    assert _plan(tokenizer, tools=[WEATHER]).output == OutputSpec(tools=JAMBA15_TOOLS, citations=True)


def test_tags_that_are_special_tokens_are_kept_in_the_text(tmp_path):
    """Jamba 1.5's tool tags are special tokens: the choice's text keeps special tokens then (as
    vLLM's Jamba parser asks), or the parser would never see the tags."""
    folder = tiny_tokenizer(tmp_path, chat_template=TEMPLATES["jamba-1.5"])
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.add_special_tokens(
        [AddedToken("<tool_calls>", special=True), AddedToken("</tool_calls>", special=True)]
    )
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_pretrained(folder)
    assert not _plan(tokenizer, tools=[WEATHER]).skip_special_tokens
    assert _plan(tokenizer).skip_special_tokens  # no tools: nothing special to look for
    ids = tokenizer.encode(
        '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>', add_special_tokens=False
    )
    text = ChoiceText(tokenizer, [], frozenset(), skip_special_tokens=False)
    released = "".join(text.push(i).text for i in ids) + text.finish().text
    assert released == '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>'


# The shipped model's template before it learned tools: plain chats must render byte for byte the same.
OLD_SHIPPED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_the_shipped_template_renders_tools_in_the_jamba2_form():
    shipped = Tokenizer.from_pretrained(SHIPPED_MODEL)
    chats = [
        ASK,
        [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "Sun."}],
    ]
    for chat in chats:
        for generation in (True, False):
            assert shipped.apply_chat_template(chat, add_generation_prompt=generation) == (
                shipped.apply_chat_template(
                    chat, add_generation_prompt=generation, chat_template=OLD_SHIPPED_TEMPLATE
                )
            )
    history = [
        *ASK,
        {
            **CALLED,
            "tool_calls": [{**CALLED["tool_calls"][0], "function": {"name": "get_weather", "arguments": {}}}],
        },
        {"role": "tool", "tool_call_id": CALL_ID, "content": "Sun."},
    ]
    text = shipped.apply_chat_template(history, add_generation_prompt=True, tools=[WEATHER])
    assert text == shipped.apply_chat_template(
        history, add_generation_prompt=True, tools=[WEATHER], chat_template=TEMPLATES["jamba2"]
    )
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>' in text
    assert "<tool_response>\nSun.\n</tool_response>" in text


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tools_documents_and_history_reach_templates_as_transformers_passes_them(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    folder = tiny_tokenizer(tmp_path, chat_template=TEMPLATES[name])
    ours, theirs = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            **CALLED,
            "tool_calls": [{**CALLED["tool_calls"][0], "function": {"name": "get_weather", "arguments": {}}}],
        },
        {"role": "tool", "tool_call_id": CALL_ID, "content": "Sun."},
        {"role": "user", "content": "Thanks"},
    ]
    kwargs = {
        "tools": [WEATHER],
        "documents": DOCUMENTS,
        "citation_mode": True,
        "add_generation_prompt": True,
    }
    text = ours.apply_chat_template(history, **kwargs)
    assert text == theirs.apply_chat_template(history, tokenize=False, **kwargs)
    assert "get_weather" in text and ("Document ID: 0" in text) == (name == "jamba-1.5")
