"""How fast this CPU runs a Jamba layer in float32 and in bfloat16: what `dtype="auto"` decides by.

Whether bfloat16 weights pay on a CPU depends on more than one flag: with AVX512-BF16 or AMX the
matmuls run natively, without them a prompt's weights are converted to float32 on every call while
decoding reads half the bytes; kernels, threads and memory bandwidth shift the balance. So it is
measured, once per machine: a probe model of one Mamba layer and one SwiGLU MLP at a realistic
width (80 MB of float32 weights, more than a CPU's caches), built with the backend "auto" picks,
prefills a prompt and decodes a few tokens in each dtype. The result is kept in a small JSON file
(`cache_file()`), keyed by the CPU, its flags, the thread count and the library versions, so that
later loads read it in microseconds; the first costs a few seconds, announced on stderr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["DtypeSpeeds", "cache_file", "dtype_speeds", "measure"]

logger = logging.getLogger(__name__)

# One Mamba layer and one MLP of a 1B-class width: memory-bound when decoding, compute-bound on a prompt.
PROBE_CONFIG = dict(
    vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=8,
    num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=7, num_experts=1, num_experts_per_tok=1,
    expert_layer_period=1, expert_layer_offset=0, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
)  # fmt: skip
PROMPT, STEPS, ROUNDS = 128, 8, 5


@dataclass(frozen=True)
class DtypeSpeeds:
    """Tokens per second of the probe model in float32 and bfloat16, and what it ran on."""

    prefill_float32: float
    prefill_bfloat16: float
    decode_float32: float
    decode_bfloat16: float
    machine: str = ""

    @property
    def prefill_ratio(self) -> float:
        """bfloat16's prompt speed over float32's."""
        return self.prefill_bfloat16 / self.prefill_float32

    @property
    def decode_ratio(self) -> float:
        """bfloat16's decoding speed over float32's."""
        return self.decode_bfloat16 / self.decode_float32


def _machine() -> str:
    """The CPU, its flags (hashed), the threads and the versions: what a measurement holds for."""
    model, flags = "unknown CPU", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.partition(":")[2].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = " ".join(sorted(line.partition(":")[2].split()))
    except OSError:
        pass
    from . import __version__

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = "none"
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return (
        f"{model} (flags {digest}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"numba {numba_version}, pyjamba {__version__}"
    )


def cache_file() -> Path:
    """Where measurements are kept: $PYJAMBA_CACHE_DIR, else $XDG_CACHE_HOME/pyjamba, else ~/.cache/pyjamba."""
    base = os.environ.get("PYJAMBA_CACHE_DIR")
    if base is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = os.path.join(xdg, "pyjamba")
    return Path(base) / "dtype-speeds.json"


def _seconds(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def measure(
    config_fields: dict | None = None, prompt: int = PROMPT, steps: int = STEPS, rounds: int = ROUNDS
) -> DtypeSpeeds:
    """Run the probe model in float32 and in bfloat16 here (a few seconds) and return the speeds.

    The two alternate, `rounds` times (the order reversed every other round), and each speed is the
    median over the rounds: a shared machine drifts by tens of percent from second to second, and a
    decision taken once per machine must not rest on one lucky or unlucky run.
    """
    from .config import JambaConfig
    from .model import JambaForCausalLM

    config = JambaConfig(**(config_fields or PROBE_CONFIG))
    generator = torch.Generator().manual_seed(0)
    base = JambaForCausalLM(config)  # "auto" kernels: what a load with dtype="auto" gets
    base.init_weights(generator)
    models = {"float32": base.eval()}
    models["bfloat16"] = JambaForCausalLM(config, kernels=base.kernels)
    models["bfloat16"].load_state_dict(base.state_dict())
    models["bfloat16"].to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=generator)
    times: dict[str, list[float]] = {
        f"{phase}_{name}": [] for phase in ("prefill", "decode") for name in models
    }
    caches = {}
    for name, model in models.items():  # warm-up: compiles or loads every kernel the rounds use
        caches[name] = model.make_cache(1, prompt + (rounds + 1) * steps + 1)
        model(ids, cache=caches[name], logits_to_keep=1)
        model(ids[:, -1:], cache=caches[name])
    for r in range(rounds):
        for name in models if r % 2 == 0 else reversed(models):
            model, cache = models[name], caches[name]
            prefill = lambda: model(ids, cache=model.make_cache(1, prompt), logits_to_keep=1)  # noqa: B023, E731

            def decode() -> None:
                for _ in range(steps):
                    model(ids[:, -1:], cache=cache)  # noqa: B023

            times[f"prefill_{name}"].append(prompt / _seconds(prefill))
            times[f"decode_{name}"].append(steps / _seconds(decode))
    speeds = {key: round(statistics.median(values), 1) for key, values in times.items()}
    return DtypeSpeeds(**speeds, machine=_machine())


def dtype_speeds() -> DtypeSpeeds:
    """This machine's speeds: read from `cache_file()`, or measured now (a few seconds) and kept."""
    machine = _machine()
    path = cache_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    key = hashlib.sha256(machine.encode()).hexdigest()[:16]
    if isinstance(known.get(key), dict):
        try:
            return DtypeSpeeds(**known[key])
        except TypeError:
            pass  # an older layout: measure again
    print(
        "pyjamba: measuring float32 and bfloat16 speed on this CPU for dtype auto (once per machine)...",
        file=sys.stderr,
        flush=True,
    )
    speeds = measure()
    known[key] = asdict(speeds)
    try:
        from .folders import write_file

        write_file(path, json.dumps(known, indent=1, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only home: measured again next time, nothing worse
        logger.warning("could not keep the dtype measurement in %s: %s", path, exc)
    return speeds
