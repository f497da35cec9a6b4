"""The engine: continuous batching of token sequences over a slot pool, in one background thread.

Three parts, as nano-vllm's: a scheduler (a bounded FIFO of waiting sequences, admitted into free
slots between steps), the slots (slots.py), and the step loop. Each step:

1. drops cancelled sequences (their slots are free at once) and admits waiting ones;
2. prefills one chunk (at most `prefill_chunk` tokens) of the oldest sequence still reading its
   prompt, so a long prompt never stalls the streams already running for more than one chunk;
3. runs one decode step for every sequence with a token to feed, all in one batch, each slot at its
   own length, and samples each row with its own settings (sampling.py).

A sequence ends at an end-of-sequence token ("stop"), at `max_tokens` ("length"), or when cancelled.
A sequence with a structured output (`constraint`, constrain.py) samples only tokens its grammar
allows (the masks of a decode batch's constrained rows filled together) and ends ("stop") as soon
as the grammar is complete and admits nothing more.
Token ids in, token ids out: text (detokenizing, stop strings) is the server's business.

Failures are contained where they belong. Whatever raises for one sequence (building its sampler at
admission, sampling, its logprobs, delivering its events) fails that sequence alone (`Failed`, status
500) and frees its slot; the others go on. A forward call that raises fails the sequences running
(status 503: retry) and the engine starts again from fresh slot state, with the queue kept; after
`max_model_failures` such failures in a row (a device lost, weights broken) the engine stops for
good, with `error` set, so that `pyjamba serve` exits non-zero and a supervisor restarts it.

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
from .constrain import Matcher, allowed_tokens
from .prefix_cache import PrefixCache, default_capacity, model_namespace
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
    """The sequence ended without an answer. status: 500 (its own fault: sampling, delivery), 503 (the
    model step failed, or the engine stopped: worth a retry)."""

    message: str
    status: int = 503


Event = PromptLogprobs | Token | Finished | Failed


class QueueFull(Exception):
    """More waiting sequences than the queue holds: the client should retry later."""


class EngineUnavailable(Exception):
    """The engine has stopped, or died (the message says why)."""


class ModelStepFailed(Exception):
    """A forward call raised: the state of the slots it ran on can no longer be trusted."""


class Observer(Protocol):
    """What the engine reports to metrics (metrics.Metrics implements it)."""

    def prompt_tokens(self, count: int) -> None: ...
    def generated_token(self, first: bool, seconds: float) -> None: ...
    def step(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None: ...
    def prefix_lookup(self, reused_tokens: int) -> None: ...
    def prefix_shared(self, tokens: int) -> None: ...
    def prefix_cache_size(self, entries: int, nbytes: int, capacity: int) -> None: ...


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
    constraint: Matcher | None = None  # a structured output's grammar (constrain.py): masks every token
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
        max_model_failures: int = 3,
        prefix_block: int | None = None,
        prefix_cache_bytes: int | None = None,
    ) -> None:
        if max_model_failures < 1:
            raise ValueError(f"max_model_failures must be at least 1, got {max_model_failures}")
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
        self.max_model_failures = max_model_failures
        self.model_failures = 0  # in a row
        self.device = model.lm_head.weight.device
        self.pool = self._new_pool(slots)
        self.prefix_cache = self._new_prefix_cache(prefix_block, prefix_cache_bytes)
        self._prefix_keys: dict[Sequence, list[bytes]] = {}  # a prefilling sequence's block keys
        self.error: str | None = None
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # holding a slot, in admission order
        self._stopping = False
        self._thread: threading.Thread | None = None

    def _new_pool(self, slots: int) -> SlotPool:
        weight = self.model.model.final_layernorm.weight  # the model's dtype (an int8 head is not)
        capacity = min(256, self.max_context)
        return SlotPool(self.model.config, slots, capacity=capacity, dtype=weight.dtype, device=weight.device)

    def _new_prefix_cache(self, block: int | None, capacity: int | None) -> PrefixCache | None:
        """The prefix cache (None when `capacity` is 0). Its blocks end on prefill chunk boundaries
        (`block` a multiple of `prefill_chunk`, by default the chunk, at least 64 tokens), and every
        chunk starts at a multiple of the chunk whether a sequence resumed or not: a resumed prompt
        runs the very same forward calls as a fresh one, so its results are the same to the bit."""
        if block is None:
            block = self.prefill_chunk * -(-64 // self.prefill_chunk)
        if block < 1 or block % self.prefill_chunk:
            raise ValueError(
                f"the prefix block ({block} tokens) must be a positive multiple of the prefill chunk "
                f"({self.prefill_chunk} tokens), so that cached prefixes end where prefill chunks end"
            )
        if capacity is None:
            capacity = default_capacity(self.device)
        if capacity < 0:
            raise ValueError(f"the prefix cache size must not be negative, got {capacity} bytes")
        if capacity == 0:
            return None
        return PrefixCache(block, capacity, model_namespace(self.model))

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
                        refused = self._admit()
                    for seq, message in refused:
                        self._emit(seq, Failed(message, status=500))
                    self._step()  # outside the lock: submit and cancel never wait for a forward
        except Exception as exc:  # a model that keeps failing, or a bug in the engine itself
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

    def _admit(self) -> list[tuple[Sequence, str]]:
        """Move waiting sequences into free slots; returns those refused (their sampler could not be
        built), with why, to be failed outside the lock. A sequence is always in exactly one place:
        the queue, the running list with a slot, or the refused list with none."""
        refused = []
        while self._waiting and self.pool.in_use < self.pool.slots:
            seq = self._waiting.popleft()
            try:
                seq.sampler = Sampler(seq.params, seq.prompt, self.vocab_size)
            except Exception as exc:
                logger.exception("could not set up sampling for a sequence")
                refused.append((seq, f"invalid sampling settings: {type(exc).__name__}: {exc}"))
                continue
            seq.slot = self.pool.acquire()
            self._running.append(seq)
        return refused

    def _release(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._prefix_keys.pop(seq, None)
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
        self._after_step()

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.emit(event)
        except Exception:  # a listener that broke must not take the engine down
            logger.exception("could not deliver an event; cancelling the sequence")
            seq.cancelled = True

    def _fail(self, seq: Sequence, message: str, status: int) -> None:
        """End one sequence with Failed and free its slot."""
        with self._cond:
            if seq in self._running:
                self._release(seq)
        self._emit(seq, Failed(message, status))

    def _observe(self, report: Callable[[], None]) -> None:
        """Report to the observer (metrics); a broken observer is logged, never fatal."""
        if self.observer is None:
            return
        try:
            report()
        except Exception:
            logger.exception("the engine's observer failed")

    def _after_step(self) -> None:
        if self.after_step is None:
            return
        try:
            self.after_step()
        except Exception:
            logger.exception("the engine's after_step callback failed")

    def _step(self) -> None:
        start = time.perf_counter()
        prefilled = 0
        decoding: list[Sequence] = []
        try:
            prefilling = next(
                (s for s in self._running if s.prefilled < len(s.prompt) and not s.cancelled), None
            )
            if prefilling is not None:
                prefilled = self._prefill(prefilling)
            decoding = [s for s in self._running if s.next_token is not None and not s.cancelled]
            if decoding:
                self._decode(sorted(decoding, key=lambda s: s.slot))
        except ModelStepFailed as exc:
            self._recover(exc)
        self._after_step()
        if prefilled or decoding:
            seconds = time.perf_counter() - start
            self._observe(lambda: self.observer.step(len(decoding), prefilled, seconds))

    def _forward(self, slots: list[int], ids: torch.Tensor, *, logits_to_keep: int = 0) -> torch.Tensor:
        """The model on these slots' rows of ids (B, L): float32 logits, the slots' state committed.

        Everything that touches the pool's state is inside: whatever raises here (gathering the
        slots, the forward, the commit) is a ModelStepFailed.
        """
        try:
            batch = self.pool.batch(slots)
            mask = batch.attention_mask(ids.shape[1])
            out = self.model(ids, attention_mask=mask, cache=batch, logits_to_keep=logits_to_keep)
            logits = out.logits.float()
            batch.commit()
        except Exception as exc:
            raise ModelStepFailed(f"{type(exc).__name__}: {exc}") from exc
        self.model_failures = 0
        return logits

    def _recover(self, exc: ModelStepFailed) -> None:
        """After a failed forward: fail the running sequences, start again from fresh slot state
        (a forward that raised midway may have left any slot it touched half-updated), keep the queue.
        Too many failures in a row: give up (raise), so that the process can be restarted."""
        self.model_failures += 1
        logger.error(
            "the model step failed (%d in a row, at most %d): %s",
            self.model_failures,
            self.max_model_failures,
            exc,
            exc_info=exc.__cause__,
        )
        with self._cond:
            failed = list(self._running)
            for seq in failed:
                self._release(seq)
                seq.next_token = None
            self.pool = self._new_pool(self.pool.slots)
        message = f"the model step failed ({exc}); the request can be retried"
        for seq in failed:
            self._emit(seq, Failed(message, status=503))
        if self.model_failures >= self.max_model_failures:
            raise RuntimeError(f"the model step failed {self.model_failures} times in a row; last: {exc}")

    def _prefill(self, seq: Sequence) -> int:
        """Feed the next chunk of a prompt (returns its length); after the last one, sample the first
        token, and that of every sequence waiting with the same prompt (`_share_prefill`).

        A sequence's first chunk starts after the longest prefix of its prompt in the prefix cache,
        and every block boundary it reaches is saved there. Chunks start at multiples of the chunk."""
        if seq.prefilled == 0:
            self._resume(seq)
        start = seq.prefilled
        chunk = seq.prompt[start : start + self.prefill_chunk]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, L)
        keep = 0 if seq.prompt_logprobs is not None else 1  # all positions only when scoring the prompt
        logits = self._forward([seq.slot], ids, logits_to_keep=keep)[0]  # (L or 1, V)
        seq.prefilled += len(chunk)
        self._save_prefix(seq)
        if seq.prompt_logprobs is not None:
            try:
                self._emit(seq, PromptLogprobs(self._prompt_logprobs(seq, start, len(chunk), logits)))
            except Exception as exc:
                logger.exception("scoring a prompt failed")
                self._fail(seq, f"scoring the prompt failed: {type(exc).__name__}: {exc}", 500)
                return len(chunk)
        if seq.prefilled < len(seq.prompt):
            return len(chunk)
        for each in [seq, *self._share_prefill(seq)]:
            self._observe(lambda: self.observer.prompt_tokens(len(seq.prompt)))  # the same prompt
            if each.max_tokens == 0:
                self._finish(each, "length")
            else:
                # Each its own copy: a sampler (or a logits mask) may change the row it is given.
                self._accept(each, logits[-1:] if each is seq else logits[-1:].clone())
        return len(chunk)

    def _resume(self, seq: Sequence) -> None:
        """Restore the longest cached prefix of the sequence's prompt into its slot, leaving at least
        one token to prefill (the first generated token needs its logits); a prompt to be scored
        (prompt logprobs) needs every position's logits, so it starts from scratch."""
        cache = self.prefix_cache
        if cache is None:
            return
        keys = self._prefix_keys[seq] = cache.hashes(seq.prompt)
        if seq.prompt_logprobs is not None:
            return
        parts = cache.lookup(keys[: (len(seq.prompt) - 1) // cache.block])
        reused = parts[-1].end if parts else 0
        self._observe(lambda: self.observer.prefix_lookup(reused))
        if not parts:
            return
        try:
            self.pool.restore(seq.slot, parts)
        except Exception as exc:  # the slot (or the pool, if it was growing) is half-written
            raise ModelStepFailed(f"restoring a cached prefix failed: {type(exc).__name__}: {exc}") from exc
        seq.prefilled = reused
        logger.debug("prefix cache: resumed at %d of %d prompt tokens", reused, len(seq.prompt))

    def _save_prefix(self, seq: Sequence) -> None:
        """At a block boundary, keep the sequence's state in the prefix cache: the keys/values of the
        block just read and the Mamba states. A failure (memory) loses the entry, nothing else."""
        cache = self.prefix_cache
        keys = self._prefix_keys.get(seq)
        if cache is None or keys is None or seq.prefilled % cache.block:
            return
        blocks = keys[: seq.prefilled // cache.block]
        if blocks[-1] in cache:
            return
        try:
            cache.insert(blocks, self.pool.save(seq.slot, start=seq.prefilled - cache.block))
        except Exception:
            logger.exception("could not save a prefix in the prefix cache")
            return
        self._observe(lambda: self.observer.prefix_cache_size(len(cache), cache.nbytes, cache.capacity))

    def _share_prefill(self, seq: Sequence) -> list[Sequence]:
        """Running sequences that wait with the same prompt as `seq` (the other choices of its request,
        or another request's) and want no prompt logprobs: they take a copy of its slot, prefilled."""
        sharing = [
            s
            for s in self._running
            if s is not seq
            and s.prefilled == 0
            and s.slot is not None
            and not s.cancelled
            and s.prompt_logprobs is None
            and s.prompt == seq.prompt
        ]
        for other in sharing:
            try:
                self.pool.copy(seq.slot, other.slot)
            except Exception as exc:
                raise ModelStepFailed(f"copying a prefilled slot failed: {exc!r}") from exc
            other.prefilled = len(other.prompt)
        if sharing:
            self._observe(lambda: self.observer.prefix_shared(len(seq.prompt) * len(sharing)))
        return sharing

    @staticmethod
    def _prompt_logprobs(
        seq: Sequence, start: int, length: int, logits: torch.Tensor
    ) -> list[TokenLogprob | None]:
        """Entries for the prompt tokens a chunk scores: position t predicts token t + 1, so the chunk
        at `start` scores tokens start+1 ... start+length (the very first token gets None)."""
        targets = seq.prompt[start + 1 : start + length + 1]
        entries: list[TokenLogprob | None] = [None] if start == 0 else []
        if targets:
            target_ids = torch.tensor(targets, device=logits.device)
            entries += logprobs_of(logits[: len(targets)], target_ids, seq.prompt_logprobs)
        return entries

    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for each sequence, all in one forward call."""
        tokens = torch.tensor([[s.next_token] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
        logits = self._forward([s.slot for s in seqs], tokens)[:, -1]  # (B, V)
        allowed = self._allowed(seqs)
        for row, seq in enumerate(seqs):
            seq.next_token = None
            self._accept(seq, logits[row : row + 1], allowed.get(row))

    def _allowed(self, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
        """The structured-output masks of a batch's constrained rows, filled together: {row: (1, V) bool}."""
        rows = [(row, seq) for row, seq in enumerate(seqs) if seq.constraint is not None]
        if not rows:
            return {}
        try:
            masks = allowed_tokens([(seq.constraint, seq.stop_tokens) for _, seq in rows], self.vocab_size)
        except Exception:  # each row then fills its own in _accept, and fails alone if that raises
            logger.exception("filling a batch's structured-output masks failed")
            return {}
        return {row: masks[i : i + 1] for i, (row, _) in enumerate(rows)}

    def _accept(self, seq: Sequence, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """Sample the sequence's next token from its logits (1, V), within its structured output's
        mask `allowed` (1, V) (filled here when not given), report it, and end it if it is done.
        Anything that raises here belongs to this sequence alone: it fails, the batch goes on."""
        try:
            if seq.constraint is not None and allowed is None:
                allowed = allowed_tokens([(seq.constraint, seq.stop_tokens)], self.vocab_size)
            token = seq.sampler(logits, allowed)
            seq.sampler.observe(token)
            complete = False  # the structured output admits nothing more: the sequence ends
            if seq.constraint is not None and token not in seq.stop_tokens:
                seq.constraint.accept(token)
                complete = seq.constraint.finished
            logprob = None
            if seq.logprobs is not None:
                logprob = logprobs_of(logits, torch.tensor([token], device=logits.device), seq.logprobs)[0]
        except Exception as exc:
            logger.exception("sampling failed for a sequence")
            self._fail(seq, f"sampling failed: {type(exc).__name__}: {exc}", 500)
            return
        seq.generated += 1
        now = time.perf_counter()
        first = seq.generated == 1
        waited = now - (seq.submitted_at if first else seq.last_token_at)
        self._observe(lambda: self.observer.generated_token(first, waited))
        seq.last_token_at = now
        self._emit(seq, Token(token, logprob))
        if token in seq.stop_tokens or complete:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        with self._cond:
            self._release(seq)
        self._emit(seq, Finished(reason))
