"""Files for the data package: its error type, input discovery, hashes and atomic writes.

Every output of `pyjamba data` is written next to its destination under a temporary name and
renamed into place, so that an interrupted run leaves the previous output (or nothing), never half
of a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..folders import replacement, write_file

__all__ = ["DataError", "atomic_folder", "atomic_write_text", "sha256_file", "text_files"]


class DataError(Exception):
    """Input the data tools cannot use (a missing file, a malformed line); the message names it."""


def text_files(paths: Sequence[str | os.PathLike], suffix: str = ".txt") -> list[Path]:
    """The files named, plus every `*{suffix}` file under each folder named (sorted), in order.

    Raises DataError for a path that does not exist, a folder without such files, or no input.
    """
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
            if not found:
                raise DataError(f"{path}: folder holds no {suffix} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no input files given")
    seen: set[Path] = set()
    unique = []
    for path in files:  # a file named twice (directly and through its folder) is read once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, '\\n' line ends) to `path` atomically and durably (`folders.write_file`)."""
    write_file(path, text)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `folder`; on success it replaces `folder`, on error it goes.

    `folders.replacement`: the sibling gets mode 0o777 less the umask, replaces `folder` atomically
    where the system can (else the old one is renamed aside first), and the old one is deleted. What
    interrupted runs left beside `folder` (unlocked `.NAME.tmp-*` / `.NAME.old-*` folders) goes first.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: exists and is not a folder")
    with replacement(folder) as tmp:
        yield tmp
