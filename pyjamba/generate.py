"""Text generation: prefill, the one-token decode step, logits processing and sampling, stopping.

`stream` is the one generation loop: it yields each step's new tokens; `generate` collects them.
Greedy decoding is transformers' `generate(do_sample=False)` token for token; sampling applies
transformers' processors in transformers' order: repetition penalty, then temperature, top-k, top-p,
min-p, then a multinomial draw from the softmax.

A batch of prompts of different lengths is left-padded, with an `attention_mask` (1 token, 0 padding).
The prompt is prefilled in one forward into a preallocated `HybridCache`; every later step feeds one
token per sequence, so a Mamba layer's cost per step is constant (its state does not grow with the
context) and only attention layers read a longer cache.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .cache import HybridCache
from .cuda_graph import GraphedDecoder
from .sampling import SamplingError, SamplingParams, check_logits

if TYPE_CHECKING:
    from .model import JambaForCausalLM  # model.py imports this module

__all__ = [
    "GenerationConfig",
    "StopStrings",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "decode_step",
    "generate",
    "prefill",
    "stream",
    "warp",
]


# ---- defaults read from a checkpoint folder --------------------------------------------------


@dataclass
class GenerationConfig:
    """Generation defaults, with the field names of Hugging Face's `generation_config.json`.

    `top_k` 0 means no top-k filter (transformers' own default is 50 when a file leaves it out).
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> GenerationConfig:
        """Read `folder/generation_config.json` if there is one (defaults otherwise); unknown keys are ignored."""
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        values = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:  # absent, or written as null: the default
                continue
            if not _json_type_ok(f.name, value):
                raise ValueError(f"{path}: {f.name} has the wrong type: {value!r}")
            values[f.name] = value
        config = cls(**values)
        try:  # the ranges every sampler honours, checked at load rather than at the first request
            SamplingParams(**{k: getattr(config, k) for k in _SAMPLING_FIELDS})
        except SamplingError as err:
            raise ValueError(f"{path}: {err}") from err
        return config

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `generate` / `stream` (everything but bos_token_id)."""
        kwargs = asdict(self)
        del kwargs["bos_token_id"]
        return kwargs


_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _json_type_ok(name: str, value: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if name == "do_sample":
        return isinstance(value, bool)
    if name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        return is_int(value) or isinstance(value, float)
    if name == "eos_token_id":
        return is_int(value) or (isinstance(value, list) and all(is_int(v) for v in value))
    return is_int(value)  # max_new_tokens, top_k, pad_token_id, bos_token_id


# ---- logits processors (transformers' semantics, as pure functions on (B, V) scores) ----------


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise the tokens already present (`seen`, (B, V) bool): positive scores / penalty, negative * penalty.

    transformers' RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019, eq. 2).
    """
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Scores / temperature (transformers' TemperatureLogitsWarper)."""
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too), -inf elsewhere (TopKLogitsWarper)."""
    k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # (B, 1)
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (TopPLogitsWarper)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # ascending: the tail's mass first
    remove = cumulative <= (1 - top_p)
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(-1, order, remove)  # back to vocabulary order
    return scores.masked_fill(remove, -math.inf)


def apply_min_p(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (MinPLogitsWarper)."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return scores.masked_fill(remove, -math.inf)


# ---- stop strings -----------------------------------------------------------------------------


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering, in transformers' order; neutral values skip."""
    if temperature != 1.0:
        scores = apply_temperature(scores, temperature)
    if top_k > 0:
        scores = apply_top_k(scores, top_k)
    if top_p < 1.0:
        scores = apply_top_p(scores, top_p)
    if min_p > 0.0:
        scores = apply_min_p(scores, min_p)
    return scores


class Tokenizer(Protocol):
    """What stop strings need of a tokenizer."""

    def decode(self, ids: list[int]) -> str: ...


class StopStrings:
    """Which sequences' generated text contains a stop string, decoding only a tail window of tokens.

    Checked after every token, "contains" means "the last token completed it" (transformers'
    StopStringCriteria semantics), here over the generated text only, not the prompt. The window,
    the longest stop string's length in UTF-8 bytes plus 4 tokens, covers every token that a match
    can overlap, as long as each token decodes to at least one byte.
    """

    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Tokenizer | None) -> None:
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings need a tokenizer with decode(ids) -> str: pass tokenizer=")
        self.strings = strings
        self.tokenizer = tokenizer
        self.window = max(len(s.encode("utf-8")) for s in strings) + 4

    def __call__(self, generated: torch.Tensor, rows: Sequence[int]) -> list[int]:
        """The rows among `rows` of `generated` (B, n) whose tail text contains a stop string."""
        tails = generated[list(rows), -self.window :].tolist()
        hits = []
        for row, ids in zip(rows, tails, strict=True):
            text = self.tokenizer.decode(ids)
            if any(s in text for s in self.strings):
                hits.append(row)
        return hits


