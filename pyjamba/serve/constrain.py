"""Structured output: a request's format (JSON schema, regex, choice, grammar, forced tool call) as a
grammar that masks each sequence's logits, token by token, with llguidance.

Three steps, three objects:

- `Spec`: what a request asks for, in a canonical, hashable form (`spec_from_response_format`,
  `spec_from_guided`, `tool_call_spec` turn the API's fields into one, or raise `ConstraintError`);
- `Constraint`: a Spec compiled for one tokenizer (`Compiler.compile`, cached by Spec: the same
  schema again is a dictionary hit, never a recompile); each choice of a request takes its own
  `Matcher` from it (a copy of the compiled start state: microseconds);
- `Matcher`: one sequence's place in the grammar. The engine asks `allowed_tokens` for the tokens
  every constrained row of a batch may take next (one bitmask for all rows, filled by llguidance,
  in parallel), samples within them, and feeds the token back with `Matcher.accept`.

Why llguidance rather than xgrammar (benchmarks/bench_structured.py, docs/benchmarks.md): both mask
a token in well under a millisecond and compile a typical schema in a few, but xgrammar needs
`transformers` (and triton) at run time, which pyjamba keeps a test-only dependency; llguidance is
one self-contained wheel that reads `tokenizer.json` as it is, special tokens included.

The end of a sequence is the engine's business, not the grammar's: llguidance's own end-of-sequence
bit is replaced by the sequence's stop tokens, allowed only while the grammar is complete; a grammar
that can take nothing more (`Matcher.finished`: a closed JSON object, the last choice) ends the
sequence at once, so its text is exactly the grammar's.

JSON is written as `json.dumps` writes it (`", "` and `": "`, no other whitespace): a model may not
pad with endless blanks, and every answer has one layout.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.torch
import torch

from ..tokenizer import Tokenizer
from .tools import ToolError, ToolFormat, check_tool_choice, check_tools

__all__ = [
    "Compiler",
    "Constraint",
    "ConstraintError",
    "ConstraintRejected",
    "Matcher",
    "Spec",
    "allowed_tokens",
    "allowed_tokens_ref",
    "compiler_for",
    "spec_from_guided",
    "spec_from_response_format",
    "tool_call_spec",
]

logger = logging.getLogger(__name__)

# The layout of generated JSON (see the module docstring). JSON Schema keywords llguidance does not
# implement are refused under `strict`, ignored otherwise ("lenient", as OpenAI's non-strict mode).
_JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class ConstraintError(ValueError):
    """A format the server cannot honour: an invalid schema, regex, grammar or tool. `param` names
    the request field (the server answers 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ConstraintRejected(RuntimeError):
    """A matcher refused a token (or failed inside): the sequence cannot go on."""


@dataclass(frozen=True)
class Spec:
    """A format, canonical: `kind` is "json" (a JSON Schema), "regex", "lark" (a grammar in
    llguidance's Lark) or "choice"; `source` its text (compact JSON for schemas and choices);
    `after`: a special token that comes first, after free text (a reasoning model's `</think>`: it
    thinks freely, then answers in the format); `param` the request field it came from (for error
    messages, not part of the key)."""

    kind: str
    source: str
    strict: bool = True
    param: str = "response_format"
    after: str | None = None

    def key(self) -> tuple[str, str, bool, str | None]:
        return self.kind, self.source, self.strict, self.after


# ---- from the API's fields to a Spec --------------------------------------------------------


def _canonical(value: Any) -> str:
    # Keys keep their order: a schema's property order is the order the model writes them in.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_spec(schema: Any, strict: bool, param: str) -> Spec:
    if isinstance(schema, bool):  # JSON Schema's `true` (anything) and `false` (nothing)
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param)
    return Spec("json", _canonical(schema), strict, param)


