"""Time to first token of a chat's second turn, with the prefix cache and without: one JSON line per
document length, then a markdown table.

The first turn carries a document of N tokens (text of this repository's docs, cut to N tokens) and
a question; the second turn (the first turn, the model's answer, a follow-up question) starts with
the first turn's prompt, so with the cache the engine resumes after its last whole block and
prefills only the rest. Each repetition uses fresh engines (an empty cache) on the same loaded
model, drives them directly (no HTTP), and times the second turn from `submit` to its first token;
the median over --repeats is reported, with the cache's entries and bytes after the first turn.

    python benchmarks/bench_prefix_cache.py --doc-tokens 1024 2048 4096 8192 --max-context 8448 --threads 1

The shipped model was trained on 4096-token contexts; a Jamba model has no position embeddings, so
`--max-context` lets it read longer prompts (the answers' quality is not what is measured here).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pyjamba import runtime
from pyjamba.serve.engine import Engine, Finished, Sequence, Token
from pyjamba.serve.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _cpu_flags() -> str:
    try:
        out = subprocess.run(
            ["grep", "-o", "-w", r"avx2\|avx512[a-z_0-9]*\|fma\|f16c\|amx[a-z_0-9]*", "/proc/cpuinfo"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return "unknown"
    return " ".join(sorted(set(out.split())))


def _document(tokenizer, tokens: int) -> str:
    """The first `tokens` tokens of the repository's docs, as text."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:tokens])


def _turn(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Seconds from submit to the first token, and the tokens (greedy)."""
    events: queue.Queue = queue.Queue()
    seq = Sequence(prompt, max_tokens, SamplingParams(temperature=0.0), events.put)
    start = time.perf_counter()
    engine.submit([seq])
    first = None
    tokens = []
    while True:
        event = events.get(timeout=600)
        if isinstance(event, Token):
            first = first if first is not None else time.perf_counter() - start
            tokens.append(event.token)
        elif isinstance(event, Finished):
            return first, tokens
        else:
            raise RuntimeError(f"the turn failed: {event}")


def _measure(loaded, doc_tokens: int, cache_mib: float, args) -> dict:
    tok = loaded.tokenizer
    document = _document(tok, doc_tokens)
    first_turn = [
        {"role": "system", "content": "You answer questions about the document the user gives."},
        {"role": "user", "content": f"Here is a document.\n\n{document}\n\nWhat is it about?"},
    ]
    prompt1 = tok.apply_chat_template(first_turn, add_generation_prompt=True, tokenize=True)
    engine = Engine(
        loaded.model,
        slots=1,
        prefill_chunk=args.prefill_chunk,
        prefix_block=args.prefix_block,
        prefix_cache_bytes=int(cache_mib * 2**20),
        max_context=args.max_context,
    )
    engine.start()
    try:
        ttft1, answer = _turn(engine, prompt1, args.answer_tokens)
        stats = (
            engine.prefix_cache.stats() if engine.prefix_cache else {"entries": 0, "bytes": 0, "block": None}
        )
        second_turn = [
            *first_turn,
            {"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)},
            {"role": "user", "content": "Which sections does it have? Answer in one line."},
        ]
        prompt2 = tok.apply_chat_template(second_turn, add_generation_prompt=True, tokenize=True)
        ttft2, _ = _turn(engine, prompt2, 1)
    finally:
        engine.stop(60)
    shared = next((i for i, (a, b) in enumerate(zip(prompt1, prompt2, strict=False)) if a != b), len(prompt1))
    return {
        "ttft1": ttft1,
        "ttft2": ttft2,
        "prompt1": len(prompt1),
        "prompt2": len(prompt2),
        "shared": shared,
        "entries": stats["entries"],
        "block": stats["block"],
        "bytes": stats["bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--doc-tokens", type=int, nargs="+", default=[1024, 2048, 3584])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=16, help="tokens of the first turn's answer")
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefix-block", type=int, help="default: the engine's (the chunk, at least 64)")
    p.add_argument("--cache-mib", type=float, default=512.0)
    p.add_argument("--max-context", type=int, help="default: the model's max_position_embeddings")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()

    loaded = runtime.load(args.model, dtype=args.dtype, kernels=args.kernels, threads=args.threads)
    context = {
        "model": args.model or "shipped",
        "dtype": str(loaded.model.model.final_layernorm.weight.dtype).removeprefix("torch."),
        "kernels": loaded.model.kernels.name,
        "threads": args.threads,
        "prefill_chunk": args.prefill_chunk,
        "cpu_flags": _cpu_flags(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    _measure(loaded, 256, args.cache_mib, args)  # warm up: kernels compiled, allocator primed
    rows = []
    for n in args.doc_tokens:
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for mode, mib in (("off", 0.0), ("on", args.cache_mib)):
                runs[mode].append(_measure(loaded, n, mib, args))
        on, off = runs["on"][-1], runs["off"][-1]
        row = {
            **context,
            "doc_tokens": n,
            "turn1_prompt_tokens": on["prompt1"],
            "turn2_prompt_tokens": on["prompt2"],
            "shared_prefix_tokens": on["shared"],
            "ttft2_off_ms": 1000 * statistics.median(r["ttft2"] for r in runs["off"]),
            "ttft2_on_ms": 1000 * statistics.median(r["ttft2"] for r in runs["on"]),
            "ttft1_on_ms": 1000 * statistics.median(r["ttft1"] for r in runs["on"]),
            "prefix_block": on["block"],
            "cache_entries": on["entries"],
            "cache_mib": on["bytes"] / 2**20,
            "repeats": args.repeats,
        }
        row["speedup"] = row["ttft2_off_ms"] / row["ttft2_on_ms"]
        assert off["prompt2"] == on["prompt2"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        "| document tokens | turn-2 prompt | shared with turn 1 | TTFT off (ms) | TTFT on (ms) | speedup | cache held (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['doc_tokens']} | {r['turn2_prompt_tokens']} | {r['shared_prefix_tokens']} | "
            f"{r['ttft2_off_ms']:.1f} | {r['ttft2_on_ms']:.1f} | {r['speedup']:.1f}x | {r['cache_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
