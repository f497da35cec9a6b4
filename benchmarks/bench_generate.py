"""Prefill and decode speed on the CPU, pyjamba against transformers: one JSON line per measurement.

The same engine as `pyjamba bench` (pyjamba/bench.py, whose docstring says what is measured and how):

    python benchmarks/bench_generate.py --model-preset jamba-small --dtype float32 --threads 2 --wait-idle
"""

from __future__ import annotations

import sys

from pyjamba.bench import main

if __name__ == "__main__":
    sys.exit(main())