def spec_from_response_format(raw: dict[str, Any] | None) -> Spec | None:
    """OpenAI's `response_format`: `text` (None), `json_object`, or `json_schema` with
    `{"name": ..., "schema": {...}, "strict": ...}`."""
    param = "response_format"
    if raw is None:
        return None
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Spec("json", _canonical({"type": "object"}), True, param)
    if kind == "json_schema":
        body = raw.get("json_schema")
        if not isinstance(body, dict):
            raise ConstraintError(
                "response_format of type 'json_schema' needs a 'json_schema' object: "
                '{"name": ..., "schema": {...}}',
                param,
            )
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise ConstraintError(f"response_format.json_schema.name must be a string, got {name!r}", param)
        strict = body.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ConstraintError(
                f"response_format.json_schema.strict must be a boolean, got {strict!r}", param
            )
        # An absent schema is any JSON value (as vLLM takes it).
        return _json_spec(body.get("schema", {}), bool(strict), "response_format")
    raise ConstraintError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param
    )


def spec_from_guided(
    guided_json: Any = None,
    guided_regex: str | None = None,
    guided_choice: list[str] | None = None,
    guided_grammar: str | None = None,
) -> Spec | None:
    """vLLM's extras: at most one of `guided_json` (a schema, as an object or its JSON text),
    `guided_regex`, `guided_choice` (a list of strings), `guided_grammar` (Lark, llguidance's dialect)."""
    given = {
        name: value
        for name, value in (
            ("guided_json", guided_json),
            ("guided_regex", guided_regex),
            ("guided_choice", guided_choice),
            ("guided_grammar", guided_grammar),
        )
        if value is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise ConstraintError(f"give at most one of {', '.join(given)}", next(iter(given)))
    if guided_json is not None:
        if isinstance(guided_json, str):
            try:
                guided_json = json.loads(guided_json)
            except ValueError as exc:
                raise ConstraintError(f"guided_json is not valid JSON: {exc}", "guided_json") from None
        return _json_spec(guided_json, True, "guided_json")
    if guided_regex is not None:
        if not guided_regex:
            raise ConstraintError("guided_regex is empty", "guided_regex")
        return Spec("regex", guided_regex, True, "guided_regex")
    if guided_choice is not None:
        if not guided_choice or not all(isinstance(c, str) and c for c in guided_choice):
            raise ConstraintError("guided_choice must be a list of non-empty strings", "guided_choice")
        return Spec("choice", _canonical(list(dict.fromkeys(guided_choice))), True, "guided_choice")
    if not guided_grammar.strip():
        raise ConstraintError("guided_grammar is empty", "guided_grammar")
    return Spec("lark", guided_grammar, True, "guided_grammar")


def tool_call_spec(
    tools: list[Any], choice: Any, form: ToolFormat, special: frozenset[str], *, parallel: bool = True
) -> Spec | None:
    """The grammar of a forced tool call: `form`'s open tag, the call (or with `parallel`, one or
    more calls) as JSON objects `{"name": NAME, "arguments": {...}}` whose arguments validate
    against that tool's parameters, the close tag, and nothing after. None unless `choice` forces a
    call ("required" or `{"type": "function", "function": {"name": ...}}`); `special` holds the tags
    that are special tokens of the tokenizer (the model writes them as one token, as it was trained to)."""
    if choice in (None, "none", "auto"):
        return None
    try:  # the request's own checks (tools.py), worded for the field they concern
        tools = check_tools(tools or [])
        if not tools:
            raise ConstraintError("tool_choice forces a tool call, but no tools are given", "tool_choice")
        choice = check_tool_choice(choice, tools)
    except ToolError as exc:
        raise ConstraintError(str(exc), exc.param) from None
    described = []  # (name, parameters schema, strict) of each tool
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters")
        described.append(
            (
                function["name"],
                parameters if parameters is not None else {"type": "object"},
                function.get("strict") is True,
            )
        )
    functions = {name: parameters for name, parameters, _ in described}
    if choice != "required":
        name = choice["function"]["name"]
        functions = {name: functions[name]}
    # As response_format: keywords the library does not implement are refused only under `strict`.
    strict = all(is_strict for name, _, is_strict in described if name in functions)
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions.items()
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    layout = {"x-guidance": {**_JSON_LAYOUT, "lenient": not strict}}  # a %json's options live in its schema

    def tag(text: str) -> str:
        return text if text in special else json.dumps(text)

    if form.array:  # Jamba 1.5: one array of every call in one pair of tags
        array = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        body = _canonical({**array, **layout})
        lark = f"start: {tag(form.open)} calls {tag(form.close)}\ncalls: %json {body}\n"
    else:  # Jamba2: a pair of tags around each call
        more = ' ("\\n" one)*' if parallel else ""
        lark = (
            f"start: one{more}\none: {tag(form.open)} call {tag(form.close)}\n"
            f"call: %json {_canonical({**call, **layout})}\n"
        )
    return Spec("lark", lark, strict, "tools")


# ---- compiling ------------------------------------------------------------------------------


class Matcher:
    """One sequence's state in a grammar: what it may write next, and the tokens it has written."""

    def __init__(self, ll: llguidance.LLMatcher, vocab_size: int, eos: Sequence[int]) -> None:
        self._ll = ll
        self.vocab_size = vocab_size  # the mask's width: the tokenizer's ids and the model's
        self._eos = list(eos)  # llguidance's end-of-sequence ids, replaced by the sequence's stop tokens

    @property
    def error(self) -> str | None:
        if not self._ll.is_error():
            return None
        return self._ll.get_error() or "the matcher failed"

    @property
    def accepting(self) -> bool:
        """The text so far is complete: the sequence may end here."""
        return self._ll.is_accepting()

    @property
    def finished(self) -> bool:
        """Complete, and nothing more can follow: the sequence ends here."""
        return self._ll.is_stopped() and not self._ll.is_error()

    def accept(self, token: int) -> None:
        """Move past a token; raises ConstraintRejected if the grammar refuses it."""
        if not self._ll.consume_token(token):
            raise ConstraintRejected(f"the output format refused token {token}: {self._ll.get_error()}")


@dataclass(frozen=True)
class Constraint:
    """A Spec compiled for one tokenizer: `matcher()` gives each sequence its own start."""

    spec: Spec
    _start: llguidance.LLMatcher
    vocab_size: int
    eos: tuple[int, ...]

    def matcher(self) -> Matcher:
        return Matcher(self._start.deep_copy(), self.vocab_size, self.eos)


class Compiler:
    """Compiles Specs for one tokenizer and keeps the last `cache_size` (LRU)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 64) -> None:
        # The tokenizer's own JSON, with the added tokens its tokenizer_config.json declared.
        text = tokenizer.to_json()
        # llguidance needs an end-of-sequence id; a special one is never text, so its bit in a mask
        # means "the end" and nothing else (see _ends).
        eos = tokenizer.eos_token_ids or sorted(tokenizer.special_ids)[:1] or [tokenizer.vocab_size - 1]
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=eos)
        self.eos = tuple(e for e in self.tokenizer.eos_tokens if self.tokenizer.is_special_token(e))
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Constraint] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # how many compilations ran (cache misses)

    def special_tokens(self, texts: Sequence[str]) -> frozenset[str]:
        """Which of these strings are one special token of the tokenizer."""
        found = set()
        for text in texts:
            ids = self.tokenizer.tokenize_str(text, parse_special=True)
            if len(ids) == 1 and self.tokenizer.is_special_token(ids[0]):
                found.add(text)
        return frozenset(found)

    def compile(self, spec: Spec) -> Constraint:
        """The Constraint for `spec` (cached); raises ConstraintError naming what is wrong with it."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        constraint = Constraint(spec, self._build(spec), self.vocab_size, self.eos)
        with self._lock:
            self.compiled += 1
            self._cache[key] = constraint
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return constraint

    def _grammar(self, spec: Spec) -> str:
        grammar = self._format(spec)
        if spec.after is None:
            return grammar
        # Free text, the special token, then the format as a grammar of its own (`@answer`). Free
        # text cannot hold a special token, so the thinking ends exactly at `after`.
        answer = {**json.loads(grammar)["grammars"][0], "name": "answer"}
        lead = {"lark_grammar": f"start: THINKING {spec.after} @answer\nTHINKING: /(?s:.*)/\n"}
        return json.dumps({"grammars": [lead, answer]})

    def _format(self, spec: Spec) -> str:
        if spec.kind == "json":
            options = {**_JSON_LAYOUT, "lenient": not spec.strict}
            return llguidance.LLMatcher.grammar_from_json_schema(spec.source, overrides=options)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            choices = json.loads(spec.source)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, choices)))
        if spec.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec.source)
        raise ValueError(f"unknown constraint kind {spec.kind!r}")

    def _build(self, spec: Spec) -> llguidance.LLMatcher:
        what = {"json": "JSON schema", "regex": "regex", "lark": "grammar", "choice": "choice"}[spec.kind]
        try:
            grammar = self._grammar(spec)
        except ValueError as exc:
            raise ConstraintError(f"{spec.param}: invalid {what}: {exc}", spec.param) from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if problem:
            raise ConstraintError(f"{spec.param}: invalid {what}: {problem.strip()}", spec.param)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"{spec.param}: invalid {what}: {matcher.get_error()}", spec.param)
        return matcher


