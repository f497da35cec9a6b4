"""The weights' dtype: the one parser of dtype names and the one "auto" policy.

Every command line (`--dtype`), `runtime.load`, `from_pretrained` and `save_pretrained` read a dtype
through `parse_dtype`; `resolve_dtype` turns what was asked for into the dtype to load and says why.

    auto      the fastest for the model on this machine (`auto_dtype`)
    stored    each tensor as the checkpoint holds it (None in Python)
    float32, bfloat16, float16 (and float64, or a torch.dtype)   that dtype
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from .config import JambaConfig
    from .probe import DtypeSpeeds

__all__ = [
    "DTYPE_CHOICES",
    "auto_dtype",
    "available_memory",
    "cpu_has_native_bf16",
    "dtype_name",
    "parse_dtype",
    "resolve_dtype",
]

# What a command line offers for --dtype.
DTYPE_CHOICES = ("auto", "stored", "float32", "bfloat16", "float16")
_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    # torch's own aliases, as `getattr(torch, name)` has always accepted them here
    "float": torch.float32,
    "half": torch.float16,
    "double": torch.float64,
}


def parse_dtype(
    value: torch.dtype | str | None, *, allow_auto: bool = True
) -> torch.dtype | Literal["auto"] | None:
    """A dtype as given in Python or on a command line: a floating-point torch.dtype, None for "stored",
    or "auto" (where `allow_auto`). Names may carry torch's prefix ("torch.bfloat16").

    Raises ValueError naming what was given and what is accepted.
    """
    if value is None or isinstance(value, torch.dtype):
        if value is not None and not value.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {value}")
        return value
    if isinstance(value, str):
        name = value.strip().removeprefix("torch.")
        if name == "auto" and allow_auto:
            return "auto"
        if name == "stored":
            return None
        if name in _NAMES:
            return _NAMES[name]
    accepted = ", ".join(c for c in DTYPE_CHOICES if allow_auto or c != "auto")
    raise ValueError(
        f"dtype must be one of {accepted}, float64 or a floating-point torch.dtype, got {value!r}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    value: torch.dtype | str | None,
    config: JambaConfig,
    device: torch.device | str = "cpu",
    *,
    native_bf16: bool | None = None,
    available_bytes: int | None = None,
    speeds: DtypeSpeeds | None = None,
) -> tuple[torch.dtype | None, str]:
    """(the dtype to load `config`'s weights in, None for as stored; why) for what was asked for.

    native_bf16, speeds and available_bytes override what is measured or read on this machine (for
    tests), as in `auto_dtype`.
    """
    parsed = parse_dtype(value)
    if parsed == "auto":
        return _auto(config, device, native_bf16=native_bf16, available_bytes=available_bytes, speeds=speeds)
    if parsed is None:
        return None, "stored: each tensor as the checkpoint holds it"
    return parsed, "asked for"


def auto_dtype(
    config: JambaConfig,
    device: torch.device | str = "cpu",
    *,
    native_bf16: bool | None = None,
    available_bytes: int | None = None,
    speeds: DtypeSpeeds | None = None,
) -> torch.dtype:
    """The weights' dtype that runs `config` fastest on `device`: what `dtype="auto"` resolves to.

    - Not a CPU: bfloat16 (accelerators multiply it at float32's rate or faster).
    - A CPU: measured (`probe.dtype_speeds`, once per machine). bfloat16 when it decodes at least
      `_DECODE_GAIN` times as fast as float32 and prefills no slower, so that auto never decodes
      nor prefills slower than float32; else float32. (On a 2-core AVX2 EPYC, where a prompt's
      bfloat16 weights are converted to float32 on every call, bfloat16 decoded ~1.4-1.6x as fast
      and prefilled ~0.85-0.9x: float32; with AVX512-BF16 or AMX both run faster: bfloat16.)
      Unless float32 weights would take more than 80% of the available memory (MemAvailable, or
      `available_bytes`) while bfloat16 ones would not: then bfloat16, which at least fits.

    native_bf16 (True: bfloat16 is faster, False: it is not), speeds and available_bytes override
    what is read or measured on this machine (for tests). `resolve_dtype("auto", ...)` gives the
    same dtype with the reason.
    """
    return _auto(config, device, native_bf16=native_bf16, available_bytes=available_bytes, speeds=speeds)[0]


_DECODE_GAIN = 1.05  # bfloat16 must decode this much faster than float32 (beyond the probe's noise)
_PREFILL_KEEP = 1.0  # and prefill no slower than float32


def _auto(
    config: JambaConfig,
    device: torch.device | str,
    *,
    native_bf16: bool | None,
    available_bytes: int | None,
    speeds: DtypeSpeeds | None = None,
) -> tuple[torch.dtype, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return torch.bfloat16, f"auto: {device.type} multiplies bfloat16 at float32's rate or faster"
    if native_bf16 is not None:
        faster = native_bf16
        why = "auto: bfloat16 " + ("is" if faster else "is not") + " faster on this CPU (as given)"
    else:
        if speeds is None:
            from .probe import dtype_speeds

            speeds = dtype_speeds()
        faster = speeds.decode_ratio >= _DECODE_GAIN and speeds.prefill_ratio >= _PREFILL_KEEP
        why = (
            f"auto: measured on this CPU, bfloat16 weights decode at {speeds.decode_ratio:.2f}x and prefill at "
            f"{speeds.prefill_ratio:.2f}x float32's speed"
        )
    if faster:
        return torch.bfloat16, why
    if available_bytes is None:
        available_bytes = available_memory()
    if available_bytes is not None:
        from .accounting import total_params

        params = total_params(config)
        budget = 0.8 * available_bytes
        if 4 * params > budget and 2 * params <= budget:
            return torch.bfloat16, (
                f"auto: float32 weights ({4 * params / 1e9:.1f} GB) would not fit in 80% of the available "
                f"memory ({available_bytes / 1e9:.1f} GB), bfloat16 ones do"
            )
    return torch.float32, why


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively: AVX512-BF16 or AMX-BF16 (x86), BF16 (Arm).

    Read from the flags of /proc/cpuinfo (or the text given); False where there is none to read.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(set(line.partition(":")[2].split()) & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
