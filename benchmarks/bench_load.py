"""Peak memory and time of loading a ~1 GB checkpoint: pyjamba's from_pretrained against transformers'.

Writes a random Jamba checkpoint (float32, 4 layers, 8 experts in 2 of them, vocab 32000: 0.98 GB,
of which 0.55 GB experts) with pyjamba's save_pretrained, sharded at 400 MB, then loads it in a fresh
Python process per loader and prints one JSON line per measurement:

    python benchmarks/bench_load.py [--dir DIR] [--loaders pyjamba pyjamba-bf16 transformers]

Memory is the process's resident set (RSS), read from /proc/self/status (Linux): `RssAnon` is memory
the process owns, `RssFile` pages of memory-mapped files, which the kernel may drop and read again
under pressure. `peak_increase` is getrusage's ru_maxrss after loading minus the RSS just before it.
Parameters that are views of the mapped files occupy no memory until touched, so the figures are
taken twice: right after loading, and after reading every parameter once (`touch`), when all of
them are resident. The files were just written, so loads read from the page cache (warm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    expert_layer_period=2,
    expert_layer_offset=1,
    attn_layer_period=4,
    attn_layer_offset=2,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)


def _rss() -> dict[str, int]:
    """Current RSS and its anonymous and file-backed parts, in bytes (Linux /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(loader: str, folder: Path) -> dict:
    """Load `folder` with `loader` in this (fresh) process and report memory and time."""
    import torch

    if loader.startswith("pyjamba"):
        from pyjamba.checkpoint import from_pretrained

        dtype = torch.bfloat16 if loader == "pyjamba-bf16" else None

        def load():
            return from_pretrained(folder, dtype=dtype)
    else:
        import transformers

        transformers.logging.set_verbosity_error()

        def load():
            return transformers.JambaForCausalLM.from_pretrained(folder)

    files = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    checkpoint_bytes = sum(p.stat().st_size for p in files)
    before = _rss()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    peak_load = _peak()
    loaded = _rss()

    start = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.float().sum()  # reads every byte of every parameter
    touch_s = time.perf_counter() - start
    touched = _rss()
    peak_touch = _peak()
    gb = 1e9
    return {
        "bench": "load",
        "loader": loader,
        "checkpoint_bytes": checkpoint_bytes,
        "files": len(files),
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_s": round(load_s, 3),
        "touch_s": round(touch_s, 3),
        "rss_before_gb": round(before["rss"] / gb, 3),
        "peak_increase_gb": round((peak_load - before["rss"]) / gb, 3),
        "peak_ratio": round((peak_load - before["rss"]) / checkpoint_bytes, 3),
        "after_load_anon_gb": round((loaded["anon"] - before["anon"]) / gb, 3),
        "after_load_file_gb": round((loaded["file"] - before["file"]) / gb, 3),
        "after_touch_anon_gb": round((touched["anon"] - before["anon"]) / gb, 3),
        "after_touch_file_gb": round((touched["file"] - before["file"]) / gb, 3),
        "peak_increase_after_touch_gb": round((peak_touch - before["rss"]) / gb, 3),
        "peak_ratio_after_touch": round((peak_touch - before["rss"]) / checkpoint_bytes, 3),
    }


def build(folder: Path) -> None:
    """A random checkpoint of CONFIG, saved sharded at 400 MB."""
    import torch

    from pyjamba.checkpoint import save_pretrained
    from pyjamba.config import JambaConfig
    from pyjamba.model import JambaForCausalLM

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(**CONFIG))
    model.init_weights()
    save_pretrained(model, folder, max_shard_size="400MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint folder (built if it has no config.json)")
    parser.add_argument("--loaders", nargs="+", default=["pyjamba", "pyjamba-bf16", "transformers"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: one loader, one folder
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        folder = args.dir or Path(tmp) / "checkpoint"
        if not (folder / "config.json").is_file():
            # Built in a child too, so that this process stays small and the children start alike.
            code = "import sys; sys.path.insert(0, sys.argv[1]); import bench_load; bench_load.build(sys.argv[2])"
            subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(folder)], check=True)
        for loader in args.loaders:
            out = subprocess.run(
                [sys.executable, __file__, "--measure", loader, "--dir", str(folder)],
                check=True,
                capture_output=True,
                text=True,
            )
            print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
