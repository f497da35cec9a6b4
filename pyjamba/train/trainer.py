"""The training loop: one process or many (torchrun + FSDP2), exactly resumable.

Each optimizer step takes one global batch of `data.batch_size` sequences, the same in every process
(each builds the same seeded loader and keeps its own rows), split into `optim.grad_accum`
micro-batches and then across processes. The loss of a step is the cross-entropy summed over every
labelled token of the global batch divided by their count, so a step is the same whether it runs in
one process or in N, with or without accumulation. Resuming restores the model, the optimizer, the
step (the learning rate is a function of it), the loader's position, the carried Mamba states and the
random state: the losses continue as if the run had never stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import JambaConfig
from ..model import JambaForCausalLM
from . import checkpoints, data_source
from .config import RecipeError, TrainRecipe
from .data_source import Batch
from .optim import lr_at, make_optimizer
from .parallelize import World, init_world, shard_model
from .state_passing import MambaCarry

__all__ = ["Trainer", "build_config", "rows_per_process"]

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
        self._stop_requested = False

    # ---- setup --------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        t, m = self.recipe.train, self.recipe.model
        dtype, device = _DTYPES[t.dtype], self.world.device
        if m.init_from:
            model = JambaForCausalLM.from_pretrained(
                m.init_from, dtype=dtype, device=device, kernels=m.kernels
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
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self._log(record)
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
        """One optimizer step over one global batch; returns its metrics."""
        recipe = self.recipe
        lr = lr_at(self.step, recipe.optim, recipe.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.source.next_batch(self.loader)
        n_labels = int((batch.labels != -100).sum())  # over the global batch: the same in every process
        micro = recipe.data.batch_size // recipe.optim.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64)
        aux_sum = torch.zeros((), dtype=torch.float64)
        for k in range(recipe.optim.grad_accum):
            first = k * micro + self.world.rank * self.micro_rows
            part = batch.rows(first, first + self.micro_rows)
            ce_sum, aux = self._forward(part, self.carries[k] if self.carries else None)
            # FSDP averages gradients over processes: scaling by world size makes the result the
            # gradient of (summed cross-entropy / labels in the global batch).
            loss = ce_sum * (self.world.size / max(1, n_labels))
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux / recipe.optim.grad_accum
                aux_sum += aux.detach().double() / recipe.optim.grad_accum
            loss.backward()
            loss_sum += ce_sum.detach().double()
        if recipe.optim.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.optim.grad_clip)
        else:
            grad_norm = _grad_norm(self.model)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for carry in self.carries:
            carry.detach_()
        stats = torch.stack([loss_sum, aux_sum])
        if self.world.distributed:
            dist.all_reduce(stats)
            stats[1] /= self.world.size
        tokens = batch.input_ids.numel() if batch.attention_mask is None else int(batch.attention_mask.sum())
        self.tokens_seen += tokens
        record = {
            "loss": round(stats[0].item() / max(1, n_labels), 5),
            "lr": lr,
            "grad_norm": round(float(_full(grad_norm)), 4),
            "step_tokens": tokens,
        }
        if self.config.num_experts > 1:
            record["aux_loss"] = round(stats[1].item(), 5)
        return record

    def _forward(self, batch: Batch, carry: MambaCarry | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed cross-entropy of a micro-batch (float32) and its load-balancing loss (MoE only)."""
        device = self.world.device
        if carry is not None and batch.reset is not None:
            carry.detach_(batch.reset.to(device))
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
            "loader": self.loader.state_dict() if self.world.main else None,
            "recipe": self.recipe.to_dict(),
        }
        path = checkpoints.save_checkpoint(
            self.out_dir, self.step, self.model, self.optimizer, trainer_state, self._rank_state(),
            self.recipe.train.keep_last,
        )  # fmt: skip
        logger.info("saved checkpoint %s", path)

    def _resume(self) -> None:
        for path in reversed(checkpoints.list_checkpoints(self.out_dir)):
            try:
                trainer_state, rank_state = checkpoints.load_checkpoint(path, self.model, self.optimizer)
            except checkpoints.CheckpointCorrupt as e:
                logger.warning("%s; trying an older one", e)
                continue
            self.step = int(trainer_state["step"])
            self.tokens_seen = int(trainer_state["tokens_seen"])
            self.train_seconds = float(trainer_state.get("train_seconds", 0.0))
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
            return

    def _log(self, record: dict[str, Any]) -> None:
        if not self.world.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def export(self, last_eval: dict[str, Any] | None) -> Path | None:
        """Write the model (Hugging Face layout), its tokenizer and a training summary to out_dir/model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

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
                    shutil.copyfile(src, target / name)
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
        (target / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint a run resumes from), atomically."""
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
