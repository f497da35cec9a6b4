"""From a parsed request to a plan: prompts as token ids, checked limits, per-choice sampling settings.

Every rule a request can break is checked here, before anything reaches the engine, and raises an
`APIError` (400) that names the parameter and the value. Settings a request leaves out fall back to
the model's `generation_config.json` (temperature, top_p, top_k, min_p, repetition_penalty, as vLLM
does), then to OpenAI's defaults. `max_tokens` 0 is accepted only with `echo`: it scores the prompt.
A structured output (`response_format`, a `guided_*` extra, a forced tool call) is compiled here
(constrain.py), so an invalid schema or regex is a 400 before anything is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..sampling import SamplingError, SamplingParams
from ..tokenizer import ChatTemplateError, Tokenizer, TokenizerError
from .chat_output import CITATIONS_CLOSE, CITATIONS_OPEN, THINK_CLOSE, THINK_OPEN, OutputSpec
from .constrain import (
    Constraint,
    ConstraintError,
    Spec,
    compiler_for,
    spec_from_guided,
    spec_from_response_format,
    tool_call_spec,
)
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from .tools import ToolError, ToolFormat, check_tool_choice, check_tools, history_tool_calls, tool_format

__all__ = ["Limits", "Plan", "Prompt", "chat_plan", "completion_plan"]


@dataclass(frozen=True)
class Limits:
    """What the server allows, from its command line and the model."""

    max_context: int
    vocab_size: int
    max_n: int = 16
    max_logprobs: int = 20
    max_stop: int = 32
    max_sequences: int = 64  # prompts x n of one request: what the engine's queue can take


@dataclass
class Prompt:
    ids: list[int]
    text: str  # echoed: the prompt's own text, or its ids decoded


@dataclass
class Plan:
    """A request made ready: `n` choices per prompt, choice i of prompt p at index p * n + i."""

    prompts: list[Prompt]
    n: int
    max_tokens: list[int]  # per prompt (absent in the request: the rest of the context)
    params: list[SamplingParams]  # per choice of a prompt (seed + i)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # per generated token: the chosen one's and the k best
    prompt_logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    constraint: Constraint | None = None  # a structured output: each choice takes its own matcher
    # Chat: the checked tools and tool_choice ("none", "auto", "required" or a named function), and
    # what chat_output.py splits out of each choice's text.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "none"
    output: OutputSpec | None = None
    skip_special_tokens: bool = True  # False where a tag the output is split at is a special token

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


def _bad(message: str, param: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _in_range(name: str, value: float | None, low: float, high: float, *, open_low: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise _bad(f"{name} must be a finite number in {bracket}{low}, {high}], got {value}", name)


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias (token ids written as JSON keys) with int keys; the values are checked later."""
    bias = {}
    for key, value in (raw or {}).items():
        # ASCII digits only: str.isdigit() accepts "²" and "١", which int() then refuses or misreads.
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise _bad(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias")
        bias[int(key)] = value
    return bias


def _sampling(req: _Sampling, defaults: dict[str, Any], vocab_size: int) -> SamplingParams:
    """The request's settings over the model's defaults, checked by SamplingParams (the rules
    `generate` and the command line share)."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    top_k = pick("top_k", 0)
    try:
        return SamplingParams(
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=0 if top_k == -1 else top_k,  # vLLM's -1: no limit
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            logit_bias=_logit_bias(req.logit_bias, vocab_size),
            seed=req.seed,
        )
    except SamplingError as exc:
        raise _bad(str(exc), exc.param) from exc


def _stop(req: _Sampling, limits: Limits) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise _bad(f"stop takes at most {limits.max_stop} strings, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise _bad("stop strings must not be empty", "stop")
    return stop


def _common(req: _Sampling, limits: Limits, prompts: int = 1) -> None:
    if not 1 <= req.n <= limits.max_n:
        raise _bad(f"n must be between 1 and {limits.max_n}, got {req.n}", "n")
    if prompts * req.n > limits.max_sequences:  # checked before tokenizing anything
        raise _bad(
            f"The request asks for {prompts * req.n} sequences ({prompts} prompts x n={req.n}), more than "
            f"the queue holds ({limits.max_sequences})",
            "n" if req.n > 1 else "prompt",
        )


def _choice_params(base: SamplingParams, n: int) -> list[SamplingParams]:
    """Choice i draws from seed + i (wrapped, `sampling.choice_seed`): choice 0 is what
    `generate(seed=seed)` draws."""
    return [base.for_choice(i) for i in range(n)]


def _max_tokens(
    given: int | None, prompt_len: int, limits: Limits, *, allow_zero: bool, param: str, what: str
) -> int:
    context = limits.max_context
    if given is None:
        if prompt_len >= context:
            raise _bad(
                f"This model's maximum context length is {context} tokens, but the {what} has "
                f"{prompt_len} tokens: no room left to generate",
                what,
                "context_length_exceeded",
            )
        return context - prompt_len
    if given < 0 or (given == 0 and not allow_zero):
        hint = " (0 is accepted with echo, to score the prompt)" if what == "prompt" else ""
        raise _bad(f"{param} must be at least 1{hint}, got {given}", param)
    if prompt_len + given > context:
        raise _bad(
            f"This model's maximum context length is {context} tokens, but the {what} has {prompt_len} "
            f"tokens and {param} is {given} ({prompt_len} + {given} = {prompt_len + given})",
            param,
            "context_length_exceeded",
        )
    return given


def _constraint(
    req: _Sampling,
    tokenizer: Tokenizer,
    limits: Limits,
    tool_call: Spec | None = None,
    after: str | None = None,
) -> Constraint | None:
    """The request's structured output compiled (cached by spec): `response_format`, a `guided_*`
    extra, or a forced tool call, at most one of them; with `after` (a reasoning model's
    `</think>`), free text first, the format after that tag."""
    try:
        guided = spec_from_guided(req.guided_json, req.guided_regex, req.guided_choice, req.guided_grammar)
        specs = [s for s in (spec_from_response_format(req.response_format), guided, tool_call) if s]
        if not specs:
            return None
        if len(specs) > 1:
            raise ConstraintError(
                f"one output format per request: {' and '.join(s.param for s in specs)} both set one",
                specs[1].param,
            )
        compiler = compiler_for(tokenizer, limits.vocab_size)
        spec = specs[0]
        if after is not None:
            if after not in compiler.special_tokens([after]):
                raise ConstraintError(
                    f"this model thinks before it answers, and its {after!r} is not a special token: "
                    "the output format cannot be held back until the answer",
                    spec.param,
                )
            spec = replace(spec, after=after)
        return compiler.compile(spec)
    except ConstraintError as exc:
        raise _bad(str(exc), exc.param, "invalid_output_format") from exc


def _forced_tool_call(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any],
    parallel: bool,
    form: ToolFormat | None,
    tokenizer: Tokenizer,
    limits: Limits,
) -> Spec | None:
    """With `tool_choice` (checked) "required" or naming a function, the grammar of a valid call in
    the model's tool format `form` (several calls when `parallel`); None otherwise."""
    if tool_choice in ("none", "auto") or form is None:
        return None
    try:
        special = compiler_for(tokenizer, limits.vocab_size).special_tokens([form.open, form.close])
        return tool_call_spec(tools or [], tool_choice, form, special, parallel=parallel)
    except ConstraintError as exc:
        raise _bad(str(exc), exc.param) from exc


# ---- completions ------------------------------------------------------------------------------

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _token_ids(ids: list[Any], where: str, vocab_size: int) -> list[int]:
    if not ids:
        raise _bad(f"{where} is empty: give at least one token", "prompt")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise _bad(f"{where}[{i}] must be a token id (an integer), got {token!r}", "prompt")
        if not 0 <= token < vocab_size:
            raise _bad(f"{where}[{i}] = {token} is not a token id: ids lie in [0, {vocab_size})", "prompt")
    return list(ids)


def _prompts(raw: Any, tokenizer: Tokenizer, vocab_size: int) -> list[Prompt]:
    """The prompt field's four shapes as Prompts."""

    def from_text(text: str, where: str) -> Prompt:
        if not text:
            raise _bad(f"{where} is empty: give some text", "prompt")
        return Prompt(tokenizer.encode(text, add_special_tokens=True), text)

    def from_ids(ids: list[Any], where: str) -> Prompt:
        ids = _token_ids(ids, where, vocab_size)
        return Prompt(ids, tokenizer.decode(ids))

    if isinstance(raw, str):
        return [from_text(raw, "prompt")]
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if raw == [] else type(raw).__name__ if raw is not None else "null"
        raise _bad(f"prompt must be {_PROMPT_SHAPES}; got {got}", "prompt")
    if all(isinstance(p, str) for p in raw):
        return [from_text(p, f"prompt[{i}]") for i, p in enumerate(raw)]
    if all(isinstance(p, int) and not isinstance(p, bool) for p in raw) or not isinstance(
        raw[0], (list, str)
    ):
        return [from_ids(raw, "prompt")]
    if all(isinstance(p, list) for p in raw):
        return [from_ids(p, f"prompt[{i}]") for i, p in enumerate(raw)]
    raise _bad(f"prompt must be {_PROMPT_SHAPES}, not a mix", "prompt")


def completion_plan(
    req: CompletionRequest, tokenizer: Tokenizer, limits: Limits, defaults: dict[str, Any]
) -> Plan:
    batch = isinstance(req.prompt, list) and bool(req.prompt) and isinstance(req.prompt[0], (str, list))
    _common(req, limits, len(req.prompt) if batch else 1)
    if req.suffix:
        raise _bad("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _bad(f"best_of must equal n when given (no best-of ranking here), got {req.best_of}", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= limits.max_logprobs:
        raise _bad(f"logprobs must be between 0 and {limits.max_logprobs}, got {req.logprobs}", "logprobs")
    stop = _stop(req, limits)
    params = _sampling(req, defaults, limits.vocab_size)
    constraint = _constraint(req, tokenizer, limits)
    prompts = _prompts(req.prompt, tokenizer, limits.vocab_size)
    max_tokens = [
        _max_tokens(
            req.max_tokens, len(p.ids), limits, allow_zero=req.echo, param="max_tokens", what="prompt"
        )
        for p in prompts
    ]
    return Plan(
        prompts=prompts,
        n=req.n,
        max_tokens=max_tokens,
        params=_choice_params(params, req.n),
        stop=stop,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
        echo=req.echo,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        constraint=constraint,
    )


# ---- chat -------------------------------------------------------------------------------------


# What a request's chat_template_kwargs may not set: the template's own inputs.
_TEMPLATE_INPUTS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "chat_template"}
)


