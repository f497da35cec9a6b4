"""AdamW's parameter groups and the learning-rate schedule (linear warmup, then cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["lr_at", "make_optimizer", "param_groups"]

# Parameters that shape dynamics rather than features: decaying them towards 0 would change what the
# model computes (A_log -> A = -1, D -> no skip path), as Mamba's own training excludes them.
_NO_DECAY_SUFFIXES = ("A_log", ".D", "bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay for matrices and stacked experts; none for norms, biases, embeddings, A_log, D.

    The embedding is left out of decay because its rows for rare tokens get few gradients, and decay
    would shrink them towards zero between visits; a tied head is the same tensor, so it follows.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or name.endswith(_NO_DECAY_SUFFIXES) or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the learning rate is set each step from `lr_at`."""
    # foreach=False: the per-parameter loop gives the same numbers on plain and sharded parameters,
    # so a single process and an FSDP run take identical steps.
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        foreach=False,
    )


def lr_at(step: int, config: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): warmup to lr, cosine down to min_lr."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
