"""Selective-scan benchmark on CPU: time and peak memory per call, one JSON line per measurement.

Compares four implementations of the same forward (float32, with D, z and delta_bias, no gradient):
  reference     pyjamba.kernels.reference.selective_scan_ref (the spec: a loop over L)
  fast          pyjamba.kernels.chunked.selective_scan (kernels="torch", the chunked PyTorch scan)
  numba         pyjamba.kernels.numba.scan.selective_scan (kernels="numba", what "auto" runs on CPU with numba)
  transformers  transformers.models.jamba.modeling_jamba.mamba_selective_scan (its CPU path)
and reports each one's time and peak memory as a ratio to transformers' on the same shape, and the
numba kernel's time as a ratio to the chunked scan's (`speedup_vs_fast`).

Every measurement runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) belongs to
that case alone; the peak reported is ru_maxrss after the calls minus the resident size just before
the first call, with the inputs already built (torch's allocations are invisible to tracemalloc).
Time is the best of `calls` calls (and the median is reported too); the first call is included, which
matters only for the reference at L = 4096, which runs once. The numba kernel is compiled (or loaded
from numba's on-disk cache) before the inputs are built, as `resolve_kernels` does; its `setup_s` is
that time, and the first compilation on a machine is much longer than a load from the cache.

    python benchmarks/bench_scan.py --threads 2 [--lengths 512 4096] [--long] [--wait-idle]

--long adds L = 16384 for the fast and numba scans alone. --wait-idle waits for an idle CPU before each timed
call, for shared machines where other jobs come and go.

    python benchmarks/bench_scan.py --threads 2 --paired [--lengths 512 4096]

--paired is for a machine that never goes idle: it times fast and numba (and transformers where its
(B, ED, L, N) tensors stay under ~1.5 GiB) in one process, alternating call by call so that each sees
the same load, and prints per shape the medians and the median of the per-round ratios. No peak memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from pyjamba.bench import wait_idle

SHAPES = ((1, 1024), (8, 1024), (1, 5120), (1, 8192))  # (B, ED)
N_STATE = 16
IMPLS = ("transformers", "reference", "fast", "numba")


def calls_for(impl: str, batch: int, length: int, inner: int) -> int:
    """How many calls to time: fewer for the slow reference loop, more for fast cases."""
    work = batch * length * inner
    if impl == "reference":
        return 1 if work >= 4096 * 1024 else 3
    if impl == "transformers":
        return 2 if work >= 4096 * 8192 else 3
    return 5 if work >= 4096 * 8192 else 9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(case: dict) -> dict:
    """Build the inputs for one implementation and shape, call it, and measure (in this process)."""
    import torch

    torch.set_num_threads(case["threads"])
    batch, length, inner, n_state = case["batch"], case["length"], case["inner"], N_STATE
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g).mul_(scale).add_(shift)

    setup_s = None
    if case["impl"] == "numba":
        from pyjamba.kernels.numba import scan as fused

        setup_s = round(fused.compile_kernels(), 2)
    A = -torch.exp(randn(inner, n_state, scale=0.5, shift=0.5))  # (ED, N)
    D, delta_bias = randn(inner), randn(inner, scale=0.2)
    if case["impl"] == "transformers":
        from transformers.models.jamba.modeling_jamba import mamba_selective_scan

        # transformers' layout: channel-first, u, dt, z (B, ED, L) and B, C (B, N, L).
        u, delta, z = (
            randn(batch, inner, length),
            randn(batch, inner, length, shift=-1.0),
            randn(batch, inner, length),
        )
        B, C = randn(batch, n_state, length), randn(batch, n_state, length)

        def call() -> object:
            return mamba_selective_scan(
                u,
                delta,
                A,
                B,
                C,
                D=D,
                z=z,
                delta_bias=delta_bias,
                delta_softplus=True,
                return_last_state=True,
            )
    else:
        from pyjamba.kernels import chunked, reference
        from pyjamba.kernels.numba import scan as fused

        scan = {
            "fast": chunked.selective_scan,
            "numba": fused.selective_scan,
            "reference": reference.selective_scan_ref,
        }[case["impl"]]
        u, delta, z = (
            randn(batch, length, inner),
            randn(batch, length, inner, shift=-1.0),
            randn(batch, length, inner),
        )
        B, C = randn(batch, length, n_state), randn(batch, length, n_state)

        def call() -> object:
            return scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)

    rss_before = rss_bytes()
    times = []
    with torch.no_grad():
        for _ in range(case["calls"]):
            if case["wait_idle"]:
                wait_idle()
            start = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - start)
            del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result = {
        "time_s": round(min(times), 4),
        "time_median_s": round(statistics.median(times), 4),
        "peak_rss_increase_mib": round(max(0, peak - rss_before) / 2**20, 1),
        "torch": torch.__version__,
    }
    if setup_s is not None:
        result["setup_s"] = setup_s
    return result


def paired(shapes: list[tuple[int, int, int]], threads: int) -> None:
    """Alternate the implementations call by call in this process; one JSON line per (B, L, ED)."""
    import torch

    from pyjamba.kernels import chunked
    from pyjamba.kernels.numba import scan as fused

    torch.set_num_threads(threads)
    setup_s = fused.compile_kernels()
    for batch, length, inner in shapes:
        g = torch.Generator().manual_seed(0)

        def randn(
            *shape: int, scale: float = 1.0, shift: float = 0.0, g: torch.Generator = g
        ) -> torch.Tensor:
            return torch.randn(*shape, generator=g).mul_(scale).add_(shift)

        A = -torch.exp(randn(inner, N_STATE, scale=0.5, shift=0.5))  # (ED, N)
        D, bias = randn(inner), randn(inner, scale=0.2)
        u, delta, z = (
            randn(batch, length, inner),
            randn(batch, length, inner, shift=-1.0),
            randn(batch, length, inner),
        )
        B, C = randn(batch, length, N_STATE), randn(batch, length, N_STATE)
        calls = {
            name: functools.partial(scan, u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
            for name, scan in (("numba", fused.selective_scan), ("fast", chunked.selective_scan))
        }
        if batch * length * inner * N_STATE * 4 <= 1.5 * 2**30:
            from transformers.models.jamba.modeling_jamba import mamba_selective_scan

            # transformers' layout: channel-first, (B, ED, L) and (B, N, L).
            first = [t.transpose(1, 2).contiguous() for t in (u, delta, B, C, z)]
            calls["transformers"] = functools.partial(
                mamba_selective_scan, first[0], first[1], A, first[2], first[3], D=D, z=first[4],
                delta_bias=bias, delta_softplus=True, return_last_state=True,
            )  # fmt: skip
        rounds = 9 if batch * length * inner <= 4096 * 1024 else 5
        times: dict[str, list[float]] = {name: [] for name in calls}
        with torch.no_grad():
            for _ in range(rounds):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        row = {"bench": "selective_scan_paired", "batch": batch, "length": length, "inner": inner}
        row |= {"n_state": N_STATE, "threads": threads, "rounds": rounds, "numba_setup_s": round(setup_s, 2)}
        row |= {f"{name}_median_s": round(statistics.median(ts), 4) for name, ts in times.items()}
        for name in calls.keys() - {"numba"}:
            ratios = [a / b for a, b in zip(times[name], times["numba"], strict=True)]
            row[f"numba_speedup_vs_{name}"] = round(statistics.median(ratios), 2)
        print(json.dumps(row), flush=True)


def measure(case: dict) -> dict:
    """Run one case in a fresh interpreter and return its measurements."""
    env = {**os.environ, "OMP_NUM_THREADS": str(case["threads"])}
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--long", action="store_true", help="also L = 16384, fast and numba scans only")
    parser.add_argument("--wait-idle", action="store_true", help="wait for an idle CPU before each call")
    parser.add_argument("--paired", action="store_true", help="alternate fast and numba in one process")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.paired:
        paired([(b, length, ed) for length in args.lengths for b, ed in SHAPES], args.threads)
        return
    plan = [(length, shape, args.impls) for length in args.lengths for shape in SHAPES]
    if args.long:
        plan += [(16384, shape, ["fast", "numba"]) for shape in SHAPES]
    for length, (batch, inner), impls in plan:
        baseline = fast = None
        for impl in sorted(impls, key=IMPLS.index):  # transformers first: the others are its ratios
            case = {
                "impl": impl,
                "batch": batch,
                "length": length,
                "inner": inner,
                "n_state": N_STATE,
                "threads": args.threads,
                "calls": calls_for(impl, batch, length, inner),
                "wait_idle": args.wait_idle,
            }
            result = measure(case)
            row = {"bench": "selective_scan", **case, **result}
            del row["wait_idle"]
            if impl == "transformers" and "error" not in result:
                baseline = result
            if impl == "fast" and "error" not in result:
                fast = result
            if impl == "numba" and fast is not None and "error" not in result:
                row["speedup_vs_fast"] = round(fast["time_s"] / result["time_s"], 2)
                row["speedup_vs_fast_median"] = round(fast["time_median_s"] / result["time_median_s"], 2)
            if baseline is not None and "error" not in result:
                row["time_vs_transformers"] = round(result["time_s"] / baseline["time_s"], 3)
                row["peak_vs_transformers"] = round(
                    result["peak_rss_increase_mib"] / max(baseline["peak_rss_increase_mib"], 0.1), 3
                )
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
