"""The training recipe: typed sections read from a TOML file, overridable from the command line.

A recipe is four tables, each a dataclass below: `[model]` (what to train: a preset, a config.json or
a checkpoint to fine-tune, plus field overrides), `[data]` (token arrays or SFT chat lines, sequence
length, batch), `[optim]` (AdamW and its schedule) and `[train]` (the run: steps, checkpoints,
precision, evaluation). `key=value` overrides from the command line use dotted names
(`optim.lr=1e-3`, `model.overrides.hidden_size=128`) and are parsed as TOML values.
`RecipeError` names a field that breaks a rule before the run starts; `TrainingDiverged` is raised
by a run whose loss or weights went non-finite, and names the fields to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RecipeError",
    "TrainConfig",
    "TrainRecipe",
    "TrainingDiverged",
]


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the field (`optim.lr`) and the rule."""


class TrainingDiverged(RuntimeError):
    """A run that went non-finite (`train.max_bad_steps` bad steps in a row, or non-finite weights).

    The message names the step, the loss and gradient norm, and the recipe fields to change; the
    checkpoints on disk are the last good ones, and a rerun resumes from the newest.
    """


@dataclass
class ModelConfig:
    """What to train. Exactly one of preset, config and init_from; `overrides` replace config fields."""

    preset: str = ""  # a name from pyjamba.config.PRESETS
    config: str = ""  # a config.json to build a fresh model from
    init_from: str = ""  # a Hugging Face Jamba folder whose weights are the starting point (fine-tuning)
    overrides: dict[str, Any] = field(default_factory=dict)
    kernels: str = "auto"


@dataclass
class DataConfig:
    """What to read. `tokens` is a folder written by `pyjamba data tokenize`; `sft` a JSON-lines file."""

    tokens: str = ""
    sft: str = ""
    tokenizer: str = ""  # the tokenizer folder; copied into the exported model
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step, over all processes and accumulation steps
    state_passing: bool = False  # consecutive chunks, Mamba state carried between them
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    """The run: where it writes, how long, how precise, how often it evaluates and checkpoints."""

    out_dir: str = "runs/default"
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (and checkpoint) after this much wall time in this process; 0: no limit
    stop_at: int = 0  # stop (and checkpoint) at this step, the schedule still planned for max_steps; 0: no
    seed: int = 0
    dtype: str = "float32"  # the weights' dtype
    autocast: str = "none"  # "bf16": matmuls in bfloat16 under torch.autocast
    activation_checkpointing: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int = 0  # CPU threads per process; 0: torch's default
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0  # validation batches per evaluation; 0: the whole validation split
    checkpoint_every: int = 200
    keep_last: int = 2
    max_bad_steps: int = 5  # stop (TrainingDiverged) after this many non-finite steps in a row
    export: bool = True  # write the final model in the Hugging Face layout to out_dir/model


@dataclass
class TrainRecipe:
    """A whole recipe: the four sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> TrainRecipe:
        """Build and validate a recipe from nested dicts; unknown sections and keys are errors."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a table of sections, got {type(data).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise RecipeError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            table = data.get(f.name, {})
            if not isinstance(table, dict):
                raise RecipeError(f"{source}: [{f.name}] must be a table, got {type(table).__name__}")
            kwargs[f.name] = _section(f.default_factory, table, f.name, source)  # type: ignore[misc]
        recipe = cls(**kwargs)
        recipe.validate()
        return recipe

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
        """Read a TOML recipe and apply `section.key=value` overrides."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts (tuples as lists), as written into checkpoints and metrics."""
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(out["optim"]["betas"])
        return out

    def validate(self) -> None:
        """Raise RecipeError naming the first field that breaks a rule."""
        m, d, o, t = self.model, self.data, self.optim, self.train
        sources = [name for name in ("preset", "config", "init_from") if getattr(m, name)]
        if len(sources) != 1:
            raise RecipeError(
                f"[model] needs exactly one of preset, config, init_from; got {sources or 'none'}"
            )
        if bool(d.tokens) == bool(d.sft):
            raise RecipeError("[data] needs exactly one of tokens (pretraining) or sft (chat fine-tuning)")
        if d.sft and not d.tokenizer:
            raise RecipeError(
                "data.tokenizer is required with data.sft (the chat template renders the lines)"
            )
        if d.sft and d.state_passing:
            raise RecipeError("data.state_passing applies to token streams, not to data.sft")
        for name, value in [
            ("data.seq_len", d.seq_len),
            ("data.batch_size", d.batch_size),
            ("optim.grad_accum", o.grad_accum),
            ("train.max_steps", t.max_steps),
            ("train.log_every", t.log_every),
            ("train.eval_every", t.eval_every),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep_last", t.keep_last),
            ("train.max_bad_steps", t.max_bad_steps),
        ]:
            if not isinstance(value, int) or value <= 0:
                raise RecipeError(f"{name} must be a positive integer, got {value!r}")
        if d.batch_size % o.grad_accum:
            raise RecipeError(
                f"data.batch_size ({d.batch_size}) must be a multiple of optim.grad_accum ({o.grad_accum})"
            )
        for name, value in [("optim.lr", o.lr), ("optim.min_lr", o.min_lr), ("optim.eps", o.eps)]:
            if not math.isfinite(value) or value < 0:
                raise RecipeError(f"{name} must be a finite number >= 0, got {value!r}")
        if o.min_lr > o.lr:
            raise RecipeError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
        if o.weight_decay < 0 or o.grad_clip < 0 or o.warmup_steps < 0:
            raise RecipeError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise RecipeError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        if t.dtype not in ("float32", "bfloat16", "float64"):
            raise RecipeError(f"train.dtype must be float32, bfloat16 or float64, got {t.dtype!r}")
        if t.autocast not in ("none", "bf16"):
            raise RecipeError(f"train.autocast must be 'none' or 'bf16', got {t.autocast!r}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise RecipeError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        if t.max_minutes < 0 or t.eval_batches < 0 or t.threads < 0 or t.stop_at < 0:
            raise RecipeError(
                "train.max_minutes, train.stop_at, train.eval_batches and train.threads must be >= 0"
            )
        if t.activation_checkpointing and d.state_passing:
            # Recomputing a layer in the backward pass would read the carried state after the forward
            # pass has already overwritten it.
            raise RecipeError("train.activation_checkpointing cannot be combined with data.state_passing")


def _section(factory: Any, table: dict[str, Any], name: str, source: str) -> Any:
    """One section's dataclass from its table, checking keys and the types of the values."""
    defaults = factory()
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    unknown = set(table) - set(fields)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {sorted(f'{name}.{k}' for k in unknown)}")
    values = {}
    for key, value in table.items():
        default = getattr(defaults, key)
        values[key] = _coerce(value, default, f"{name}.{key}")
    return dataclasses.replace(defaults, **values)


def _coerce(value: Any, default: Any, name: str) -> Any:
    """`value` checked against the type of its default (ints are accepted where floats are expected)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise RecipeError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise RecipeError(f"{name} must be a list of {len(default)} numbers, got {value!r}")
        return tuple(_coerce(v, d, name) for v, d in zip(value, default, strict=True))
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise RecipeError(f"{name} must be a table, got {value!r}")
        return dict(value)
    raise RecipeError(f"{name}: unsupported value {value!r}")  # pragma: no cover - every field is typed


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `section.key[.subkey]=value` in the nested dict; the value is a TOML value or a bare string."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise RecipeError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string (e.g. train.out_dir=runs/a)
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise RecipeError(f"override {item!r}: {part} is not a table")
    table[parts[-1]] = value
