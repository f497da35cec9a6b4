"""`pyjamba paper recall`: does a 1:7 hybrid recover the in-context recall that pure Mamba lacks?

Three small dense models of one width and depth and matched parameter counts (families.py): pure
Mamba, Jamba's 1:7 hybrid and pure attention (no positional encoding, as Jamba's). Each is trained,
from the same seed and for the same number of steps, on alternating batches of multi-query
associative recall and needle-in-a-haystack (tasks.py), then scored on held-out sequences:
MQAR against the number of pairs, the needle against the context length, both past the lengths
seen in training. Several seeds; each (model, seed) is one training run, run in worker processes
of `--threads` threads each.

Output (in --out): recall.jsonl (one row per model, seed and evaluation point, plus one row per
training run), recall.png, and the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import output, tasks
from .families import recall_family

__all__ = ["RecallSettings", "load", "main", "run", "train_and_score"]

ARCHS = ("mamba", "hybrid", "attention")


@dataclass(frozen=True)
class RecallSettings:
    """Sizes of the models, the training and the evaluation."""

    hidden: int = 64
    layers: int = 8
    steps: int = 400
    batch: int = 16
    lr: float = 3e-3
    train_pairs: tuple[int, int] = (2, 8)  # MQAR pairs per training sequence, uniform in [lo, hi]
    train_length: int = 64  # needle sequences in training
    eval_pairs: tuple[int, ...] = (2, 4, 8, 16, 32)
    eval_lengths: tuple[int, ...] = (32, 64, 128, 256, 512)
    eval_sequences: int = 256
    seeds: tuple[int, ...] = (0, 1)
    threads: int = 1
    archs: tuple[str, ...] = field(default=ARCHS)


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to a tenth of the peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _accuracy(model: Any, ids: Any, labels: Any) -> float:
    """Share of the labelled positions whose greedy prediction is the label."""
    import torch

    with torch.no_grad():
        logits = model(ids).logits  # (B, L, V)
    scored = labels[:, 1:] != tasks.IGNORE
    predicted = logits[:, :-1].argmax(-1)
    return float((predicted == labels[:, 1:])[scored].float().mean())


def _score(model: Any, s: RecallSettings, seed: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)  # held-out: not the training stream
    rows, chunk = [], min(64, s.eval_sequences)
    for pairs in s.eval_pairs:
        accs = [
            _accuracy(model, *tasks.mqar(chunk, pairs, g)) for _ in range(max(1, s.eval_sequences // chunk))
        ]
        rows.append(
            {"task": "mqar", "pairs": pairs, "length": 4 * pairs,
             "past_training": pairs > s.train_pairs[1], "accuracy": statistics.fmean(accs)}
        )  # fmt: skip
    for length in s.eval_lengths:
        n = max(1, s.eval_sequences // chunk)
        accs = [_accuracy(model, *tasks.needle(chunk, length, g)) for _ in range(n)]
        rows.append(
            {"task": "needle", "length": length, "past_training": length > s.train_length,
             "accuracy": statistics.fmean(accs)}
        )  # fmt: skip
    return rows


def train_and_score(arch: str, seed: int, s: RecallSettings) -> list[dict[str, Any]]:
    """Train one model on the two tasks and score it; the rows of recall.jsonl for this run."""
    import torch

    from pyjamba import accounting as acc
    from pyjamba.model import JambaForCausalLM

    torch.set_num_threads(s.threads)
    config = recall_family(hidden=s.hidden, layers=s.layers, vocab=tasks.MIN_VOCAB)[arch]
    torch.manual_seed(seed)
    model = JambaForCausalLM(config, kernels="torch")  # the chunked scan is differentiable
    model.init_weights(torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    for step in range(s.steps):
        if step % 2 == 0:
            pairs = int(torch.randint(s.train_pairs[0], s.train_pairs[1] + 1, (), generator=g))
            ids, labels = tasks.mqar(s.batch, pairs, g)
        else:
            ids, labels = tasks.needle(s.batch, s.train_length, g)
        for group in opt.param_groups:
            group["lr"] = _lr(step, s.steps, s.lr)
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    head = {"claim": "recall", "arch": arch, "seed": seed, "params": acc.total_params(config)}
    tail = losses[-20:]
    rows = [
        {**head, "task": "train", "steps": s.steps, "train_seconds": round(seconds, 1),
         "final_loss": statistics.fmean(tail), "threads": s.threads,
         "intermediate_size": config.intermediate_size,
         "attention_layers": config.layer_types.count("attention")}
    ]  # fmt: skip
    rows += [{**head, **row} for row in _score(model, s, seed)]
    return rows


def _runs(s: RecallSettings, jobs: int) -> Any:
    """Yield each run's rows as it completes (in worker processes when jobs > 1)."""
    specs = [(arch, seed) for seed in s.seeds for arch in s.archs]
    if jobs <= 1:
        for arch, seed in specs:
            yield train_and_score(arch, seed, s)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(train_and_score, arch, seed, s) for arch, seed in specs]
        for future in cf.as_completed(futures):
            yield future.result()


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], tuple[float, float, bool]]:
    """(arch, task, pairs or length) -> (mean accuracy, sample std over seeds, past training)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    past: dict[tuple[str, str, int], bool] = {}
    for r in rows:
        if r["task"] == "train":
            continue
        key = (r["arch"], r["task"], r["pairs"] if r["task"] == "mqar" else r["length"])
        groups.setdefault(key, []).append(r["accuracy"])
        past[key] = r["past_training"]
    return {
        k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, past[k])
        for k, v in groups.items()
    }


def table(rows: list[dict[str, Any]], s: RecallSettings) -> str:
    """Accuracy per model (mean ± std over seeds when there are several), for each pair count and
    each needle length."""
    summary = summarise(rows)
    header = ["model", "params", "seeds", "train s/run", "final loss"]
    header += [f"MQAR {p}{'*' if p > s.train_pairs[1] else ''}" for p in s.eval_pairs]
    header += [f"needle {n}{'*' if n > s.train_length else ''}" for n in s.eval_lengths]
    body = []
    for arch in s.archs:
        train = [r for r in rows if r["arch"] == arch and r["task"] == "train"]
        if not train:
            continue
        cells = [arch, f"{train[0]['params'] / 1e6:.2f}M", str(len(train)),
                 f"{statistics.fmean(r['train_seconds'] for r in train):.0f}",
                 f"{statistics.fmean(r['final_loss'] for r in train):.3f}"]  # fmt: skip
        for task, points in (("mqar", s.eval_pairs), ("needle", s.eval_lengths)):
            for p in points:
                mean, std, _ = summary[(arch, task, p)]
                cells.append(f"{mean:.2f}±{std:.2f}" if len(train) > 1 else f"{mean:.2f}")
        body.append(cells)
    return output.markdown_table(header, body)


def plot(rows: list[dict[str, Any]], s: RecallSettings, path: Path) -> Path:
    """Two panels: MQAR accuracy against pairs, needle accuracy against length; the trained range shaded."""
    plt = output.pyplot()
    summary = summarise(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, task, points, edge, xlabel in (
        (axes[0], "mqar", s.eval_pairs, s.train_pairs[1], "key-value pairs in context"),
        (axes[1], "needle", s.eval_lengths, s.train_length, "context length (tokens)"),
    ):
        for arch in s.archs:
            if (arch, task, points[0]) not in summary:
                continue
            means = [summary[(arch, task, p)][0] for p in points]
            stds = [summary[(arch, task, p)][1] for p in points]
            ax.errorbar(points, means, yerr=stds, marker="o", capsize=3, label=arch)
        ax.axvspan(min(points), edge, color="0.9", zorder=0, label="trained range")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.set_title("multi-query associative recall" if task == "mqar" else "needle in a haystack")
    axes[1].legend(fontsize=8)
    return output.save_figure(fig, path)


def run(s: RecallSettings, out: Path, jobs: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Train and score every (model, seed); write recall.jsonl and recall.png into `out`."""
    from tqdm import tqdm

    out = output.out_folder(out)
    rows: list[dict[str, Any]] = []
    total = len(s.seeds) * len(s.archs)
    with (
        output.JsonLines(out / "recall.jsonl") as jl,
        tqdm(total=total, desc="recall runs", disable=not progress) as bar,
    ):
        jl.write(
            {
                "claim": "recall",
                "task": "settings",
                **asdict(s),
                "jobs": jobs,
                "cpu_flags": output.cpu_flags(),
            }
        )
        for run_rows in _runs(s, jobs):
            for r in run_rows:
                jl.write(r)
            rows += run_rows
            bar.update(1)
    plot(rows, s, out / "recall.png")
    return rows


