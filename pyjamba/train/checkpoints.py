"""Training checkpoints: written atomically, the last k kept, half-written ones ignored on resume.

A checkpoint is a folder `step-00001200/` under `out_dir/checkpoints/`:
- the model and optimizer state through `torch.distributed.checkpoint` (DCP), so that a run sharded
  over N processes (FSDP2) saves its shards in parallel and the checkpoint loads into any number of
  processes, one included;
- `rank-R.pt`: each process's random-number state and data position;
- `trainer.json`: the step, the tokens seen, the recipe; written last.
Everything goes into `step-00001200.tmp/` first, which is renamed once complete: a folder without the
`.tmp` suffix is whole, and a crash mid-save leaves only a `.tmp` that the next run deletes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["CheckpointCorrupt", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointCorrupt(Exception):
    """A complete-looking checkpoint folder that cannot be read back."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (`.tmp` folders are not checkpoints)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.json").is_file()
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (every process calls this), then keep only the last `keep_last`."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        _write_json(tmp / "trainer.json", {**trainer_state, "step": step, "world_size": world})
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model and optimizer in place; return (trainer state, this rank's saved state or None).

    The rank state is None when the checkpoint was written by a different number of processes (the
    weights and optimizer still load; the data position then comes from the trainer state alone).
    """
    path = Path(path)
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (OSError, ValueError, RuntimeError, KeyError, CheckpointException) as e:
        raise CheckpointCorrupt(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from e
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank_file = path / f"rank-{_rank()}.pt"
    rank_state = None
    if trainer_state.get("world_size") == world and rank_file.is_file():
        rank_state = torch.load(rank_file, weights_only=True)
    return trainer_state, rank_state


def remove_partial(out_dir: str | os.PathLike) -> None:
    """Delete half-written (`.tmp`) checkpoint folders left by a crash (rank 0 only)."""
    root = Path(out_dir) / "checkpoints"
    if _rank() != 0 or not root.is_dir():
        return
    for p in root.glob("step-*.tmp"):
        logger.warning("removing half-written checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
