"""Text in, text out: a model, its tokenizer and its generation defaults, loaded together.

`load(source)` resolves a model folder, a Hugging Face repo id (with `huggingface_hub` and a
network), or the model shipped inside the package, and returns a `TextGenerator`, which renders
chat templates, streams text (never a broken character, never past a stop string) and returns it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import recover_folder
from .generate import GenerationConfig, stream
from .hugepages import move_to_huge_pages
from .model import JambaForCausalLM
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["SHIPPED_MODEL", "ModelNotFoundError", "TextGenerator", "load", "resolve_model"]

logger = logging.getLogger(__name__)

# The model trained by pyjamba and shipped inside the package (see its model card there).
SHIPPED_MODEL = Path(__file__).parent / "assets" / "model"


class ModelNotFoundError(Exception):
    """No model at the place named: the message says what was tried."""


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


@dataclass
class TextGenerator:
    """A model with its tokenizer and generation defaults: prompts in, text out.

    `defaults` holds the options the model folder's `generation_config.json` sets (and only those),
    as keyword arguments of `generate.stream`.
    """

    model: JambaForCausalLM
    tokenizer: Tokenizer
    defaults: dict[str, Any] = field(default_factory=dict)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments for `generate.stream`: the defaults, then the overrides that are not None."""
        options = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        eos = set(self.tokenizer.eos_token_ids) | set(self.model.config.eos_token_ids)
        given = options.get("eos_token_id")
        if given is not None:
            eos |= {given} if isinstance(given, int) else set(given)
        options["eos_token_id"] = sorted(eos)
        return options

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Token ids (1, L) of a plain-text prompt, with the tokenizer's special tokens (BOS)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise ValueError("the prompt is empty: it encodes to no tokens")
        return torch.tensor([ids], dtype=torch.long)

    def encode_chat(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        """Token ids (1, L) of a conversation rendered with the model's chat template."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return torch.tensor([ids], dtype=torch.long)

    def stream_ids(self, input_ids: torch.Tensor, **overrides: Any) -> Iterator[str]:
        """Stream the text generated after `input_ids` (1, L), piece by piece, cut at a stop string."""
        options = self.options(**overrides)
        stop = list(options.get("stop_strings") or ())
        eos = set(options["eos_token_id"])
        decoder = StreamDecoder(self.tokenizer)
        pending = ""  # text held back while it could still be the start of a stop string
        for step in stream(self.model, input_ids, tokenizer=self.tokenizer, **options):
            token = int(step[0])
            if token in eos:
                break
            pending += decoder.push(token)
            done, pending, stopped = _split_at_stop(pending, stop)
            if done:
                yield done
            if stopped:
                return
        pending += decoder.flush()
        done, _, _ = _split_at_stop(pending, stop, final=True)
        if done:
            yield done

    def complete(self, prompt: str, **overrides: Any) -> str:
        """The text the model writes after a plain-text prompt."""
        return "".join(self.stream_ids(self.encode_prompt(prompt), **overrides))

    def chat(self, messages: list[dict[str, Any]], **overrides: Any) -> str:
        """The assistant's reply to a conversation."""
        return "".join(self.stream_ids(self.encode_chat(messages), **overrides))


def _split_at_stop(text: str, stop: list[str], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string was reached).

    Text is held back while its end could be the beginning of a stop string; at a stop string,
    everything from it on is dropped.
    """
    if not stop:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    if final:
        return text, "", False
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


def load(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str = "cpu",
    kernels: str = "auto",
    huge_pages: bool = True,
) -> TextGenerator:
    """Model, tokenizer and generation defaults from a folder, a Hub repo id, or the shipped model.

    dtype: "auto" the fastest for this machine (`checkpoint.auto_dtype`), None as stored, or a dtype.
    huge_pages: on a CPU, copy the weights into transparent huge pages where Linux offers them
        (`hugepages.move_to_huge_pages`: decoding streams them ~10% faster).
    """
    folder = resolve_model(source)
    model = JambaForCausalLM.from_pretrained(folder, dtype=dtype, device=device, kernels=kernels)
    if huge_pages:
        move_to_huge_pages(model)
    tokenizer = Tokenizer.from_pretrained(folder)
    logger.info("loaded %s (%s)", folder, next(model.parameters()).dtype)
    return TextGenerator(model, tokenizer, _generation_defaults(folder))


def _generation_defaults(folder: Path) -> dict[str, Any]:
    """The options `generation_config.json` sets, validated by GenerationConfig (none if no file)."""
    config = GenerationConfig.from_pretrained(folder)
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    given = json.loads(path.read_text(encoding="utf-8"))  # already checked by from_pretrained
    return {k: v for k, v in config.to_kwargs().items() if given.get(k) is not None}
