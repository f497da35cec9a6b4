"""`pyjamba bench`: prefill and decode speed on the CPU, pyjamba against transformers, one JSON line each.

Owns the benchmark: the machine's own limits (matmul FLOP/s, memory bandwidth), a random-weight
checkpoint on disk that both engines load, and the timed runs. Every engine and variant runs in its
own fresh subprocess, one after another (a 3B model in float32 is 12.8 GB: never two at once):

    machine      float32 and bfloat16 matmul GFLOP/s (a large square product and the model's own
                 shapes) and memory bandwidth (a sum over a 1 GiB tensor), measured in this run
    prefill      one prompt of each length, batch 1, logits for the last position only (what a
                 generation starts with), with a cache sized for it
    decode       `--decode-steps` greedy steps after a `--decode-prompt`-token prompt, per batch size;
                 tokens/s counts every sequence of the batch

pyjamba decodes with `model(tokens[:, None], cache=cache)`, transformers with its own forward and
cache (`past_key_values`, `use_cache=True`): the same work. Variants: `hybrid` is the preset itself,
`transformer` the same shape with attention in every layer (attn_layer_period=1).

Each measurement line carries the model's matmul FLOPs (prefill) and the bytes of weights a decoding
step reads (decode), and what fraction of the machine's measured limits the run achieved:

    prefill FLOPs   2 x (matmul weights a token uses: experts K of E, no embedding) x L
                    + 4 x H x Dh x L(L+1)/2 per attention layer (QK^T and AV, causal)
                    + 2 x D x V for the one position's logits
    decode bytes    weights a step reads: all but the embedding table (one row of it instead) and the
                    unrouted experts (with B sequences, the expected number of distinct experts
                    E (1 - (1 - K/E)^B)), the lm_head in full; floor tokens/s = B x bandwidth / bytes,
                    the bandwidth measured in the engine's process just before each decode run
                    (a sum over 256 MiB; `bandwidth_gbs_at_run`, the median over the runs), since on
                    a shared machine it moves by 20% from minute to minute

Time is the best of `--repeats` runs (the median is reported too); with `--wait-idle` each run
waits for an idle CPU first, for machines shared with other jobs. Peak memory is the process's
resident high-water mark during the measurement (reset before it through /proc/self/clear_refs),
with the weights; `peak_increase_gb` is that minus the resident size just before.

On a machine that never goes idle, `--paired` loads every engine at once, each in its own process,
and runs them in turn, measurement by measurement and run by run, so that both see the same load;
rows then carry their run times (`times_s`) and ours the median of the per-run ratios
(`speed_vs_transformers_round_median`) besides the ratio of the best times. It needs both models
in memory at once (not for a 3B model in float32 on 24 GiB).

`--dtype auto` (the default) is `dtypes.auto_dtype`'s choice for this machine, resolved once
and written in every row. pyjamba's model loads as the commands load it (`runtime.load_weights`):
`--kernels` picks its Mamba kernels (the rows name them), `--verbose` prints what was chosen and why.

    pyjamba bench --model-preset jamba-small --threads 2 --paired
    pyjamba bench --model-preset jamba-small --dtype float32 --threads 2 --wait-idle
    python benchmarks/bench_generate.py ...   (the same)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .config import PRESETS, JambaConfig
from .quantize import METHODS
from .runtime import KERNEL_NAMES

__all__ = ["decode_bytes_per_step", "main", "prefill_flops", "variant_config"]

ENGINES = ("ours", "transformers")
VARIANTS = ("hybrid", "transformer")
DTYPES = ("float32", "bfloat16")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ---- the model's arithmetic ---------------------------------------------------------------------
def variant_config(preset: str, variant: str) -> JambaConfig:
    """The preset (`hybrid`) or the same shape with attention in every layer (`transformer`)."""
    config = JambaConfig.from_preset(preset)
    if variant == "transformer":
        config = config.replace(attn_layer_period=1, attn_layer_offset=0)
    return config


def _matmul_weights_per_token(c: JambaConfig) -> int:
    """Weights a token multiplies by in the layers (experts K of E, router included), no head."""
    d, ed, n, r = c.hidden_size, c.mamba_inner, c.mamba_d_state, c.dt_rank
    attention = d * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + (
        c.num_attention_heads * c.head_dim * d
    )
    mamba = d * 2 * ed + ed * (r + 2 * n) + r * ed + ed * d  # in_proj, x_proj, dt_proj, out_proj
    mlp = 3 * d * c.intermediate_size
    total = 0
    for i, kind in enumerate(c.layer_types):
        total += attention if kind == "attention" else mamba
        if c.is_moe_layer(i):
            total += c.num_experts * d + c.num_experts_per_tok * mlp
        else:
            total += mlp
    return total


def prefill_flops(c: JambaConfig, length: int, batch: int = 1) -> int:
    """Matmul FLOPs of a prompt of `length` tokens with logits for its last position only."""
    n_attn = c.layer_types.count("attention")
    attention = n_attn * 4 * c.num_attention_heads * c.head_dim * length * (length + 1) // 2
    head = 2 * c.hidden_size * c.vocab_size
    return batch * (2 * _matmul_weights_per_token(c) * length + attention + head)


def decode_bytes_per_step(
    c: JambaConfig, dtype_bytes: int, batch: int = 1, quantize: str | None = None
) -> float:
    """Bytes of weights one decoding step reads for `batch` sequences (see the module docstring);
    with `quantize` ("experts-int8", "int8"), its int8 matrices at 1 byte and their float32 scales."""
    from .accounting import INT8_COMPONENTS, INT8_SCALE_BYTES, linear_weights, param_breakdown

    params = param_breakdown(c)
    quantized = INT8_COMPONENTS[quantize] if quantize else frozenset()
    linear = linear_weights(c)
    nbytes = {}
    for key, n in params.items():
        elements, rows = linear[key] if key in quantized else (0, 0)
        nbytes[key] = (n - elements) * dtype_bytes + elements + INT8_SCALE_BYTES * rows
    total = sum(nbytes.values()) - nbytes["embedding"] + batch * c.hidden_size * dtype_bytes
    if c.tie_word_embeddings:
        total += c.vocab_size * c.hidden_size * dtype_bytes  # the head is the embedding table, read in full
    if params["experts"]:
        used = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch)
        total -= nbytes["experts"] * (1 - used / c.num_experts)
    return total


# ---- measuring ------------------------------------------------------------------------------------
def wait_idle(threshold: float = 0.1, timeout_s: float = 300.0) -> None:
    """Block until the whole machine's CPU use over 0.3 s falls below `threshold` (Linux /proc/stat)."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total0, idle0 = ticks()
        time.sleep(0.3)
        total1, idle1 = ticks()
        if 1 - (idle1 - idle0) / max(1, total1 - total0) < threshold:
            return


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Peak:
    """Resident memory just before a block and its high-water mark during it (VmHWM, reset first)."""

    def __enter__(self) -> _Peak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass
        self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(_status_kib("VmHWM") * 1024, self.before)


