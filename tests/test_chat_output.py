"""chat_output.py and tools.py's parsers: a choice's text split into content, reasoning, tool calls
and citations, for both tool formats, with malformed output left as content, and the same message
whether the text comes whole, cut at any one place, or a character at a time."""

from __future__ import annotations

import json

import pytest

from pyjamba.serve.chat_output import ChatOutput, OutputSpec
from pyjamba.serve.tools import (
    JAMBA2_TOOLS,
    JAMBA15_TOOLS,
    ToolCall,
    ToolError,
    check_tool_choice,
    check_tools,
    history_tool_calls,
    parse_calls,
    tool_format,
)

J2 = OutputSpec(tools=JAMBA2_TOOLS)
J15 = OutputSpec(tools=JAMBA15_TOOLS, citations=True)
THINK = OutputSpec(tools=JAMBA2_TOOLS, reasoning=True)
PLAIN = OutputSpec()

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}'
WEATHER = ToolCall("get_weather", '{"city": "Paris", "unit": "°C"}')

# (spec, text, content, reasoning, calls, citations)
CASES = [
    (J2, "Hello there.", "Hello there.", None, [], []),
    (J2, f"<tool_call>{CALL}</tool_call>", None, None, [WEATHER], []),
    (J2, f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n", "Let me look.", None, [WEATHER], []),
    (
        J2,
        f'<tool_call>{CALL}</tool_call>\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>',
        None,
        None,
        [WEATHER, ToolCall("now", "{}")],
        [],
    ),
    # Arguments written as a JSON string, and "parameters" for "arguments": read as calls too.
    (
        J2,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        None,
        None,
        [ToolCall("f", '{"a": 1}')],
        [],
    ),
    (
        J2,
        '<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call>',
        None,
        None,
        [ToolCall("f", '{"a": [1, 2]}')],
        [],
    ),
    # Text after a call stays content; the whitespace around the call goes.
    (J2, f"<tool_call>{CALL}</tool_call>\n\nDone. ", "Done. ", None, [WEATHER], []),
    # Malformed calls stay as written: bad JSON, no name, arguments that are no object, never closed.
    (J2, '<tool_call>{"name": oops}</tool_call>', '<tool_call>{"name": oops}</tool_call>', None, [], []),
    (
        J2,
        'x <tool_call>{"arguments": {}}</tool_call> y',
        'x <tool_call>{"arguments": {}}</tool_call> y',
        None,
        [],
        [],
    ),
    (
        J2,
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        None,
        [],
        [],
    ),
    (J2, '<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', None, [], []),
    (J2, "<tool_call></tool_call>", "<tool_call></tool_call>", None, [], []),
    # A call whose close tag never came (the choice ended) is still a call if its JSON is whole.
    (J2, f"<tool_call>{CALL}", None, None, [WEATHER], []),
    # Text that only looks like the start of a tag.
    (J2, "a < b, <tool and <tool_cal", "a < b, <tool and <tool_cal", None, [], []),
    (J2, "1 <citations>[0]</citations>", "1 <citations>[0]</citations>", None, [], []),  # not Jamba 1.5's
    # Jamba 1.5: one array of calls; citations split out.
    (
        J15,
        '<tool_calls>[\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}},\n'
        '{"name": "now", "arguments": {}}\n]</tool_calls>',
        None,
        None,
        [WEATHER, ToolCall("now", "{}")],
        [],
    ),
    (J15, "<tool_calls>[]</tool_calls>", "<tool_calls>[]</tool_calls>", None, [], []),
    (J15, f"<tool_call>{CALL}</tool_call>", f"<tool_call>{CALL}</tool_call>", None, [], []),  # Jamba2's tag
    (J15, "Paris is the capital.\n<citations>[0, 2]</citations>", "Paris is the capital.", None, [], [0, 2]),
    (
        J15,
        "Paris <citations>[1]</citations> is large <citations>[1, 0]</citations>.",
        "Paris is large.",
        None,
        [],
        [1, 0],
    ),
    (J15, "See <citations>zero</citations>", "See <citations>zero</citations>", None, [], []),
    (J15, "See <citations>[0]", "See", None, [], [0]),  # unclosed at the end, but whole: as calls
    (J15, "See <citations>[0", "See <citations>[0", None, [], []),
    # Reasoning: opened by the prompt, or by the text; the content starts after </think>.
    (THINK, "Two and two.\n</think>\n\nFour.", "Four.", "Two and two.\n", [], []),
    (THINK, "Still thinking", None, "Still thinking", [], []),
    (THINK, f"Weather?</think>\n<tool_call>{CALL}</tool_call>", None, "Weather?", [WEATHER], []),
    (PLAIN, "\n<think>hm</think> Yes.", "Yes.", "hm", [], []),
    (PLAIN, "<think>", None, "", [], []),
    (PLAIN, "I <think> so.", "I <think> so.", None, [], []),
    (
        PLAIN,
        f"<tool_call>{CALL}</tool_call>",
        f"<tool_call>{CALL}</tool_call>",
        None,
        [],
        [],
    ),  # no tools asked
    (PLAIN, "  spaced  \n", "  spaced  \n", None, [], []),
    (J2, "  spaced  \n", "  spaced  \n", None, [], []),
]


def _run(spec: OutputSpec, chunks: list[str]) -> dict:
    out = ChatOutput(spec)
    deltas = [out.push(c) for c in chunks] + [out.finish()]
    joined = {
        "content": "".join(d.content for d in deltas),
        "reasoning": "".join(d.reasoning for d in deltas),
        "calls": [call for d in deltas for call in d.tool_calls],
        "citations": [d.citations for d in deltas if d.citations is not None],
    }
    # The deltas join to the message; calls come with their index; citations only at the end.
    assert joined["content"] == out.content
    assert joined["reasoning"] == (out.reasoning or "")
    assert joined["calls"] == list(enumerate(out.tool_calls))
    assert joined["citations"] == ([out.citations] if out.citations else [])
    assert all(d.citations is None for d in deltas[:-1])
    return {
        "content": out.message_content(),
        "reasoning": out.reasoning,
        "calls": out.tool_calls,
        "citations": out.citations,
    }


@pytest.mark.parametrize(("spec", "text", "content", "reasoning", "calls", "citations"), CASES)
def test_parsed_whole_and_at_every_cut(spec, text, content, reasoning, calls, citations):
    expected = {"content": content, "reasoning": reasoning, "calls": calls, "citations": citations}
    assert _run(spec, [text]) == expected
    assert _run(spec, list(text)) == expected  # a character per push
    for i in range(len(text) + 1):
        assert _run(spec, [text[:i], text[i:]]) == expected, i
    for i in range(0, len(text) + 1, 3):  # two cuts, and empty pushes
        for j in range(i, len(text) + 1, 5):
            assert _run(spec, [text[:i], "", text[i:j], text[j:]]) == expected, (i, j)


def test_text_is_released_as_soon_as_it_cannot_start_a_tag():
    out = ChatOutput(J2)
    assert out.push("Hello <").content == "Hello"  # the space and '<' wait
    assert out.push("b").content == " <b"
    assert out.push(" <tool_ca").content == ""
    delta = out.push("ll>" + CALL)
    assert delta.content == "" and delta.tool_calls == []  # a call waits for its close tag
    delta = out.push("</tool_call>")
    assert delta.tool_calls == [(0, WEATHER)]
    reasoning = ChatOutput(THINK)
    assert reasoning.push("a</thi").reasoning == "a"
    assert reasoning.push("nk>b").content == "b"


def test_parse_calls():
    assert parse_calls(CALL) == [WEATHER]
    assert parse_calls(f"[{CALL}, {CALL}]") == [WEATHER, WEATHER]
    assert parse_calls('{"name": "f"}') == [ToolCall("f", "{}")]
    for bad in (
        "",
        "[]",
        "{}",
        "1",
        '{"name": ""}',
        '{"name": 3}',
        f"[{CALL}, 3]",
        '{"name": "f", "arguments": "x"}',
    ):
        assert parse_calls(bad) is None, bad
    assert parse_calls("[" * 100_000) is None  # deep nesting is malformed, not a crash


def test_tool_format_is_chosen_from_the_template():
    assert tool_format(None) is None
    assert tool_format("{{ '<tool_calls>' }}") is JAMBA15_TOOLS
    assert tool_format("<|im_start|>{{ m }}") is JAMBA2_TOOLS
    assert tool_format("plain {{ m }}") is None


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_and_tool_choice_checks():
    assert check_tools([TOOL]) == [TOOL]
    assert check_tool_choice(None, [TOOL]) == "auto"
    assert check_tool_choice(None, None) == "none"
    assert check_tool_choice("required", [TOOL]) == "required"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert check_tool_choice(named, [TOOL]) == named
    bad_tools = [
        ({"type": "function"}, "must be a list"),
        ([{"type": "code"}], "tools[0] must be"),
        ([{"type": "function", "function": "f"}], "tools[0].function must be"),
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
        ([TOOL, TOOL], "two tools are named 'get_weather'"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
    ]
    for tools, words in bad_tools:
        with pytest.raises(ToolError, match=words.replace("[", r"\[").replace("(", r"\(")):
            check_tools(tools)
    for choice, tools, words in [
        ("auto", None, "needs tools"),
        ("required", [], "needs tools"),
        ("always", [TOOL], "must be 'none'"),
        ({"type": "function", "function": {"name": "f"}}, [TOOL], "'f', which is not among the tools"),
        ({"type": "function"}, [TOOL], "must be 'none'"),
    ]:
        with pytest.raises(ToolError, match=words) as info:
            check_tool_choice(choice, tools)
        assert info.value.param == "tool_choice"


def test_history_tool_calls_parse_their_arguments():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    assert history_tool_calls(calls, "messages[1]") == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    ]
    with pytest.raises(
        ToolError, match=r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"
    ):
        history_tool_calls([{"function": {"name": "f", "arguments": "{"}}], "messages[1]")
    with pytest.raises(ToolError, match="must be a JSON object"):
        history_tool_calls([{"function": {"name": "f", "arguments": json.dumps([1])}}], "messages[1]")
    with pytest.raises(ToolError, match="not valid JSON"):
        history_tool_calls([{"function": {"name": "f", "arguments": "[" * 100_000}}], "messages[1]")
    with pytest.raises(ToolError, match=r"tool_calls\[0\] must be"):
        history_tool_calls([{"function": {}}], "messages[1]")
