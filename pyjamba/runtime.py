"""From a source to a ready model: the one loading path of `pyjamba generate`, `chat`, `serve`, `bench`
and `pyjamba.load`.

`load(source)` resolves the source (a model folder, a Hugging Face repo id, or the model shipped in the
package: `resolve_model`), reads config.json, generation_config.json and the tokenizer (so that a bad
folder fails before any weight is read), picks the dtype (`dtypes.resolve_dtype`: one "auto" policy),
sets torch's threads, loads the weights with the kernels asked for (`JambaForCausalLM.from_pretrained`),
moves them into transparent huge pages, and returns a `pipeline.TextGenerator` with

- `defaults`: the options generation_config.json sets, and only those (`generation_defaults`);
- `eos_token_ids`: the stop tokens by one rule (`stop_token_ids`): the tokenizer's end-of-sequence
  tokens, config.json's `eos_token_id` and generation_config.json's, all of them;
- `choices`: what was chosen and why (`Choices`: kernels, dtype, threads, huge pages), which
  `--verbose` prints.

`load_weights` is the same without the tokenizer and generation settings (what `pyjamba bench` needs of
a bare checkpoint); `check` is the same reads without the weights (what `pyjamba serve` does before it
starts listening).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, recover_folder
from .config import JambaConfig
from .dtypes import dtype_name, parse_dtype, resolve_dtype
from .generate import GenerationConfig
from .hugepages import huge_pages_unavailable, move_to_huge_pages
from .kernels import KERNEL_NAMES, Kernels, numba_unavailable
from .model import JambaForCausalLM
from .pipeline import TextGenerator, stop_token_ids
from .quantize import check_method, method_of
from .tokenizer import Tokenizer

__all__ = [
    "KERNEL_NAMES",
    "SHIPPED_MODEL",
    "Choices",
    "ModelNotFoundError",
    "check",
    "generation_defaults",
    "load",
    "load_weights",
    "resolve_model",
    "stop_token_ids",
]

logger = logging.getLogger(__name__)

# The model trained by pyjamba and shipped inside the package (see its model card there).
SHIPPED_MODEL = Path(__file__).parent / "assets" / "model"


class ModelNotFoundError(Exception):
    """No model at the place named: the message says what was tried."""


@dataclass(frozen=True)
class Choices:
    """How a model was loaded, and why: what `--verbose` prints (`summary`)."""

    folder: Path
    device: torch.device
    kernels: str
    kernels_why: str
    dtype: str  # "float32", or e.g. "bfloat16/float32" for a checkpoint stored in several
    dtype_why: str
    threads: int
    threads_why: str
    huge_pages_bytes: int
    huge_pages_why: str
    quantize: str | None = None  # "experts-int8" or "int8": weights in int8 (quantize.py)

    def summary(self) -> str:
        """One line: 'kernels numba (why), dtype float32 (why), 2 threads (why), weights in huge pages'."""
        pages = (
            f"weights in huge pages ({self.huge_pages_bytes / 1e6:.1f} MB)"
            if self.huge_pages_bytes
            else f"weights in ordinary pages ({self.huge_pages_why})"
        )
        quantized = f", {self.quantize} weights" if self.quantize else ""
        return (
            f"kernels {self.kernels} ({self.kernels_why}), dtype {self.dtype} ({self.dtype_why}){quantized}, "
            f"{self.threads} thread{'s' * (self.threads != 1)} ({self.threads_why}), {pages}"
        )


def resolve_model(source: str | os.PathLike | None) -> Path:
    """The local folder of a model: a folder as given, a Hugging Face repo id downloaded, or the shipped one."""
    if source is None:
        if not (SHIPPED_MODEL / "config.json").is_file():
            raise ModelNotFoundError(
                "no model ships with this version of pyjamba yet: pass --model with a Jamba model folder "
                "(config.json, safetensors weights and tokenizer.json)"
            )
        return SHIPPED_MODEL
    path = Path(source).expanduser()
    recover_folder(path)  # a save interrupted between its two renames left the previous version aside
    if path.is_dir():
        return path
    text = str(source)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise ModelNotFoundError(f"no model folder at {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{text!r} is not a local folder, and reading it as a Hugging Face repo id needs "
            "huggingface_hub (pip install huggingface_hub)"
        ) from exc
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:  # network down, repo absent, gated: all end the same way for the user
        raise ModelNotFoundError(
            f"could not download {text!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "offline, pass --model with a local folder"
        ) from exc


def generation_defaults(
    folder: str | os.PathLike, generation: GenerationConfig | None = None
) -> dict[str, Any]:
    """The options the folder's generation_config.json sets (and only those), as keyword arguments of
    `generate.stream`, validated by GenerationConfig; none without the file. `generation`: the file
    already read by `GenerationConfig.from_pretrained`."""
    folder = Path(folder)
    if generation is None:
        generation = GenerationConfig.from_pretrained(folder)
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    given = json.loads(path.read_text(encoding="utf-8"))  # already checked by GenerationConfig
    return {k: v for k, v in generation.to_kwargs().items() if given.get(k) is not None}


def _read_config(folder: Path) -> JambaConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (a model folder holds config.json and weights)")
    return JambaConfig.from_pretrained(folder)


def _check_options(
    dtype: torch.dtype | str | None, kernels: str | Kernels, threads: int | None, quantize: str | None = None
) -> None:
    """ValueError for a bad dtype, unknown kernels, numba kernels without numba (not resolve_kernels'
    RuntimeError: one line from a command), a bad thread count or quantization, before anything is read."""
    parse_dtype(dtype)
    check_method(quantize)
    if isinstance(kernels, str) and kernels not in KERNEL_NAMES:
        raise ValueError(f"unknown kernels {kernels!r}; choose one of {', '.join(KERNEL_NAMES)}")
    if kernels == "numba" and (reason := numba_unavailable()) is not None:
        raise ValueError(f"kernels numba are unavailable: {reason}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer of at least 1, got {threads!r}")


def check(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    kernels: str | Kernels = "auto",
    threads: int | None = None,
) -> Path:
    """The model's folder, with its config.json, tokenizer and generation_config.json read and checked,
    and no weight read: the errors `load` with these arguments would raise first (ModelNotFoundError,
    CheckpointError, ConfigError, TokenizerError, ValueError)."""
    _check_options(dtype, kernels, threads)
    folder = resolve_model(source)
    _read_config(folder)
    GenerationConfig.from_pretrained(folder)
    Tokenizer.from_pretrained(folder)
    return folder


def load_weights(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str = "cpu",
    kernels: str | Kernels = "auto",
    threads: int | None = None,
    huge_pages: bool = True,
    quantize: str | None = None,
) -> tuple[JambaForCausalLM, Choices]:
    """The model of a folder (or Hub repo id, or the shipped model), without its tokenizer, and what was
    chosen for it. The arguments are `load`'s."""
    _check_options(dtype, kernels, threads, quantize)
    return _load_weights(
        resolve_model(source), dtype, device, kernels, threads, huge_pages, quantize=quantize
    )


