"""What every `pyjamba paper` command writes: an output folder, JSON lines, a markdown table, PNG plots.

matplotlib is imported only when a plot is drawn, and its absence is reported with the extra that
installs it, `pip install 'pyjamba[paper]'`, rather than as an ImportError deep in a command.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..folders import fsync, write_file

__all__ = ["JsonLines", "cpu_flags", "markdown_table", "out_folder", "pyplot", "save_figure"]


class MissingExtra(RuntimeError):
    """An optional dependency a command needs is not installed; the message says how to install it."""


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(
            "the plots need matplotlib: pip install 'pyjamba[paper]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def out_folder(path: str | Path) -> Path:
    """The output folder, created if missing."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class JsonLines:
    """A JSON-lines file written row by row into a hidden sibling, flushed after every row, and renamed
    over `path` when closed (also after an error or Ctrl-C: a run cut short keeps what it measured);
    a process killed outright leaves the previous `path` as it was."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(f".{path.name}.partial")
        self._file = self._partial.open("w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        fsync(self.path.parent)

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep what their caller formatted (pass strings for control)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a small PNG (docs-sized: 100 dpi) and close the figure."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    pyplot().close(fig)
    write_file(path, png.getvalue())  # whole or not at all: the previous plot stays until then
    return path


def cpu_flags() -> str:
    """The CPU's vector flags that matter to the kernels (as docs/benchmarks.md records them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = set(re.findall(r"\b(avx2|avx512[a-z_0-9]*|fma|f16c|amx[a-z_0-9]*)\b", text))
    return " ".join(sorted(found)) or "none"
