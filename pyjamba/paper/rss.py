"""Resident memory of this process, from /proc (Linux): what the memory figures of `pyjamba paper` read."""

from __future__ import annotations

__all__ = ["Peak", "status_bytes"]


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    """Resident bytes around a block: `before` it, `bytes` its peak above that (VmHWM is reset on
    entry, so the peak is this block's), `held` what stays resident after it above `before`."""

    def __enter__(self) -> Peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self.before = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = max(0, status_bytes("VmHWM") - self.before)
        self.held = status_bytes("VmRSS") - self.before