def _chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The history as the template takes it (transformers' form): tool calls with their arguments
    as objects, tool answers with the id of their call."""
    messages = []
    for i, message in enumerate(req.messages):
        where = f"messages[{i}]"
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            if message.role != "assistant":
                raise _bad(
                    f"{where}: only assistant messages carry tool_calls, not {message.role!r}", "messages"
                )
            try:
                entry["tool_calls"] = history_tool_calls(message.tool_calls, where)
            except ToolError as exc:
                raise _bad(str(exc), exc.param) from exc
        if message.role == "tool":
            if message.tool_call_id is None:
                raise _bad(
                    f"{where}: a tool message needs the tool_call_id of the call it answers", "messages"
                )
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        messages.append(entry)
    return messages


def _documents(documents: list[Any] | None) -> list[dict[str, Any]] | None:
    """vLLM's `documents`: objects with a `text` (a `title` and other fields as the template uses them)."""
    if documents is None:
        return None
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise _bad(
                f'documents[{i}] must be an object with a string "text" (and a "title"), got {doc!r}',
                "documents",
            )
        if "title" in doc and not isinstance(doc["title"], str):
            raise _bad(f"documents[{i}].title must be a string, got {doc['title']!r}", "documents")
    return documents


def _template_context(req: ChatCompletionRequest) -> dict[str, Any]:
    """vLLM's `chat_template_kwargs`: more variables for the template (a mode, a knob)."""
    kwargs = req.chat_template_kwargs or {}
    taken = sorted(_TEMPLATE_INPUTS & kwargs.keys())
    if taken:
        raise _bad(
            f"chat_template_kwargs cannot set {', '.join(taken)}: the request's own fields do",
            "chat_template_kwargs",
        )
    return kwargs


def chat_plan(
    req: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits, defaults: dict[str, Any]
) -> Plan:
    _common(req, limits)
    try:
        tools = None if req.tools is None else check_tools(req.tools)
        tool_choice = check_tool_choice(req.tool_choice, tools)
    except ToolError as exc:
        raise _bad(str(exc), exc.param) from exc
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= req.top_logprobs <= limits.max_logprobs:
            raise _bad(
                f"top_logprobs must be between 0 and {limits.max_logprobs}, got {req.top_logprobs}",
                "top_logprobs",
            )
    stop = _stop(req, limits)
    params = _sampling(req, defaults, limits.vocab_size)
    if not req.messages:
        raise _bad("messages is empty: a chat needs at least one message", "messages")
    messages = _chat_messages(req)
    if tokenizer.chat_template is None:
        raise _bad("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
    template = tokenizer.chat_template_for(tools if tool_choice != "none" else None)
    form = tool_format(template) if tool_choice != "none" else None
    if tool_choice != "none" and (form is None or "tools" not in template):
        raise _bad("this model's chat template does not render tools: it cannot call them", "tools")
    context = _template_context(req)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tools=tools if tool_choice != "none" else None,  # as vLLM with tools excluded on "none"
            documents=_documents(req.documents),
            **context,
        )
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself
    except ChatTemplateError as exc:  # names the template; a template is code and can fail any way
        raise _bad(
            f"the messages do not fit the model's chat template: {exc}", "messages", "chat_template_error"
        ) from exc
    except (TokenizerError, ValueError, TypeError) as exc:
        raise _bad(f"the messages do not fit the model's chat template: {exc}", "messages") from exc
    if not ids:
        raise _bad("the messages render to no tokens", "messages")
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(given, len(ids), limits, allow_zero=False, param=param, what="messages")
    output = OutputSpec(
        tools=form,
        reasoning=text.rstrip().endswith(THINK_OPEN),
        citations=CITATIONS_OPEN in template,
    )
    forced_call = _forced_tool_call(tools, tool_choice, req.parallel_tool_calls, form, tokenizer, limits)
    # A model that thinks first gets its format after `</think>`.
    after = THINK_CLOSE if output.reasoning else None
    constraint = _constraint(req, tokenizer, limits, forced_call, after=after)
    tags = [THINK_OPEN, THINK_CLOSE] + ([form.open, form.close] if form else [])
    tags += [CITATIONS_OPEN, CITATIONS_CLOSE] if output.citations else []
    return Plan(
        prompts=[Prompt(ids, "")],
        n=req.n,
        max_tokens=[max_tokens],
        params=_choice_params(params, req.n),
        stop=stop,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        constraint=constraint,
        tools=tools,
        tool_choice=tool_choice,
        output=output,
        skip_special_tokens=not any(tokenizer.token_to_id(tag) in tokenizer.special_ids for tag in tags),
    )
