"""Muon for a model's hidden matrices and AdamW for the rest, stepped as one optimiser (``train.optimizer: muon``).

``torch.optim.Muon`` replaces each 2-D weight's momentum by its nearest semi-orthogonal matrix (a Newton-Schulz
iteration) before the update. As in Keller Jordan's recipe it takes only the hidden matrices: the ``nn.Linear``
weights inside the network. Embeddings (and weights tied to them), output heads, norms and biases stay on AdamW.
``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling, 0.2 * sqrt(max(fan_in, fan_out))) gives Muon's updates
AdamW's size, so both halves share the run's learning rate, weight decay and warmup + cosine schedule.

The two inner optimisers share this one's parameter-group dicts, so an LR scheduler stepping this optimiser
moves both; the checkpointed state holds both states. ``BatchedMuon`` is torch's Muon (same hyperparameters and
state) with one Newton-Schulz iteration per shape of matrix instead of one per matrix: torch's loop costs 23 ms
a step for the demo VLM's 30 matrices on 2 CPU cores, the batched form about 7 ms.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.optim._muon import _adjust_lr

_HEAD = re.compile(r"(^|\.)(lm_head|head|heads)(\.|$)")


def hidden_matrices(model: nn.Module) -> set[int]:
    """Ids of the trainable ``nn.Linear`` weights that are neither an output head nor tied to an embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _HEAD.search(name):
            continue
        weight = module.weight
        if weight.requires_grad and id(weight) not in embeddings:
            found.add(id(weight))
    return found


def newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch's Muon over a stack of matrices (..., m, n), in bfloat16."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose step orthogonalises all same-shape momenta in one batched iteration."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[tuple(p.shape)].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                update = torch.stack(bufs)
                if group["nesterov"]:
                    update = torch.stack(grads).lerp_(update, group["momentum"])
                ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                lr = group["lr"]
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                step_size = _adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape))  # torch's own per-shape scaling
                torch._foreach_add_(params, list(ortho.float().unbind(0)), alpha=-step_size)
        return loss


def _closure_loss(closure: Any) -> Any:
    """The loss a step's closure returns (re-evaluated with gradients on), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameters whose ids are in ``muon_ids``, AdamW (``betas``, ``eps``) on the others.

    ``groups`` carry their own ``weight_decay`` as for AdamW; each is split into a Muon and an AdamW group.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        muon_ids: set[int],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        momentum: float = 0.95,
    ) -> None:
        muon_groups, adamw_groups = [], []
        for group in groups:
            params = list(group["params"])
            muon = [p for p in params if id(p) in muon_ids]
            rest = [p for p in params if id(p) not in muon_ids]
            if muon:
                muon_groups.append({**group, "params": muon, "muon": True})
            if rest:
                adamw_groups.append({**group, "params": rest, "muon": False})
        if not muon_groups:
            raise ValueError("train.optimizer=muon found no hidden matrices to train (use adamw)")
        super().__init__(muon_groups + adamw_groups, {"lr": lr, "weight_decay": 0.0})
        # the inner optimisers take the very same group dicts: a scheduler's lr changes reach them
        self.muon = BatchedMuon(
            self.param_groups[: len(muon_groups)], lr=lr, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = (
            torch.optim.AdamW(self.param_groups[len(muon_groups) :], lr=lr, betas=betas, eps=eps)
            if adamw_groups
            else None
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = _closure_loss(closure)
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this optimiser state was not written by train.optimizer=muon")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        # loading gives the inner optimisers fresh group dicts: share them again
        self.param_groups[:] = self.muon.param_groups + (self.adamw.param_groups if self.adamw else [])
