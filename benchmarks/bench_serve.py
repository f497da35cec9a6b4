"""Load test of `pyjamba serve`: concurrent streaming clients over loopback, one JSON line per run.

For each --slots value a real server process is started (`python -m pyjamba serve`); for each
--clients value, runs alternating between the servers, that many clients stream completions back to back for --seconds: random token-id
prompts and output lengths (EOS biased away, so every request runs to its max_tokens), and a
fraction --cancel of requests closed early, after a random number of tokens. Requests still
running (or queued) at the deadline are closed too. Reported per run:

- requests/s (completed only) and output tokens/s (every token received, cancelled requests' too);
- time to first token and inter-token latency (gap between SSE chunks), p50 and p99, in ms;
- from /metrics: engine steps, the mean decode batch and step time, the fraction of the run the
  engine was busy; after the run, whether every slot is free and the queue empty;
- the server's RSS before and after (it should come back near where it started).

    python benchmarks/bench_serve.py --preset jamba-tiny --clients 1 8 32 --slots 8 1 --seconds 20

`--slots 8 1` compares continuous batching with the same model served one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from pyjamba.bench import wait_idle


def _checkpoint(preset: str, folder: Path) -> Path:
    """A random-weight checkpoint of a preset with the tiny test tokenizer (its vocabulary size)."""
    from pyjamba.testing import tiny_model_folder

    if (folder / "config.json").is_file():
        return folder
    return tiny_model_folder(folder, preset)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


class Run:
    """What the clients of one run saw."""

    def __init__(self) -> None:
        self.completed = self.cancelled = self.cut = self.errors = self.tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []


async def _request(http: httpx.AsyncClient, url: str, body: dict, cancel_after: int | None, run: Run) -> None:
    sent = time.perf_counter()
    last = None
    seen = 0
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            run.errors += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                run.errors += 1
                return
            tokens = len(chunk["choices"][0]["logprobs"]["tokens"]) if chunk["choices"] else 0
            if tokens == 0:
                continue
            if last is None:
                run.ttft.append(now - sent)
            else:
                run.itl.append(now - last)
            last = now
            seen += tokens
            run.tokens += tokens
            if cancel_after is not None and seen >= cancel_after:
                run.cancelled += 1
                return  # leaving the block closes the connection mid-stream
    run.completed += 1


async def _client(
    url: str, args: argparse.Namespace, rng: random.Random, run: Run, deadline: float, vocab: int
) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        while time.perf_counter() < deadline:
            prompt = [1] + [rng.randrange(6, vocab) for _ in range(rng.randint(*args.prompt_tokens) - 1)]
            max_tokens = rng.randint(*args.max_tokens)
            cancel_after = rng.randint(1, max_tokens) if rng.random() < args.cancel else None
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "stream": True,
                "logprobs": 0,  # token count per chunk
                "logit_bias": {"2": -100},
                "seed": rng.randrange(2**31),
            }
            request = _request(http, url + "/v1/completions", body, cancel_after, run)
            try:
                await asyncio.wait_for(request, timeout=max(0.001, deadline - time.perf_counter()))
            except asyncio.TimeoutError:
                run.cut += 1  # still running (or queued) at the deadline: closed
            except httpx.HTTPError:
                run.errors += 1


_SCRAPED = (
    "pyjamba_slots_in_use",
    "pyjamba_queue_length",
    "pyjamba_decode_batch_size_sum",
    "pyjamba_decode_batch_size_count",
    "pyjamba_engine_step_seconds_sum",
)


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in _SCRAPED:
            values[name] = float(value)
    return values


def _wait_free(url: str, timeout: float = 30.0) -> float | None:
    """Seconds until /metrics shows no slot in use and an empty queue (None: not within the timeout)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        m = _metrics(url)
        if m["pyjamba_slots_in_use"] == 0 and m["pyjamba_queue_length"] == 0:
            return time.perf_counter() - start
        time.sleep(0.05)
    return None


def _rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _serve(folder: Path, slots: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "pyjamba", "serve", "--model", str(folder), "--port", str(port)]
    command += [
        "--slots",
        str(slots),
        "--threads",
        str(args.threads),
        "--max-queue",
        str(max(64, 2 * max(args.clients))),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server on {url} did not start")


def _run(url: str, pid: int, slots: int, clients: int, args: argparse.Namespace, vocab: int) -> dict:
    if args.wait_idle:
        wait_idle()
    rss_before = _rss_mib(pid)
    load = os.getloadavg()[0]  # other work on the machine skews every number here: say how much there was
    before = _metrics(url)
    run = Run()
    rng = random.Random(args.seed)
    seeds = [rng.randrange(2**31) for _ in range(clients)]

    async def all_clients() -> float:
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(_client(url, args, random.Random(s), run, deadline, vocab) for s in seeds))
        return time.perf_counter() - start

    # Rates are per second of the run's window: after the deadline only the closing of the requests
    # still open remains (reported as teardown_s), with no tokens.
    elapsed = asyncio.run(all_clients())
    window = args.seconds
    freed_in = _wait_free(url)
    after = _metrics(url)
    steps = after["pyjamba_decode_batch_size_count"] - before["pyjamba_decode_batch_size_count"]
    rows = after["pyjamba_decode_batch_size_sum"] - before["pyjamba_decode_batch_size_sum"]
    busy = after["pyjamba_engine_step_seconds_sum"] - before["pyjamba_engine_step_seconds_sum"]
    ms = 1000.0
    row = {
        "bench": "serve",
        "slots": slots,
        "clients": clients,
        "seconds": window,
        "teardown_s": round(elapsed - window, 2),
        "requests": run.completed,
        "cancelled": run.cancelled,
        "cut_at_deadline": run.cut,
        "errors": run.errors,
        "requests_per_s": round(run.completed / window, 2),
        "output_tokens_per_s": round(run.tokens / window, 1),
    }
    for name, values in (("ttft", run.ttft), ("itl", run.itl)):
        for q in (50, 99):
            value = _percentile(values, q)
            row[f"{name}_p{q}_ms"] = None if value is None else round(value * ms, 1)
    row |= {
        "engine_steps": int(steps),
        "mean_decode_batch": round(rows / max(steps, 1), 2),
        "mean_step_ms": round(busy / max(steps, 1) * ms, 2),
        "engine_busy_fraction": round(busy / window, 2),
        "slots_free_after": freed_in is not None,
        "rss_before_mib": rss_before,
        "rss_after_mib": _rss_mib(pid),
        "threads": args.threads,
        "loadavg_1m_before": round(load, 2),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "cancel": args.cancel,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a model folder to serve")
    source.add_argument(
        "--preset", default="jamba-tiny", help="random weights of this preset (default jamba-tiny)"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 1], help="one server per value")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    parser.add_argument("--max-tokens", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--cancel", type=float, default=0.1, help="fraction of requests closed early")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of every run (on a shared machine: take medians)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-idle", action="store_true", help="wait for an idle CPU before each run")
    args = parser.parse_args(argv)

    if args.model:
        folder = Path(args.model)
    else:
        folder = _checkpoint(args.preset, Path(tempfile.gettempdir()) / f"pyjamba-bench-serve-{args.preset}")
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    # Every server up at once (an idle one costs nothing), runs alternating between them: a drift in
    # the machine's load then hits each --slots value alike.
    servers = {}
    try:
        for slots in args.slots:
            servers[slots] = _serve(folder, slots, args)
        for repeat in range(args.repeats):
            for clients in args.clients:
                for slots, (process, url) in servers.items():
                    row = _run(url, process.pid, slots, clients, args, vocab)
                    print(json.dumps({**row, "repeat": repeat}), flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
