"""The training loop: one process or many (torchrun + FSDP2), exactly resumable.

Each optimizer step takes one global batch of `data.batch_size` sequences, the same in every process
(each builds the same seeded loader and keeps its own rows), split into `optim.grad_accum`
micro-batches and then across processes. The loss of a step is the cross-entropy summed over every
labelled token of the global batch divided by their count, so a step is the same whether it runs in
one process or in N, with or without accumulation. Resuming restores the model, the optimizer, the
step (the learning rate is a function of it), the loader's position, the carried Mamba states and the
random state: the losses continue as if the run had never stopped.

Training never loses the good. A step whose loss or gradient norm is not finite (one verdict for
all processes: both are reduced first) is skipped: no optimizer update, the carried Mamba states go
back to where the chunk started, a warning and a `"skipped": true` metrics line. The step still
counts (its batch is consumed and the learning rate follows the step), so resuming stays exact.
`train.max_bad_steps` skipped steps in a row stop the run with TrainingDiverged, as does a checkpoint
or export of non-finite weights, which is never written. `metrics.jsonl` holds strict JSON
(non-finite numbers as null), written by rank 0, and is cut back to the resumed step on resume.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import JambaConfig
from ..folders import write_file
from ..model import JambaForCausalLM
from ..quantize import method_of
from . import checkpoints, data_source
from .config import RecipeError, TrainingDiverged, TrainRecipe
from .data_source import Batch
from .optim import lr_at, make_optimizer
from .parallelize import World, init_world, shard_model
from .state_passing import MambaCarry

__all__ = ["Trainer", "TrainingDiverged", "build_config", "rows_per_process"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def build_config(recipe: TrainRecipe, vocab_size: int | None, special_ids: dict[str, int]) -> JambaConfig:
    """The model's JambaConfig: the chosen source, the tokenizer's vocabulary and ids, then the overrides."""
    m = recipe.model
    if m.preset:
        config = JambaConfig.from_preset(m.preset)
    elif m.config:
        config = JambaConfig.from_json_file(m.config)
    else:
        config = JambaConfig.from_pretrained(m.init_from)
    fields = config.to_dict()
    if not m.init_from:  # a fresh model takes the data's vocabulary and special tokens
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        fields.update(special_ids)
    fields.update(m.overrides)
    try:
        return JambaConfig.from_dict(fields)
    except ValueError as e:
        raise RecipeError(f"[model] gives an invalid config: {e}") from None


def rows_per_process(recipe: TrainRecipe, world_size: int) -> int:
    """The rows of each micro-batch one process computes; the micro-batch must split evenly."""
    micro = recipe.data.batch_size // recipe.optim.grad_accum
    if micro % world_size:
        raise RecipeError(
            f"a micro-batch of {micro} sequences (data.batch_size / optim.grad_accum) does not split "
            f"over {world_size} processes"
        )
    return micro // world_size


class Trainer:
    """Runs a TrainRecipe: `Trainer(recipe).run()` trains, checkpoints, evaluates and exports."""

    def __init__(self, recipe: TrainRecipe, world: World | None = None) -> None:
        self.recipe = recipe
        t = recipe.train
        self.world = world or init_world(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.out_dir = Path(t.out_dir)
        self.source = data_source.open_source(recipe.data)
        self.config = build_config(recipe, self.source.vocab_size, self.source.special_ids)
        self.source.check_vocab(self.config.vocab_size)
        self.micro_rows = rows_per_process(recipe, self.world.size)

        torch.manual_seed(t.seed)
        self.model = self._build_model()
        self.optimizer = make_optimizer(self.model, recipe.optim)
        self.loader = self.source.train_loader(recipe.data, recipe.train.seed)
        self.carries: list[MambaCarry] = []
        if recipe.data.state_passing:
            self.carries = [
                MambaCarry(self.config, self.micro_rows, _DTYPES[t.dtype], self.world.device)
                for _ in range(recipe.optim.grad_accum)
            ]
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.skipped_steps = 0  # non-finite steps skipped over the whole run
        self.bad_in_a_row = 0  # ... and since the last good one
        self._stop_requested = False

    # ---- setup --------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        t, m = self.recipe.train, self.recipe.model
        dtype, device = _DTYPES[t.dtype], self.world.device
        if m.init_from:
            model = JambaForCausalLM.from_pretrained(
                m.init_from, dtype=dtype, device=device, kernels=m.kernels
            )
            if (method := method_of(model)) is not None:
                raise RecipeError(
                    f"model.init_from {m.init_from} holds {method} weights, which do not train (int8 has no "
                    "gradients): start from the unquantized checkpoint"
                )
            if model.config.vocab_size != self.config.vocab_size:
                raise RecipeError(
                    f"model.init_from has vocab_size {model.config.vocab_size}, the data needs "
                    f"{self.config.vocab_size}"
                )
        else:
            model = JambaForCausalLM(self.config, kernels=m.kernels)
            model.init_weights(torch.Generator().manual_seed(t.seed))
            model.to(device=device, dtype=dtype)
        model.train()
        if t.activation_checkpointing:
            for layer in model.model.layers:
                # An instance attribute: the module tree, and so the state dict's names, stay unchanged.
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        if self.world.distributed:
            shard_model(model, self.world)
        return model

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to train.max_steps (or the time limit), resuming from the last checkpoint if any."""
        t = self.recipe.train
        if self.world.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_partial(self.out_dir)
        self._barrier()
        self._resume()
        previous = signal.signal(signal.SIGTERM, self._request_stop) if _main_thread() else None
        started = time.monotonic()
        bar = _progress(self.world.main, self.step, t.max_steps)
        last_eval: dict[str, Any] | None = None
        saved_at = self.step
        try:
            while self.step < t.max_steps:
                tick = time.perf_counter()
                record = self._train_step()
                elapsed = time.perf_counter() - tick
                self.train_seconds += elapsed
                self.step += 1
                record.update(step=self.step, tokens=self.tokens_seen, step_s=round(elapsed, 4))
                record["tokens_per_s"] = round(record.pop("step_tokens") / elapsed, 1)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.step % t.log_every == 0 or self.step == t.max_steps or record.get("skipped"):
                    self._log(record)
                if self.bad_in_a_row >= t.max_bad_steps:
                    raise self._diverged(record)
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    last_eval = self.evaluate()
                    self._log({"step": self.step, **last_eval})
                out_of_time = bool(t.max_minutes) and time.monotonic() - started > 60 * t.max_minutes
                out_of_time = out_of_time or self.step == t.stop_at
                if self.step % t.checkpoint_every == 0 or self.step == t.max_steps or out_of_time:
                    self._save()
                    saved_at = self.step
                if out_of_time or self._stop_requested:
                    break
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if self.step != saved_at:  # stopped by a signal between checkpoints
            self._save()
        finished = self.step >= t.max_steps
        if finished and t.export:
            self.export(last_eval)
        self._barrier()
        return {"step": self.step, "finished": finished, "tokens": self.tokens_seen, **(last_eval or {})}

    def _train_step(self) -> dict[str, Any]:
        """One optimizer step over one global batch; returns its metrics.

        A non-finite loss or gradient norm skips the update (see the module docstring); the batch
        is consumed either way.
        """
        recipe = self.recipe
        lr = lr_at(self.step, recipe.optim, recipe.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.source.next_batch(self.loader)
        n_labels = int((batch.labels != -100).sum())  # over the global batch: the same in every process
        micro = recipe.data.batch_size // recipe.optim.grad_accum
        device = self.world.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        starts = []  # each carry's state at the start of its chunk, to go back to on a skipped step
        for k in range(recipe.optim.grad_accum):
            first = k * micro + self.world.rank * self.micro_rows
            part = batch.rows(first, first + self.micro_rows)
            carry = self.carries[k] if self.carries else None
            if carry is not None:
                starts.append(_start_chunk(carry, part.reset, device))
            ce_sum, aux = self._forward(part, carry)
            # FSDP averages gradients over processes: scaling by world size makes the result the
            # gradient of (summed cross-entropy / labels in the global batch).
            loss = ce_sum * (self.world.size / max(1, n_labels))
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux / recipe.optim.grad_accum
                aux_sum += aux.detach().double() / recipe.optim.grad_accum
            loss.backward()
            loss_sum += ce_sum.detach().double()
        if recipe.optim.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.optim.grad_clip)
        else:
            norm = _grad_norm(self.model)
        grad_norm = _full(norm)  # the global norm: the same in every process
        loss_total, aux_mean, finite = self._reduce_stats(loss_sum, aux_sum, grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self._skip_step(starts, loss_total / max(1, n_labels), grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        for carry in self.carries:
            carry.detach_()
        tokens = batch.input_ids.numel() if batch.attention_mask is None else int(batch.attention_mask.sum())
        self.tokens_seen += tokens
        record: dict[str, Any] = {
            "loss": round(loss_total / max(1, n_labels), 5),
            "lr": lr,
            "grad_norm": round(grad_norm, 4),
            "step_tokens": tokens,
        }
        if self.config.num_experts > 1:
            record["aux_loss"] = round(aux_mean, 5)
        if not finite:
            record["skipped"] = True
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        return record

    def _reduce_stats(
        self, loss_sum: torch.Tensor, aux_sum: torch.Tensor, grad_norm: float
    ) -> tuple[float, float, bool]:
        """(summed cross-entropy, mean aux loss, all finite) over every process, identical in each.

        A count of the processes that saw a non-finite value travels with the sums, so the verdict
        never depends on how NaN or infinity propagate through the reduction.
        """
        local_bad = not (torch.isfinite(loss_sum) & torch.isfinite(aux_sum)) or not math.isfinite(grad_norm)
        stats = torch.stack(
            [loss_sum, aux_sum, torch.tensor(float(local_bad), dtype=torch.float64, device=loss_sum.device)]
        )
        if self.world.distributed:
            dist.all_reduce(stats)
            stats[1] /= self.world.size
        loss_total, aux_mean, bad = stats.tolist()
        finite = bad == 0 and math.isfinite(loss_total) and math.isfinite(aux_mean)
        return loss_total, aux_mean, finite

    def _skip_step(
        self, starts: list[dict[str, dict[int, torch.Tensor]]], loss: float, grad_norm: float
    ) -> None:
        """Count a non-finite step and undo what it did to the carried states (the weights are untouched)."""
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        for carry, start in zip(self.carries, starts, strict=True):
            carry.conv_states, carry.ssm_states = start["conv"], start["ssm"]
        if self.world.main:
            logger.warning(
                "step %d: loss %s, gradient norm %s: not finite, the update is skipped "
                "(%d in a row, train.max_bad_steps = %d)",
                self.step + 1, loss, grad_norm, self.bad_in_a_row, self.recipe.train.max_bad_steps,
            )  # fmt: skip

    def _diverged(self, record: dict[str, Any]) -> TrainingDiverged:
        """The error that stops a run after train.max_bad_steps non-finite steps in a row."""
        o = self.recipe.optim
        clip = f"lower optim.grad_clip (now {o.grad_clip:g})" if o.grad_clip else "set optim.grad_clip"
        newest = checkpoints.latest_checkpoint(self.out_dir)
        kept = (
            f"a rerun resumes from {newest}, the newest (finite) checkpoint"
            if newest
            else "no checkpoint yet"
        )
        return TrainingDiverged(
            f"training diverged: {self.bad_in_a_row} steps in a row with a non-finite loss or gradient norm "
            f"(train.max_bad_steps = {self.recipe.train.max_bad_steps}), the last at step {record['step']} "
            f"(loss {record['loss']}, gradient norm {record['grad_norm']}, lr {record['lr']:g}); "
            f"lower optim.lr (now {o.lr:g}), raise optim.warmup_steps or {clip}; {kept}"
        )

    def _forward(self, batch: Batch, carry: MambaCarry | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed cross-entropy of a micro-batch (float32) and its load-balancing loss (MoE only)."""
        device = self.world.device
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=self.recipe.train.autocast == "bf16"
        )
        with autocast:
            out = self.model(
                batch.input_ids.to(device),
                attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device),
                cache=carry,
                output_router_logits=self.config.num_experts > 1,
            )
        logits = out.logits.float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            batch.labels.to(device).reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return ce, out.aux_loss

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean cross-entropy per token) and perplexity over the validation split."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        limit = self.recipe.train.eval_batches or None
        for i, batch in enumerate(self.source.eval_batches(self.recipe.data)):
            if limit is not None and i >= limit:
                break
            rows = -(-batch.input_ids.shape[0] // self.world.size)
            part = batch.rows(self.world.rank * rows, (self.world.rank + 1) * rows)
            if part.input_ids.shape[0]:
                ce, _ = self._forward(part, None)
                totals += torch.tensor([ce.item(), float((part.labels != -100).sum())], dtype=torch.float64)
            elif self.world.distributed:
                # FSDP's forward is collective: a process without rows still takes part.
                self._forward(batch.rows(0, 1), None)
        if self.world.distributed:
            dist.all_reduce(totals)
        self.model.train()
        loss = totals[0].item() / max(1.0, totals[1].item())
        return {"val_loss": round(loss, 5), "val_ppl": round(math.exp(min(loss, 50.0)), 3)}

    # ---- checkpoints, metrics, export ---------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        return {
            "torch_rng": torch.get_rng_state(),
            "loader": self.loader.state_dict(),
            "carries": [{"conv": dict(c.conv_states), "ssm": dict(c.ssm_states)} for c in self.carries],
        }

    def _save(self) -> None:
        trainer_state = {
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_in_a_row,
            "loader": self.loader.state_dict() if self.world.main else None,
            "recipe": self.recipe.to_dict(),
        }
        try:
            path = checkpoints.save_checkpoint(
                self.out_dir, self.step, self.model, self.optimizer, trainer_state, self._rank_state(),
                self.recipe.train.keep_last,
            )  # fmt: skip
        except checkpoints.NonFiniteState as e:
            raise self._non_finite(str(e)) from None
        logger.info("saved checkpoint %s", path)

    def _non_finite(self, what: str) -> TrainingDiverged:
        """The error for weights that cannot be saved or exported because they are not finite."""
        if self.world.main:
            logger.error("%s", what)
        return TrainingDiverged(
            f"{what}; lower optim.lr (now {self.recipe.optim.lr:g}) or set optim.grad_clip, "
            "then rerun: it resumes from the newest checkpoint"
        )

    def _resume(self) -> None:
        """Load the newest checkpoint that reads back, falling back over unreadable ones.

        When checkpoints exist but none loads, stop (CheckpointCorrupt) rather than start over: a
        failed load may have left the model half restored, and a fresh run would rotate them away.
        """
        found = checkpoints.list_checkpoints(self.out_dir)
        for path in reversed(found):
            try:
                trainer_state, rank_state = checkpoints.load_checkpoint(path, self.model, self.optimizer)
            except checkpoints.CheckpointCorrupt as e:
                logger.warning("%s; trying an older one", e)
                continue
            self._restore(path, trainer_state, rank_state)
            return
        if found:
            raise checkpoints.CheckpointCorrupt(
                f"none of the {len(found)} checkpoints in {found[0].parent} loads (see the warnings above); "
                "move them away to start afresh"
            )
        if self.world.main:  # lines a run that never checkpointed left behind
            _truncate_metrics(self.out_dir / "metrics.jsonl", 0)

    def _restore(self, path: Path, trainer_state: dict[str, Any], rank_state: dict[str, Any] | None) -> None:
        """Take up the counters, data position, carried states and random state a checkpoint saved."""
        self.step = int(trainer_state["step"])
        self.tokens_seen = int(trainer_state["tokens_seen"])
        self.train_seconds = float(trainer_state.get("train_seconds", 0.0))
        self.skipped_steps = int(trainer_state.get("skipped_steps", 0))
        self.bad_in_a_row = int(trainer_state.get("bad_steps_in_a_row", 0))
        if rank_state is not None:
            torch.set_rng_state(rank_state["torch_rng"])
            self.loader.load_state_dict(rank_state["loader"])
            for carry, saved in zip(self.carries, rank_state["carries"], strict=True):
                carry.conv_states = {int(i): s.to(self.world.device) for i, s in saved["conv"].items()}
                carry.ssm_states = {int(i): s.to(self.world.device) for i, s in saved["ssm"].items()}
        else:  # saved by another number of processes: the data position is shared, carries restart
            self.loader.load_state_dict(trainer_state["loader"])
        if self.world.main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    def _log(self, record: dict[str, Any]) -> None:
        """Append one strict JSON line to metrics.jsonl (rank 0): NaN and infinity become null."""
        if not self.world.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(_json_line(record) + "\n")

    def export(self, last_eval: dict[str, Any] | None) -> Path | None:
        """Write the model (Hugging Face layout), its tokenizer and a training summary to out_dir/model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not checkpoints.all_finite(self.model):  # collective under FSDP
            raise self._non_finite(
                f"the weights at step {self.step} hold NaN or infinity: model not exported"
            )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # collective under FSDP
        if not self.world.main:
            return None
        plain = JambaForCausalLM(self.config, kernels="torch")
        plain.load_state_dict(state)
        target = self.out_dir / "model"
        plain.save_pretrained(target)
        if self.recipe.data.tokenizer:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                src = Path(self.recipe.data.tokenizer) / name
                if src.is_file():
                    write_file(target / name, src.read_bytes())
        summary = {
            "recipe": self.recipe.to_dict(),
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 1),
            "parameters": sum(p.numel() for p in plain.parameters()),
            "processes": self.world.size,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            **(last_eval or {}),
        }
        write_file(target / "training.json", json.dumps(summary, indent=2) + "\n")
        logger.info("exported the model to %s", target)
        return target

    def _request_stop(self, signum: int, frame: Any) -> None:
        logger.warning("signal %d: stopping after this step, with a checkpoint", signum)
        self._stop_requested = True

    def _barrier(self) -> None:
        if self.world.distributed:
            dist.barrier()


def _full(value: torch.Tensor | float) -> float:
    """A gradient norm as a float (under FSDP2 clip_grad_norm_ returns a DTensor)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _start_chunk(
    carry: MambaCarry, reset: torch.Tensor | None, device: torch.device
) -> dict[str, dict[int, torch.Tensor]]:
    """Zero the streams that start a document; return a copy of the states the chunk starts from.

    The model updates the states in place, so going back to them after a skipped step needs a copy.
    """
    if reset is not None:
        carry.detach_(reset.to(device))
    return {
        "conv": {i: s.clone() for i, s in carry.conv_states.items()},
        "ssm": {i: s.clone() for i, s in carry.ssm_states.items()},
    }


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_line(record: dict[str, Any]) -> str:
    """A record as strict JSON: non-finite floats (which json writes as bare NaN) become null."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)


def _parse_line(line: str) -> dict[str, Any] | None:
    """A metrics record, or None for a line that is not one (a torn last line from a crash)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a run resumes from), durably.

    Lines that do not parse (a crash mid-write) are dropped with a warning; the rest are rewritten
    as strict JSON, so files from before null-for-NaN are repaired too.
    """
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = [_parse_line(line) for line in lines if line.strip()]
    torn = sum(r is None for r in records)
    if torn:
        logger.warning("%s: dropping %d line(s) that are not JSON records (a crash mid-write)", path, torn)
    kept = [r for r in records if r is not None and _step_number(r) <= step]
    write_file(path, "".join(_json_line(r) + "\n" for r in kept))


def _step_number(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else 0


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
