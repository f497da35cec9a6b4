"""`pyjamba info PRESET|DIR`: parameters, attention-cache and Mamba-state memory of a Jamba config,
weight bytes per precision, and with `--budget SIZE [--gpus N]` the largest context each precision
leaves room for.

Owns the command line and its report; the arithmetic is `pyjamba.accounting`. The report is built
once as a plain dict (what `--json` prints) and rendered to text by small formatting functions.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pyjamba import accounting as acc
from pyjamba.config import PRESETS, ConfigError, JambaConfig

__all__ = ["build_report", "format_report", "load_config", "main", "parse_size"]


# ---- inputs ----------------------------------------------------------------------------------------
def load_config(spec: str) -> JambaConfig:
    """A preset name, or a model folder (or config.json file) read with JambaConfig.from_pretrained."""
    if spec in PRESETS:
        return JambaConfig.from_preset(spec)
    if not Path(spec).exists():
        raise ConfigError(
            f"{spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing model folder"
        )
    return JambaConfig.from_pretrained(spec)


def _tokens(text: str) -> int:
    """'262144', '262_144', '262,144' or '256K' (K = 1024 tokens, as in the papers' '256K')."""
    text = text.replace("_", "").replace(",", "").strip()
    scale = 1024 if text[-1:] in ("k", "K") else 1
    try:
        value = int(text.rstrip("kK")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of tokens: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens, got {text}")
    return value


SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'80GiB', '80 GiB', '640GB', '1.5TiB', '85899345920' (bytes) -> bytes; the unit's case is free.

    GB/TB are decimal (10^9), GiB/TiB binary (2^30). Raises ValueError with a one-line message.
    """
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in SIZE_UNITS):
        raise ValueError(
            f"not a memory size: {text!r} (expected e.g. 80GiB, 640GB, 1.5TiB or a number of bytes)"
        )
    value = int(float(match.group(1).replace("_", "")) * SIZE_UNITS[unit or "b"])
    if value <= 0:
        raise ValueError(f"the memory size must be positive, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyjamba info",
        description="Parameters (total and active per token), attention KV cache, Mamba state and "
        "memory at a context length, computed from the config alone.",
    )
    p.add_argument("model", metavar="PRESET|DIR", help=f"a preset ({', '.join(PRESETS)}) or a model folder")
    p.add_argument(
        "--context", type=_tokens, help="tokens, e.g. 262144 or 256K (default: max_position_embeddings)"
    )
    p.add_argument("--dtype", choices=sorted(acc.DTYPE_BYTES), default="bfloat16", help="weights and KV")
    p.add_argument("--compare", action="store_true", help="add the papers' attention-cache table")
    p.add_argument(
        "--budget",
        metavar="SIZE",
        help="memory per GPU, e.g. 80GiB or 640GB: per precision, whether the weights fit and the "
        "largest context (batch 1, KV cache bfloat16) that fits",
    )
    p.add_argument("--gpus", metavar="N", help="GPUs of --budget each, their memory pooled (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


# ---- the report as data ------------------------------------------------------------------------------
def _layers(c: JambaConfig) -> dict[str, Any]:
    types = c.layer_types
    moe = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    return {
        "total": c.num_hidden_layers,
        "attention": types.count("attention"),
        "mamba": types.count("mamba"),
        "attention_at": [i for i, t in enumerate(types) if t == "attention"],
        "moe": len(moe),
        "num_experts": c.num_experts,
        "experts_per_token": c.num_experts_per_tok,
    }


def _kv_row(m: acc.KVModel, context: int, nbytes: int) -> dict[str, Any]:
    return {
        "name": m.name,
        "attn_layers": m.attn_layers,
        "kv_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "kv_bytes": m.kv_bytes(context, nbytes),
        "paper_gb_256k": m.paper_gb,
        "formula_gib_256k": m.formula_gib,
        "flagged": m.flagged,
    }


def _precisions(c: JambaConfig) -> dict[str, Any]:
    return {
        p: {"total": acc.weight_bytes(c, p), "breakdown": acc.weight_breakdown(c, p)} for p in acc.PRECISIONS
    }


def _budget(c: JambaConfig, per_gpu: int, gpus: int) -> dict[str, Any]:
    fits = {p: acc.budget_fit(c, p, per_gpu * gpus) for p in acc.PRECISIONS}
    first = next(iter(fits.values()))
    return {
        "bytes_per_gpu": per_gpu,
        "gpus": gpus,
        "total": per_gpu * gpus,
        "batch": 1,
        "kv_dtype": "bfloat16",
        "kv_cache_bytes_per_token": first.kv_bytes_per_token,
        "mamba_state_bytes": first.mamba_state,
        "max_position_embeddings": c.max_position_embeddings,
        "precisions": {
            p: {
                "weights": f.weights,
                "weights_fit": f.weights_fit,
                "max_context": f.max_context,
                "capped": f.capped,
                "free_at_max_context": f.free_at_max_context,
            }
            for p, f in fits.items()
        },
    }


def build_report(
    c: JambaConfig,
    name: str,
    context: int,
    dtype: str,
    compare: bool,
    budget: int | None = None,
    gpus: int = 1,
) -> dict[str, Any]:
    """Everything `info` says about a config, as a JSON-ready dict (bytes and counts are exact ints).

    `budget`: bytes per GPU, of `gpus` GPUs (None: no budget section)."""
    nbytes = acc.DTYPE_BYTES[dtype]
    mem = acc.memory_at_context(c, context, nbytes)
    report: dict[str, Any] = {
        "model": name,
        "dtype": dtype,
        "layers": _layers(c),
        "params": {
            "total": acc.total_params(c),
            "active": acc.active_params(c),
            "breakdown": acc.param_breakdown(c),
            "active_breakdown": acc.active_breakdown(c),
            "tie_word_embeddings": c.tie_word_embeddings,
        },
        "kv_cache_bytes_per_token": acc.kv_cache_bytes_per_token(c, nbytes),
        "mamba_state_bytes_per_sequence": acc.mamba_state_bytes(c, nbytes),
        "memory": {
            "context": context,
            "batch": 1,
            "weights": mem.weights,
            "kv_cache": mem.kv_cache,
            "mamba_state": mem.mamba_state,
            "total": mem.total,
        },
        "weights_by_precision": _precisions(c),
    }
    if budget is not None:
        report["budget"] = _budget(c, budget, gpus)
    if compare:
        rows = [acc.jamba_kv_model(f"{name} (this config)", c), *acc.paper_kv_table()]
        report["compare"] = [_kv_row(m, context, nbytes) for m in rows]
    return report


# ---- the report as text ------------------------------------------------------------------------------
def fmt_count(n: int) -> str:
    """51570323328 -> '51.57B'; 413436 -> '413.4K'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit != "K" else f"{n / scale:.1f}{unit}"
    return str(n)


def fmt_bytes(n: int | float) -> str:
    """Binary units: 4294967296 -> '4.00 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _layers_line(lay: dict[str, Any]) -> str:
    ffn = (
        f"{lay['moe']} MoE ({lay['num_experts']} experts, top-{lay['experts_per_token']})"
        if lay["moe"]
        else "dense (no MoE)"
    )
    at = ", ".join(map(str, lay["attention_at"]))
    return (
        f"{lay['total']} layers: {lay['attention']} attention, {lay['mamba']} mamba; {ffn}; attention at {at}"
    )


def _params_lines(p: dict[str, Any]) -> list[str]:
    lines = [f"parameters:  {fmt_count(p['total'])} total, {fmt_count(p['active'])} active per token"]
    lines.append(f"  {'component':<10} {'total':>10} {'active':>10}")
    for key, total in p["breakdown"].items():
        if total or key == "head":
            note = " (tied to embedding)" if key == "head" and p["tie_word_embeddings"] else ""
            lines.append(
                f"  {key:<10} {fmt_count(total):>10} {fmt_count(p['active_breakdown'][key]):>10}{note}"
            )
    return lines


def _memory_lines(r: dict[str, Any]) -> list[str]:
    m, dtype = r["memory"], r["dtype"]
    return [
        f"attention KV cache: {fmt_bytes(r['kv_cache_bytes_per_token'])} per token ({dtype})",
        f"Mamba state: {fmt_bytes(r['mamba_state_bytes_per_sequence'])} per sequence "
        f"(conv state in {dtype}, SSM state in float32), whatever the length",
        f"memory at {m['context']:,} tokens, batch 1, {dtype} weights:",
        f"  weights      {fmt_bytes(m['weights']):>12}",
        f"  KV cache     {fmt_bytes(m['kv_cache']):>12}",
        f"  Mamba state  {fmt_bytes(m['mamba_state']):>12}",
        f"  total        {fmt_bytes(m['total']):>12}",
    ]


def _precision_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        "weights by precision (experts-int8: MLPs and experts in int8; int8: every linear layer but the",
        "  lm_head; each int8 matrix with one float32 scale per output row; the rest bfloat16):",
    ]
    lines += [f"  {p:<13} {fmt_bytes(w['total']):>12}" for p, w in r["weights_by_precision"].items()]
    return lines


def _budget_lines(b: dict[str, Any]) -> list[str]:
    gpus = f"{b['gpus']} x {fmt_bytes(b['bytes_per_gpu'])} = " if b["gpus"] > 1 else ""
    lines = [
        f"budget {gpus}{fmt_bytes(b['total'])}, batch 1: weights + Mamba state "
        f"{fmt_bytes(b['mamba_state_bytes'])} + KV cache {fmt_bytes(b['kv_cache_bytes_per_token'])} per token",
        "  (KV bfloat16; not counted: activations, workspace, CUDA context, framework overhead)",
        f"  {'precision':<13} {'weights':>12}  {'fits':<4}  largest context",
    ]
    for p, f in b["precisions"].items():
        if not f["weights_fit"]:
            fits, ctx = "no", "none (the weights alone exceed the budget)"
        elif f["max_context"] == 0:
            fits, ctx = "yes", "none (no room for the Mamba state and one token)"
        else:
            fits = "yes"
            capped = " (the model's maximum)" if f["capped"] else ""
            ctx = f"{f['max_context']:,} tokens{capped}, {fmt_bytes(f['free_at_max_context'])} left"
        lines.append(f"  {p:<13} {fmt_bytes(f['weights']):>12}  {fits:<4}  {ctx}")
    return lines


def _compare_lines(r: dict[str, Any]) -> list[str]:
    ctx, dtype = r["memory"]["context"], r["dtype"]
    lines = [
        f"attention KV cache at {ctx:,} tokens ({dtype}); 'paper': the papers' figure at 256K tokens, 16-bit",
        f"  {'model':<34} {'attn':>4} {'kv':>3} {'Dh':>4} {'KV cache':>12} {'paper':>7}  note",
    ]
    for row in r["compare"]:
        paper = "" if row["paper_gb_256k"] is None else f"{row['paper_gb_256k']:g} GB"
        note = (
            f"FLAGGED: the formula gives {row['formula_gib_256k']:g} GiB at 256K, 16-bit"
            if row["flagged"]
            else ""
        )
        lines.append(
            f"  {row['name']:<34} {row['attn_layers']:>4} {row['kv_heads']:>3} {row['head_dim']:>4} "
            f"{fmt_bytes(row['kv_bytes']):>12} {paper:>7}  {note}".rstrip()
        )
    return lines


def format_report(r: dict[str, Any]) -> str:
    """The readable report."""
    lines = [r["model"], _layers_line(r["layers"]), *_params_lines(r["params"]), *_memory_lines(r)]
    lines += _precision_lines(r)
    if "budget" in r:
        lines += _budget_lines(r["budget"])
    if "compare" in r:
        lines += ["", *_compare_lines(r)]
    return "\n".join(lines)


# ---- entry point ------------------------------------------------------------------------------------
def _gpus(text: str | None, budget: int | None) -> int:
    if text is None:
        return 1
    if budget is None:
        raise ValueError("--gpus needs --budget (the memory of each GPU)")
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"--gpus must be a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str]) -> int:
    """`pyjamba info`: 0 on success, 2 on a usage error or a config that cannot be read."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage or help
        return int(exc.code or 0)
    try:
        config = load_config(args.model)
    except (ConfigError, OSError) as exc:
        print(f"pyjamba info: error: {exc}", file=sys.stderr)
        return 2
    try:
        budget = None if args.budget is None else parse_size(args.budget)
        gpus = _gpus(args.gpus, budget)
    except ValueError as exc:
        print(f"pyjamba info: error: {exc}", file=sys.stderr)
        return 2
    context = args.context or config.max_position_embeddings
    report = build_report(config, args.model, context, args.dtype, args.compare, budget, gpus)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
