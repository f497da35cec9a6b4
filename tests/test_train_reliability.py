"""Training never loses the good: non-finite steps are skipped and stop the run in time, checkpoints
are finite, read back before older ones are rotated away and synced before they are published, an
unreadable per-process file falls back to the checkpoint before, and metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import losses, make_corpus, recipe

from pyjamba.train import checkpoints
from pyjamba.train.cli import main
from pyjamba.train.config import TrainingDiverged, TrainRecipe
from pyjamba.train.trainer import Trainer

EVERY_2 = {"checkpoint_every": 2, "keep_last": 3, "export": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run with a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(recipe(corpus, out, train=EVERY_2)).run()
    return losses(out)


def strict_records(out_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl line by line, refusing the NaN / Infinity literals that are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    text = (out_dir / "metrics.jsonl").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def step_records(out_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in strict_records(out_dir) if "loss" in r}


def poison(trainer: Trainer, steps: set[int]) -> Trainer:
    """NaN embeddings in the training forward pass of the given (1-based) steps: the loss, the
    gradients and the carried Mamba states all go non-finite, as in a diverging run."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if trainer.model.training and trainer.step + 1 in steps:
            return output * float("nan")
        return None

    trainer.model.model.embed_tokens.register_forward_hook(hook)
    return trainer


def names(out_dir: Path) -> list[str]:
    return [p.name for p in checkpoints.list_checkpoints(out_dir)]


def load_into_fresh(corpus, out_dir: Path, path: Path) -> Trainer:
    trainer = Trainer(recipe(corpus, out_dir))
    checkpoints.load_checkpoint(path, trainer.model, trainer.optimizer)
    return trainer


# ---- non-finite steps ---------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_the_run_goes_on(corpus, tmp_path, caplog):
    r = recipe(corpus, tmp_path, data={"state_passing": True}, train={"max_bad_steps": 3, "export": False})
    trainer = poison(Trainer(r), {2, 3, 5})
    with caplog.at_level(logging.WARNING, logger="pyjamba"):
        result = trainer.run()
    assert result["finished"] and result["step"] == 6
    records = step_records(tmp_path)
    assert [s for s, rec in records.items() if rec.get("skipped")] == [2, 3, 5]
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None  # null, not NaN
    assert records[6]["skipped_steps"] == 3 and "skipped" not in records[6]
    # The skipped chunks' NaN states were not carried on: the steps after them are finite.
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 4, 6))
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {3}  # AdamW stepped 3 times
    assert checkpoints.all_finite(trainer.model, trainer.optimizer)
    assert "step 2: loss nan, gradient norm nan: not finite, the update is skipped" in caplog.text


def test_resume_is_exact_across_skipped_steps(corpus, tmp_path):
    data = {"state_passing": True}
    poison(Trainer(recipe(corpus, tmp_path / "straight", data=data, train=EVERY_2)), {3}).run()
    poison(
        Trainer(recipe(corpus, tmp_path / "resumed", data=data, train={**EVERY_2, "stop_at": 3})), {3}
    ).run()
    poison(Trainer(recipe(corpus, tmp_path / "resumed", data=data, train=EVERY_2)), {3}).run()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # None at step 3 in both
    assert step_records(tmp_path / "resumed")[6]["skipped_steps"] == 1