# ---- forward passes ---------------------------------------------------------------------------


@torch.no_grad()
def prefill(
    model: JambaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: HybridCache,
) -> torch.Tensor:
    """Run the whole prompt (B, L) into an empty cache; the last position's logits (B, V) in float32."""
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits
    return logits[:, -1].float()


@torch.no_grad()
def decode_step(
    model: JambaForCausalLM,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: HybridCache,
) -> torch.Tensor:
    """Feed one token per sequence (B,); the next logits (B, V) in float32.

    attention_mask: (B, past + 1), or None when no sequence of the batch has padding.
    """
    logits = model(tokens[:, None], attention_mask=attention_mask, cache=cache).logits  # (B, 1, V)
    return logits[:, -1].float()


_compiled_decode_step: Callable[..., torch.Tensor] | None = None


def _decode_step_fn(compile: bool) -> Callable[..., torch.Tensor]:
    """decode_step, or its torch.compile'd twin (built once per process and reused across calls).

    dynamic=None, not False: the cache's length (a Python int) and the attention width change every
    step, so a static graph would recompile every step until dynamo's recompile limit; automatic
    dynamic shapes recompile once, at the second step, with the length symbolic. The numba kernels'
    calls and the MoE layers' data-dependent expert loop break the graph, and inside it `linear`
    gives way to F.linear: compiled, the jamba-small step measured slower than eager
    (docs/benchmarks.md).
    """
    global _compiled_decode_step
    if not compile:
        return decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, dynamic=None, fullgraph=False)
    return _compiled_decode_step


# ---- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Validated settings of one generation call."""

    max_new_tokens: int
    sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    eos: tuple[int, ...]
    pad: int | None
    stop: StopStrings | None
    generator: torch.Generator | None
    compile: bool
    cuda_graphs: bool


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _plan(
    model: JambaForCausalLM,
    device: torch.device,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> _Plan:
    """Check the keyword arguments of `generate` and `stream` (their one signature) into a _Plan.

    The sampling settings go through `SamplingParams`, the rules the server and the CLI share.
    """
    vocab = model.config.vocab_size
    max_new_tokens = _integer("max_new_tokens", max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )

    if eos_token_id is None:
        eos = tuple(model.config.eos_token_ids)
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(eos_token_id)
    for token in eos:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"eos_token_id {token!r} must be a token id in [0, vocab_size={vocab})")
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    elif isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id {pad_token_id!r} must be a token id in [0, vocab_size={vocab})")

    stop = None
    if stop_strings is not None and (isinstance(stop_strings, str) or len(stop_strings) > 0):
        stop = StopStrings(stop_strings, tokenizer)
        if pad_token_id is None:
            raise ValueError(
                "stop_strings need a pad_token_id to fill finished sequences: pass pad_token_id="
            )

    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a model on a CUDA device, not on {device.type}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    return _Plan(
        max_new_tokens=max_new_tokens,
        sample=bool(do_sample) and not params.greedy,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        eos=eos,
        pad=pad_token_id,
        stop=stop,
        generator=generator,
        compile=compile,
        cuda_graphs=bool(cuda_graphs),
    )


def _check_inputs(
    model: JambaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids as int64 on the model's device, and the mask (None when there is no padding)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one prompt token"
        )
    vocab = model.config.vocab_size
    low, high = input_ids.min().item(), input_ids.max().item()
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids hold token ids in [{low}, {high}], outside [0, vocab_size={vocab})")
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return input_ids, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    mask = attention_mask.to(device=device, dtype=torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one token")
    if (mask[:, 1:] < mask[:, :-1]).any():
        row = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding after a token: batches must be left-padded "
            "(zeros first, then ones)"
        )
    return input_ids, (None if bool(mask.all()) else mask)


def _next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """Process the (B, V) float32 logits in transformers' order, then pick one token per row (B,).

    Raises NonFiniteLogits for NaN or infinite logits: argmax would silently pick a NaN's index.
    """
    check_logits(logits)
    scores = logits
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, plan.repetition_penalty)
    if not plan.sample:
        return scores.argmax(dim=-1)
    scores = warp(scores, plan.temperature, plan.top_k, plan.top_p, plan.min_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=plan.generator).squeeze(1)


