"""pyjamba against llama.cpp on the same random Jamba checkpoint, on this CPU, in one run.

Prefill (`--prompt` tokens, batch 1, logits for the last position only) and greedy decoding
(`--decode-steps` single-token steps right after that prompt, batch 1), tokens/s, for llama.cpp
(through llama-cpp-python) on F16 and Q8_0 GGUFs and for pyjamba in several precisions. Shared
machines drift by 20% from minute to minute, so the engines alternate round by round (the order
reversed every other round) and the ratios are taken within a round: only ratios measured in one
run of this script are worth comparing.

Every engine variant is a worker process of its own, fed the same random token ids per round:

    llama.cpp    `--llama-python` (a Python with llama_cpp): `Llama(gguf, n_threads=T,
                 n_threads_batch=T, n_batch=n_ubatch=512, use_mmap=False)`; prefill is one `eval` of
                 the prompt after clearing the memory (KV cache and Mamba states), decoding is
                 `eval([token])` and an argmax over the logits, step by step
    pyjamba      `--pyjamba-python` (default: the repo's .venv): `runtime.load_weights(folder,
                 dtype=..., quantize=...)` as the commands load it, then prefill and decode as
                 `pyjamba bench` does (a cache sized for prompt + steps, `logits_to_keep=1`)

pyjamba variants: `float32`, `bfloat16`, `experts-int8`, `int8`, `int8-head` (quantized on load, activations
in `auto`'s dtype), or `METHOD:DTYPE` (e.g. `int8:bfloat16`). llama.cpp variants: `f16`, `q8_0`
(`bf16`, `f32` also convert). `--resident` keeps every worker loaded for the whole run (needs them
all in memory at once; the default when the preset is under 1B parameters); otherwise each round
loads, warms and times one worker at a time (a 3B model: F16 and pyjamba float32 together would
not fit in 24 GiB).

The checkpoint is pyjamba's own random one (`pyjamba.bench.build_checkpoint`, the preset's shape,
float32 below 1B parameters, bfloat16 above) under `--work-dir`. The GGUFs are converted from it
by llama.cpp's `convert_hf_to_gguf.py`, from a folder that links the safetensors and holds a
config.json with `mamba_dt_rank` resolved (the converter does not read "auto") and a small
SentencePiece `tokenizer.model` trained on the repo's docs (pyjamba's checkpoint has no tokenizer;
the converter pads the vocabulary to the config's with unused tokens; the benchmark feeds ids).

Getting llama.cpp (nothing of it is in this repo):

    python3 -m venv /tmp/llama-env
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llama-env/bin/pip install llama-cpp-python   # builds, ~30 min on 2 cores
    /tmp/llama-env/bin/pip install torch==2.13.0 numpy sentencepiece safetensors transformers protobuf
    # the converter: from the sdist (vendor/llama.cpp: convert_hf_to_gguf.py, conversion/, gguf-py/)
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llsrc && tar xzf /tmp/llsrc/*.tar.gz -C /tmp/llsrc

    /tmp/llama-env/bin/python benchmarks/bench_llamacpp.py --preset jamba-small --rounds 6 --decode-steps 32 \\
        --wait-idle --idle-timeout-s 20 --retries 2 \\
        --convert-script /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

`--wait-idle` waits before each run for other jobs' CPU use to fall under --idle-threshold and
runs again when they took more than that during the run (`others_during` in every row: the
machine's CPU time used by processes other than the worker, a fraction of all cores). llama.cpp's
and torch's thread pools both spin at barriers, so two threads sharing a core with another job
slow down far beyond 2x: runs with others_during above ~0.1 are not worth comparing.

Prints one JSON line per (engine, variant, phase) (median and best tokens/s over the rounds, run
times, weight bytes), one `machine` line (CPU model, its flags that matter: avx2, avx512*, vnni,
amx; llama.cpp's system info), and a Markdown table with each variant's round-paired ratio to
each llama.cpp variant (the median over rounds of the per-round speed ratios).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


# ---- the workers (each in its own process) --------------------------------------------------------
class _LlamaWorker:
    def __init__(self, case: dict[str, Any]) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=case["gguf"],
            n_threads=case["threads"],
            n_threads_batch=case["threads"],
            n_ctx=case["n_ctx"],
            n_batch=512,
            n_ubatch=512,
            use_mmap=False,
            verbose=case.get("verbose", False),
        )
        self.load_s = time.perf_counter() - t0
        self.info = {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "weight_bytes": int(llama_cpp.llama_model_size(self.llm.model)),
            "n_vocab": self.llm.n_vocab(),
        }

    def _clear(self) -> None:
        """Forget the KV cache and the Mamba states, as for a new sequence."""
        llama_cpp = self.llama_cpp
        ctx = self.llm._ctx.ctx
        if hasattr(llama_cpp, "llama_get_memory"):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        else:  # older bindings
            llama_cpp.llama_kv_self_clear(ctx)
        self.llm.reset()

    def run(self, ids: list[int], steps: int) -> dict[str, Any]:
        import numpy as np

        llama_cpp, ctx, n_vocab = self.llama_cpp, self.llm._ctx.ctx, self.llm.n_vocab()

        def greedy() -> int:  # the last position's logits (eval keeps none without logits_all)
            return int(
                np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)))
            )

        self._clear()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        token = greedy()
        prefill_s = time.perf_counter() - t0
        out = [token]
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = greedy()
            out.append(token)
        decode_s = time.perf_counter() - t0
        return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": out[:8]}


_METHODS = ("experts-int8", "int8", "int8-head")  # pyjamba.quantize.METHODS (this runs without pyjamba)


class _PyjambaWorker:
    def __init__(self, case: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(case["threads"])
        self.torch = torch
        method, _, dtype = case["variant"].partition(":")
        quantize = method if method in _METHODS else None
        dtype = dtype or (method if quantize is None else "auto")
        t0 = time.perf_counter()
        self.model, kernels = _load_pyjamba(case["checkpoint"], dtype, quantize, case["threads"])
        self.load_s = time.perf_counter() - t0
        seen: set[int] = set()
        nbytes = 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                nbytes += t.numel() * t.element_size()
        import pyjamba

        self.info = {
            "pyjamba": getattr(pyjamba, "__version__", "?"),
            "torch": torch.__version__,
            "kernels": kernels,
            "quantize": quantize,
            "dtype": "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()})),
            "weight_bytes": nbytes,
        }
        try:
            from pyjamba.bench import _engine_calls

            self.prefill, self.step = _engine_calls("ours", self.model)
        except ImportError:  # pyjamba bench's own calls, as of this script's writing
            model = self.model

            def prefill(ids: Any, extra: int) -> tuple[Any, Any]:
                cache = model.make_cache(ids.shape[0], max_length=ids.shape[1] + extra)
                return model(ids, cache=cache, logits_to_keep=1).logits, cache

            def step(tokens: Any, cache: Any) -> Any:
                return model(tokens[:, None], cache=cache).logits

            self.prefill, self.step = prefill, step

    def run(self, ids: list[int], steps: int) -> dict[str, Any]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            logits, cache = self.prefill(x, steps + 1)
            prefill_s = time.perf_counter() - t0
            token = logits[:, -1].argmax(-1)
            out = [int(token)]
            t0 = time.perf_counter()
            for _ in range(steps):
                token = self.step(token, cache)[:, -1].argmax(-1)
                out.append(int(token))
            decode_s = time.perf_counter() - t0
        return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": out[:8]}


def _load_pyjamba(folder: str, dtype: str, quantize: str | None, threads: int) -> tuple[Any, str]:
    """The model as `pyjamba` commands load it; `quantize` through load_weights where it takes it,
    else `quantize_model` after loading."""
    from pyjamba.runtime import load_weights

    if quantize is None or "quantize" in inspect.signature(load_weights).parameters:
        extra = {"quantize": quantize} if quantize else {}
        model, choices = load_weights(folder, dtype=dtype, threads=threads, **extra)
        return model.eval(), choices.kernels
    from pyjamba.quantize import quantize_model

    model, choices = load_weights(folder, dtype=dtype, threads=threads)
    quantize_model(model, quantize)
    return model.eval(), choices.kernels


def worker_main(case: dict[str, Any]) -> None:
    """Load, warm up, say `ready` with the load facts, then one timed run per request line."""
    worker = _LlamaWorker(case) if case["engine"] == "llama.cpp" else _PyjambaWorker(case)
    rng = random.Random(0)
    warm = [rng.randrange(case["id_low"], case["id_high"]) for _ in range(64)]
    worker.run(warm, 2)  # allocators, thread pools, oneDNN primitives, the weights paged in
    worker.run(warm, 2)
    print(json.dumps({"ready": True, "load_s": round(worker.load_s, 2), **worker.info}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(worker.run(request["ids"], request["steps"])), flush=True)


# ---- the driver -----------------------------------------------------------------------------------
class _Worker:
    def __init__(self, python: str, case: dict[str, Any], threads: int) -> None:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "NUMBA_NUM_THREADS": str(threads),
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self.case = case
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", json.dumps(case)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
        )  # fmt: skip
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"{self.case['engine']} {self.case['variant']} worker exited with {self.proc.wait()}"
            )
        return json.loads(line)

    def run(self, ids: list[int], steps: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"ids": ids, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def machine_info() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in _FLAGS},
        "memory_gb": round(mem / 2**30, 1),
    }


def _stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), sum(values) - values[3] - values[4]  # total, busy


def _proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def cpu_busy(interval: float = 0.3) -> float:
    """The whole machine's CPU use over `interval` s (Linux /proc/stat), 0..1."""
    t0, b0 = _stat()
    time.sleep(interval)
    t1, b1 = _stat()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_idle(threshold: float, timeout_s: float) -> float:
    """Wait until the machine's CPU use falls below `threshold` (other jobs); the last reading."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy()
    while busy >= threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def _run_py(python: str, code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([python, "-c", code, *args], check=True, cwd=str(REPO), env=env,
                          stdout=subprocess.PIPE, text=True).stdout  # fmt: skip


_BUILD = """
import json, sys
from pathlib import Path
from pyjamba.accounting import total_params
from pyjamba.bench import build_checkpoint
from pyjamba.config import JambaConfig
config = JambaConfig.from_preset(sys.argv[1])
params = total_params(config)
stored = sys.argv[3] or ("bfloat16" if params > 1e9 else "float32")
folder = Path(sys.argv[2]) / f"hf-{stored}"
if not (folder / "config.json").is_file():
    print(f"writing the random {sys.argv[1]} checkpoint ({stored}) to {folder}", file=sys.stderr, flush=True)
    build_checkpoint(config, folder, stored)
