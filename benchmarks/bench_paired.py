"""Two versions of pyjamba measured side by side: `pyjamba bench` run alternately from two source
trees, rounds interleaved (A B, then B A, ...) so that a shared machine's drift falls on both.

    git archive <commit> pyjamba | tar -x -C /tmp/pyjamba-before
    python benchmarks/bench_paired.py --before /tmp/pyjamba-before --after . --rounds 3 -- \\
        --model-preset jamba-small --engines ours --variants hybrid --lengths 512 2048 \\
        --batches 1 8 --decode-steps 32 --repeats 3

Each tree is a folder holding the `pyjamba` package (a checkout, or an export of a commit); each run
is `python -m pyjamba bench ...` with that folder first on PYTHONPATH. Prints one JSON line per
measurement and side (the median over rounds of each run's median), then a Markdown table of
tokens/s with the after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def _key(row: dict) -> tuple | None:
    if row.get("bench") == "prefill":
        return ("prefill", row.get("variant"), row["length"])
    if row.get("bench") == "decode":
        return ("decode", row.get("variant"), row["batch"])
    return None


def _run(tree: Path, bench_args: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{tree.resolve()}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "pyjamba", "bench", *bench_args],
        capture_output=True, text=True, env=env, cwd=tree.resolve(), check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bench from {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="folder holding the old `pyjamba`")
    parser.add_argument("--after", type=Path, required=True, help="folder holding the new `pyjamba`")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: `pyjamba bench` options")
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    for tree in (args.before, args.after):
        if not (tree / "pyjamba" / "__init__.py").is_file():
            parser.error(f"{tree} holds no pyjamba package")

    speeds: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in range(args.rounds):
        order = [("before", args.before), ("after", args.after)]
        for side, tree in order if r % 2 == 0 else order[::-1]:
            for row in _run(tree, bench_args):
                if (key := _key(row)) is not None:
                    speeds[key][side].append(row["tokens_per_s"])
            print(f"round {r + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)

    lines = ["| measurement | before tok/s | after tok/s | after / before |", "|---|---|---|---|"]
    for key in sorted(speeds, key=str):
        before, after = (statistics.median(speeds[key][s]) for s in ("before", "after"))
        kind, variant, size = key
        label = f"{kind} {'length' if kind == 'prefill' else 'batch'} {size} ({variant})"
        print(json.dumps({"measurement": label, "before": before, "after": after, "ratio": after / before}))
        lines.append(f"| {label} | {before:.1f} | {after:.1f} | {after / before:.3f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
