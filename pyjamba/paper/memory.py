"""`pyjamba paper memory`: how much context fits in memory, for the real configs and measured in miniature.

1. The real configs, from the config alone (accounting.py, as `pyjamba info --budget`): Jamba v0.1 and
   1.5 Large, and Mixtral 8x7B and Llama-2 70B written as all-attention JambaConfigs (their public
   sizes; their KV cache is all that matters here). Per model: the attention KV cache per token and at
   256K tokens, the Mamba state, the weights in bfloat16 and ExpertsInt8, and the largest context of
   one sequence that fits the budget (`--budget` per GPU, `--gpus` of them for 1.5 Large) beside the
   papers' figure. The arithmetic counts weights, KV cache and Mamba state only; where a paper's
   figure is lower, the table gives the runtime memory per token it implies (activations, workspace).
2. In miniature, measured: the resident memory of a small hybrid and of the Transformers of the same
   width and depth (families.throughput_family) while they prefill a long prompt in chunks, each
   (model, length) in its own process so that its peak resident size (VmHWM) is its own. Rows: the
   memory held after the prefill (the cache) and the peak during it, each above the resident size of
   the built model.

Output (in --out): memory.jsonl, memory.png, the two markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyjamba import accounting as acc
from pyjamba.config import JambaConfig
from pyjamba.info import fmt_bytes, parse_size

from . import output, rss
from .families import throughput_family

__all__ = ["RealModel", "main", "measure_prefill", "measured_rows", "real_models", "real_rows", "real_table"]

GIB = 2**30
MODELS = ("jamba", "mixtral-like", "llama-like")


@dataclass(frozen=True)
class RealModel:
    """A released model's config, the GPUs it is placed on, and the papers' claim for it (or None)."""

    name: str
    config: JambaConfig
    gpus: int
    paper_context: int | None
    paper_note: str


def _transformer(**sizes: Any) -> JambaConfig:
    """A pure-attention model as a JambaConfig (all layers attention; MoE on every layer if experts > 1)."""
    return JambaConfig(
        attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0,
        max_position_embeddings=262144, **sizes,
    )  # fmt: skip


def real_models(large_gpus: int = 8) -> list[RealModel]:
    """Jamba v0.1 and 1.5 Large (presets), Mixtral 8x7B and Llama-2 70B (their public config sizes)."""
    mixtral = _transformer(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
    )  # fmt: skip
    llama = _transformer(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, num_experts=1, num_experts_per_tok=1,
    )  # fmt: skip
    return [
        RealModel("Jamba v0.1 (52B)", JambaConfig.from_preset("jamba-v0.1"), 1, 140 * 1024,
                  "up to 140K tokens on one 80 GB GPU"),
        RealModel("Mixtral 8x7B", mixtral, 1, None, "much shorter contexts than Jamba on the same GPU"),
        RealModel("Llama-2 70B", llama, 1, None, ""),
        RealModel("Jamba 1.5 Large (398B)", JambaConfig.from_preset("jamba-1.5-large"), large_gpus, 256 * 1024,
                  f"full 256K on one {large_gpus}-GPU node with ExpertsInt8"),
    ]  # fmt: skip


def real_rows(budget: int, large_gpus: int) -> list[dict[str, Any]]:
    """One JSON row per released model: its KV, state, weights and the contexts that fit."""
    rows = []
    for m in real_models(large_gpus):
        c, total = m.config, budget * m.gpus
        row: dict[str, Any] = {
            "claim": "memory", "kind": "real", "model": m.name, "gpus": m.gpus, "budget_bytes": total,
            "params": acc.total_params(c), "active_params": acc.active_params(c),
            "attention_layers": c.layer_types.count("attention"),
            "kv_bytes_per_token": acc.kv_cache_bytes_per_token(c, 2),
            "kv_bytes_256k": acc.kv_cache_bytes(c, acc.PAPER_CONTEXT, 2),
            "mamba_state_bytes": acc.mamba_state_bytes(c, 2),
            "paper_context": m.paper_context, "paper_note": m.paper_note,
        }  # fmt: skip
        for precision in ("bfloat16", "experts-int8"):
            fit = acc.budget_fit(c, precision, total)
            row[f"weights_{precision}"] = fit.weights
            row[f"max_context_{precision}"] = fit.max_context if fit.weights_fit else 0
            row[f"capped_{precision}"] = fit.capped
            if m.paper_context and fit.weights_fit and fit.max_context >= m.paper_context:
                # What the claim leaves per token beyond the KV cache: the runtime memory it implies.
                spare = total - fit.weights - fit.mamba_state - m.paper_context * fit.kv_bytes_per_token
                row[f"implied_runtime_bytes_per_token_{precision}"] = spare // m.paper_context
        rows.append(row)
    # Jamba v0.1's claim implies some runtime memory per token; charge every model the same to see
    # what the claim means for the others.
    runtime = rows[0].get("implied_runtime_bytes_per_token_experts-int8")
    for row in rows:
        row["runtime_bytes_per_token"] = runtime
        free = row["budget_bytes"] - row["weights_experts-int8"] - row["mamba_state_bytes"]
        if runtime is not None:
            fits = max(0, free // (row["kv_bytes_per_token"] + runtime))
            row["max_context_experts-int8_with_runtime"] = min(fits, acc.PAPER_CONTEXT)
    return rows


def _ctx(tokens: int, capped: bool) -> str:
    if tokens == 0:
        return "weights do not fit"
    return f"{tokens / 1024:,.0f}K" + (" (max)" if capped else "")


def real_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "GPUs", "attn layers", "KV/token", "KV at 256K", "Mamba state", "weights bf16",
              "weights ExpertsInt8", "fits, bf16", "fits, ExpertsInt8", "fits, ExpertsInt8 + runtime", "papers"]  # fmt: skip
    body = []
    for r in rows:
        paper = r["paper_note"]
        implied = r.get("implied_runtime_bytes_per_token_experts-int8")
        if implied is not None and r["max_context_experts-int8"] > r["paper_context"]:
            paper += f" (implies {fmt_bytes(implied)}/token beyond the KV cache)"
        body.append([
            r["model"], r["gpus"], r["attention_layers"], fmt_bytes(r["kv_bytes_per_token"]),
            fmt_bytes(r["kv_bytes_256k"]), fmt_bytes(r["mamba_state_bytes"]), fmt_bytes(r["weights_bfloat16"]),
            fmt_bytes(r["weights_experts-int8"]), _ctx(r["max_context_bfloat16"], r["capped_bfloat16"]),
            _ctx(r["max_context_experts-int8"], r["capped_experts-int8"]),
            "" if r.get("max_context_experts-int8_with_runtime") is None
            else _ctx(r["max_context_experts-int8_with_runtime"], r["max_context_experts-int8_with_runtime"] == acc.PAPER_CONTEXT),
            paper,
        ])  # fmt: skip
    return output.markdown_table(header, body)


# ---- measured in miniature ------------------------------------------------------------------------------
def measure_prefill(config: dict[str, Any], length: int, chunk: int, threads: int) -> dict[str, Any]:
    """In this process: build the model, then prefill `length` random tokens `chunk` at a time into a
    cache sized for them. Resident bytes: of the built model, held after the prefill, peak during it."""
    import torch

    from pyjamba.model import JambaForCausalLM

    torch.set_num_threads(threads)
    c = JambaConfig.from_dict(config)
    model = JambaForCausalLM(c, kernels="torch")
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, c.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a small prefill first: the allocator's and kernels' one-time memory
        model(ids[:, :16], cache=model.make_cache(1, 16), logits_to_keep=1)
    with rss.Peak() as peak:  # this prefill's peak, and what its cache holds after it
        start = time.perf_counter()
        cache = model.make_cache(1, length)
        with torch.no_grad():
            for s in range(0, length, chunk):
                model(ids[:, s : s + chunk], cache=cache, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return {"rss_model": peak.before, "held": peak.held, "peak": peak.bytes, "seconds": round(seconds, 2)}


def _child(config: JambaConfig, length: int, chunk: int, threads: int) -> dict[str, Any]:
    """measure_prefill in a fresh interpreter: its peak resident size is this prefill's alone."""
    args = json.dumps({"config": config.to_dict(), "length": length, "chunk": chunk, "threads": threads})
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when
    # freed, so the memory held after the prefill is the cache, not what glibc's heap kept back.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, "-m", "pyjamba.paper.memory", "--child", args],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the prefill of {length} tokens failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured_rows(
    lengths: list[int],
    hidden: int,
    chunk: int,
    threads: int,
    progress: bool,
    models: tuple[str, ...] = MODELS,
) -> list[dict[str, Any]]:
    """Each model of throughput_family(hidden) prefilled at each length, each in its own process."""
    from tqdm import tqdm

    family = throughput_family(hidden=hidden, heads=max(1, hidden // 32), kv_heads=max(1, hidden // 128))
    family = {name: family[name] for name in models}
    rows = []
    work = [(length, name) for length in lengths for name in family]  # alternate the models per length
    for length, name in tqdm(work, desc="prefill memory", disable=not progress):
        c = family[name]
        got = _child(c, length, chunk, threads)
        rows.append({
            "claim": "memory", "kind": "measured", "model": name, "length": length, "chunk": chunk,
            "hidden": hidden, "layers": c.num_hidden_layers, "attention_layers": c.layer_types.count("attention"),
            "active_params": acc.active_params(c), "total_params": acc.total_params(c), "dtype": "float32",
            "kv_bytes": acc.kv_cache_bytes(c, length, 4), "mamba_state_bytes": acc.mamba_state_bytes(c, 4),
            **got,
        })  # fmt: skip
    return rows


def measured_table(rows: list[dict[str, Any]]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    by = {(r["model"], r["length"]): r for r in rows}
    header = ["context"] + [f"{m}: {what}" for m in models for what in ("KV (formula)", "held", "peak")]
    body = []
    for n in lengths:
        cells = [f"{n:,}"]
        for m in models:
            r = by[(m, n)]
            cells += [
                fmt_bytes(r["kv_bytes"] + r["mamba_state_bytes"]),
                fmt_bytes(max(0, r["held"])),
                fmt_bytes(r["peak"]),
            ]
        body.append(cells)
    return output.markdown_table(header, body)


def plot(real: list[dict[str, Any]], measured: list[dict[str, Any]], budget: int, path: Path) -> Path:
    """Left: KV cache + state of the released models against context, the budget's free memory marked.
    Right: the miniature's measured memory held and peak against context."""
    plt = output.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    contexts = [2**k for k in range(10, 19)]
    for r in real:
        if r["gpus"] != 1:
            continue
        ys = [(r["kv_bytes_per_token"] * n + r["mamba_state_bytes"]) / GIB for n in contexts]
        line = ax.plot([n / 1024 for n in contexts], ys, marker=".", label=r["model"])[0]
        free = (budget - r["weights_experts-int8"]) / GIB
        if free > 0:
            ax.axhline(free, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("KV cache + Mamba state (GiB, bf16)")
    ax.set_title(f"released configs; dotted: {fmt_bytes(budget)} minus ExpertsInt8 weights", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for name in dict.fromkeys(r["model"] for r in measured):
        rs = sorted((r for r in measured if r["model"] == name), key=lambda r: r["length"])
        xs = [r["length"] / 1024 for r in rs]
        line = ax.plot(xs, [r["peak"] / 2**20 for r in rs], marker="o", label=f"{name} peak")[0]
        ax.plot(xs, [max(r["held"], 0) / 2**20 for r in rs], marker="x", linestyle="--", color=line.get_color(),
                label=f"{name} held")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (K tokens)")
    ax.set_ylabel("resident memory above the model (MiB)")
    ax.set_title("measured: chunked prefill, float32, CPU", fontsize=9)
    ax.legend(fontsize=7)
    return output.save_figure(fig, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyjamba paper memory",
        description="KV cache and Mamba state of the released configs, the largest context a memory "
        "budget holds, and the measured memory of a long prefill of a small hybrid and Transformers.",
    )
    p.add_argument("--out", default="runs/paper-memory", help="output folder (default runs/paper-memory)")
    p.add_argument("--budget", default="80GiB", help="memory per GPU (default 80GiB)")
    p.add_argument("--large-gpus", type=int, default=8, help="GPUs for Jamba 1.5 Large (default 8)")
    p.add_argument("--max-context", type=int, default=16384, help="longest measured prefill (default 16384)")
    p.add_argument("--min-context", type=int, default=1024, help="shortest measured prefill (default 1024)")
    p.add_argument("--hidden", type=int, default=128, help="width of the measured models (default 128)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk (default 1024)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models measured (default all)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small measured sizes, the hybrid and the dense Transformer: a smoke test",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv: list[str]) -> int:
    """`pyjamba paper memory`: 0 on success, 2 on bad options."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_prefill(spec["config"], spec["length"], spec["chunk"], spec["threads"])))
        return 0
    try:
        budget = parse_size(args.budget)
        for name in ("large_gpus", "max_context", "min_context", "hidden", "chunk", "threads"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        if args.min_context > args.max_context:
            raise ValueError("--min-context must not exceed --max-context")
        if args.hidden % 32:
            raise ValueError(f"--hidden must be a multiple of 32 (heads of 32), got {args.hidden}")
    except ValueError as exc:
        print(f"pyjamba paper memory: error: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        args.hidden, args.min_context, args.max_context, args.chunk = 64, 1024, 2048, 1024
        args.models = ["jamba", "llama-like"]
    start = time.perf_counter()
    out = output.out_folder(args.out)
    lengths = []
    n = args.min_context
    while n <= args.max_context:
        lengths.append(n)
        n *= 2
    real = real_rows(budget, args.large_gpus)
    with output.JsonLines(out / "memory.jsonl") as jl:
        jl.write({"claim": "memory", "kind": "settings", **{k: v for k, v in vars(args).items() if k != "child"},
                  "budget_bytes": budget, "cpu_flags": output.cpu_flags()})  # fmt: skip
        for r in real:
            jl.write(r)
        measured = measured_rows(
            lengths, args.hidden, args.chunk, args.threads, not args.no_progress, tuple(args.models)
        )
        for r in measured:
            jl.write(r)
    plot(real, measured, budget, out / "memory.png")
    print(f"Released configs, budget {fmt_bytes(budget)} per GPU, batch 1, KV cache bf16:\n")
    print(real_table(real))
    print(f"\nMeasured in miniature (hidden {args.hidden}, 8 layers, float32, chunks of {args.chunk}):\n")
    print(measured_table(measured))
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {out}/memory.jsonl, memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