print(json.dumps({"params": params, "stored": stored, "checkpoint": str(folder), "dt_rank": config.dt_rank,
                  "vocab_size": config.vocab_size}))
"""

_SPM = """
import sys, sentencepiece as spm
spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=int(sys.argv[3]),
    model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
    bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
"""


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The random checkpoint, its GGUF source folder and the GGUFs, made once under --work-dir."""
    work = Path(args.work_dir) / args.preset
    work.mkdir(parents=True, exist_ok=True)
    out = _run_py(args.pyjamba_python, _BUILD, args.preset, str(work), args.checkpoint_dtype or "")
    built = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    checkpoint = Path(built["checkpoint"])
    ggufs: dict[str, Path] = {}
    for variant in args.llama_variants:
        gguf = work / f"{args.preset}-{variant}.gguf"
        ggufs[variant] = gguf
        if gguf.is_file():
            continue
        if not args.convert_script:
            raise SystemExit(
                f"{gguf} is not there: give --convert-script (llama.cpp's convert_hf_to_gguf.py)"
            )
        src = work / "gguf-src"
        if not (src / "tokenizer.model").is_file():
            src.mkdir(exist_ok=True)
            for f in checkpoint.iterdir():
                if f.suffix in (".safetensors",) or f.name.endswith(".index.json"):
                    link = src / f.name
                    if not link.exists():
                        link.symlink_to(f.resolve())
            data = json.loads((checkpoint / "config.json").read_text())
            data["mamba_dt_rank"] = built["dt_rank"]  # the converter does not resolve "auto"
            (src / "config.json").write_text(json.dumps(data, indent=2))
            corpus = src / "corpus.txt"
            corpus.write_text(
                "\n".join(p.read_text(errors="replace") for p in sorted(REPO.glob("docs/*.md")))
            )
            _run_py(args.convert_python, _SPM, str(corpus), str(src / "tokenizer"), "1000")
        print(f"converting to {gguf}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        log = work / f"convert-{variant}.log"
        with log.open("w") as out:
            done = subprocess.run(
                [args.convert_python, args.convert_script, str(src), "--outtype", variant, "--outfile", str(gguf)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if done.returncode != 0:
            gguf.unlink(missing_ok=True)
            raise SystemExit(f"the converter failed ({done.returncode}): see {log}")
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {**built, "checkpoint": checkpoint, "ggufs": ggufs}


def _gguf_types(path: Path, convert_script: str | None) -> dict[str, int]:
    """Bytes of the GGUF's tensors by ggml type (gguf-py from the converter's folder, else installed)."""
    if convert_script:
        sys.path.insert(0, str(Path(convert_script).resolve().parent / "gguf-py"))
    try:
        import gguf
    except ImportError:
        return {}
    out: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="jamba-small", help="pyjamba.config.PRESETS name")
    parser.add_argument(
        "--convert-script", help="llama.cpp's convert_hf_to_gguf.py (see the module docstring)"
    )
    parser.add_argument("--llama-python", default=sys.executable, help="a Python that imports llama_cpp")
    parser.add_argument("--convert-python", help="runs the converter: torch, numpy, sentencepiece, "
                        "transformers, protobuf (default: --llama-python)")  # fmt: skip
    default_py = REPO / ".venv" / "bin" / "python"
    parser.add_argument(
        "--pyjamba-python", default=str(default_py if default_py.exists() else sys.executable)
    )
    parser.add_argument("--work-dir", default="/tmp/pyjamba-llamacpp", help="checkpoints and GGUFs live here")
    parser.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prefill length, then decoding after it")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--llama-variants", default="f16,q8_0")
    parser.add_argument("--pyjamba-variants", default="float32,bfloat16,experts-int8,int8")
    parser.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                        help="all workers loaded at once (default: below 1B parameters)")  # fmt: skip
    parser.add_argument(
        "--gap-s", type=float, default=0.3, help="pause between engines (spinning threads settle)"
    )
    parser.add_argument("--wait-idle", action="store_true",
                        help="before each engine's run, wait for the machine's CPU use (other jobs) to fall "
                        "below --idle-threshold, and run again if others took more during it")  # fmt: skip
    parser.add_argument("--idle-threshold", type=float, default=0.15)
    parser.add_argument("--idle-timeout-s", type=float, default=900)
    parser.add_argument("--retries", type=int, default=6,
                        help="with --wait-idle, runs again while other processes took over --idle-threshold "
                        "of the CPU during the run (others_during)")  # fmt: skip
    parser.add_argument(
        "--prepare-only", action="store_true", help="write the checkpoint and GGUFs, then stop"
    )
    parser.add_argument("--verbose", action="store_true", help="llama.cpp's load log on stderr")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    args.convert_python = args.convert_python or args.llama_python
    args.llama_variants = [v for v in args.llama_variants.split(",") if v]
    args.pyjamba_variants = [v for v in args.pyjamba_variants.split(",") if v]

    machine = machine_info()
    prepared = prepare(args)
    if args.prepare_only:
        return 0
    resident = args.resident if args.resident is not None else prepared["params"] < 1e9
    common = {
        "threads": args.threads,
        "verbose": args.verbose,
        "id_low": 3,
        "id_high": prepared["vocab_size"],
    }
    cases: list[tuple[str, dict[str, Any]]] = []
    for v in args.llama_variants:
        n_ctx = args.prompt + args.decode_steps + 16
        cases.append((args.llama_python, {**common, "engine": "llama.cpp", "variant": v,
                                          "gguf": str(prepared["ggufs"][v]), "n_ctx": n_ctx}))  # fmt: skip
    for v in args.pyjamba_variants:
        cases.append((args.pyjamba_python, {**common, "engine": "pyjamba", "variant": v,
                                            "checkpoint": str(prepared["checkpoint"])}))  # fmt: skip
    keys = [(c["engine"], c["variant"]) for _, c in cases]
    header = {
        "bench": "machine", **machine, "preset": args.preset, "params": prepared["params"],
        "checkpoint_dtype": prepared["stored"], "threads": args.threads, "prompt": args.prompt,
        "decode_steps": args.decode_steps, "rounds": args.rounds, "resident": resident,
    }  # fmt: skip
    ready: dict[tuple[str, str], dict[str, Any]] = {}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in keys}
    workers: dict[tuple[str, str], _Worker] = {}
    try:
        if resident:
            for (python, case), key in zip(cases, keys, strict=True):
                workers[key] = _Worker(python, case, args.threads)
                ready[key] = workers[key].ready
                print(json.dumps({"bench": "load", "engine": key[0], "variant": key[1], **ready[key]}),
                      file=sys.stderr, flush=True)  # fmt: skip
        for r in range(args.rounds):
            rng = random.Random(1000 + r)
            ids = [rng.randrange(common["id_low"], common["id_high"]) for _ in range(args.prompt)]
            order = list(range(len(cases))) if r % 2 == 0 else list(reversed(range(len(cases))))
            for i in order:
                key = keys[i]
                if resident:
                    worker = workers[key]
                else:
                    worker = _Worker(cases[i][0], cases[i][1], args.threads)
                    ready.setdefault(key, worker.ready)
                time.sleep(args.gap_s)
                for attempt in range(args.retries + 1):
                    busy = (
                        wait_idle(args.idle_threshold, args.idle_timeout_s) if args.wait_idle else cpu_busy()
                    )
                    total0, busy0, own0 = *_stat(), _proc_ticks(worker.proc.pid)
                    result = worker.run(ids, args.decode_steps)
                    total1, busy1, own1 = *_stat(), _proc_ticks(worker.proc.pid)
                    # the machine's CPU used by other processes during the run (0..1 of all cores)
                    others = max(0, (busy1 - busy0) - (own1 - own0)) / max(total1 - total0, 1)
                    result |= {"busy_before": round(busy, 2), "others_during": round(others, 2)}
                    if not args.wait_idle or others < args.idle_threshold or busy >= args.idle_threshold:
                        break  # (busy: the wait timed out, the machine is not going idle: take the run)
                    print(json.dumps({"retry": attempt, "engine": key[0], "variant": key[1],
                                      "others_during": round(others, 2)}), file=sys.stderr, flush=True)  # fmt: skip
                result["attempts"] = attempt + 1
                if not resident:
                    result["load_s"] = worker.ready["load_s"]
                    worker.close()
                runs[key].append(result)
                print(json.dumps({"round": r, "engine": key[0], "variant": key[1],
                                  "prefill_tok_s": round(args.prompt / result["prefill_s"], 1),
                                  "decode_tok_s": round(args.decode_steps / result["decode_s"], 2),
                                  "busy_before": result["busy_before"], "others_during": result["others_during"],
                                  "tokens": result["tokens"]}),
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for worker in workers.values():
            worker.close()

    llama_info = next((ready[k] for k in keys if k[0] == "llama.cpp" and k in ready), {})
    header["llama_system_info"] = llama_info.get("system_info")
    header["llama_cpp_python"] = llama_info.get("llama_cpp_python")
    pj = next((ready[k] for k in keys if k[0] == "pyjamba" and k in ready), {})
    header["pyjamba_kernels"], header["torch"] = pj.get("kernels"), pj.get("torch")
    print(json.dumps(header), flush=True)
    speed: dict[tuple[str, str, str], list[float]] = {}
    for key in keys:
        info = ready[key]
        extra = {k: info[k] for k in ("weight_bytes", "dtype", "quantize", "kernels", "load_s") if k in info}
        if key[0] == "llama.cpp":
            extra["gguf_bytes_by_type"] = _gguf_types(prepared["ggufs"][key[1]], args.convert_script)
            extra["gguf_file_bytes"] = prepared["ggufs"][key[1]].stat().st_size
        for phase, n in (("prefill", args.prompt), ("decode", args.decode_steps)):
            times = [run[f"{phase}_s"] for run in runs[key]]
            speed[(*key, phase)] = [n / t for t in times]
            row = {"engine": key[0], "variant": key[1], "phase": phase, "preset": args.preset,
                   "tokens": n, "batch": 1, "threads": args.threads,
                   "tokens_per_s": round(statistics.median(n / t for t in times), 2),
                   "best_tokens_per_s": round(n / min(times), 2),
                   "times_s": [round(t, 4) for t in times],
                   "others_during": [run["others_during"] for run in runs[key]], **extra}  # fmt: skip
            if phase == "decode":
                row["after_prompt"] = args.prompt
                row["greedy_tokens_round0"] = runs[key][0]["tokens"]
            print(json.dumps(row), flush=True)

    refs = [k for k in keys if k[0] == "llama.cpp"]
    cols = [f"{p} vs llama.cpp {v}" for p in ("prefill", "decode") for _, v in refs]
    print()
    print(f"{args.preset}, {args.threads} threads, prefill {args.prompt} tokens, decode {args.decode_steps} "
          f"steps after it, batch 1; {args.rounds} rounds; {machine['cpu']}")  # fmt: skip
    print("| engine | variant | weights MB | prefill tok/s | decode tok/s | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (5 + len(cols)))
    for key in keys:
        cells = [key[0], key[1], f"{ready[key].get('weight_bytes', 0) / 1e6:.0f}",
                 f"{statistics.median(speed[(*key, 'prefill')]):.1f}",
                 f"{statistics.median(speed[(*key, 'decode')]):.2f}"]  # fmt: skip
        for phase in ("prefill", "decode"):
            for ref in refs:
                ratios = [a / b for a, b in zip(speed[(*key, phase)], speed[(*ref, phase)], strict=True)]
                cells.append(f"{statistics.median(ratios):.2f}x")
        print("| " + " | ".join(cells) + " |")
    first = keys[0]
    same = [f"{e} {v}" for e, v in keys[1:]
            if all(a["tokens"] == b["tokens"] for a, b in zip(runs[(e, v)], runs[first], strict=True))]  # fmt: skip
    print(
        f"\nfirst 8 greedy tokens identical to {first[0]} {first[1]}'s in every round: {', '.join(same) or 'none'}"
    )
    flags = ", ".join(f for f, on in machine["flags"].items() if on)
    print(f"CPU flags: {flags}; absent: {', '.join(f for f, on in machine['flags'].items() if not on)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
