"""Prometheus metrics of the server, in their own registry (two servers in one process do not mix).

Counters of requests (by endpoint and status), prompt and generated tokens, engine steps; gauges of
the queue and the slots, read from the engine when scraped; histograms of time to first token,
inter-token latency, step duration and decode batch size, observed by the engine thread
(prometheus_client is thread-safe); the prefix cache's lookups, hits, prompt tokens it saved, entries
and bytes held, and the prompt tokens saved by choices that share their request's prefill.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: TTFT spans a queued wait plus a prefill; inter-token latency one decode step.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics; `bind` points the gauges at a running engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pyjamba_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens_total = Counter("pyjamba_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens_total = Counter("pyjamba_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("pyjamba_queue_length", "Sequences waiting for a slot", registry=r)
        self.slots_in_use = Gauge("pyjamba_slots_in_use", "Slots holding a sequence", registry=r)
        self.slots_total = Gauge("pyjamba_slots_total", "Slots in the pool", registry=r)
        self.ttft = Histogram(
            "pyjamba_time_to_first_token_seconds",
            "From a sequence's arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "pyjamba_engine_steps", "Engine steps (a prefill chunk and/or a decode batch)", registry=r
        )
        self.step_seconds = Histogram(
            "pyjamba_engine_step_seconds", "Duration of an engine step", buckets=_ITL_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "pyjamba_decode_batch_size",
            "Sequences decoded together in a step",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pyjamba_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            buckets=_ITL_BUCKETS,
            registry=r,
        )

        self.prefix_queries = Counter(
            "pyjamba_prefix_cache_queries", "Prompts looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "pyjamba_prefix_cache_hits", "Prompts that resumed from a cached prefix", registry=r
        )
        self.prefix_tokens_saved = Counter(
            "pyjamba_prefix_cache_tokens_saved", "Prompt tokens restored from the prefix cache", registry=r
        )
        self.prefix_entries = Gauge(
            "pyjamba_prefix_cache_entries", "Blocks held by the prefix cache", registry=r
        )
        self.prefix_bytes = Gauge("pyjamba_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.prefix_capacity = Gauge(
            "pyjamba_prefix_cache_capacity_bytes", "Most bytes the prefix cache may hold", registry=r
        )
        self.shared_tokens_saved = Counter(
            "pyjamba_shared_prefill_tokens_saved",
            "Prompt tokens not prefilled because a sequence with the same prompt had just read them",
            registry=r,
        )

    def bind(self, queue_length: Callable[[], float], slots_in_use: Callable[[], float], slots: int) -> None:
        self.queue_length.set_function(queue_length)
        self.slots_in_use.set_function(slots_in_use)
        self.slots_total.set(slots)

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    # The engine's Observer protocol.
    def prompt_tokens(self, count: int) -> None:
        self.prompt_tokens_total.inc(count)

    def generated_token(self, first: bool, seconds: float) -> None:
        self.generation_tokens_total.inc()
        (self.ttft if first else self.itl).observe(seconds)

    def step(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.batch_size.observe(decode_rows)

    def prefix_lookup(self, reused_tokens: int) -> None:
        self.prefix_queries.inc()
        if reused_tokens:
            self.prefix_hits.inc()
            self.prefix_tokens_saved.inc(reused_tokens)

    def prefix_shared(self, tokens: int) -> None:
        self.shared_tokens_saved.inc(tokens)

    def prefix_cache_size(self, entries: int, nbytes: int, capacity: int) -> None:
        self.prefix_entries.set(entries)
        self.prefix_bytes.set(nbytes)
        self.prefix_capacity.set(capacity)

    def render(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)