def test_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(corpus, tmp_path):
    train = {"max_bad_steps": 3, "checkpoint_every": 2, "keep_last": 1, "max_steps": 12}
    with pytest.raises(TrainingDiverged) as info:
        poison(Trainer(recipe(corpus, tmp_path, train=train)), set(range(3, 13))).run()
    message = str(info.value)
    for part in ("3 steps in a row", "train.max_bad_steps = 3", "the last at step 5", "loss nan", "optim.lr"):
        assert part in message
    assert "step-00000004" in message  # where a rerun resumes
    assert names(tmp_path) == ["step-00000004"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    records = step_records(tmp_path)
    assert [s for s, rec in records.items() if rec.get("skipped")] == [3, 4, 5]
    fresh = load_into_fresh(corpus, tmp_path, tmp_path / "checkpoints" / "step-00000004")
    assert checkpoints.all_finite(fresh.model, fresh.optimizer)
    # The count of bad steps in a row is part of the checkpoint: still diverging, a rerun stops at once.
    with pytest.raises(TrainingDiverged, match="the last at step 5"):
        poison(Trainer(recipe(corpus, tmp_path, train=train)), set(range(3, 13))).run()
    # Once the cause is gone, the rerun resumes from step 4 and finishes.
    result = Trainer(recipe(corpus, tmp_path, train=train)).run()
    assert result["finished"]
    records = step_records(tmp_path)
    assert sorted(records) == list(range(1, 13))
    assert [s for s, rec in records.items() if rec.get("skipped")] == [3, 4]


def test_a_diverging_learning_rate_stops_the_cli_with_one_line(corpus, tmp_path, capsys):
    path = write_recipe(recipe(corpus, tmp_path / "run"), tmp_path / "recipe.toml")
    overrides = ["optim.lr=1e6", "optim.min_lr=0", "optim.warmup_steps=0", "train.max_steps=40"]
    overrides += ["train.max_bad_steps=3", "train.checkpoint_every=2", "train.keep_last=1"]
    assert main([str(path), *overrides]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pyjamba train: training diverged: 3 steps in a row")
    assert "optim.lr (now 1e+06)" in last
    out = tmp_path / "run"
    records = step_records(out)  # strict JSON: no NaN literals
    skipped = [s for s, rec in records.items() if rec.get("skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert records[skipped[0]]["loss"] is None
    for ckpt in checkpoints.list_checkpoints(out):  # every checkpoint written loads and is finite
        fresh = load_into_fresh(corpus, out, ckpt)
        assert checkpoints.all_finite(fresh.model, fresh.optimizer)
    assert not (out / "model").exists()


def write_recipe(r: TrainRecipe, path: Path) -> Path:
    """A recipe as a TOML file (flat tables, inline tables for dicts)."""
    lines = []
    for section, table in r.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, dict):
                text = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
            else:
                text = json.dumps(value)
            lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- non-finite weights -------------------------------------------------------------------------


def test_non_finite_weights_are_never_checkpointed_or_exported(corpus, tmp_path):
    trainer = Trainer(recipe(corpus, tmp_path, train={"checkpoint_every": 2, "keep_last": 1}))
    original = trainer._train_step

    def step_then_break() -> dict[str, Any]:
        record = original()
        if trainer.step == 2:  # after the third step, as a broken update would leave them
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return record

    trainer._train_step = step_then_break
    with pytest.raises(TrainingDiverged, match="at step 4 hold NaN or infinity: checkpoint not written"):
        trainer.run()
    assert names(tmp_path) == ["step-00000002"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    with pytest.raises(TrainingDiverged, match="model not exported"):
        trainer.export(None)
    assert not (tmp_path / "model").exists()


# ---- unreadable checkpoints ---------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"not a torch file\n" * 20)
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "missing"])
def test_an_unreadable_rank_file_falls_back_to_the_checkpoint_before(corpus, tmp_path, straight, caplog, how):
    Trainer(recipe(corpus, tmp_path, train={**EVERY_2, "stop_at": 4})).run()
    damage(tmp_path / "checkpoints" / "step-00000004" / "rank-0.pt", how)
    with caplog.at_level(logging.INFO, logger="pyjamba"):
        result = Trainer(recipe(corpus, tmp_path, train=EVERY_2)).run()
    assert result["finished"]
    assert "step-00000004 cannot be read: ValueError: rank-0.pt" in caplog.text
    assert "resumed from" in caplog.text and "step-00000002 at step 2" in caplog.text
    assert losses(tmp_path) == straight  # exactly the uninterrupted run


def test_rank_files_are_optional_only_for_another_world_size(corpus, tmp_path):
    Trainer(recipe(corpus, tmp_path, train={"stop_at": 3, "export": False})).run()
    ckpt = checkpoints.latest_checkpoint(tmp_path)
    (ckpt / "rank-0.pt").unlink()
    # The only checkpoint is unreadable: the run stops instead of starting over (and rotating it away).
    with pytest.raises(checkpoints.CheckpointCorrupt, match="none of the 1 checkpoints"):
        Trainer(recipe(corpus, tmp_path)).run()
    assert names(tmp_path) == ["step-00000003"]
    # Written by two processes, it loads into one: the data position comes from trainer.json.
    state = json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "trainer.json").write_text(json.dumps({**state, "world_size": 2}))
    trainer = Trainer(recipe(corpus, tmp_path))
    trainer_state, rank_state = checkpoints.load_checkpoint(ckpt, trainer.model, trainer.optimizer)
    assert trainer_state["step"] == 3 and rank_state is None


def test_a_checkpoint_that_does_not_read_back_deletes_nothing(corpus, tmp_path, monkeypatch, caplog):
    write = checkpoints._write_rank_state

    def lossy_disk(path: Path, state: dict[str, Any]) -> None:
        write(path, state)
        if path.parent.name.startswith("step-00000006"):
            path.write_bytes(b"")

    monkeypatch.setattr(checkpoints, "_write_rank_state", lossy_disk)
    train = {"checkpoint_every": 2, "keep_last": 1, "export": False}
    with caplog.at_level(logging.ERROR, logger="pyjamba"):
        Trainer(recipe(corpus, tmp_path, train=train)).run()
    assert "step-00000006 does not read back" in caplog.text
    assert names(tmp_path) == ["step-00000004", "step-00000006"]  # step 4 survives the rotation
    monkeypatch.undo()
    result = Trainer(recipe(corpus, tmp_path, train={**train, "max_steps": 8})).run()  # falls back to 4
    assert result["step"] == 8
    assert sorted(step_records(tmp_path)) == list(range(1, 9))
    assert names(tmp_path) == ["step-00000008"]
    ckpt = tmp_path / "checkpoints" / "step-00000008"
    assert checkpoints.verify_checkpoint(ckpt) is None
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "metadata needs" in checkpoints.verify_checkpoint(ckpt)


def test_rotation_keeps_the_new_checkpoint_and_leaves_later_steps(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "trainer.json").write_text("{}")
    # Steps 4 and 5 come from an attempt the run resumed before: the run overwrites them in turn.
    checkpoints._rotate(root, root / "step-00000003", keep_last=2)
    assert names(tmp_path) == [f"step-{s:08d}" for s in (2, 3, 4, 5)]
    checkpoints._rotate(root, root / "step-00000005", keep_last=1)
    assert names(tmp_path) == ["step-00000005"]


# ---- metrics and durability ---------------------------------------------------------------------


def test_metrics_survive_a_torn_line_and_stay_strict_json(corpus, tmp_path, straight, caplog):
    Trainer(recipe(corpus, tmp_path, train={**EVERY_2, "stop_at": 4})).run()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a line from an older version, then a crash mid-line
        f.write('{"step": 1, "val_loss": NaN}\n{"loss": 4.2, "st')
    with caplog.at_level(logging.WARNING, logger="pyjamba"):
        Trainer(recipe(corpus, tmp_path, train=EVERY_2)).run()
    assert "dropping 1 line(s) that are not JSON records" in caplog.text
    records = strict_records(tmp_path)
    assert {"step": 1, "val_loss": None} in records
    assert losses(tmp_path) == straight


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name synced files")
def test_files_are_synced_before_they_are_published(corpus, tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path.resolve()
    Trainer(recipe(corpus, out, train={"stop_at": 1, "export": False})).run()
    Trainer(recipe(corpus, out, train={"stop_at": 2, "export": False})).run()  # resumes: rewrites metrics
    tmp = out / "checkpoints" / "step-00000001.tmp"
    for path in (tmp, out / "checkpoints"):
        assert str(path) in synced
    assert any(p.endswith(".distcp") for p in synced)  # DCP syncs its shards itself (sync_files)
    # rank-0.pt, trainer.json and the rewritten metrics go through folders.write_file's temporary siblings.
    assert any(p.startswith(str(tmp / ".rank-0.pt.tmp-")) for p in synced)
    assert any(p.startswith(str(tmp / ".trainer.json.tmp-")) for p in synced)
    assert any(p.startswith(str(out / ".metrics.jsonl.tmp-")) for p in synced) and str(out) in synced


# ---- two processes ------------------------------------------------------------------------------


def torchrun(recipe_file: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--standalone", "-m", "pyjamba", "train", str(recipe_file), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_two_processes_fall_back_together_and_stop_together(corpus, tmp_path):
    """Only rank 1's file is missing: both processes must skip the checkpoint (the DCP load is
    collective). Then a diverging learning rate stops both with the same verdict."""
    path = write_recipe(recipe(corpus, tmp_path / "run", train=EVERY_2), tmp_path / "recipe.toml")
    done = torchrun(path, 2, "train.stop_at=4")
    assert done.returncode == 0, done.stderr[-3000:]
    first = step_records(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-00000004" / "rank-1.pt").unlink()
    done = torchrun(path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank-1.pt is missing" in done.stderr and "another process failed" in done.stderr
    again = step_records(tmp_path / "run")
    assert sorted(again) == list(range(1, 7))
    assert all(again[s]["loss"] == first[s]["loss"] for s in (3, 4))  # redone from step 2, exactly

    diverge = ["train.out_dir=" + str(tmp_path / "nan"), "optim.lr=1e6", "optim.min_lr=0"]
    diverge += ["optim.warmup_steps=0", "train.max_bad_steps=2", "train.max_steps=20"]
    done = torchrun(path, 2, *diverge)
    assert done.returncode != 0
    assert done.stderr.count("pyjamba train: training diverged: 2 steps in a row") == 2  # both ranks
    records = step_records(tmp_path / "nan")
    assert sum(bool(r.get("skipped")) for r in records.values()) == 2
    for ckpt in checkpoints.list_checkpoints(tmp_path / "nan"):
        fresh = load_into_fresh(corpus, tmp_path / "nan", ckpt)
        assert checkpoints.all_finite(fresh.model, fresh.optimizer)
