"""A request in flight: its sequences in the engine, and their events turned into text, per choice.

The engine thread reports through each sequence's `emit`, which drops the event in the `Mailbox`;
after each step the mailbox hands the step's events to the event loop at once, into each request's
asyncio queue. `Job.updates()` reads that queue and yields
one `Update` per change of a choice: text made final, logprobs, prompt logprobs, the finish. A choice
that reaches a stop string is cancelled in the engine at once (its slot is freed); so is every
unfinished choice when the job is closed (the client went away, or an error). A choice whose tokens
cannot be turned into text fails the request (500) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .engine import (
    Engine,
    EngineUnavailable,
    Event,
    Failed,
    Finished,
    PromptLogprobs,
    QueueFull,
    Sequence,
    Token,
)
from .errors import APIError
from .requests import Plan
from .sampling import TokenLogprob
from .text import ChoiceText

__all__ = ["Job", "Mailbox", "Update"]

logger = logging.getLogger(__name__)


class Mailbox:
    """Events from the engine thread into the event loop, handed over once per engine step.

    Each wake-up of the event loop is a write to its self-pipe and a handover of the GIL to the loop;
    the engine puts a step's events here and calls `flush` (its `after_step`), which wakes the loop
    once per step to deliver them all, rather than once per token of every stream.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: object) -> None:
        with self._lock:
            self._items.append((queue, item))

    def flush(self) -> None:
        with self._lock:
            if not self._items or self._scheduled:
                return
            self._scheduled = True
        # A closed event loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Update:
    """What changed in choice `index`: new text, its logprobs (with text offsets), maybe the end."""

    index: int
    text: str = ""
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


class Job:
    """The sequences of one request; `submit`, then iterate `updates()`, and always `close()`."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, plan: Plan, stop_tokens: frozenset[int], mailbox: Mailbox
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.mailbox = mailbox
        self._queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.texts: list[ChoiceText] = []
        self.completion_tokens = [0] * plan.choices
        self.finished = [False] * plan.choices
        for p, prompt in enumerate(plan.prompts):
            for i in range(plan.n):
                index = p * plan.n + i
                self.sequences.append(
                    Sequence(
                        prompt=prompt.ids,
                        max_tokens=plan.max_tokens[p],
                        params=plan.params[i],
                        emit=self._sink(index),
                        stop_tokens=stop_tokens,
                        logprobs=plan.logprobs,
                        prompt_logprobs=plan.prompt_logprobs,
                        constraint=None if plan.constraint is None else plan.constraint.matcher(),
                    )
                )
                self.texts.append(ChoiceText(tokenizer, plan.stop, stop_tokens, plan.skip_special_tokens))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.ids) for p in self.plan.prompts)

    def _sink(self, index: int) -> Callable[[Event], None]:
        queue = self._queue

        def emit(event: Event) -> None:  # runs in the engine thread
            self.mailbox.put(queue, (index, event))

        return emit

    def submit(self) -> None:
        """Queue every sequence in the engine, or raise the APIError that says why not."""
        try:
            self.engine.submit(self.sequences)
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: {exc}; retry later", code="queue_full") from exc
        except EngineUnavailable as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from exc

    def close(self) -> None:
        """Cancel whatever has not finished (idempotent); wakes a reader blocked in `updates()`."""
        left = [s for s, done in zip(self.sequences, self.finished, strict=True) if not done]
        if left:
            self.engine.cancel(left)
        self.finished = [True] * len(self.finished)
        self._queue.put_nowait(None)

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until every choice has finished; raises APIError if the engine fails a sequence."""
        while not all(self.finished):
            item = await self._queue.get()
            if item is None:  # closed
                return
            index, event = item
            if self.finished[index]:
                continue  # after a stop string: tokens already on their way are not part of the answer
            try:
                update = self._apply(index, event)
            except APIError:
                raise
            except Exception as exc:  # detokenizing or stop strings broke: this request alone fails
                logger.exception("could not turn choice %d's tokens into text", index)
                self.close()
                raise APIError(
                    500,
                    f"The request could not be completed: its text could not be decoded "
                    f"({type(exc).__name__}: {exc})",
                    code="decoding_failed",
                ) from exc
            if update is not None:
                yield update

    def _apply(self, index: int, event: Event) -> Update | None:
        text = self.texts[index]
        if isinstance(event, Token):
            self.completion_tokens[index] += 1
            piece = text.push(event.token, event.logprob)
            if piece.stopped:
                self._end(index)
                return Update(index, piece.text, piece.logprobs, finish_reason="stop")
            if not piece.text and not piece.logprobs:
                return None
            return Update(index, piece.text, piece.logprobs)
        if isinstance(event, PromptLogprobs):
            return Update(index, prompt_logprobs=event.entries)
        if isinstance(event, Finished):
            self.finished[index] = True
            piece = text.finish()
            return Update(
                index, piece.text, piece.logprobs, finish_reason="stop" if piece.stopped else event.reason
            )
        if isinstance(event, Failed):
            self.close()
            code = "engine_failed" if event.status == 503 else "sequence_failed"
            raise APIError(event.status, f"The request could not be completed: {event.message}", code=code)
        raise TypeError(f"unknown engine event {event!r}")

    def _end(self, index: int) -> None:
        self.finished[index] = True
        self.engine.cancel([self.sequences[index]])
