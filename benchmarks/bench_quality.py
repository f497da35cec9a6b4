"""What reduced precision costs in quality: perplexity, KL divergence and greedy agreement against float32.

    python benchmarks/bench_quality.py shipped            # the shipped model on its validation text
    python benchmarks/bench_quality.py random --preset jamba2-3b --tokens 256

`shipped`: the model inside the package, scored on the validation split of the Austen corpus it
was trained on (`pyjamba data tokenize data/austen ... --val-fraction 0.05`, as recipes/austen.toml;
made in a temporary folder unless --tokens names one), in chunks of --seq-len tokens.
`random`: a preset's shape with random weights (transformers' initialisation, seeded), scored on
random token ids; there is no text to measure perplexity on, so only the divergence from float32.

For each precision (float32, bfloat16 weights, experts-int8, int8, int8-head: quantize.py) it prints one JSON
line: perplexity (shipped), the mean KL(float32 || precision) of the next-token distributions, and
the fraction of positions whose likeliest token is float32's. Each precision is built afresh from
the same weights, one model in memory at a time (a 3B float32 model is 12.8 GB).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from pyjamba.config import JambaConfig
from pyjamba.model import JambaForCausalLM
from pyjamba.quantize import METHODS, quantize_model

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16", "experts-int8", "int8", "int8-head")


def cpu_flags() -> str:
    """The CPU model and the flags that decide the fast paths (AVX2, AVX-512 BF16/VNNI, AMX)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "?")
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    keep = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return f"{model} [{' '.join(keep)}] ({platform.machine()})"


def convert(model: JambaForCausalLM, precision: str) -> JambaForCausalLM:
    """The model in `precision`, changed in place: bfloat16 weights, or int8 ones (quantize.py)."""
    if precision == "bfloat16":
        return model.to(torch.bfloat16)
    if precision in METHODS:
        return quantize_model(model, precision)
    return model


def score(
    build: Callable[[], JambaForCausalLM],
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    precisions: list[str],
    label: str,
    perplexity: bool,
) -> None:
    """Score each precision against float32 (always scored first) and print a JSON line each."""
    reference: list[torch.Tensor] = []  # float32 log-probabilities, batch by batch
    base = 1.0  # float32's perplexity
    for precision in ["float32", *[p for p in precisions if p != "float32"]]:
        start = time.perf_counter()
        model = convert(build(), precision)
        nll = kl = agree = count = 0.0
        for i, (ids, labels) in enumerate(batches()):
            with torch.no_grad():
                logp = F.log_softmax(model(ids).logits.float(), dim=-1)  # (B, L, V)
            keep = labels != -100
            if precision == "float32":
                reference.append(logp)
            ref = reference[i]
            nll -= logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0][keep].sum().item()
            kl += (ref.exp() * (ref - logp)).sum(-1)[keep].sum().item()
            agree += (ref.argmax(-1) == logp.argmax(-1))[keep].sum().item()
            count += keep.sum().item()
        row = {
            "model": label,
            "precision": precision,
            "tokens": int(count),
            "kl_vs_float32": round(kl / count, 6),
            "greedy_agreement": round(agree / count, 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        if perplexity:
            row["perplexity"] = round(math.exp(nll / count), 4)
            if precision == "float32":
                base = row["perplexity"]
            else:
                row["perplexity_vs_float32"] = f"{100 * (math.exp(nll / count) / base - 1):+.3f}%"
        print(json.dumps(row), flush=True)
        del model


def shipped(args: argparse.Namespace) -> None:
    from pyjamba.data.dataset import TokenDataset, eval_batches
    from pyjamba.runtime import SHIPPED_MODEL

    folder = Path(args.tokens) if args.tokens else None
    scratch = None
    if folder is None:
        scratch = tempfile.TemporaryDirectory()
        folder = Path(scratch.name) / "austen-tokens"
        subprocess.run(
            [sys.executable, "-m", "pyjamba", "data", "tokenize", str(ROOT / "data/austen"),
             "--tokenizer", str(ROOT / "data/austen-tokenizer"), "--out", str(folder), "--val-fraction", "0.05"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    dataset = TokenDataset(folder, "val")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for n, batch in enumerate(eval_batches(dataset, args.seq_len, args.batch_size)):
            if args.max_batches and n >= args.max_batches:
                return
            yield batch

    def build() -> JambaForCausalLM:
        return JambaForCausalLM.from_pretrained(SHIPPED_MODEL, dtype="float32", kernels=args.kernels)

    score(build, batches, args.precisions, "shipped (pyjamba-austen, 7.1M)", perplexity=True)
    if scratch is not None:
        scratch.cleanup()


def random(args: argparse.Namespace) -> None:
    config = JambaConfig.from_preset(args.preset)

    def build() -> JambaForCausalLM:
        torch.manual_seed(args.seed)
        model = JambaForCausalLM(config, kernels=args.kernels)
        model.init_weights()
        return model.eval()

    ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield ids, labels

    score(build, batches, args.precisions, f"random {args.preset}", perplexity=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("shipped", "random"))
    parser.add_argument("--precisions", default=",".join(PRECISIONS), type=lambda s: s.split(","))
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--tokens", help="shipped: a tokenized Austen folder; random: token count", default=None
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=0, help="0: the whole validation split")
    parser.add_argument("--preset", default="jamba2-3b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu": cpu_flags(), "torch": torch.__version__, "threads": args.threads}), flush=True)
    if args.which == "shipped":
        shipped(args)
    else:
        args.tokens = int(args.tokens or 256)
        random(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
