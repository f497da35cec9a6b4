"""From a parsed request to a plan: prompts as token ids, checked limits, per-choice sampling settings.

Every rule a request can break is checked here, before anything reaches the engine, and raises an
`APIError` (400) that names the parameter and the value. Settings a request leaves out fall back to
the model's `generation_config.json` (temperature, top_p, top_k, min_p, repetition_penalty, as vLLM
does), then to OpenAI's defaults. `max_tokens` 0 is accepted only with `echo`: it scores the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingError, SamplingParams
from ..tokenizer import ChatTemplateError, Tokenizer, TokenizerError
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, _Sampling

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
    )


# ---- chat -------------------------------------------------------------------------------------


def chat_plan(
    req: ChatCompletionRequest, tokenizer: Tokenizer, limits: Limits, defaults: dict[str, Any]
) -> Plan:
    _common(req, limits)
    if req.tools:
        raise _bad("tools are not supported", "tools")
    if req.tool_choice not in (None, "none"):
        raise _bad("tool_choice is not supported", "tool_choice")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise _bad("response_format other than {'type': 'text'} is not supported", "response_format")
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
    messages = []
    for message in req.messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        messages.append(entry)
    if tokenizer.chat_template is None:
        raise _bad("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
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
    return Plan(
        prompts=[Prompt(ids, "")],
        n=req.n,
        max_tokens=[max_tokens],
        params=_choice_params(params, req.n),
        stop=stop,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
