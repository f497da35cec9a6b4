"""`pyjamba paper throughput`: prefill and decode speed against context, the hybrid beside two Transformers.

Three models of one width and depth, random weights, matched active parameters (families.py): Jamba's
pattern (attention 1 layer in 8, MoE every other layer), a Mixtral-like pure-attention MoE and a
Llama-like dense Transformer, none with a positional encoding (pyjamba's attention has none, as
Jamba's). For each context length, shortest first, every model is measured in turn before the next
length, so that a change in the machine's load falls on all three alike:

    prefill   one prompt of `length` tokens into an empty cache (batch 1): tokens per second, and
              the peak resident memory above what was resident before (VmHWM, reset first)
    decode    `--steps` one-token steps per sequence after `length` tokens, at batch 1 and 16: new
              tokens per second. A step costs the same whatever the values in the cache, so the
              cache is filled with random keys, values and Mamba states rather than by a prefill of
              16 x length tokens (which would cost more than the whole measurement)

Lengths double from --min-context until --max-context, or until the next length would overrun
--time-budget seconds (each doubling is assumed to cost 4x the last: attention is quadratic).
Output (in --out): throughput.jsonl, throughput.png, and the table and the hybrid's ratios on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path
from typing import Any

from pyjamba import accounting as acc
from pyjamba.config import JambaConfig
from pyjamba.info import fmt_bytes

from . import output, rss
from .families import throughput_family

__all__ = ["crossover", "main", "measure", "ratios"]

PAPER_RATIO = 3.0  # Jamba against Mixtral 8x7B at long context (8K at batch 16; 128K at batch 1)


def _unpooled_malloc() -> None:
    """Have glibc map every block over 128 KiB on its own and unmap it when freed, so the peak of one
    measurement is not hidden by memory an earlier one left in the heap (a no-op off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed: no more dynamic raising
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _random_cache(model: Any, batch: int, length: int, extra: int, g: Any) -> Any:
    """A cache that holds `length` tokens of random state, with room for `extra` more."""
    import torch

    cache = model.make_cache(batch, length + extra)
    for store in (cache.keys, cache.values):
        for t in store.values():
            t[:, :, :length].normal_(generator=g)
    for store in (cache.conv_states, cache.ssm_states):
        for t in store.values():
            t.normal_(0.0, 0.1, generator=g)
    cache.advance(length)
    assert (
        cache.length == length and torch.isfinite(next(iter(cache.ssm_states.values()), torch.zeros(1))).all()
    )
    return cache


def measure(
    model: Any, length: int, batches: tuple[int, ...], steps: int, repeats: int = 1, seed: int = 0
) -> list[dict[str, Any]]:
    """Prefill (batch 1) and decode (each batch size) of one model at one context length; of
    `repeats` timings each, the fastest (the one least slowed by other work on the machine)."""
    import torch

    from pyjamba.generate import decode_step, prefill

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = []
    ids = torch.randint(0, vocab, (1, length), generator=g)
    times, peaks = [], []
    for _ in range(repeats):
        with rss.Peak() as peak:
            cache = model.make_cache(1, length)
            start = time.perf_counter()
            prefill(model, ids, None, cache)
            times.append(time.perf_counter() - start)
        del cache
        peaks.append(peak.bytes)
    rows.append({"phase": "prefill", "batch": 1, "seconds": min(times), "tokens_per_s": length / min(times),
                 "peak_bytes": max(peaks), "repeats": repeats})  # fmt: skip
    for batch in batches:
        tokens = torch.randint(0, vocab, (batch,), generator=g)
        times = []
        with rss.Peak() as peak:
            cache = _random_cache(model, batch, length, repeats * steps + 1, g)
            decode_step(model, tokens, None, cache)  # warm-up: the first step at this shape
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(steps):
                    decode_step(model, tokens, None, cache)
                times.append(time.perf_counter() - start)
        del cache
        rows.append({"phase": "decode", "batch": batch, "seconds": min(times),
                     "tokens_per_s": batch * steps / min(times), "peak_bytes": peak.bytes,
                     "repeats": repeats})  # fmt: skip
    return rows


def ratios(rows: list[dict[str, Any]], other: str) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(phase, batch) -> [(length, jamba tokens/s / other's tokens/s)] in order of length."""
    speed = {(r["model"], r["phase"], r["batch"], r["length"]): r["tokens_per_s"] for r in rows}
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for (model, phase, batch, length), v in sorted(speed.items(), key=lambda kv: kv[0][3]):
        if model == "jamba" and (other, phase, batch, length) in speed:
            out.setdefault((phase, batch), []).append((length, v / speed[(other, phase, batch, length)]))
    return out


def crossover(points: list[tuple[int, float]]) -> int | None:
    """The shortest length from which the hybrid is faster (ratio > 1) at every longer length; None if never."""
    answer = None
    for length, ratio in reversed(points):
        if ratio <= 1:
            break
        answer = length
    return answer


def ratio_table(rows: list[dict[str, Any]]) -> str:
    header = ["vs", "phase", "batch", "crossover", "longest length", "jamba / other", "papers"]
    body = []
    for other in ("mixtral-like", "llama-like"):
        for (phase, batch), points in ratios(rows, other).items():
            cross = crossover(points)
            paper = f"~{PAPER_RATIO:g}x (vs Mixtral)" if other == "mixtral-like" else ""
            body.append([other, phase, batch, f"{cross:,}" if cross else "none", f"{points[-1][0]:,}",
                         f"{points[-1][1]:.2f}x", paper])  # fmt: skip
    return output.markdown_table(header, body)


def speed_table(rows: list[dict[str, Any]]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = list(dict.fromkeys((r["phase"], r["batch"]) for r in rows))
    by = {(r["model"], r["phase"], r["batch"], r["length"]): r for r in rows}
    header = ["context", "model"] + [f"{p} b{b} tok/s" for p, b in columns] + ["prefill peak"]
    body = []
    for length in sorted({r["length"] for r in rows}):
        for m in models:
            if (m, "prefill", 1, length) not in by:
                continue
            cells = [f"{length:,}", m]
            cells += [f"{by[(m, p, b, length)]['tokens_per_s']:,.1f}" for p, b in columns]
            cells.append(fmt_bytes(by[(m, "prefill", 1, length)]["peak_bytes"]))
            body.append(cells)
    return output.markdown_table(header, body)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Panels: prefill tok/s, decode tok/s at each batch, prefill peak memory; all against context."""
    plt = output.pyplot()
    columns = list(dict.fromkeys((r["phase"], r["batch"]) for r in rows))
    fig, axes = plt.subplots(1, len(columns) + 1, figsize=(3.3 * (len(columns) + 1), 3.3))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, (phase, batch) in zip(axes, columns, strict=False):
        for m in models:
            rs = sorted((r for r in rows if (r["model"], r["phase"], r["batch"]) == (m, phase, batch)),
                        key=lambda r: r["length"])  # fmt: skip
            ax.plot([r["length"] / 1024 for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=m)
        ax.set_title(f"{phase}, batch {batch}", fontsize=9)
        ax.set_ylabel("tokens / s")
    ax = axes[-1]
    for m in models:
        rs = sorted(
            (r for r in rows if (r["model"], r["phase"]) == (m, "prefill")), key=lambda r: r["length"]
        )
        ax.plot([r["length"] / 1024 for r in rs], [r["peak_bytes"] / 2**20 for r in rs], marker="o", label=m)
    ax.set_title("prefill peak memory", fontsize=9)
    ax.set_ylabel("MiB above the model")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (K tokens)")
    axes[0].legend(fontsize=7)
    return output.save_figure(fig, path)


def _model(config: JambaConfig, kernels: str) -> Any:
    import torch

    from pyjamba.model import JambaForCausalLM

    model = JambaForCausalLM(config, kernels=kernels)
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def run(args: argparse.Namespace, progress: bool = True) -> list[dict[str, Any]]:
    import torch
    from tqdm import tqdm

    from pyjamba.generate import prefill

    torch.set_num_threads(args.threads)
    _unpooled_malloc()
    family = throughput_family(hidden=args.hidden, heads=args.hidden // 32, kv_heads=max(1, args.hidden // 128),
                               experts=args.experts)  # fmt: skip
    models = {name: _model(c, args.kernels) for name, c in family.items()}
    for m in models.values():  # compile the kernels and warm the allocator once, outside the timings
        prefill(m, torch.zeros(1, 64, dtype=torch.long), None, m.make_cache(1, 64))
    lengths, n = [], args.min_context
    while n <= args.max_context:
        lengths.append(n)
        n *= 2
    out = output.out_folder(args.out)
    rows: list[dict[str, Any]] = []
    start, last = time.perf_counter(), 0.0
    with (
        output.JsonLines(out / "throughput.jsonl") as jl,
        tqdm(total=len(lengths) * len(models), desc="throughput", disable=not progress) as bar,
    ):
        jl.write({"claim": "throughput", "kind": "settings", "cpu_flags": output.cpu_flags(),
                  **{k: v for k, v in vars(args).items()}})  # fmt: skip
        for name, c in family.items():
            jl.write({"claim": "throughput", "kind": "model", "model": name, "active_params": acc.active_params(c),
                      "total_params": acc.total_params(c), "intermediate_size": c.intermediate_size,
                      "attention_layers": c.layer_types.count("attention"), "num_experts": c.num_experts})  # fmt: skip
        for length in lengths:
            elapsed = time.perf_counter() - start
            if rows and elapsed + 4 * last > args.time_budget:
                bar.write(
                    f"stopping before {length:,} tokens: the time budget ({args.time_budget:.0f} s) would run out"
                )
                break
            t0 = time.perf_counter()
            for name, model in models.items():
                for r in measure(model, length, tuple(args.batches), args.steps, args.repeats):
                    row = {"claim": "throughput", "kind": "measurement", "model": name, "length": length,
                           "dtype": "float32", "kernels": model.kernels.name, **r}  # fmt: skip
                    jl.write(row)
                    rows.append(row)
                bar.update(1)
            last = time.perf_counter() - t0
    plot(rows, out / "throughput.png")
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyjamba paper throughput",
        description="Prefill and decode tokens/s and peak memory against context length: the 1:7 "
        "hybrid, a Mixtral-like MoE and a Llama-like Transformer of matched active parameters.",
    )
    p.add_argument(
        "--out", default="runs/paper-throughput", help="output folder (default runs/paper-throughput)"
    )
    p.add_argument("--hidden", type=int, default=256, help="width, a multiple of 32 (default 256)")
    p.add_argument("--experts", type=int, default=8, help="experts of the MoE models, top-2 (default 8)")
    p.add_argument("--min-context", type=int, default=1024, help="shortest context (default 1024)")
    p.add_argument("--max-context", type=int, default=65536, help="longest context (default 65536)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=1200.0,
        help="seconds before no longer length starts (default 1200)",
    )
    p.add_argument(
        "--batches", type=int, nargs="+", default=[1, 16], help="decode batch sizes (default 1 16)"
    )
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement (default 8)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timings per measurement, the fastest kept (default 3)"
    )
    p.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "torch", "numba", "reference"),
        help="backend (default auto)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny models and contexts: a smoke test in seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    """`pyjamba paper throughput`: 0 on success, 2 on bad options."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.quick:
        args.hidden, args.experts, args.min_context, args.max_context, args.steps = 64, 4, 128, 512, 2
        args.batches, args.repeats = [1, 4], 1
    problems = [f"--{n.replace('_', '-')} must be positive" for n in
                ("hidden", "experts", "min_context", "max_context", "steps", "repeats", "threads", "time_budget")
                if getattr(args, n) <= 0]  # fmt: skip
    if args.hidden % 32:
        problems.append(f"--hidden must be a multiple of 32 (heads of 32), got {args.hidden}")
    if args.min_context > args.max_context:
        problems.append("--min-context must not exceed --max-context")
    if any(b <= 0 for b in args.batches):
        problems.append("--batches must be positive")
    if problems:
        print(f"pyjamba paper throughput: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = run(args, progress=not args.no_progress)
    print(speed_table(rows))
    print()
    print(ratio_table(rows))
    print(f"\n{time.perf_counter() - start:.0f} s on a CPU with {output.cpu_flags()}, {args.threads} threads; "
          f"wrote {args.out}/throughput.jsonl, throughput.png")  # fmt: skip
    return 0
