"""Replacing a folder so that it never goes missing: write a new version beside it, then swap.

`replacement(folder)` hands out an empty sibling `.NAME.tmp-<uuid>` (made with os.mkdir, so mode
0o777 less the umask) to fill; when the block ends without error everything in it is fsynced and the
sibling replaces `folder` (`replace_folder`), and on any error it is deleted, leaving the previous
version as it was. `write_file` does the same for one file.

The swap: where the system can (Linux's renameat2 with RENAME_EXCHANGE, glibc 2.28 or later on a file
system that takes the flag), the new folder and the old one are exchanged in one step, so `folder`
exists at every moment; the previous version, now under the `.tmp-` name, is then deleted. Elsewhere
(another OS, an old kernel, overlayfs) it takes two renames: the old folder aside to
`.NAME.old-XXXXXXXX`, the new one in. The old folder is flock'ed across the two renames.

Recovery: a process killed between the two renames leaves no `folder`, only its `.old-` sibling.
`recover_folder(folder, complete)` renames the newest such sibling that `complete` accepts back into
place, with a warning; a reader that comes while a live process is between its renames waits on the
flock and then finds the new folder, never recovering over it. What counts as complete is the
caller's: checkpoint.py asks for config.json and every weight file.

Leftovers: a kill can leave a `.tmp-` folder (unfinished output, or the previous version after an
exchange) or an `.old-` one. Every `replacement` holds an flock on its own `.tmp-` folder while it
works, so what a killed process leaves is exactly what is unlocked; the next `replacement` of the same
folder deletes those (made before it started, under those two name patterns only, and `.old-` ones only
while `folder` exists, since they may be its only copy). Without flock (not POSIX) nothing is deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["fsync", "fsync_tree", "recover_folder", "replace_folder", "replacement", "write_file"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# The errors by which renameat2 says "not here" rather than "this failed": no such system call
# (ENOSYS: kernel before 3.15), a file system without the flag (EINVAL), an overlayfs layer (EXDEV).
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}
# The names our temporary folders get: uuid hex, or 8 characters of mkdtemp's alphabet (earlier versions).
_SUFFIX = r"(?:[0-9a-f]{32}|[0-9a-z_]{8})"


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (a folder is skipped where only POSIX can open one)."""
    if os.name != "posix" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and every folder's entries, deepest first, to disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                fsync(path)
        fsync(Path(root))


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` so that a crash leaves the old file or the new one, whole.

    Through a temporary sibling (mode 0o666 less the umask, as `open` makes files), flushed and
    fsynced, renamed over `path`; then the folder's entry is synced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync(path.parent)


@contextlib.contextmanager
def replacement(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty sibling of `folder` to fill; when the block ends it replaces `folder`.

    On an error in the block (or a KeyboardInterrupt) the sibling is deleted and `folder` is left as it
    was. The sibling is `.NAME.tmp-<uuid>` with mode 0o777 less the umask, flock'ed while in use; on
    entry, the unlocked leftovers of earlier, interrupted replacements of `folder` are deleted. Raises
    NotADirectoryError if `folder` exists and is not a folder; creates its parent if missing.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)  # not mkdtemp's 0o700: what is written here is for other users to read too
    lock = _lock(tmp)  # marks it as in use, for the clean-up of other replacements
    try:
        _remove_leftovers(folder, started)
        yield tmp
        fsync_tree(tmp)  # every file whole on disk before the rename that publishes them
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


@functools.cache
def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    """libc's renameat2(AT_FDCWD, a, AT_FDCWD, b, flags), or None off Linux or before glibc 2.28."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return lambda a, b, flags: func(_AT_FDCWD, a, _AT_FDCWD, b, flags)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically: True if done, False where this system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        logger.debug("no atomic exchange of %s and %s (%s): two renames", a, b, os.strerror(err))
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`, replacing (and deleting) an existing `folder`; `new` is gone after.

    Where the system can, the two are exchanged atomically, so that `folder` exists at every moment;
    elsewhere the old one is renamed aside first, and a kill between the two renames leaves no
    `folder`, which `recover_folder` puts back. A model loaded from `folder` keeps working: its mapped
    files stay readable until it lets them go.
    """
    if not folder.exists():
        os.rename(new, folder)
    elif _exchange(new, folder):
        fsync(folder.parent)  # the exchange is on disk before the previous version goes
        _remove_previous(new)
    else:
        _swap_by_renames(new, folder)
    fsync(folder.parent)


def _swap_by_renames(new: Path, folder: Path) -> None:
    aside = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    lock = _lock(folder)  # held while `folder` is missing: recover_folder waits, not recovers
    try:
        os.rename(folder, aside)
        try:
            os.rename(new, folder)
        except BaseException:
            os.rename(aside, folder)
            raise
    finally:
        _unlock(lock)
    _remove_previous(aside)


def _remove_previous(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not delete the previous version, left at %s (the next save tries again)", path)


def _leftovers(folder: Path, kinds: tuple[str, ...]) -> list[Path]:
    """The sibling folders a replacement of `folder` makes: `.NAME.tmp-*` and/or `.NAME.old-*`, newest first."""
    pattern = re.compile(re.escape(f".{folder.name}.") + f"(?:{'|'.join(kinds)})-{_SUFFIX}")
    found = []
    try:
        with os.scandir(folder.parent) as entries:
            for entry in entries:
                if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                    found.append((entry.stat(follow_symlinks=False).st_mtime, Path(entry.path)))
    except OSError:
        return []
    return [path for _, path in sorted(found, reverse=True)]


def _remove_leftovers(folder: Path, started: float) -> None:
    """Delete what killed replacements of `folder` left behind, never a folder another one is using.

    That is the `.tmp-` folders (unfinished output, or the previous version after an exchange) and,
    while `folder` exists, `.old-` ones, made before this replacement `started` and unlocked.
    """
    if fcntl is None:
        return  # no way to tell a leftover from a replacement in progress
    kinds = ("tmp", "old") if folder.is_dir() else ("tmp",)
    for path in _leftovers(folder, kinds):
        try:
            if path.stat().st_mtime >= started:
                continue  # made during this replacement: another process's
        except OSError:
            continue
        lock = _lock(path, wait=False)
        if lock is None:
            continue  # in use
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            _unlock(lock)
        logger.info("deleted %s, left behind by an interrupted save", path)


def recover_folder(path: str | os.PathLike, complete: Callable[[Path], bool]) -> bool:
    """Put back the previous version of a folder that a replacement killed between two renames left missing.

    Only the two-rename replacement (where the atomic exchange is unavailable) has such a moment; the
    newest `.NAME.old-*` sibling for which `complete(sibling)` is true is renamed back, with a warning.
    A replacement still between its renames is waited for instead. Returns whether a folder was put back.
    """
    folder = Path(path)
    if folder.exists():
        return False
    for aside in _leftovers(folder, ("old",)):
        lock = _lock(aside)  # waits for a replacement between its two renames
        try:
            if folder.exists():
                return False  # that replacement finished, or another process put the folder back
            if not complete(aside):
                continue
            os.rename(aside, folder)
        finally:
            _unlock(lock)
        fsync(folder.parent)
        logger.warning(
            "%s was missing (a save was interrupted): put back its previous version from %s",
            folder,
            aside.name,
        )
        return True
    return False


def _lock(folder: Path, *, wait: bool = True) -> int | None:
    """An open descriptor of `folder` holding an exclusive flock.

    None if the folder is gone, if it is taken and not `wait`, or if the system has no flock.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing releases the flock
