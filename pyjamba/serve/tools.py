"""Function calling: how a chat template's family writes tool calls, chosen from the template.

Jamba 1.5 / 1.6 / 1.7 write every call of a turn as one JSON array inside `<tool_calls>...</tool_calls>`;
Jamba2 and Jamba Reasoning 3B write one JSON object per `<tool_call>...</tool_call>` (as ChatML
templates do). A template that names neither tag gets the Jamba2 form when it is ChatML.

Also here: `parse_calls`, the JSON between the tags as OpenAI tool calls (chat_output.py finds the
tags in a choice's text), and the checks of a request's `tools`, `tool_choice` and the `tool_calls`
of its history (requests.py turns a ToolError into a 400 naming the field).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "JAMBA2_TOOLS",
    "JAMBA15_TOOLS",
    "ToolCall",
    "ToolError",
    "ToolFormat",
    "check_tool_choice",
    "check_tools",
    "history_tool_calls",
    "parse_calls",
    "tool_format",
]


@dataclass(frozen=True)
class ToolFormat:
    """The text around a turn's tool calls: `open` JSON `close`, the JSON an array of calls when
    `array`, else one call per tag (repeated for several calls)."""

    name: str
    open: str
    close: str
    array: bool


JAMBA15_TOOLS = ToolFormat("jamba-1.5", "<tool_calls>", "</tool_calls>", array=True)
JAMBA2_TOOLS = ToolFormat("jamba2", "<tool_call>", "</tool_call>", array=False)


def tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template's model writes, or None when the template has no sign of one."""
    if template is None:
        return None
    if JAMBA15_TOOLS.open in template:
        return JAMBA15_TOOLS
    if JAMBA2_TOOLS.open in template or "<|im_start|>" in template:
        return JAMBA2_TOOLS
    return None


# ---- the model's calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: the function's name and its arguments as JSON text (OpenAI's
    `function.arguments`, a JSON object)."""

    name: str
    arguments: str


def _call(item: Any) -> ToolCall | None:
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, Mapping):
        return None
    return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def parse_calls(body: str) -> list[ToolCall] | None:
    """The calls in the JSON between a format's tags: one call object `{"name": ..., "arguments":
    {...}}` or an array of them (either form in either format). None when the text is not that, so
    that the caller leaves it as content, as vLLM does with malformed calls."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


# ---- requests: tools, tool_choice, the history's calls ----------------------------------------


class ToolError(ValueError):
    """A tools-related request field that breaks a rule; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's rule for function names (and a dot, as vLLM)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """The request's `tools` checked: each `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}` with a valid, unique name. They reach the template as the client sent them, as
    transformers and vLLM pass them."""
    if not isinstance(tools, list):
        raise ToolError(f"tools must be a list of tools, got {type(tools).__name__}", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolError(
                f'{where} must be {{"type": "function", "function": {{...}}}}, got {tool!r}', "tools"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolError(f"{where}.function must be an object with a name, got {function!r}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(
                f"{where}.function.name must be 1 to 64 letters, digits, '_', '.' or '-', got {name!r}",
                "tools",
            )
        if name in names:
            raise ToolError(f"{where}: two tools are named {name!r}", "tools")
        names.add(name)
        for key, kind in (("description", str), ("parameters", Mapping)):
            if function.get(key) is not None and not isinstance(function[key], kind):
                what = "a string" if kind is str else "a JSON schema object"
                raise ToolError(f"{where}.function.{key} must be {what}, got {function[key]!r}", "tools")
    return [dict(tool) for tool in tools]


def check_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """`tool_choice` checked and defaulted as OpenAI does: "auto" with tools, "none" without."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise ToolError(f"tool_choice {choice!r} needs tools: the request gives none", "tool_choice")
        return choice
    name = None
    if (
        isinstance(choice, Mapping)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), Mapping)
    ):
        name = choice["function"].get("name")
    if not isinstance(name, str):
        raise ToolError(
            "tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}',
            "tool_choice",
        )
    known = [t["function"]["name"] for t in tools or []]
    if name not in known:
        listed = ", ".join(known) if known else "none given"
        raise ToolError(
            f"tool_choice names the function {name!r}, which is not among the tools ({listed})", "tool_choice"
        )
    return {"type": "function", "function": {"name": name}}


def history_tool_calls(calls: list[Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` for its template: OpenAI's form, each call's arguments
    parsed from JSON text into an object (vLLM does the same: templates write them with `tojson`)."""
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ToolError(
                f"{at} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", "messages"
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError) as exc:
                raise ToolError(f"{at}.function.arguments is not valid JSON: {exc}", "messages") from None
        if not isinstance(arguments, Mapping):
            raise ToolError(f"{at}.function.arguments must be a JSON object, got {arguments!r}", "messages")
        entry = {**call, "type": "function", "function": {**function, "arguments": dict(arguments)}}
        out.append(entry)
    return out