def _summary(runs: list[tuple[float, int, int, float]]) -> dict[str, Any]:
    """Best and median time of the runs (seconds, peak bytes, resident bytes before, bandwidth GB/s
    just before the run or 0), highest peak, median bandwidth."""
    times = [run[0] for run in runs]
    out = {
        "time_s": round(min(times), 4),
        "time_median_s": round(statistics.median(times), 4),
        "repeats": len(times),
        "peak_rss_gb": round(max(run[1] for run in runs) / 1e9, 3),
        "peak_increase_gb": round(max(run[1] - run[2] for run in runs) / 1e9, 3),
    }
    bandwidths = [run[3] for run in runs if run[3] > 0]
    if bandwidths:
        out["bandwidth_gbs_at_run"] = round(statistics.median(bandwidths), 1)
    return out


def measure_machine(threads: int, idle: bool) -> dict[str, Any]:
    """Matmul GFLOP/s (float32, bfloat16) and memory bandwidth of this machine, at `threads` threads."""
    import torch

    torch.set_num_threads(threads)

    def best(fn: Any, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if idle:
                wait_idle()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    out: dict[str, Any] = {"bench": "machine", "threads": threads, "torch": torch.__version__}
    g = torch.Generator().manual_seed(0)
    # A large square product: what the BLAS can do at best. torch's bfloat16 GEMM on a CPU without
    # native bfloat16 is a scalar loop, so it gets a smaller square (2048 would take minutes).
    for dtype, n in ((torch.float32, 2048), (torch.bfloat16, 512)):
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        t = best(lambda a=a, b=b: a @ b, 3)
        out[f"matmul_gflops_{str(dtype).removeprefix('torch.')}"] = round(2 * n**3 / t / 1e9, 1)
        out[f"matmul_square_{str(dtype).removeprefix('torch.')}"] = n
    x = torch.empty(2**28)  # 1 GiB of float32, far more than any cache
    x.normal_(generator=g)
    t = best(lambda: x.sum(), 5)
    out["bandwidth_gbs"] = round(x.numel() * 4 / t / 1e9, 1)
    y = torch.empty_like(x)
    t = best(lambda: y.copy_(x), 3)
    out["copy_gbs"] = round(2 * x.numel() * 4 / t / 1e9, 1)  # read + write
    return out


def model_matmul_gflops(config: JambaConfig, threads: int, tokens: int = 512) -> dict[str, float]:
    """float32 GFLOP/s of F.linear at the model's own projection shapes, `tokens` rows."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    d, ed = config.hidden_size, config.mamba_inner
    shapes = {
        "in_proj": (d, 2 * ed),
        "out_proj": (ed, d),
        "mlp_up": (d, config.intermediate_size),
        "mlp_down": (config.intermediate_size, d),
    }
    out = {}
    for name, (n_in, n_out) in shapes.items():
        x, w = torch.randn(tokens, n_in), torch.randn(n_out, n_in)
        F.linear(x, w)
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            F.linear(x, w)
            best = min(best, time.perf_counter() - start)
        out[name] = round(2 * tokens * n_in * n_out / best / 1e9, 1)
    return out


# ---- one engine, in its own process ---------------------------------------------------------------
def _load(engine: str, case: dict[str, Any]) -> Any:
    """The engine's model from the case's checkpoint; ours through `runtime.load_weights`, as the
    commands load it (huge pages, kernels), its choices on stderr with --verbose."""
    if engine == "ours":
        from .runtime import load_weights

        model, choices = load_weights(
            case["checkpoint"],
            dtype=case["dtype"],
            kernels=case.get("kernels", "auto"),
            huge_pages=case.get("huge_pages", True),
            quantize=case.get("quantize"),
        )
        if case.get("verbose"):
            print(f"pyjamba bench: {choices.summary()}", file=sys.stderr, flush=True)
        return model
    import warnings

    import transformers

    from .dtypes import parse_dtype

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.JambaForCausalLM.from_pretrained(
            case["checkpoint"], dtype=parse_dtype(case["dtype"])
        )
    return model.eval()


def _engine_calls(engine: str, model: Any, chunk: int = 0) -> tuple[Any, Any]:
    """(prefill(ids, extra) -> (logits, state), step(tokens, state) -> logits) for an engine.

    chunk: pyjamba feeds a prompt through the cache `chunk` tokens at a time (0: all at once).
    """
    if engine == "ours":

        def prefill(ids: Any, extra: int) -> tuple[Any, Any]:
            cache = model.make_cache(ids.shape[0], max_length=ids.shape[1] + extra)
            size = chunk or ids.shape[1]
            for start in range(0, ids.shape[1], size):
                logits = model(ids[:, start : start + size], cache=cache, logits_to_keep=1).logits
            return logits, cache

        def step(tokens: Any, cache: Any) -> Any:
            return model(tokens[:, None], cache=cache).logits

    else:

        def prefill(ids: Any, extra: int) -> tuple[Any, Any]:
            out = model(ids, use_cache=True, logits_to_keep=1)
            return out.logits, out.past_key_values

        def step(tokens: Any, cache: Any) -> Any:
            return model(tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    return prefill, step


class _Engine:
    """One engine's model, loaded in this process and warmed up; `run` times one measurement."""

    def __init__(self, case: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(case["threads"])
        self.case = case
        self._stream: Any = None  # the buffer `_bandwidth` sums, made at the first decode run
        start = time.perf_counter()
        with _Peak() as peak:
            model = _load(case["engine"], case)
        load_s = time.perf_counter() - start
        self.prefill, self.step = _engine_calls(case["engine"], model, case.get("prefill_chunk", 0))
        self.vocab = model.config.vocab_size
        self.base = {k: case[k] for k in ("engine", "variant", "preset", "dtype", "threads")}
        if case["engine"] == "ours":
            self.base["kernels"] = model.kernels.name
            if case.get("prefill_chunk"):
                self.base["prefill_chunk"] = case["prefill_chunk"]
            if not case.get("huge_pages", True):
                self.base["huge_pages"] = False
            if case.get("quantize"):
                self.base["quantize"] = case["quantize"]
        self.load_row = {"bench": "load", **self.base, "load_s": round(load_s, 2)}
        self.load_row["rss_gb"] = round(peak.peak / 1e9, 3)
        with torch.inference_mode():
            warm = self._ids(1, 64, seed=0)
            logits, state = self.prefill(warm, 4)  # first calls: allocator, oneDNN primitives, lazy imports
            self.step(logits[:, -1].argmax(-1), state)

    def _ids(self, batch: int, length: int, seed: int) -> Any:
        """The same random token ids for every engine (seeded by the measurement)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, self.vocab, (batch, length), generator=g)

    def _bandwidth(self) -> float:
        """Memory bandwidth now, GB/s: the best of two sums over 256 MiB (more than any cache here).

        Measured just before each decode run, because on a shared machine the bandwidth other jobs
        leave changes from minute to minute, and a decode run is a measure of it."""
        import torch

        if self._stream is None:
            self._stream = torch.ones(2**26)
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            self._stream.sum()
            best = min(best, time.perf_counter() - start)
        return self._stream.numel() * 4 / best / 1e9

    def run(self, bench: str, size: int) -> tuple[float, int, int, float]:
        """One prefill of `size` tokens or one decode of a batch of `size`: (seconds, peak, before,
        bandwidth GB/s measured just before a decode run, 0 for a prefill)."""
        import torch

        case = self.case
        bandwidth = self._bandwidth() if bench == "decode" else 0.0
        with torch.inference_mode(), _Peak() as peak:
            if bench == "prefill":
                ids = self._ids(1, size, seed=size)
                t0 = time.perf_counter()
                self.prefill(ids, 1)
                seconds = time.perf_counter() - t0
            else:
                ids = self._ids(size, case["decode_prompt"], seed=10**6 + size)
                logits, state = self.prefill(ids, case["decode_steps"])
                tokens = logits[:, -1].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(case["decode_steps"]):
                    tokens = self.step(tokens, state)[:, -1].argmax(-1)
                seconds = time.perf_counter() - t0
        return seconds, peak.peak, peak.before, bandwidth


def _row(base: dict[str, Any], case: dict[str, Any], bench: str, size: int, runs: list) -> dict[str, Any]:
    """The JSON row of a measurement from its runs (seconds, peak, before)."""
    if bench == "prefill":
        row = {"bench": "prefill", **base, "length": size, **_summary(runs)}
        row["tokens_per_s"] = round(size / row["time_s"], 1)
        return row
    row = {"bench": "decode", **base, "batch": size, "prompt": case["decode_prompt"]}
    row |= {"steps": case["decode_steps"], **_summary(runs)}
    row["tokens_per_s"] = round(size * case["decode_steps"] / row["time_s"], 2)
    row["ms_per_step"] = round(1e3 * row["time_s"] / case["decode_steps"], 2)
    return row


def _measurements(case: dict[str, Any]) -> list[tuple[str, int]]:
    return [("prefill", n) for n in case["lengths"]] + [("decode", b) for b in case["batches"]]


def run_engine(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Load one engine's model and run every measurement of `case` (in this process)."""
    engine = _Engine(case)
    rows = [engine.load_row]
    for bench, size in _measurements(case):
        runs = []
        for _ in range(case["repeats"]):
            if case["wait_idle"]:
                wait_idle()
            runs.append(engine.run(bench, size))
        rows.append(_row(engine.base, case, bench, size, runs))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def serve_engine(case: dict[str, Any]) -> None:
    """Worker of a paired run: the load row, then one run per request line ({"bench", "size"}) on stdin."""
    engine = _Engine(case)
    print(json.dumps(engine.load_row), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(engine.run(request["bench"], request["size"])), flush=True)


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_paired(cases: list[dict[str, Any]], repeats: int, idle: bool) -> Iterator[dict[str, Any]]:
    """All engines of `cases` loaded at once, each in its own process, run in turn measurement by
    measurement (the order reversed every round), so that they see the same machine load.

    Yields the load rows, then per measurement one row per engine that runs it; ratios between
    engines are then taken round by round (`_paired_ratios`).
    """
    workers: list[subprocess.Popen] = []
    bases: list[dict[str, Any]] = []
    try:
        for case in cases:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyjamba.bench", "--serve", json.dumps(case)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(case["threads"]),
            )  # fmt: skip
            workers.append(proc)
            loaded = json.loads(_reply(proc))
            bases.append({k: v for k, v in loaded.items() if k not in ("bench", "load_s", "rss_gb")})
            yield loaded
        sizes = dict.fromkeys(m for case in cases for m in _measurements(case))
        for bench, size in sizes:
            taking = [
                (case, base, proc)
                for case, base, proc in zip(cases, bases, workers, strict=True)
                if (bench, size) in _measurements(case)
            ]
            runs: list[list[tuple[float, int, int, float]]] = [[] for _ in taking]
            for r in range(repeats):
                if idle:
                    wait_idle()
                order = range(len(taking)) if r % 2 == 0 else reversed(range(len(taking)))
                for i in order:
                    proc = taking[i][2]
                    proc.stdin.write(json.dumps({"bench": bench, "size": size}) + "\n")
                    proc.stdin.flush()
                    runs[i].append(tuple(json.loads(_reply(proc))))
            for (case, base, _), engine_runs in zip(taking, runs, strict=True):
                row = _row(base, case, bench, size, engine_runs)
                row["paired"] = True
                row["times_s"] = [round(run[0], 4) for run in engine_runs]
                yield row
    finally:
        for proc in workers:
            proc.stdin.close()
            proc.wait()


def _reply(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench worker exited with {proc.wait()}: {proc.args[-1][:200]}")
    return line


def _subprocess(args: list[str], threads: int) -> list[dict[str, Any]]:
    """Run `python -m pyjamba.bench ARGS` in a fresh interpreter; its JSON lines (stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyjamba.bench", *args], stdout=subprocess.PIPE, text=True, env=_env(threads)
    )
    if proc.returncode != 0:
        return [{"error": f"subprocess exited with {proc.returncode}", "args": args}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# ---- the random checkpoint -------------------------------------------------------------------------
def build_checkpoint(config: JambaConfig, folder: Path, dtype: str, seed: int = 0) -> Path:
    """A random-weight checkpoint (`init_weights`) in `folder`, stored in `dtype`; reused if there.

    Built in its storage dtype straight away (meta device, then `to_empty`), so that a 3B model in
    bfloat16 needs 6.4 GB, not the 12.8 GB of float32 first.
    """
    import torch

    from .model import JambaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    model = model.to(getattr(torch, dtype)).to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_weights(torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    return folder


# ---- the report ------------------------------------------------------------------------------------
def _annotate(row: dict[str, Any], config: JambaConfig, machine: dict[str, Any]) -> None:
    """Add the FLOP and bandwidth accounting to a prefill or decode row."""
    if row.get("bench") == "prefill":
        flops = prefill_flops(config, row["length"])
        achieved = flops / row["time_s"] / 1e9
        row["gflop"] = round(flops / 1e9, 2)
        row["achieved_gflops"] = round(achieved, 1)
        # bfloat16 prompts are multiplied in float32 on CPUs without native bfloat16 (model.linear).
        row["fraction_of_fp32_matmul"] = round(achieved / machine["matmul_gflops_float32"], 3)
    elif row.get("bench") == "decode":
        nbytes = decode_bytes_per_step(config, _DTYPE_BYTES[row["dtype"]], row["batch"], row.get("quantize"))
        # The bandwidth measured alongside the run where there is one (a shared machine's varies).
        bandwidth = row.get("bandwidth_gbs_at_run", machine["bandwidth_gbs"])
        floor = row["batch"] * bandwidth * 1e9 / nbytes
        row["weight_gb_per_step"] = round(nbytes / 1e9, 4)
        row["floor_tokens_per_s"] = round(floor, 2)
        row["fraction_of_floor"] = round(row["tokens_per_s"] / floor, 3)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyjamba bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-preset", default="jamba-small", choices=sorted(PRESETS))
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *DTYPES), help="auto: dtypes.auto_dtype's choice here"
    )
    parser.add_argument(
        "--kernels", default="auto", choices=KERNEL_NAMES, help="pyjamba's Mamba kernels (default: auto)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="say on stderr which kernels and dtype pyjamba chose, and why"
    )
    parser.add_argument(
        "--quantize", choices=METHODS, help="pyjamba's weights in int8, quantized on load (quantize.py)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 8192], help="prompt lengths")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="pyjamba: feed prompts this many tokens at a time (0: whole)",
    )
    parser.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="pyjamba: leave the weights where loading put them (default: moved into transparent huge pages)",
    )
    parser.add_argument("--engines", default="ours,transformers", help="comma-separated: ours, transformers")
    parser.add_argument(
        "--variants", default="hybrid,transformer", help="comma-separated: hybrid, transformer"
    )
    parser.add_argument(
        "--transformers-max-length", type=int, default=8192, help="longer prompts are run for pyjamba only"
    )
    parser.add_argument(
        "--transformers-lengths",
        type=int,
        nargs="*",
        help="transformers' prompt lengths (default: --lengths)",
    )
    parser.add_argument(
        "--transformers-decode-steps", type=int, help="transformers' decode steps (default: --decode-steps)"
    )
    parser.add_argument("--checkpoint-dir", default="/tmp/pyjamba-bench", help="random checkpoints live here")
    parser.add_argument(
        "--checkpoint-dtype", choices=DTYPES, help="stored dtype (default: bfloat16 above 1B parameters)"
    )
    parser.add_argument(
        "--baseline", help="JSON lines of an earlier run: transformers rows taken from it, not measured"
    )
    parser.add_argument("--no-machine", action="store_true", help="skip measuring the machine")
    parser.add_argument("--wait-idle", action="store_true", help="wait for an idle CPU before each run")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="load the engines at once and alternate them run by run (ratios per round; needs both in memory)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one engine in this process
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: one engine of a paired run
    parser.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)  # internal
    return parser


def _compare(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Add ours-over-transformers ratios to our row: of the best times (per step, should the step counts
    differ), and for a paired run also the median of the round-by-round ratios."""
    if ours["bench"] == "decode":
        ours["speed_vs_transformers"] = round(theirs["ms_per_step"] / ours["ms_per_step"], 2)
    else:
        ours["speed_vs_transformers"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
    same_work = ours.get("steps") == theirs.get("steps")
    if same_work and "times_s" in ours and len(ours["times_s"]) == len(theirs.get("times_s", ())):
        ratios = [t / o for o, t in zip(ours["times_s"], theirs["times_s"], strict=True)]
        ours["speed_vs_transformers_round_median"] = round(statistics.median(ratios), 2)
    ours["peak_increase_vs_transformers"] = round(
        ours["peak_increase_gb"] / max(theirs["peak_increase_gb"], 1e-3), 2
    )


def main(argv: list[str] | None = None) -> int:
    """Measure, print one JSON line per measurement on stdout (progress on stderr)."""
    args = _parser().parse_args(argv)
    if args.case:
        for row in run_engine(json.loads(args.case)):
            print(json.dumps(row), flush=True)
        return 0
    if args.serve:
        serve_engine(json.loads(args.serve))
        return 0
    if args.machine:
        config = JambaConfig.from_preset(args.model_preset)
        row = measure_machine(args.threads, args.wait_idle)
        row["model_shapes_gflops_float32"] = model_matmul_gflops(config, args.threads)
        print(json.dumps(row), flush=True)
        return 0

    engines = [e for e in args.engines.split(",") if e]
    variants = [v for v in args.variants.split(",") if v]
    for name, given, known in (("engine", engines, ENGINES), ("variant", variants, VARIANTS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            print(f"pyjamba bench: unknown {name} {', '.join(unknown)}", file=sys.stderr)
            return 2
    dtype = args.dtype
    if dtype == "auto":
        from .dtypes import dtype_name, resolve_dtype

        resolved, why = resolve_dtype("auto", JambaConfig.from_preset(args.model_preset))
        dtype = dtype_name(resolved)
        print(f"pyjamba bench: --dtype auto is {dtype} here ({why})", file=sys.stderr)
    machine_args = ["--machine", "--threads", str(args.threads), "--model-preset", args.model_preset]
    if args.no_machine:
        machine = {"bench": "machine", "skipped": True}
    else:
        machine = _subprocess(machine_args + (["--wait-idle"] if args.wait_idle else []), args.threads)[0]
    print(json.dumps(machine), flush=True)
    from .accounting import total_params

    earlier = []
    if args.baseline:
        earlier = [json.loads(line) for line in Path(args.baseline).read_text().splitlines() if line.strip()]
    for variant in variants:
        config = variant_config(args.model_preset, variant)
        stored = args.checkpoint_dtype or ("bfloat16" if total_params(config) > 1e9 else "float32")
        folder = Path(args.checkpoint_dir) / f"{args.model_preset}-{variant}-{stored}"
        build_checkpoint(config, folder, stored)
        baseline = {
            (row.get("bench"), row.get("length"), row.get("batch")): row
            for row in earlier
            if row.get("engine") == "transformers"
            and (row.get("variant"), row.get("preset"), row.get("dtype"), row.get("threads"))
            == (variant, args.model_preset, dtype, args.threads)
        }
        cases = []
        for engine in sorted(engines, key=lambda e: e != "transformers"):  # theirs first: ours as ratios
            lengths, steps = args.lengths, args.decode_steps
            if engine == "transformers":
                lengths = args.transformers_lengths if args.transformers_lengths is not None else lengths
                lengths = [n for n in lengths if n <= args.transformers_max_length]
                steps = args.transformers_decode_steps or steps
            cases.append(
                {
                    "engine": engine,
                    "variant": variant,
                    "preset": args.model_preset,
                    "dtype": dtype,
                    "threads": args.threads,
                    "checkpoint": str(folder),
                    "lengths": lengths,
                    "batches": args.batches,
                    "decode_prompt": args.decode_prompt,
                    "decode_steps": steps,
                    "repeats": args.repeats,
                    "prefill_chunk": args.prefill_chunk,
                    "huge_pages": not args.no_huge_pages,
                    "kernels": args.kernels,
                    "quantize": args.quantize,
                    "verbose": args.verbose,
                    "wait_idle": args.wait_idle,
                }
            )
        if args.paired:
            rows: Iterable[dict[str, Any]] = run_paired(cases, args.repeats, args.wait_idle)
        else:
            rows = (row for case in cases for row in _subprocess(["--case", json.dumps(case)], args.threads))
        for row in rows:
            if "error" not in row and "tokens_per_s" in row and "skipped" not in machine:
                _annotate(row, config, machine)
            key = (row.get("bench"), row.get("length"), row.get("batch"))
            if row.get("engine") == "transformers":
                baseline[key] = row
            elif key in baseline and "tokens_per_s" in row:
                _compare(row, baseline[key])
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
