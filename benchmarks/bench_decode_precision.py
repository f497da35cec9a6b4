"""Decoding speed by weight precision (float32, bfloat16, int8, experts-int8), against the bandwidth floor.

    python benchmarks/bench_decode_precision.py [--preset jamba-small] [--precisions float32,int8]
        [--threads 2] [--steps 16] [--prefill 512]

Builds each model from its preset with random weights (one at a time: jamba2-3b in float32 is 13 GB),
then decodes batch 1 with the numba kernels. The floor is the weight bytes one token reads (every
matrix and scale, the routed experts only, the head; not the embedding row) over the machine's
memory read bandwidth (a parallel sum over 1 GiB). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from pyjamba.config import PRESETS, JambaConfig
from pyjamba.model import JambaForCausalLM
from pyjamba.quantize import METHODS, quantize_model


def read_bandwidth(gib: float = 1.0) -> float:
    """Bytes per second that a parallel sum streams from memory (best of 5)."""
    a = torch.ones(int(gib * (1 << 28)))
    best = min(_timed(a.sum) for _ in range(5))
    del a
    return gib * (1 << 30) / best


def _timed(f) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def token_bytes(model: JambaForCausalLM) -> int:
    """Weight bytes one decoding token reads: all but the embedding, 1/E of each expert stack per routed expert."""
    config = model.config
    # The embedding table is read in full only as a tied head (an int8-head model has its own head).
    head_is_embedding = model.lm_head.weight is model.model.embed_tokens.weight
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("model.embed_tokens") and not head_is_embedding:
            continue
        size = t.numel() * t.element_size()
        if ".experts." in name:
            size = size * config.num_experts_per_tok // config.num_experts
        total += size
    return total


def build(preset: str, precision: str) -> JambaForCausalLM:
    model = JambaForCausalLM(JambaConfig(**PRESETS[preset]), kernels="numba")
    model.init_weights()
    if precision == "bfloat16":
        model.to(torch.bfloat16)
    elif precision in METHODS:
        quantize_model(model, precision)
    return model.eval()


@torch.no_grad()
def measure(model: JambaForCausalLM, steps: int, prefill: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = model.make_cache(1, 64 + steps)
    model(torch.randint(0, vocab, (1, 8), generator=gen), cache=cache)
    times = []
    token = torch.randint(0, vocab, (1, 1), generator=gen)
    for _ in range(steps + 2):
        times.append(_timed(lambda: model(token, cache=cache)))
    out = {"decode_ms": 1e3 * statistics.median(times[2:])}
    if prefill:
        prompt = torch.randint(0, vocab, (1, prefill), generator=gen)
        model(prompt, cache=model.make_cache(1, prefill))  # warm (compiles any prompt kernel)
        out["prefill_ms"] = 1e3 * min(
            _timed(lambda: model(prompt, cache=model.make_cache(1, prefill), logits_to_keep=1))
            for _ in range(2)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="jamba-small")
    parser.add_argument("--precisions", default="float32,bfloat16,int8,experts-int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=0, help="also time a prompt of this many tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "fma", "amx", "f16c"))]
    print(
        json.dumps({"read_GBps": round(bandwidth / 1e9, 2), "threads": args.threads, "simd": simd}),
        flush=True,
    )
    for precision in args.precisions.split(","):
        model = build(args.preset, precision)
        nbytes = token_bytes(model)
        result = measure(model, args.steps, args.prefill)
        floor_ms = 1e3 * nbytes / bandwidth
        print(json.dumps({
            "preset": args.preset, "precision": precision, "token_MB": round(nbytes / 1e6, 1),
            "floor_ms": round(floor_ms, 2), **{k: round(v, 2) for k, v in result.items()},
            "pct_of_floor": round(100 * floor_ms / result["decode_ms"], 1),
        }), flush=True)  # fmt: skip
        del model
        gc.collect()


if __name__ == "__main__":
    main()
