"""A choice's text as an assistant message: content, reasoning, tool calls and citations, whole or streamed.

`ChatOutput.push(text)` takes a choice's text as text.py releases it and returns a `Delta`, what is
now final in each field; `finish()` returns the rest. A whole answer is the deltas joined, so that a
streamed message joins to exactly the non-streamed one.

- Reasoning (vLLM's `reasoning_content`): where the prompt opened `<think>` (Jamba Reasoning 3B's
  generation prompt does), or the text itself opens with it, the text up to `</think>` is
  reasoning; the content starts after the tag, without the whitespace that follows it. A choice cut
  before `</think>` is all reasoning.
- Tool calls, in the format of the template (tools.py): each tagged block is held until its closing
  tag (or the end), then parsed. A block that parses gives its calls; anything else (bad JSON, no
  name, arguments that are no object) stays in the content as written, as vLLM leaves malformed
  calls. Text around a call stays content, the whitespace next to the call does not (but for the
  whitespace between text before and text after it).
- Citations (Jamba 1.5's `<citations>[ids]</citations>`): the ids gathered, in order, into
  `citations`, the block withheld from the content; delivered by `finish()` (a stream's last delta).
A tag cut between two pushes is held back until the next push (or the end) shows whether it is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .tools import ToolCall, ToolFormat, parse_calls

__all__ = [
    "CITATIONS_CLOSE",
    "CITATIONS_OPEN",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ChatOutput",
    "Delta",
    "OutputSpec",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CITATIONS_OPEN, CITATIONS_CLOSE = "<citations>", "</citations>"


@dataclass(frozen=True)
class OutputSpec:
    """What to look for in a chat's text (requests.py decides it from the template and the request)."""

    tools: ToolFormat | None = None  # parse tool calls written in this format
    reasoning: bool = False  # the prompt opened <think>: the text starts as reasoning
    citations: bool = False  # split <citations>[...]</citations> out of the content


@dataclass
class Delta:
    """What a push made final: text per field, calls (with their index in the message), citations."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[int, ToolCall]] = field(default_factory=list)
    citations: list[Any] | None = None  # only from finish(), when the text cited anything


def _safe_end(text: str, tags: tuple[str, ...]) -> int:
    """Where the text stops being final: before a suffix that could be the start of one of `tags`."""
    longest = max(len(t) for t in tags) - 1
    for k in range(min(len(text), longest), 0, -1):
        if any(t.startswith(text[-k:]) for t in tags):
            return len(text) - k
    return len(text)


def _parse_citations(body: str) -> list[Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, (int, str)) and not isinstance(v, bool) for v in value
    ):
        return None
    return value


class ChatOutput:
    """One choice's text split into the fields of an assistant message; see the module docstring."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.content = ""
        self.reasoning: str | None = "" if spec.reasoning else None
        self.tool_calls: list[ToolCall] = []
        self.citations: list[Any] = []
        self._mode = "reasoning" if spec.reasoning else "start"
        self._buf = ""  # text not yet placed
        self._block = ""  # the open tag of the block being read
        # Whitespace is held where a call or citations may follow (it is dropped next to them).
        self._structured = spec.tools is not None or spec.citations
        self._ws = ""  # whitespace held at the end of the content
        self._lstrip = False  # right after </think>: the content's leading whitespace goes
        self._after_block = False  # the last thing placed was a call or citations
        self._delta = Delta()

    # ---- the message --------------------------------------------------------------------------

    def message_content(self) -> str | None:
        """The content as the message holds it: null when there is none beside calls or reasoning."""
        if not self.content and (self.tool_calls or self.reasoning is not None):
            return None
        return self.content

    # ---- feeding ------------------------------------------------------------------------------

    def push(self, text: str) -> Delta:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> Delta:
        """The rest, once the choice has ended: held text, an unclosed block, the citations."""
        self._run(final=True)
        if self._ws and not self._after_block:
            self._emit(self._ws)
        self._ws = ""
        delta = self._take()
        if self.citations:
            delta.citations = list(self.citations)
        return delta

    def _take(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        return delta

    def _tags(self) -> dict[str, str]:
        """The open tags that start a block in the content, with the close tag of each."""
        tags = {}
        if self.spec.tools is not None:
            tags[self.spec.tools.open] = self.spec.tools.close
        if self.spec.citations:
            tags[CITATIONS_OPEN] = CITATIONS_CLOSE
        return tags

    def _run(self, final: bool) -> None:
        while True:
            if self._mode == "start":  # does the text open with <think>?
                head = self._buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN) :]
                    self._mode, self.reasoning = "reasoning", self.reasoning or ""
                    continue
                if not final and THINK_OPEN.startswith(head):  # nothing yet, or the tag's start
                    return
                self._mode = "content"
            elif self._mode == "reasoning":
                i = self._buf.find(THINK_CLOSE)
                if i < 0:
                    cut = len(self._buf) if final else _safe_end(self._buf, (THINK_CLOSE,))
                    self._reason(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                self._reason(self._buf[:i])
                self._buf = self._buf[i + len(THINK_CLOSE) :]
                self._mode, self._lstrip = "content", True
            elif self._mode == "content":
                tags = self._tags()
                hits = [(i, tag) for tag in tags if (i := self._buf.find(tag)) >= 0]
                if not hits:
                    cut = len(self._buf) if final or not tags else _safe_end(self._buf, tuple(tags))
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return
                i, tag = min(hits)
                self._content(self._buf[:i])
                self._buf = self._buf[i + len(tag) :]
                self._mode, self._block = "block", tag
            else:  # in a block: wait for its close tag
                close = self._tags()[self._block]
                i = self._buf.find(close)
                if i < 0 and not final:
                    return
                body = self._buf if i < 0 else self._buf[:i]
                written = self._block + body + ("" if i < 0 else close)
                self._buf = "" if i < 0 else self._buf[i + len(close) :]
                self._mode = "content"
                if not self._place_block(body):
                    self._content(written)

    def _place_block(self, body: str) -> bool:
        """The block's calls or citations into the message; False if it is not one (left as text)."""
        if self._block == CITATIONS_OPEN:
            ids = _parse_citations(body)
            if ids is None:
                return False
            self.citations += [i for i in ids if i not in self.citations]
        else:
            calls = parse_calls(body)
            if calls is None:
                return False
            for call in calls:
                self._delta.tool_calls.append((len(self.tool_calls), call))
                self.tool_calls.append(call)
            self._lstrip = not self.content  # text after calls that opened the message starts clean
        self._ws, self._after_block = "", True
        return True

    def _reason(self, text: str) -> None:
        if text:
            self.reasoning = (self.reasoning or "") + text
            self._delta.reasoning += text

    def _content(self, text: str) -> None:
        if self._lstrip:
            text = text.lstrip()
            if not text:
                return
            self._lstrip = False
        if not self._structured:
            self._emit(text)
            return
        body = text.rstrip()
        if body:
            self._emit(self._ws + body)
            self._ws, self._after_block = text[len(body) :], False
        else:
            self._ws += text

    def _emit(self, text: str) -> None:
        self.content += text
        self._delta.content += text
