"""Text in, text out: `TextGenerator`, a model with its tokenizer, generation defaults and stop tokens.

`pyjamba.load(source)` (`runtime.load`) makes one from a model folder, a Hugging Face repo id or the
model shipped inside the package. A TextGenerator renders chat templates, streams text (never a
broken character, never past a stop string) and returns it. `stop_token_ids` is the one rule for the
tokens that end a sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .config import JambaConfig
from .generate import stream
from .tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from .model import JambaForCausalLM
    from .runtime import Choices

__all__ = ["TextGenerator", "stop_token_ids"]


def stop_token_ids(
    tokenizer: Tokenizer | None, config: JambaConfig, generation_eos: int | Iterable[int] | None = None
) -> list[int]:
    """The one rule for the tokens that end a sequence: the tokenizer's end-of-sequence tokens, config.json's
    `eos_token_id` and generation_config.json's (`generation_eos`), all of them; sorted, without repeats."""
    eos = set(tokenizer.eos_token_ids if tokenizer is not None else ()) | set(config.eos_token_ids)
    if generation_eos is not None:
        eos |= {generation_eos} if isinstance(generation_eos, int) else set(generation_eos)
    return sorted(eos)


@dataclass
class TextGenerator:
    """A model with its tokenizer, generation defaults and stop tokens: prompts in, text out.

    `defaults` holds the options the model folder's `generation_config.json` sets (and only those),
    as keyword arguments of `generate.stream`. `eos_token_ids` are the stop tokens by runtime.py's one
    rule (`stop_token_ids`: the tokenizer's, config.json's and generation_config.json's),
    worked out from the other fields when not given. `choices` says how `runtime.load` loaded the
    model, and why (None for a TextGenerator built by hand).
    """

    model: JambaForCausalLM
    tokenizer: Tokenizer
    defaults: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: list[int] | None = None
    choices: Choices | None = None

    def __post_init__(self) -> None:
        if self.eos_token_ids is None:
            self.eos_token_ids = stop_token_ids(
                self.tokenizer, self.model.config, self.defaults.get("eos_token_id")
            )

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments for `generate.stream`: the defaults, then the overrides that are not None;
        `eos_token_id` is the stop tokens, with any an override adds."""
        options = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        eos = set(self.eos_token_ids)
        given = overrides.get("eos_token_id")
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
