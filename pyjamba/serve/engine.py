"""The engine: continuous batching of token sequences over a slot pool, in one background thread.

Three parts, as nano-vllm's: a scheduler (a bounded FIFO of waiting sequences, admitted into free
slots between steps), the slots (slots.py), and the step loop. Each step:

1. drops cancelled sequences (their slots are free at once) and admits waiting ones;
2. prefills one chunk (at most `prefill_chunk` tokens) of the oldest sequence still reading its
   prompt, so a long prompt never stalls the streams already running for more than one chunk;
3. runs one decode step for every sequence with a token to feed, all in one batch, each slot at its
   own length, and samples each row with its own settings (sampling.py).

A sequence ends at an end-of-sequence token ("stop"), at `max_tokens` ("length"), or when cancelled.
Token ids in, token ids out: text (detokenizing, stop strings) is the server's business.

Threading: only the engine thread runs the model (torch releases the GIL inside its kernels, so the
event loop keeps serving HTTP meanwhile). `submit` and `cancel` may be called from any thread;
results leave through each sequence's `emit`, called in the engine thread, and `after_step` once a
step's events are all out.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..model import JambaForCausalLM
from .sampling import Sampler, SamplingParams, TokenLogprob, logprobs_of
from .slots import SlotPool

__all__ = [
    "Engine",
    "EngineUnavailable",
    "Event",
    "Failed",
    "Finished",
    "PromptLogprobs",
    "QueueFull",
    "Sequence",
    "Token",
]

logger = logging.getLogger(__name__)


# ---- what a sequence reports ------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens, one chunk's worth; the very first token's entry is None."""

    entries: list[TokenLogprob | None]


@dataclass(frozen=True)
class Token:
    """A generated token (with its log-probability when asked for)."""

    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (an end-of-sequence token) or "length" (max_tokens)


@dataclass(frozen=True)
class Failed:
    message: str


Event = PromptLogprobs | Token | Finished | Failed


class QueueFull(Exception):
    """More waiting sequences than the queue holds: the client should retry later."""


class EngineUnavailable(Exception):
    """The engine has stopped, or died (the message says why)."""


