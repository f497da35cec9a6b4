"""Replacing a folder: the exchange and the two-rename fallback, errors, kills, recovery, leftovers."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import kill_while_replacing

from pyjamba import folders
from pyjamba.folders import recover_folder, replace_folder, replacement


def _fill(folder: Path, **files: str) -> None:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _others(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name != "out")


def _has_a(folder: Path) -> bool:
    return (folder / "a").is_file()


@pytest.mark.usefixtures("replace_mode")
def test_replacement_creates_then_replaces_a_folder(tmp_path):
    folder = tmp_path / "sub" / "out"  # the parent is created too
    with replacement(folder) as tmp:
        assert tmp.parent == folder.parent and tmp.name.startswith(".out.tmp-")
        assert list(tmp.iterdir()) == []
        _fill(tmp, a="1")
    assert _contents(folder) == {"a": "1"}
    with replacement(folder) as tmp:
        _fill(tmp, b="2")
    assert _contents(folder) == {"b": "2"}
    assert [p.name for p in folder.parent.iterdir()] == ["out"]  # no temporary or moved-aside folder


@pytest.mark.usefixtures("replace_mode")
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "interrupt"])
def test_an_error_in_the_block_leaves_the_previous_folder(tmp_path, error):
    folder = tmp_path / "out"
    _fill(folder, a="1")
    with pytest.raises(type(error)), replacement(folder) as tmp:
        _fill(tmp, a="2")
        raise error
    assert _contents(folder) == {"a": "1"}
    assert _others(tmp_path) == []


def test_replacing_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError), replacement(tmp_path / "out"):
        pytest.fail("the block ran")
    assert (tmp_path / "out").read_text() == "x"
    assert _others(tmp_path) == []


def test_replace_folder_renames_when_there_is_nothing_to_replace(tmp_path):
    new = tmp_path / "new"
    _fill(new, a="1")
    replace_folder(new, tmp_path / "out")
    assert _contents(tmp_path / "out") == {"a": "1"}
    assert _others(tmp_path) == []


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    folder, new = tmp_path / "out", tmp_path / "new"
    _fill(folder, a="1")
    _fill(new, a="2")
    rename = os.rename

    def refuse_the_new_folder(src, dst):
        if Path(src) == new:
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_the_new_folder)
    with pytest.raises(PermissionError):
        replace_folder(new, folder)
    assert _contents(folder) == {"a": "1"}
    assert _others(tmp_path) == ["new"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.usefixtures("replace_mode")
def test_the_folder_gets_ordinary_permissions(tmp_path, umask):
    folder = tmp_path / "out"
    old = os.umask(umask)
    try:
        for text in ("1", "2"):  # a new folder, then one replacing it
            with replacement(folder) as tmp:
                _fill(tmp, a=text)
            assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    finally:
        os.umask(old)


def _killed(folder: Path, step: str) -> None:
    body = "with folders.replacement(folder) as tmp:\n    (tmp / 'a').write_text('2')\n"
    kill_while_replacing(folder, step, body)


def test_kill_between_the_two_renames_is_recovered(tmp_path, caplog):
    folder = tmp_path / "out"
    _fill(folder, a="1")
    _killed(folder, "between the two renames")
    assert not folder.exists()
    assert [name[:9] for name in _others(tmp_path)] == [".out.old-", ".out.tmp-"]
    with caplog.at_level(logging.WARNING, logger="pyjamba.folders"):
        assert recover_folder(folder, _has_a)
    assert "a save was interrupted" in caplog.text
    assert _contents(folder) == {"a": "1"}
    assert not recover_folder(folder, _has_a)  # nothing missing
    with replacement(folder) as tmp:  # deletes the killed one's folder
        _fill(tmp, a="3")
    assert _others(tmp_path) == []
    assert _contents(folder) == {"a": "3"}


@pytest.mark.usefixtures("needs_exchange")
def test_kill_after_the_exchange_leaves_the_new_folder(tmp_path):
    folder = tmp_path / "out"
    _fill(folder, a="1")
    _killed(folder, "after the exchange")
    assert _contents(folder) == {"a": "2"}
    assert [name[:9] for name in _others(tmp_path)] == [".out.tmp-"]  # the previous version
    with replacement(folder) as tmp:
        _fill(tmp, a="3")
    assert _others(tmp_path) == []


def test_recovery_takes_the_newest_complete_previous_folder(tmp_path):
    folder = tmp_path / "out"
    past = time.time() - 60
    for name, files in [(".out.old-00000000", {"a": "old"}), (".out.old-11111111", {"a": "newer"})]:
        _fill(tmp_path / name, **files)
        os.utime(tmp_path / name, (past, past))
        past += 10
    _fill(tmp_path / ".out.old-ffffffff", b="incomplete")  # the newest, but not complete
    _fill(tmp_path / ".out.old-keep", a="not a name a replacement gives")
    assert recover_folder(folder, _has_a)
    assert _contents(folder) == {"a": "newer"}
    assert _others(tmp_path) == [".out.old-00000000", ".out.old-ffffffff", ".out.old-keep"]
    assert not recover_folder(folder, _has_a)
    assert not recover_folder(tmp_path / "none", _has_a)  # nothing to put back


def test_recovery_waits_for_a_replacement_between_its_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    folder = tmp_path / "out"
    _fill(folder, a="1")
    rename, recovered, readers = os.rename, [], []

    def rename_then_recover(src, dst):
        rename(src, dst)
        if ".old-" in os.fspath(dst):  # between the two renames: a reader finds no folder
            reader = threading.Thread(target=lambda: recovered.append(recover_folder(folder, _has_a)))
            reader.start()
            reader.join(0.5)
            assert reader.is_alive()  # waiting for the replacement, not putting the old folder back
            readers.append(reader)

    monkeypatch.setattr(os, "rename", rename_then_recover)
    with replacement(folder) as tmp:
        _fill(tmp, a="2")
    readers[0].join(60)
    assert recovered == [False]
    assert _contents(folder) == {"a": "2"}
    assert _others(tmp_path) == []


def test_leftovers_go_only_if_unused_and_named_by_a_replacement(tmp_path):
    folder = tmp_path / "out"
    _fill(folder, a="1")
    stale = [f".out.tmp-{'a' * 32}", ".out.tmp-x_9abcde", ".out.old-0123abcd"]  # the last two: mkdtemp, aside
    busy = f".out.tmp-{'b' * 32}"  # a replacement in progress holds its folder locked
    others = [".out.old-backup", f".other.tmp-{'c' * 32}", "out.tmp-0123abcd", ".out.tmp-0123abcd.keep"]
    for name in [*stale, busy, *others]:
        _fill(tmp_path / name, file="x")
    (tmp_path / ".out.old-deadbeef").symlink_to(tmp_path / "out.tmp-0123abcd")
    past = time.time() - 60
    for path in tmp_path.iterdir():
        os.utime(path, (past, past), follow_symlinks=False)
    fd = os.open(tmp_path / busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with replacement(folder) as tmp:
            _fill(tmp, a="2")
        assert _others(tmp_path) == sorted([busy, *others, ".out.old-deadbeef"])
    finally:
        os.close(fd)
    with replacement(folder) as tmp:
        _fill(tmp, a="3")
    assert _others(tmp_path) == sorted([*others, ".out.old-deadbeef"])
    assert (tmp_path / "out.tmp-0123abcd" / "file").is_file()


def test_old_folders_are_kept_while_the_folder_is_missing(tmp_path):
    """An `.old-` folder may be the only copy: a replacement that finds no folder leaves it be."""
    aside = tmp_path / ".out.old-0123abcd"
    _fill(aside, a="1")
    past = time.time() - 60
    os.utime(aside, (past, past))
    with replacement(tmp_path / "out") as tmp:
        _fill(tmp, a="2")
    assert _others(tmp_path) == [".out.old-0123abcd"]


def test_write_file_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.json"
    folders.write_file(path, '{"a": 1}')
    assert path.read_text() == '{"a": 1}'
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(folders.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        folders.write_file(path, b"{broken")
    assert path.read_text() == '{"a": 1}'
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left


def test_replacement_syncs_every_file_before_publishing(tmp_path, monkeypatch):
    synced: list[str] = []
    real = folders.fsync
    monkeypatch.setattr(folders, "fsync", lambda p: (synced.append(Path(p).name), real(p)))
    published = []
    monkeypatch.setattr(
        folders,
        "replace_folder",
        lambda new, folder: (published.append(list(synced)), os.rename(new, folder)),
    )
    with folders.replacement(tmp_path / "out") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "deep").mkdir()
        (tmp / "deep" / "b.bin").write_bytes(b"2")
    assert {"a.bin", "b.bin", "deep"} <= set(published[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
