"""Per-request sampling: the next token of one sequence from its logits, with its own settings and RNG.

The order is `pyjamba.generate`'s (transformers'): repetition penalty, then temperature, top-k, top-p,
min-p and a multinomial draw, with generate's own warper functions, so a request with a seed draws
the same tokens as `generate(..., do_sample=True, seed=seed)`. The OpenAI extras come first, as in
vLLM: `logit_bias` added to the logits, then frequency and presence penalties on the tokens generated
so far. Temperature 0 is greedy (after the penalties), as is one under `GREEDY_BELOW`. A structured
output's mask (`allowed`, constrain.py) comes last before the pick: tokens outside it get -inf, so
greedy, temperature, top-k/p, min-p and logit_bias all choose among the allowed tokens only.
`SamplingParams` (pyjamba.sampling) has already checked every setting; logits that are not finite
raise `NonFiniteLogits` (the engine then fails that request alone).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from ..generate import apply_repetition_penalty, warp
from ..sampling import SamplingParams, check_logits

__all__ = ["Sampler", "SamplingParams", "TokenLogprob", "logprobs_of"]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before any sampling setting) and the top ones."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For each row of logits (T, V) float32, the log-probability of tokens[t] (T,) and the `top` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
    best_values = best_ids = None
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)  # (T, top)
        best_values, best_ids = values.tolist(), ids.tolist()
    out = []
    for t, token in enumerate(tokens.tolist()):
        alternatives = () if best_ids is None else tuple(zip(best_ids[t], best_values[t], strict=True))
        out.append(TokenLogprob(token, chosen[t], alternatives))
    return out


class Sampler:
    """Picks one sequence's tokens: its settings, its generator, and what it has seen so far."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int) -> None:
        params.check_vocab(vocab_size)
        self.params = params
        self.sample = not params.greedy
        # A request without a seed still gets its own generator, so the global RNG is left alone.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size)
            for token, value in params.logit_bias.items():
                self.bias[token] = value
        self.seen = None
        if params.repetition_penalty != 1.0:  # prompt and generated tokens, as generate
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool)
            self.seen[0, prompt] = True
        self.counts = None
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:  # generated tokens only
            self.counts = torch.zeros(1, vocab_size)

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """The next token from one row of float32 logits (1, V); `allowed` (1, V) bool: the only
        tokens it may be (a structured output's mask)."""
        check_logits(logits)
        if allowed is not None and not bool(allowed.any()):
            raise ValueError("the output format allows no token here")
        p = self.params
        scores = logits
        if self.bias is not None:
            scores = scores + self.bias.to(scores.device)
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen.to(scores.device), p.repetition_penalty)
        if self.counts is not None:
            counts = self.counts.to(scores.device)
            scores = (
                scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(scores.dtype)
            )
        if allowed is not None:
            scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        if not self.sample:
            return int(scores.argmax(dim=-1))
        scores = warp(scores, p.temperature, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))

    def observe(self, token: int) -> None:
        """Record a token the sequence produced."""
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