class Observer(Protocol):
    """What the engine reports to metrics (metrics.Metrics implements it)."""

    def prompt_tokens(self, count: int) -> None: ...
    def generated_token(self, first: bool, seconds: float) -> None: ...
    def step(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None: ...


# ---- a sequence -------------------------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    """One prompt to continue. `logprobs`: None for none, k for the chosen token's and the k best;
    `prompt_logprobs` likewise for the prompt's tokens (echo scoring)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]
    stop_tokens: frozenset[int] = frozenset()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # The engine's bookkeeping.
    slot: int | None = field(default=None, repr=False)
    prefilled: int = field(default=0, repr=False)
    generated: int = field(default=0, repr=False)
    next_token: int | None = field(default=None, repr=False)  # sampled, not yet fed to the model
    sampler: Sampler | None = field(default=None, repr=False)
    submitted_at: float = field(default=0.0, repr=False)
    last_token_at: float = field(default=0.0, repr=False)
    cancelled: bool = field(default=False, repr=False)


# ---- the engine -------------------------------------------------------------------------------


class Engine:
    """Continuous batching for one model: `start()`, then `submit` sequences and read their events."""

    def __init__(
        self,
        model: JambaForCausalLM,
        *,
        slots: int = 8,
        prefill_chunk: int = 128,
        max_queue: int = 64,
        max_context: int | None = None,
        observer: Observer | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.max_context = max_context or model.config.max_position_embeddings
        if self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.observer = observer
        # Called after each step's events: lets a listener hand them over in one batch (app.Mailbox).
        self.after_step = after_step
        weight = model.lm_head.weight
        self.device = weight.device
        self.pool = SlotPool(
            model.config, slots, capacity=min(256, self.max_context), dtype=weight.dtype, device=weight.device
        )
        self.error: str | None = None
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # holding a slot, in admission order
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- any thread -----------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.pool.slots

    @property
    def queue_length(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        return self.pool.in_use

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def idle(self) -> bool:
        """Nothing waiting, nothing running."""
        with self._cond:
            return not self._waiting and not self._running

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="pyjamba-engine", daemon=True)
        self._thread.start()
        # A daemon thread still inside torch when the interpreter tears torch down aborts the process.
        ref = weakref.ref(self)
        atexit.register(lambda: (engine := ref()) is not None and engine.stop(5.0))

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; sequences still queued or running get `Failed`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences (all or none); raises QueueFull, EngineUnavailable or ValueError."""
        for seq in sequences:
            if not seq.prompt:
                raise ValueError("a sequence needs at least one prompt token")
            if len(seq.prompt) + seq.max_tokens > self.max_context:
                raise ValueError(
                    f"prompt ({len(seq.prompt)} tokens) plus max_tokens ({seq.max_tokens}) exceeds the "
                    f"context of {self.max_context} tokens"
                )
        now = time.perf_counter()
        with self._cond:
            if self.error is not None:
                raise EngineUnavailable(f"the engine has failed: {self.error}")
            if self._stopping or self._thread is None:
                raise EngineUnavailable("the engine is not running")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} sequences waiting, at most {self.max_queue})"
                )
            for seq in sequences:
                seq.submitted_at = now
                self._waiting.append(seq)
            self._cond.notify_all()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop these sequences before the next step; their slots are freed then. No event follows."""
        with self._cond:
            for seq in sequences:
                seq.cancelled = True
            self._drop_cancelled_waiting()  # at once: they must not hold places in the queue
            self._cond.notify_all()

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.no_grad():
                while True:
                    with self._cond:
                        while not (self._waiting or self._running or self._stopping):
                            self._cond.wait()
                        if self._stopping:
                            break
                        self._drop_cancelled()
                        self._admit()
                    self._step()  # outside the lock: submit and cancel never wait for a forward
        except Exception as exc:
            logger.exception("the engine failed")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._fail_all("the engine failed" if self.error else "the server is shutting down")

    def _drop_cancelled_waiting(self) -> None:
        if any(seq.cancelled for seq in self._waiting):
            self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)

    def _drop_cancelled(self) -> None:
        self._drop_cancelled_waiting()
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _admit(self) -> None:
        while self._waiting and self.pool.in_use < self.pool.slots:
            seq = self._waiting.popleft()
            seq.slot = self.pool.acquire()
            seq.sampler = Sampler(seq.params, seq.prompt, self.vocab_size)
            self._running.append(seq)

    def _release(self, seq: Sequence) -> None:
        self._running.remove(seq)
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None

    def _fail_all(self, message: str) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._running) + list(self._waiting)
            self._waiting.clear()
            for seq in list(self._running):
                self._release(seq)
        for seq in left:
            self._emit(seq, Failed(message))
        if self.after_step is not None:
            self.after_step()

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # a listener that broke must not take the engine down
            logger.exception("could not deliver an event; cancelling the sequence")
            seq.cancelled = True

    def _step(self) -> None:
        start = time.perf_counter()
        prefilled = 0
        prefilling = next((s for s in self._running if s.prefilled < len(s.prompt) and not s.cancelled), None)
        if prefilling is not None:
            prefilled = self._prefill(prefilling)
        decoding = [s for s in self._running if s.next_token is not None and not s.cancelled]
        if decoding:
            self._decode(sorted(decoding, key=lambda s: s.slot))
        if self.after_step is not None:
            self.after_step()
        if self.observer is not None and (prefilled or decoding):
            self.observer.step(len(decoding), prefilled, time.perf_counter() - start)

    def _prefill(self, seq: Sequence) -> int:
        """Feed the next chunk of a prompt (returns its length); after the last one, sample the first token."""
        start = seq.prefilled
        chunk = seq.prompt[start : start + self.prefill_chunk]
        batch = self.pool.batch([seq.slot])
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, L)
        keep = 0 if seq.prompt_logprobs is not None else 1  # all positions only when scoring the prompt
        logits = self.model(ids, cache=batch, logits_to_keep=keep).logits[0].float()  # (L or 1, V)
        batch.commit()
        seq.prefilled += len(chunk)
        if seq.prompt_logprobs is not None:
            # Position t predicts token t + 1: this chunk scores the prompt's tokens start+1 ... start+L.
            targets = seq.prompt[start + 1 : start + len(chunk) + 1]
            entries: list[TokenLogprob | None] = [None] if start == 0 else []
            if targets:
                target_ids = torch.tensor(targets, device=logits.device)
                entries += logprobs_of(logits[: len(targets)], target_ids, seq.prompt_logprobs)
            self._emit(seq, PromptLogprobs(entries))
        if seq.prefilled < len(seq.prompt):
            return len(chunk)
        if self.observer is not None:
            self.observer.prompt_tokens(len(seq.prompt))
        if seq.max_tokens == 0:
            self._finish(seq, "length")
        else:
            self._accept(seq, logits[-1:])
        return len(chunk)

    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for each sequence, all in one forward call."""
        batch = self.pool.batch([s.slot for s in seqs])
        tokens = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
        logits = self.model(tokens, attention_mask=batch.attention_mask(1), cache=batch).logits[:, -1].float()
        batch.commit()
        for row, seq in enumerate(seqs):
            seq.next_token = None
            self._accept(seq, logits[row : row + 1])

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits (1, V), report it, and end it if it is done."""
        token = seq.sampler(logits)
        seq.sampler.observe(token)
        logprob = None
        if seq.logprobs is not None:
            logprob = logprobs_of(logits, torch.tensor([token], device=logits.device), seq.logprobs)[0]
        seq.generated += 1
        now = time.perf_counter()
        if self.observer is not None:
            first = seq.generated == 1
            self.observer.generated_token(first, now - (seq.submitted_at if first else seq.last_token_at))
        seq.last_token_at = now
        self._emit(seq, Token(token, logprob))
        if token in seq.stop_tokens:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        with self._cond:
            self._release(seq)
        self._emit(seq, Finished(reason))
