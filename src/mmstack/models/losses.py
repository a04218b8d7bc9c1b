"""Contrastive losses for two-tower models: CLIP (InfoNCE), SigLIP (sigmoid) and SimCLR (NT-Xent).

Losses own the maths and the gathering of features across ranks; the model owns the learnable scale/bias
(so HF export and scoring work) and passes them in. ``logit_scale`` arguments are the *exp'd* scale (the
multiplier of cosine similarities), as in open_clip; models store its log.

Distributed training follows open_clip's ``ClipLoss(local_loss, gather_with_grad, rank, world_size)``:
with ``world_size > 1`` features are all-gathered (with gradients through ``torch.distributed.nn`` when
``gather_with_grad``), and the local rank's own features are put back so they keep their gradient.

Hard-negative mining (optional, off by default) follows Robinson et al., "Contrastive Learning with Hard
Negative Samples" (ICLR 2021): negatives are re-weighted by ``exp(beta * similarity)`` (weights normalised to
mean 1 per row, detached), and/or only the ``topk`` most similar negatives of each row are kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_LOG_SCALE = math.log(100.0)


# -------------------------------------------------------------------------------------- gathering


def gather_features(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool = False, keep_local_grad: bool = True
) -> torch.Tensor:
    """All-gather ``(B, D)`` features from every rank into ``(world_size * B, D)``, rank order.

    Args:
        with_grad: gather through ``torch.distributed.nn.all_gather`` so gradients flow to every rank.
        keep_local_grad: without ``with_grad``, put this rank's own tensor back so it keeps its gradient.
    """
    if world_size <= 1:
        return features
    import torch.distributed as dist

    if with_grad:
        import torch.distributed.nn  # the differentiable collectives live in this submodule

        return torch.cat(torch.distributed.nn.all_gather(features), dim=0)
    parts = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.contiguous())
    if keep_local_grad:
        parts[rank] = features
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------- hard negatives


def hard_negative_logits(
    logits: torch.Tensor, labels: torch.Tensor, beta: float = 0.0, topk: int | None = None
) -> torch.Tensor:
    """Re-weight the negatives of softmax ``logits`` ``(N, M)`` whose positive columns are ``labels``.

    Adding ``log w`` to a negative's logit multiplies its term in the softmax denominator by ``w``.
    ``beta > 0``: ``w ~ exp(beta * logit)`` normalised to mean 1 over the row's negatives (beta = 0 gives the
    plain loss). ``topk``: negatives outside the row's ``topk`` most similar ones are dropped.
    """
    if beta == 0 and not topk:
        return logits
    n, m = logits.shape
    pos = torch.zeros_like(logits, dtype=torch.bool)
    pos[torch.arange(n, device=logits.device), labels] = True
    with torch.no_grad():
        neg = logits.detach().masked_fill(pos, float("-inf"))
        keep = ~pos
        if topk and topk < m - 1:
            idx = neg.topk(topk, dim=1).indices
            keep = torch.zeros_like(pos).scatter_(1, idx, True) & ~pos
        log_w = torch.zeros_like(logits)
        if beta:
            scores = (beta * neg).masked_fill(~keep, float("-inf"))
            n_neg = keep.sum(dim=1, keepdim=True).clamp(min=1)
            log_w = torch.log_softmax(scores, dim=1) + n_neg.log()  # mean weight 1 over kept negatives
        log_w = log_w.masked_fill(~keep, float("-inf")).masked_fill(pos, 0.0)
    return logits + log_w


def hard_negative_weights(
    logits: torch.Tensor, positives: torch.Tensor, beta: float = 0.0, topk: int | None = None
) -> torch.Tensor:
    """Per-pair weights for an element-wise (sigmoid) loss: 1 on positives, hardness weights on negatives."""
    with torch.no_grad():
        neg = logits.detach().masked_fill(positives, float("-inf"))
        keep = ~positives
        if topk and topk < logits.shape[1] - 1:
            idx = neg.topk(topk, dim=1).indices
            keep = torch.zeros_like(positives).scatter_(1, idx, True) & ~positives
        w = keep.float()
        if beta:
            scores = (beta * neg).masked_fill(~keep, float("-inf"))
            w = torch.softmax(scores, dim=1).nan_to_num(0.0) * keep.sum(dim=1, keepdim=True)
        return w.masked_fill(positives, 1.0)


# ------------------------------------------------------------------------------------------ losses


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over an image-text batch (CLIP).

    Args:
        local_loss: with several ranks, score only local rows against all columns (less memory).
        gather_with_grad: all-gather with gradients (exact big-batch gradients across ranks).
        cache_labels: keep the label tensor between calls of the same size.
        rank, world_size: this process's place in ``torch.distributed``.
        hard_negative_beta, hard_negative_topk: hard-negative mining (module docstring); off by default.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        hard_negative_beta: float = 0.0,
        hard_negative_topk: int | None = None,
    ) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.hard_negative_beta, self.hard_negative_topk = hard_negative_beta, hard_negative_topk
        self._labels: dict[tuple[torch.device, int], torch.Tensor] = {}

    def labels(self, device: torch.device, n: int) -> torch.Tensor:
        key = (device, n)
        if key in self._labels:
            return self._labels[key]
        labels = torch.arange(n, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + n * self.rank
        if self.cache_labels:
            self._labels = {key: labels}
        return labels

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image, logits_per_text)`` over the gathered batch."""
        if self.world_size > 1:
            all_img = gather_features(image_features, self.rank, self.world_size, self.gather_with_grad)
            all_txt = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
            if self.local_loss:
                return logit_scale * image_features @ all_txt.T, logit_scale * text_features @ all_img.T
            per_image = logit_scale * all_img @ all_txt.T
            return per_image, per_image.T
        return logit_scale * image_features @ text_features.T, logit_scale * text_features @ image_features.T

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean of image->text and text->image cross-entropy; features ``(B, D)``, normalised by the caller."""
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        labels = self.labels(image_features.device, per_image.shape[0])
        beta, topk = self.hard_negative_beta, self.hard_negative_topk
        per_image = hard_negative_logits(per_image, labels, beta, topk)
        per_text = hard_negative_logits(per_text, labels, beta, topk)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss over all image-text pairs (SigLIP, Zhai et al. 2023): -sum log sigmoid(z * y) / B.

    With several ranks, this rank's images are scored against every rank's texts (gathered with
    gradients); pairs across ranks are negatives only, as open_clip's ``dist_impl="gather"``.

    Args:
        rank, world_size: this process's place in ``torch.distributed``.
        hard_negative_beta, hard_negative_topk: hard-negative mining (module docstring); off by default.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        hard_negative_beta: float = 0.0,
        hard_negative_topk: int | None = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.hard_negative_beta, self.hard_negative_topk = hard_negative_beta, hard_negative_topk

    def _pair_loss(self, img: torch.Tensor, txt: torch.Tensor, scale: Any, bias: Any, positives: bool) -> torch.Tensor:
        logits = scale * img @ txt.T + bias  # (B, B)
        pos = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
        if not positives:
            pos = torch.zeros_like(pos)
        signs = pos.to(logits.dtype) * 2 - 1  # +1 on matching pairs, -1 elsewhere
        terms = -F.logsigmoid(signs * logits)
        if self.hard_negative_beta or self.hard_negative_topk:
            terms = terms * hard_negative_weights(logits, pos, self.hard_negative_beta, self.hard_negative_topk)
        return terms.sum() / img.shape[0]

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float,
    ) -> torch.Tensor:
        """Features ``(B, D)`` (normalised by the caller); ``logit_scale`` exp'd; ``logit_bias`` as is."""
        loss = self._pair_loss(image_features, text_features, logit_scale, logit_bias, positives=True)
        if self.world_size > 1:
            all_txt = gather_features(text_features, self.rank, self.world_size, with_grad=True)
            for r, txt in enumerate(all_txt.chunk(self.world_size)):
                if r != self.rank:
                    loss = loss + self._pair_loss(image_features, txt, logit_scale, logit_bias, positives=False)
        return loss


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent: each view must pick its partner among the other 2B - 1 views.

    Args:
        temperature: used when ``forward`` gets no ``logit_scale`` (SimCLR's default 0.1).
        rank, world_size: gather both views from every rank (with gradients) when ``world_size > 1``.
    """

    def __init__(self, temperature: float = 0.1, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.rank, self.world_size = temperature, rank, world_size

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor, logit_scale: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """``z1``, ``z2``: ``(B, D)`` embeddings of two views of the same B images (normalised here)."""
        z1 = gather_features(F.normalize(z1, dim=-1), self.rank, self.world_size, with_grad=True)
        z2 = gather_features(F.normalize(z2, dim=-1), self.rank, self.world_size, with_grad=True)
        scale = 1.0 / self.temperature if logit_scale is None else logit_scale
        z = torch.cat([z1, z2])  # (2B, D)
        logits = scale * z @ z.T  # (2B, 2B)
        logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
        b = z1.shape[0]
        targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
        return F.cross_entropy(logits, targets)


# ------------------------------------------------------------------------------- optimiser helpers


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, max_log: float = MAX_LOG_SCALE, min_log: float = 0.0) -> None:
    """Clamp ``model.logit_scale`` (a log scale) to ``[min_log, max_log]`` in place; call after every step."""
    model.logit_scale.clamp_(min_log, max_log)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter is exempt from weight decay: logit scale/bias, biases, norms, 1-d tensors.

    The rule is open_clip's (``p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in name``), written for HF names.
    """
    return (
        param.ndim < 2
        or name.endswith(".bias")
        or "logit_scale" in name
        or "logit_bias" in name
        or "norm" in name
        or "layrnorm" in name  # HF CLIP's "pre_layrnorm"
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices, none on the rest (see ``no_weight_decay``).

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