def load(out: Path) -> tuple[RecallSettings, list[dict[str, Any]]]:
    """The settings and rows of a recall.jsonl written by `run`, complete or cut short."""
    import dataclasses
    import json

    path = out / "recall.jsonl"
    if not path.is_file():
        raise ValueError(f"no recall.jsonl in {out}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("task") != "settings":
        raise ValueError(f"{path} does not start with a settings row")
    names = {f.name for f in dataclasses.fields(RecallSettings)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in lines[0].items() if k in names}
    rows = lines[1:]
    done = {(r["arch"], r["seed"]) for r in rows if r["task"] == "train"}
    given["seeds"] = tuple(sorted({seed for _, seed in done}))
    given["archs"] = tuple(a for a in given["archs"] if any(a == arch for arch, _ in done))
    return RecallSettings(**given), rows


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    d = RecallSettings()
    p = argparse.ArgumentParser(
        prog="pyjamba paper recall",
        description="Train pure Mamba, the 1:7 hybrid and pure attention (matched parameters) on "
        "associative recall and needle-in-a-haystack; accuracy against pairs and context length.",
    )
    p.add_argument("--out", default="runs/paper-recall", help="output folder (default runs/paper-recall)")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps: a smoke test in seconds")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"model width (default {d.hidden})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per run (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument(
        "--seeds", type=int, default=len(d.seeds), help=f"seeds per model (default {len(d.seeds)})"
    )
    p.add_argument("--train-pairs", type=_ints, default=d.train_pairs, help="MQAR pairs in training: LO,HI")
    p.add_argument("--train-length", type=int, default=d.train_length, help="needle length in training")
    p.add_argument(
        "--eval-pairs", type=_ints, default=d.eval_pairs, help="MQAR pairs scored, comma-separated"
    )
    p.add_argument("--eval-lengths", type=_ints, default=d.eval_lengths, help="needle lengths scored")
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences, help="sequences per point")
    p.add_argument("--jobs", type=int, default=3, help="training runs at once, each a process (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: the table and plot again from --out's recall.jsonl (of a run cut short too)",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> RecallSettings:
    if len(args.train_pairs) != 2 or args.train_pairs[0] > args.train_pairs[1]:
        raise ValueError(f"--train-pairs must be LO,HI with LO <= HI, got {args.train_pairs}")
    for name in ("hidden", "steps", "batch", "seeds", "train_length", "eval_sequences", "jobs", "threads"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if max(args.eval_pairs) > len(tasks.KEYS) or max(args.train_pairs) > len(tasks.KEYS):
        raise ValueError(f"MQAR pairs are at most {len(tasks.KEYS)} (the number of distinct keys)")
    if min(args.eval_lengths) < 5 or args.train_length < 5:
        raise ValueError("needle lengths must be at least 5 tokens")
    s = RecallSettings(
        hidden=args.hidden, steps=args.steps, batch=args.batch, lr=args.lr, seeds=tuple(range(args.seeds)),
        train_pairs=tuple(args.train_pairs), train_length=args.train_length, eval_pairs=args.eval_pairs,
        eval_lengths=args.eval_lengths, eval_sequences=args.eval_sequences, threads=args.threads,
    )  # fmt: skip
    if args.quick:
        s = RecallSettings(
            hidden=32, steps=6, batch=4, train_pairs=(2, 4), train_length=16, eval_pairs=(2, 8),
            eval_lengths=(16, 32), eval_sequences=8, seeds=(0, 1), threads=args.threads,
        )  # fmt: skip
    return s


def main(argv: list[str]) -> int:
    """`pyjamba paper recall`: 0 on success, 2 on bad options."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.replot:
            s, rows = load(Path(args.out))
            plot(rows, s, Path(args.out) / "recall.png")
            print(table(rows, s))
            print(f"\n(* past the training length) seeds {list(s.seeds)}; wrote {args.out}/recall.png")
            return 0
        s = settings_from_args(args)
    except ValueError as exc:
        print(f"pyjamba paper recall: error: {exc}", file=sys.stderr)
        return 2
    jobs = 1 if args.quick else args.jobs
    start = time.perf_counter()
    rows = run(s, Path(args.out), jobs=jobs, progress=not args.no_progress)
    print(table(rows, s))
    print(
        f"\n(* past the training length) {time.perf_counter() - start:.0f} s; wrote {args.out}/recall.jsonl, recall.png"
    )
    return 0