def load(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str = "cpu",
    kernels: str | Kernels = "auto",
    threads: int | None = None,
    huge_pages: bool = True,
    quantize: str | None = None,
) -> TextGenerator:
    """A model ready to write text: weights, tokenizer, generation defaults and stop tokens, from a model
    folder, a Hugging Face repo id (with `huggingface_hub` and a network) or, with no source, the model
    shipped in the package.

    dtype: "auto" the fastest for this machine (`dtypes.auto_dtype`), "stored" (or None) as the
        checkpoint holds each tensor, or a dtype or its name ("float32", "bfloat16", "float16").
    kernels: "auto", "torch", "numba" or "reference" (kernels/__init__.py), or Kernels.
    threads: torch's CPU threads (None: torch's choice, as it stands).
    quantize: None, "experts-int8" (the MoE experts and MLPs in int8, as the Jamba 1.5 paper serves
        them) or "int8" (every projection), quantized while the weights are read (quantize.py); a
        checkpoint saved quantized (`pyjamba quantize`) loads in int8 without it.
    huge_pages: on a CPU, copy the weights into transparent huge pages where Linux offers them
        (`hugepages.move_to_huge_pages`: decoding streams them ~10% faster).
    `.choices` of the result says what was chosen and why.
    """
    _check_options(dtype, kernels, threads, quantize)
    folder = resolve_model(source)
    config = _read_config(folder)
    generation = GenerationConfig.from_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    defaults = generation_defaults(folder, generation)
    model, choices = _load_weights(folder, dtype, device, kernels, threads, huge_pages, config, quantize)
    eos = stop_token_ids(tokenizer, config, generation.eos_token_id)
    return TextGenerator(model, tokenizer, defaults, eos_token_ids=eos, choices=choices)


def _load_weights(
    folder: Path,
    dtype: torch.dtype | str | None,
    device: torch.device | str,
    kernels: str | Kernels,
    threads: int | None,
    huge_pages: bool,
    config: JambaConfig | None = None,
    quantize: str | None = None,
) -> tuple[JambaForCausalLM, Choices]:
    device = torch.device(device)
    if config is None:
        config = _read_config(folder)
    if threads is not None:
        torch.set_num_threads(threads)
        threads_why = "asked for"
    else:
        threads_why = "torch's choice"
    target, dtype_why = resolve_dtype(
        dtype, config, device
    )  # after the threads: "auto" is measured with them
    model = JambaForCausalLM.from_pretrained(
        folder, dtype=target, device=device, kernels=kernels, quantize=quantize
    )
    if not huge_pages:
        moved, pages_why = 0, "huge pages not asked for"
    elif device.type != "cpu":
        moved, pages_why = 0, f"the weights are on {device.type}"
    else:
        moved = move_to_huge_pages(model)
        pages_why = "" if moved else (huge_pages_unavailable() or "no weights to move")
    kernels_why = getattr(model.kernels, "why", "") or ("auto" if kernels == "auto" else "asked for")
    choices = Choices(
        folder=folder,
        device=device,
        kernels=model.kernels.name,
        kernels_why=kernels_why,
        dtype="/".join(sorted({dtype_name(p.dtype) for p in model.parameters()})),
        dtype_why=dtype_why,
        threads=torch.get_num_threads(),
        threads_why=threads_why,
        huge_pages_bytes=moved,
        huge_pages_why=pages_why,
        quantize=method_of(model),
    )
    logger.info("loaded %s: %s", folder, choices.summary())
    return model, choices
