"""AdamW (or Muon + AdamW) with decay/no-decay parameter groups and the linear-warmup + cosine LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norm weights (all 1-D) and the logit scale/bias get none.

    The same rule as open_clip's ``exclude``; used when a model has no ``param_groups`` helper of its own.

    Frozen parameters (``requires_grad=False``) are left out, so AdamW's decoupled decay cannot move them.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or any(key in name.lower() for key in NO_DECAY_NAMES)
        (no_decay if plain else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def trainable_groups(groups: list[dict]) -> list[dict]:
    """Drop frozen parameters and empty groups from ``groups`` (a helper's groups may list every parameter)."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            out.append({**g, "params": params})
    return out


def build_optimizer(
    groups: list[dict],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    kind: str = "adamw",
    model: nn.Module | None = None,
) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (each carries its own weight_decay); ``kind="muon"``: Muon on ``model``'s hidden
    matrices and AdamW on the rest (see ``mmstack.train.muon``)."""
    groups = trainable_groups(groups)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    if kind == "muon":
        from mmstack.train.muon import MuonAdamW, hidden_matrices

        if model is None:
            raise ValueError("train.optimizer=muon needs the model to find its hidden matrices")
        return MuonAdamW(groups, hidden_matrices(model), lr=lr, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warmup to 1, then cosine to ``min_lr_ratio``.

    Matches open_clip's ``cosine_lr``: warmup gives ``(step + 1) / warmup_steps`` so the first step already
    moves, and the cosine reaches its floor at ``max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping :func:`warmup_cosine` once per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, max_steps, min_lr_ratio)
    )