def stream(
    model: JambaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """Yield each step's new token ids (B,); a finished sequence yields pad_token_id.

    Arguments are checked here, when called, not at the first step. Keyword arguments: see `generate`.
    The loop ends once every sequence has produced an EOS or completed a stop string, or after
    max_new_tokens steps.
    """
    input_ids, mask = _check_inputs(model, input_ids, attention_mask)
    plan = _plan(model, input_ids.device, **kwargs)
    return _loop(model, input_ids, mask, plan)


def _loop(
    model: JambaForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor | None, plan: _Plan
) -> Iterator[torch.Tensor]:
    batch, prompt_len = input_ids.shape
    steps = plan.max_new_tokens
    if steps == 0:
        return
    device = input_ids.device
    vocab = model.config.vocab_size
    step_fn = _decode_step_fn(plan.compile)
    cache = model.make_cache(batch, max_length=prompt_len + steps)
    full_mask = None
    if mask is not None:
        # Preallocated: each step's mask is a view of its first past + 1 columns.
        full_mask = torch.ones(batch, prompt_len + steps, dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = mask

    seen = None
    if plan.repetition_penalty != 1.0:
        # Tokens of prompt + generated text, padding excluded (as transformers ignores the left padding).
        seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
        prompt = input_ids if mask is None else input_ids.masked_fill(mask == 0, vocab)
        seen.scatter_(1, prompt, True)
        seen = seen[:, :vocab]
    eos = torch.tensor(plan.eos, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    generated = torch.empty(batch, steps, dtype=torch.long, device=device)

    logits = prefill(model, input_ids, mask, cache)
    if plan.cuda_graphs and steps > 1:
        decoder = GraphedDecoder(model, max_batch=batch, max_length=prompt_len + steps, capture=True)
        decoder.start(cache, mask)

        def step_fn(
            model: JambaForCausalLM, tokens: torch.Tensor, mask: object, cache: object
        ) -> torch.Tensor:
            return decoder.step(tokens)

    for step in range(steps):
        tokens = _next_tokens(logits, seen, plan)
        if plan.pad is not None:
            tokens = torch.where(unfinished, tokens, plan.pad)
        generated[:, step] = tokens
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if len(plan.eos):
            unfinished &= ~torch.isin(tokens, eos)
        if plan.stop is not None:
            rows = unfinished.nonzero().squeeze(1).tolist()
            for row in plan.stop(generated[:, : step + 1], rows):
                unfinished[row] = False
        yield tokens
        if step == steps - 1 or not bool(unfinished.any()):
            return
        step_mask = full_mask[:, : prompt_len + step + 1] if full_mask is not None else None
        logits = step_fn(model, tokens, step_mask, cache)


def generate(
    model: JambaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    callback: Callable[[torch.Tensor], None] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The prompts followed by their new tokens: (B, prompt_len + steps) int64, as transformers' generate.

    input_ids: (B, L) prompts, left-padded with `attention_mask` (1 token, 0 padding) when of unequal length.
    callback: called with each step's new tokens (B,).

    Keyword arguments (checked, with their types and defaults, by `_plan`):
    max_new_tokens (20); do_sample (False): sample (after repetition_penalty, temperature, top_k,
        top_p, min_p); otherwise greedy, as is a temperature of 0 (or under `sampling.GREEDY_BELOW`).
        repetition_penalty applies to greedy decoding too (as in transformers). The ranges are
        `sampling.SamplingParams`'s, shared with the server and the command line.
    temperature (1.0), top_k (0: off), top_p (1.0), min_p (0.0), repetition_penalty (1.0: off).
    eos_token_id: an id or a list (default: the model config's); a sequence that produces one stops,
        and is padded with pad_token_id (default: the config's, else the first EOS) to the batch's end.
    seed: sample from a dedicated torch.Generator seeded so (the global RNG is left alone);
        or pass `generator`. With neither, sampling draws from the global RNG.
    stop_strings: a string or a list (empty: none); stop a sequence once its generated text contains
        one (needs `tokenizer`); the ids returned include the token that completed it.
    compile: run the decode step through torch.compile (same tokens; compilation on the first call
        costs seconds; docs/benchmarks.md has what it gains).
    cuda_graphs: replay the decode step from a CUDA graph (cuda_graph.py; a model on a CUDA device,
        its MoE layers on the triton kernels); the prompt runs eagerly.
    Raises `sampling.NonFiniteLogits` if the model produces NaN or infinite logits.
    """
    input_ids, mask = _check_inputs(model, input_ids, attention_mask)
    plan = _plan(model, input_ids.device, **kwargs)
    new = []
    for tokens in _loop(model, input_ids, mask, plan):
        new.append(tokens)
        if callback is not None:
            callback(tokens)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)  # (B, L + steps)
