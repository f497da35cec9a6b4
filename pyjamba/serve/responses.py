"""OpenAI response bodies from a job's updates: whole answers, or server-sent-event chunks.

Both shapes read the same `Job.updates()`, so a streamed answer joins to the non-streamed one.
Logprobs are the model's own (log-softmax of the raw logits, before temperature and the other
sampling settings, as vLLM reports them). Legacy completions list, per token, its text, its
logprob, a dict of the best alternatives (the chosen token included, so up to k + 1 entries) and
its offset in the returned text; with `echo` the prompt's tokens come first, the first one with
null logprob. Chat lists, per generated token, the token, logprob, UTF-8 bytes and the k best.

A chat choice's text goes through chat_output.py: its reasoning, tool calls and citations become
fields of the message (`reasoning_content`, `tool_calls`, `citations`, each present only when the
text has it) and of the stream's deltas. A tool call is streamed as OpenAI does, in two deltas: its
index, id, type and name with empty arguments, then its arguments; a choice that called a tool
finishes with "tool_calls", unless max_tokens cut it short: then "length", so that a client can tell a
truncated answer (a call cut in the middle stays in `content`, unparsed).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from ..tokenizer import Tokenizer
from .chat_output import ChatOutput, Delta, OutputSpec
from .errors import APIError
from .job import Job, Update
from .requests import Plan
from .sampling import TokenLogprob
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatTokenLogprob,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCall,
    ToolCallOut,
    TopLogprob,
    Usage,
)

__all__ = ["chat_chunks", "chat_completion", "completion", "completion_chunks", "new_id", "sse"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict | str, exclude: set[str] | None = None) -> str:
    """One server-sent event; a model is serialized by pydantic-core (2x faster than json.dumps of
    model_dump, which counts at a chunk per token)."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(job: Job) -> Usage:
    completion = sum(job.completion_tokens)
    return Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion,
        total_tokens=job.prompt_tokens + completion,
    )


class _TokenText:
    """A token's own text (for logprobs), cached: the same ids come back again and again."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def visible(self, token: int) -> str:
        """What the token adds to decoded text (nothing for a special token such as BOS)."""
        return "" if token in self.tokenizer.special_ids else self(token)


# ---- completions ------------------------------------------------------------------------------


class _CompletionLogprobs:
    """One choice's legacy logprobs, built piece by piece (prompt chunks, then generated tokens)."""

    def __init__(self, token_text: _TokenText, prompt_ids: list[int], text_base: int) -> None:
        self.token_text = token_text
        self.prompt_ids = prompt_ids
        self.position = 0  # prompt tokens listed so far
        self.prompt_offset = 0  # their text's length so far
        self.text_base = text_base  # where generated text starts in the returned text (after the echo)

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.token_text(t): lp for t, lp in entry.top}
        top.setdefault(self.token_text(entry.token), entry.logprob)
        return top

    def prompt(self, entries: list[TokenLogprob | None]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry in entries:
            token = self.prompt_ids[self.position]
            text = self.token_text(token)
            out.tokens.append(text)
            out.token_logprobs.append(None if entry is None else entry.logprob)
            out.top_logprobs.append(None if entry is None else self._top(entry))
            out.text_offset.append(self.prompt_offset)
            self.position += 1
            self.prompt_offset += len(self.token_text.visible(token))
        return out

    def generated(self, pairs: list[tuple[TokenLogprob, int]]) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=[self.token_text(e.token) for e, _ in pairs],
            token_logprobs=[e.logprob for e, _ in pairs],
            top_logprobs=[self._top(e) for e, _ in pairs],
            text_offset=[self.text_base + offset for _, offset in pairs],
        )


