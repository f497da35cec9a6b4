"""Training checkpoints: finite, durable, verified; the last k kept, unreadable ones skipped on resume.

A checkpoint is a folder `step-00001200/` under `out_dir/checkpoints/`:
- the model and optimizer state through `torch.distributed.checkpoint` (DCP), so that a run sharded
  over N processes (FSDP2) saves its shards in parallel and the checkpoint loads into any number of
  processes, one included;
- `rank-R.pt`: each process's random-number state and data position;
- `trainer.json`: the step, the tokens seen, the skipped-step counts, the recipe, the world size;
  written last.

Saving never loses the good:
- weights or optimizer state holding NaN or infinity are refused (`NonFiniteState`), nothing written;
- everything goes into `step-00001200.tmp/` first, each file fsynced (DCP syncs its own), then the
  folder, which is renamed once complete: a folder without the `.tmp` suffix is whole, and a crash
  mid-save leaves only a `.tmp` that the next run deletes;
- the published checkpoint is read back cheaply (`verify_checkpoint`); older ones are rotated away
  only when it verifies, and rotation never deletes it.

Loading raises `CheckpointCorrupt` for anything unreadable, including a missing or unreadable
`rank-R.pt` when the world size matches, so that the caller falls back to the one before; under
torch.distributed the processes agree before the (collective) DCP load, and fall back together.
"""

from __future__ import annotations

import io
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
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..folders import fsync, write_file

__all__ = [
    "CheckpointCorrupt",
    "NonFiniteState",
    "all_finite",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointCorrupt(Exception):
    """A complete-looking checkpoint folder that cannot be read back."""


class NonFiniteState(ValueError):
    """The model or optimizer state holds NaN or infinity: it is not written."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _count_everywhere(count: int) -> int:
    """`count` summed over every process (itself without torch.distributed); NCCL reduces on the GPU."""
    if not dist.is_initialized():
        return count
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor(count, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Whether every parameter (and optimizer state tensor) is finite in every process; collective."""
    tensors = [_local(p.detach()) for p in model.parameters()]
    if optimizer is not None:
        tensors += [_local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    # One host sync per device rather than one per tensor.
    bad = sum(int((~torch.stack(flags)).sum()) for flags in by_device.values())
    return _count_everywhere(bad) == 0


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first (`.tmp` folders are not checkpoints)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "trainer.json").is_file()
    ]
    return sorted(found, key=_step_of)


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
    """Write checkpoint `step` atomically (every process calls this), then keep only the last `keep_last`.

    Raises NonFiniteState, writing nothing, if the model or optimizer state is not finite. The older
    checkpoints are deleted only once the new one reads back.
    """
    if not all_finite(model, optimizer):
        raise NonFiniteState(
            f"the weights or optimizer state at step {step} hold NaN or infinity: checkpoint not written "
            "(the checkpoints on disk are kept)"
        )
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
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))  # fsyncs its files
    _write_rank_state(tmp / f"rank-{_rank()}.pt", rank_state)
    _barrier()
    if _rank() == 0:
        _write_json(tmp / "trainer.json", {**trainer_state, "step": step, "world_size": _world_size()})
        fsync(tmp)  # the folder's entries are durable before the rename publishes them
        if final.exists():  # a checkpoint of the same step from an earlier, abandoned attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(root)
        problem = verify_checkpoint(final)
        if problem is None:
            _rotate(root, final, keep_last)
        else:
            logger.error("checkpoint %s does not read back (%s); keeping the older ones", final, problem)
    _barrier()
    return final


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Read a checkpoint back cheaply; None if it looks loadable, else what is wrong.

    trainer.json parses, DCP's metadata loads and every shard file it names is long enough, and each
    process's `rank-R.pt` loads. The tensors themselves are not read.
    """
    path = Path(path)
    try:
        world = int(json.loads((path / "trainer.json").read_text())["world_size"])
        metadata = FileSystemReader(str(path)).read_metadata()
        _check_shard_lengths(path, metadata.storage_data)
        for rank in range(world):
            torch.load(path / f"rank-{rank}.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # any failure at all means "not verified"; it must never stop the run
        return f"{type(e).__name__}: {e}"
    return None


def load_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model and optimizer in place; return (trainer state, this rank's saved state or None).

    The rank state is None when the checkpoint was written by a different number of processes (the
    weights and optimizer still load; the data position then comes from the trainer state alone).
    Raises CheckpointCorrupt, in every process together, if any part cannot be read.
    """
    path = Path(path)
    trainer_state: dict[str, Any] = {}
    rank_state = None
    problem = None
    try:
        trainer_state = json.loads((path / "trainer.json").read_text())
        if not isinstance(trainer_state, dict) or "step" not in trainer_state:
            raise ValueError("trainer.json holds no step")
        if trainer_state.get("world_size") == _world_size():
            rank_state = _read_rank_state(path / f"rank-{_rank()}.pt")
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    # The DCP load below is collective: every process must try it, or every process skip it.
    if _count_everywhere(int(problem is not None)):
        raise CheckpointCorrupt(f"checkpoint {path} cannot be read: {problem or 'another process failed'}")
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (OSError, ValueError, RuntimeError, KeyError, CheckpointException) as e:
        raise CheckpointCorrupt(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from e
    return trainer_state, rank_state


def remove_partial(out_dir: str | os.PathLike) -> None:
    """Delete half-written (`.tmp`) checkpoint folders left by a crash (rank 0 only)."""
    root = Path(out_dir) / "checkpoints"
    if _rank() != 0 or not root.is_dir():
        return
    for p in root.glob("step-*.tmp"):
        logger.warning("removing half-written checkpoint %s", p)
        shutil.rmtree(p, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]


def _rotate(root: Path, newest: Path, keep_last: int) -> None:
    """Keep `newest` (just verified) and the checkpoints before it up to `keep_last` in all.

    Checkpoints with a later step (left by an attempt this run resumed before) are not touched: the
    run overwrites them when it gets there.
    """
    older = [p for p in list_checkpoints(root.parent) if _step_of(p) < _step_of(newest)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _check_shard_lengths(path: Path, storage_data: dict[Any, Any]) -> None:
    """Every DCP shard file exists and holds the bytes the metadata says it does (no truncation)."""
    needed: dict[str, int] = {}
    for info in storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in needed.items():
        size = (path / name).stat().st_size
        if size < length:
            raise ValueError(f"{name} holds {size} bytes, its metadata needs {length}")


def _read_rank_state(path: Path) -> dict[str, Any]:
    """A process's saved state; ValueError when missing, empty, truncated or not a torch file."""
    if not path.is_file():
        raise ValueError(f"{path.name} is missing")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # torch.load fails in many ways (EOFError, UnpicklingError, RuntimeError)
        raise ValueError(f"{path.name} cannot be loaded ({type(e).__name__}: {e})") from e


def _write_rank_state(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(path, buffer.getvalue())


@contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process whenever no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_file(path, json.dumps(data, indent=2))