_compilers: weakref.WeakKeyDictionary[Tokenizer, dict[int, Compiler | ConstraintError]] = (
    weakref.WeakKeyDictionary()
)
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> Compiler:
    """The one Compiler of a tokenizer and a model's vocabulary size (built on first use: about a
    second for a 65,536-token vocabulary)."""
    with _compilers_lock:
        by_size = _compilers.setdefault(tokenizer, {})
        if vocab_size not in by_size:
            try:
                by_size[vocab_size] = Compiler(tokenizer, vocab_size)
            except Exception as exc:  # a tokenizer the grammar library cannot read: no formats, 400s
                by_size[vocab_size] = ConstraintError(
                    f"structured output is not available for this model's tokenizer "
                    f"({type(exc).__name__}: {exc})",
                    "response_format",
                )  # kept: every later request is refused at once, not after another try
        found = by_size[vocab_size]
        if isinstance(found, ConstraintError):
            raise found
        return found


# ---- masks ----------------------------------------------------------------------------------

_executor: llguidance.LLExecutor | None = None
# Bit j of an int32 word (1 << 31 wraps to -2**31: the same bit).
_POWERS = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int32), torch.arange(32, dtype=torch.int32))


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (B, ceil(V' / 32)) int32, bit j of word w for token 32 w + j, as a
    bool mask (B, vocab_size): ids past the bitmask are not allowed."""
    # One AND per bit and a cast: measured faster than shift-and-mask or a byte lookup table.
    allowed = (
        torch.bitwise_and(bitmask[:, :, None], _POWERS).bool().reshape(bitmask.shape[0], -1)
    )  # (B, 32 W)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    return torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))


def _ends(allowed: torch.Tensor, rows: Sequence[tuple[Matcher, frozenset[int]]]) -> torch.Tensor:
    """llguidance's end-of-sequence bits replaced by each row's stop tokens: allowed exactly where the
    text so far is complete (a stop token that is also text, as Jamba2's id 2, never ends a JSON
    string halfway)."""
    vocab_size = allowed.shape[1]
    for i, (matcher, stop) in enumerate(rows):
        allowed[i, [e for e in matcher._eos if e < vocab_size]] = False
        allowed[i, [t for t in stop if t < vocab_size]] = matcher.accepting
    return allowed


def allowed_tokens(rows: Sequence[tuple[Matcher, frozenset[int]]], vocab_size: int) -> torch.Tensor:
    """The tokens each (matcher, stop tokens) row may take next, as a bool mask (B, vocab_size) on
    the CPU: one bitmask for all rows, filled by llguidance's executor (several rows in parallel)."""
    global _executor
    words = (rows[0][0].vocab_size + 31) // 32
    bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
    if len(rows) == 1:
        llguidance.torch.fill_next_token_bitmask(rows[0][0]._ll, bitmask, 0)
    else:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        pairs = [(matcher._ll, i) for i, (matcher, _) in enumerate(rows)]
        llguidance.torch.fill_next_token_bitmask_par(_executor, pairs, bitmask)
    return _ends(_unpack(bitmask, vocab_size), rows)


def allowed_tokens_ref(rows: Sequence[tuple[Matcher, frozenset[int]]], vocab_size: int) -> torch.Tensor:
    """`allowed_tokens` the slow, plain way (the reference its tests hold it to): each row on its
    own, asking llguidance for one byte per token (no bits to unpack)."""
    allowed = torch.zeros(len(rows), vocab_size, dtype=torch.bool)
    for i, (matcher, _) in enumerate(rows):
        bias = torch.frombuffer(bytearray(matcher._ll.compute_logit_bias()), dtype=torch.uint8)
        n = min(vocab_size, bias.numel())
        allowed[i, :n] = bias[:n] > 0
    return _ends(allowed, rows)
