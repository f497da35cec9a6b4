"""Sampling settings, checked once: the rules shared by `generate`, the command line and the server.

`SamplingParams(...)` validates on construction and raises `SamplingError` naming the parameter,
so a value reaches a sampler only if the sampler can honour it:

- every number is finite (a JSON `1e400` is `inf` in Python, and NaN slips through comparisons);
- a temperature under `GREEDY_BELOW` is greedy, as vLLM treats it: dividing float32 logits by
  1e-40 overflows to inf, and a softmax of infs is NaN;
- the repetition penalty lies in `REPETITION_PENALTY_RANGE`, so that logits scaled by it stay finite
  and nonzero in float32 (1e-300 is 0 in float32: a division by zero);
- a seed lies in `SEED_RANGE` (what `torch.Generator.manual_seed` takes), and choice i of a request
  draws from `choice_seed(seed, i)`, which wraps around 2**64 as torch itself wraps negative seeds;
- logits that are not finite (NaN or inf from a broken model) raise `NonFiniteLogits` instead of
  becoming token 0 or a NaN probability (`check_logits`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "GREEDY_BELOW",
    "REPETITION_PENALTY_RANGE",
    "SEED_RANGE",
    "NonFiniteLogits",
    "SamplingError",
    "SamplingParams",
    "check_logits",
    "check_seed",
    "choice_seed",
]

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS
# Logits scaled by at most 1e4 either way, then divided by a temperature >= 1e-5, stay below float32's
# 3.4e38 for any logit under 1e29: no model that works produces one.
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
PENALTY_RANGE = (-2.0, 2.0)  # frequency and presence penalties, OpenAI's range
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range
SEED_RANGE = (-(2**63), 2**64 - 1)


class SamplingError(ValueError):
    """A sampling setting out of range; `param` names it (as the OpenAI API spells it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or infinite logits: its weights or its computation are broken."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SamplingError(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(name, f"{name} must be an integer, got {value!r}")
    return int(value)


def _within(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    if (low < value if open_low else low <= value) and value <= high:
        return
    bracket = "(" if open_low else "["
    raise SamplingError(name, f"{name} must lie in {bracket}{low}, {high}], got {value}")


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """A seed as an int in SEED_RANGE (None passes)."""
    if seed is None:
        return None
    seed = _integer(name, seed)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise SamplingError(name, f"{name} must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed}")
    return seed


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded `seed`: seed + choice, wrapped into [0, 2**64).

    torch seeds a generator with a negative seed as its value modulo 2**64, so choice 0 draws what
    `generate(seed=seed)` draws for any seed in SEED_RANGE, and no choice's seed overflows.
    """
    return (seed + choice) % 2**64


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling settings, validated on construction (raises SamplingError).

    temperature: 0 (or under GREEDY_BELOW) is greedy. top_k 0: no limit. top_p 1 and min_p 0: off.
    repetition_penalty 1: off (transformers' multiplicative penalty, prompt and output tokens).
    frequency_penalty, presence_penalty, logit_bias: OpenAI's, on the generated tokens / all tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        temperature = _number("temperature", self.temperature)
        if temperature < 0:
            raise SamplingError("temperature", f"temperature must be >= 0 (0 is greedy), got {temperature}")
        set_(self, "temperature", temperature)
        top_p = _number("top_p", self.top_p)
        _within("top_p", top_p, 0.0, 1.0, open_low=True)
        set_(self, "top_p", top_p)
        top_k = _integer("top_k", self.top_k)
        if top_k < 0:
            raise SamplingError("top_k", f"top_k must be >= 0 (0: no limit), got {top_k}")
        set_(self, "top_k", top_k)
        min_p = _number("min_p", self.min_p)
        _within("min_p", min_p, 0.0, 1.0)
        set_(self, "min_p", min_p)
        penalty = _number("repetition_penalty", self.repetition_penalty)
        _within("repetition_penalty", penalty, *REPETITION_PENALTY_RANGE)
        set_(self, "repetition_penalty", penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            value = _number(name, getattr(self, name))
            _within(name, value, *PENALTY_RANGE)
            set_(self, name, value)
        bias = {}
        for token, value in dict(self.logit_bias).items():
            token = _integer("logit_bias", token)
            if token < 0:
                raise SamplingError("logit_bias", f"logit_bias keys must be token ids >= 0, got {token}")
            value = _number("logit_bias", value)
            _within("logit_bias", value, *LOGIT_BIAS_RANGE)
            bias[token] = value
        set_(self, "logit_bias", bias)
        set_(self, "seed", check_seed(self.seed))

    @property
    def greedy(self) -> bool:
        """Whether the next token is the argmax (after penalties and bias)."""
        return self.temperature < GREEDY_BELOW

    def check_vocab(self, vocab_size: int) -> None:
        """Raise SamplingError if a logit_bias key is not a token of a vocabulary this size."""
        for token in self.logit_bias:
            if token >= vocab_size:
                raise SamplingError(
                    "logit_bias", f"logit_bias keys must be token ids in [0, {vocab_size}), got {token}"
                )

    def for_choice(self, choice: int) -> SamplingParams:
        """These settings for choice `choice` of a request (its own seed, `choice_seed`)."""
        if self.seed is None:
            return self
        return SamplingParams(**{**self.__dict__, "seed": choice_seed(self.seed, choice)})


def check_logits(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogits if the raw logits (B, V) hold NaN or inf, naming the rows."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return
    rows = (~finite).nonzero().flatten().tolist()
    kind = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
    raise NonFiniteLogits(
        f"the model produced {kind} logits (batch rows {rows[:8]}): its weights or its computation "
        "are broken (a checkpoint with NaN weights, or an overflow in reduced precision)"
    )
