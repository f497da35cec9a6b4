"""Pydantic schemas of the OpenAI API: the requests the server accepts and the bodies it returns.

Requests are strict (a number where a string belongs, `true` for an integer, `"0.5"` for a float are
errors, not coerced) and ignore fields they do not know, as OpenAI clients send extras (`user`,
`metadata`, ...). Ranges and cross-field rules live in requests.py, which words their errors.
Besides OpenAI's fields, requests take vLLM's sampling extras `top_k`, `min_p`, `repetition_penalty`,
and its structured-output extras `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
Chat requests also take vLLM's `documents` and `chat_template_kwargs`, and tool calls (tools.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChatTokenLogprob",
    "ChoiceLogprobs",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "ModelCard",
    "ModelList",
    "TopLogprob",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    """A content part of a chat message; only text parts are served (no images, no audio)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """A message of the history. An assistant's may carry the `tool_calls` it made (its content then
    may be null); a tool's answers the call `tool_call_id` names; `reasoning_content` is an
    assistant's thinking, for templates that render it back."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # checked in tools.history_tool_calls
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class _Sampling(_Request):
    """Fields common to completions and chat completions."""

    model: str | None = None  # absent: the served model (OpenAI requires it; curl users forget it)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # Structured output (constrain.py): OpenAI's response_format, or one of vLLM's guided_* extras.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or a list of token-id lists."""

    prompt: Any  # its four shapes are told apart, with clear errors, in requests.py
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None  # checked in tools.check_tools, for clearer errors than pydantic's
    tool_choice: Any = None
    parallel_tool_calls: bool = True  # with a forced tool call: whether the grammar admits several
    # vLLM's extras: documents for grounded answers, and more variables for the chat template.
    documents: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ---- responses --------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: parallel lists, one entry per token (the first prompt token's is null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A completion, or with `stream` one chunk of it (then `usage` is null until the last chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The answer; `reasoning_content` (vLLM's), `tool_calls` and `citations` appear only when present."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    citations: list[int | str] | None = None  # Jamba 1.5's <citations>: the ids of the documents cited


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...} / {"reasoning_content": ...} /
    # {"tool_calls": [...]}, {} or {"citations": [...]} last
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pyjamba"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