def _merge(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset


def _completion_builders(job: Job, plan: Plan, tokenizer: Tokenizer) -> list[_CompletionLogprobs]:
    token_text = _TokenText(tokenizer)
    builders = []
    for prompt in plan.prompts:
        base = len(prompt.text) if plan.echo else 0
        builders += [_CompletionLogprobs(token_text, prompt.ids, base) for _ in range(plan.n)]
    return builders


def _logprobs_piece(builder: _CompletionLogprobs, update: Update) -> CompletionLogprobs:
    piece = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    if update.prompt_logprobs is not None:
        _merge(piece, builder.prompt(update.prompt_logprobs))
    if update.logprobs:
        _merge(piece, builder.generated(update.logprobs))
    return piece


async def completion(job: Job, plan: Plan, tokenizer: Tokenizer, model: str) -> dict:
    """The whole answer of /v1/completions."""
    builders = _completion_builders(job, plan, tokenizer)
    choices = []
    for prompt in plan.prompts:
        for _ in range(plan.n):
            index = len(choices)
            logprobs = None
            if plan.logprobs is not None:
                logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
            choices.append(
                CompletionChoice(index=index, text=prompt.text if plan.echo else "", logprobs=logprobs)
            )
    async for update in job.updates():
        choice = choices[update.index]
        choice.text += update.text
        if choice.logprobs is not None:
            _merge(choice.logprobs, _logprobs_piece(builders[update.index], update))
        if update.finish_reason is not None:
            choice.finish_reason = update.finish_reason
    body = Completion(
        id=new_id("cmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(job)
    )
    return body.model_dump()


async def completion_chunks(job: Job, plan: Plan, tokenizer: Tokenizer, model: str) -> AsyncIterator[str]:
    """/v1/completions with `stream`: one chunk per update, usage last if asked for, then [DONE]."""
    rid, created = new_id("cmpl"), int(time.time())
    builders = _completion_builders(job, plan, tokenizer)
    echoed = [not plan.echo] * plan.choices
    exclude = None if plan.include_usage else {"usage"}

    def chunk(choice: CompletionChoice) -> str:
        body = Completion(id=rid, created=created, model=model, choices=[choice])
        return sse(body, exclude)

    async for update in _stream_updates(job):
        if isinstance(update, APIError):
            yield sse(update.body())
            break
        if update is None:
            if plan.include_usage:
                final = Completion(id=rid, created=created, model=model, choices=[], usage=_usage(job))
                yield sse(final)
            break
        text = update.text
        if not echoed[update.index]:
            text = plan.prompts[update.index // plan.n].text + text
            echoed[update.index] = True
        logprobs = None
        if plan.logprobs is not None:
            logprobs = _logprobs_piece(builders[update.index], update)
        yield chunk(
            CompletionChoice(
                index=update.index, text=text, logprobs=logprobs, finish_reason=update.finish_reason
            )
        )
    yield sse("[DONE]")


async def _stream_updates(job: Job) -> AsyncIterator[Update | APIError | None]:
    """Each update, then None at a clean end, or the APIError that ended the job (a stream's status
    line is long gone by then: the error goes out as an event)."""
    try:
        async for update in job.updates():
            yield update
    except APIError as exc:
        yield exc
        return
    yield None


# ---- chat -------------------------------------------------------------------------------------


def _chat_logprobs(token_text: _TokenText, pairs: list[tuple[TokenLogprob, int]]) -> ChoiceLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

    content = []
    for entry, _ in pairs:
        head = top(entry.token, entry.logprob)
        alternatives = [top(t, lp) for t, lp in entry.top]
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=alternatives))
    return ChoiceLogprobs(content=content)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _outputs(plan: Plan) -> list[ChatOutput]:
    return [ChatOutput(plan.output or OutputSpec()) for _ in range(plan.choices)]


def _chat_finish(reason: str | None, output: ChatOutput) -> str | None:
    return "tool_calls" if reason not in (None, "length") and output.tool_calls else reason


def _message(output: ChatOutput) -> dict:
    """The message of a finished choice; the fields it has no value for are left out, `content` never."""
    calls = [
        ToolCallOut(id=_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in output.tool_calls
    ]
    message = AssistantMessage(
        content=output.message_content(),
        reasoning_content=output.reasoning,
        tool_calls=calls or None,
        citations=output.citations or None,
    )
    return {"content": None, **message.model_dump(exclude_none=True)}


async def chat_completion(job: Job, plan: Plan, tokenizer: Tokenizer, model: str) -> dict:
    """The whole answer of /v1/chat/completions."""
    token_text = _TokenText(tokenizer)
    outputs = _outputs(plan)
    logprobs = [[] for _ in range(plan.choices)]
    finish: list[str | None] = [None] * plan.choices
    async for update in job.updates():
        outputs[update.index].push(update.text)
        logprobs[update.index] += update.logprobs
        if update.finish_reason is not None:
            finish[update.index] = update.finish_reason
    for output in outputs:
        output.finish()
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=None),  # replaced by the whole message below
            logprobs=_chat_logprobs(token_text, logprobs[i]) if plan.logprobs is not None else None,
            finish_reason=_chat_finish(finish[i], outputs[i]),
        )
        for i in range(plan.choices)
    ]
    body = ChatCompletion(
        id=new_id("chatcmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(job)
    ).model_dump()
    for choice, output in zip(body["choices"], outputs, strict=True):
        choice["message"] = _message(output)
    return body


def _deltas(delta: Delta) -> list[dict]:
    """A chat delta as the stream's delta objects: text, then each new call in OpenAI's two pieces,
    then the citations."""
    out = []
    text = {k: v for k, v in (("reasoning_content", delta.reasoning), ("content", delta.content)) if v}
    if text:
        out.append(text)
    for index, call in delta.tool_calls:
        head = {"index": index, "id": _call_id(), "type": "function"}
        out.append({"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
    if delta.citations is not None:
        out.append({"citations": delta.citations})
    return out


async def chat_chunks(job: Job, plan: Plan, tokenizer: Tokenizer, model: str) -> AsyncIterator[str]:
    """/v1/chat/completions with `stream`: the role first, then content deltas, the finish, usage, [DONE]."""
    rid, created = new_id("chatcmpl"), int(time.time())
    token_text = _TokenText(tokenizer)
    exclude = None if plan.include_usage else {"usage"}
    outputs = _outputs(plan)

    def chunk(choice: ChatChunkChoice) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
        return sse(body, exclude)

    for i in range(plan.choices):
        yield chunk(ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
    async for update in _stream_updates(job):
        if isinstance(update, APIError):
            yield sse(update.body())
            break
        if update is None:
            if plan.include_usage:
                final = ChatCompletionChunk(
                    id=rid, created=created, model=model, choices=[], usage=_usage(job)
                )
                yield sse(final)
            break
        output = outputs[update.index]
        delta = output.push(update.text)
        if update.finish_reason is not None:
            rest = output.finish()
            delta = Delta(
                delta.content + rest.content,
                delta.reasoning + rest.reasoning,
                delta.tool_calls + rest.tool_calls,
                rest.citations,
            )
        deltas = _deltas(delta)
        logprobs = None
        if plan.logprobs is not None and update.logprobs:
            logprobs = _chat_logprobs(token_text, update.logprobs)
        finish = _chat_finish(update.finish_reason, output)
        if not deltas:
            if logprobs is None and finish is None:
                continue
            deltas = [{}]
        for k, piece in enumerate(deltas):
            yield chunk(
                ChatChunkChoice(
                    index=update.index,
                    delta=piece,
                    logprobs=logprobs if k == 0 else None,
                    finish_reason=finish if k == len(deltas) - 1 else None,
                )
            )
    yield sse("[DONE]")
