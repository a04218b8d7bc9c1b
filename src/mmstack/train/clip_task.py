"""The contrastive task: CLIP / SigLIP / SimCLR losses over the FULL batch, even with gradient accumulation.

A contrastive loss couples every sample with every other one, so plain accumulation (loss per chunk) would
shrink the batch the loss sees. ``ClipTask.train_step`` follows open_clip's ``accum_freq``: a first pass
without gradients caches the features of every chunk; then, per chunk, the features are recomputed with
gradients and substituted into the cache, the loss is taken over the whole batch and back-propagated.
Each chunk's backward thus carries exactly its share of the big-batch gradient. One fix over open_clip:
the learnable scale/bias enter with gradients in the first chunk only, so their gradient is counted once
(open_clip accumulates it ``accum_freq`` times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.train.task import Task

Features = dict[str, torch.Tensor]


@dataclass
class RegionTerm:
    """The region-text alignment term (``mmstack.models.regions``): its loss, weight and the tokenised
    phrase pool that batches' ``region_targets`` index (encoded by the text tower at every step)."""

    loss: nn.Module
    weight: float
    phrase_ids: torch.Tensor  # (P, L)
    phrase_mask: torch.Tensor  # (P, L)


class ClipTask(Task):
    """Pairs a two-tower model with its contrastive loss(es).

    Args:
        model: a ``TwoTowerModel`` (``encode_image``/``encode_text``, ``logit_scale``, ``logit_bias``).
        loss: ``ClipLoss`` (``loss(img, txt, scale)``) or ``SigLipLoss`` (``loss(img, txt, scale, bias)``),
            or None for image-only SimCLR pretraining.
        ntxent: an ``NTXentLoss`` for SimCLR on two augmented views (batches then carry ``view1``/``view2``);
            it uses its own fixed temperature.
        simclr_weight: weight of the SimCLR term added to the image-text loss.
        text_buckets: encode captions in this many length buckets, each trimmed to its longest caption
            (CLIP's causal text tower pools at the end token, so right padding never changes a feature;
            on shapes-world captions 4 buckets cut text tokens by a third). Ignored for SigLIP text
            towers, which pool the last position and need fixed-length padding.
        scale_lr: learning rate of ``logit_scale``/``logit_bias`` (None: the base rate). Adam moves a
            parameter by about the learning rate per step, so in a few hundred steps at 1e-3 the log scale
            can hardly leave its initial value; a larger rate lets the temperature adapt as in long runs.
        max_log_scale: clamp of ``logit_scale`` after every optimiser step (ln 100, as CLIP).
        regions: a ``RegionTerm`` adding region-text alignment on the patch tokens for batches that carry
            ``region_boxes``/``region_targets``; with gradient accumulation each chunk's region loss is
            its own (it couples no samples), weighted by the chunk's share of the labelled regions.
    """

    progress_keys = ("temperature",)

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | None,
        ntxent: nn.Module | None = None,
        simclr_weight: float = 0.0,
        text_buckets: int = 1,
        scale_lr: float | None = None,
        max_log_scale: float = 4.605170185988092,
        regions: RegionTerm | None = None,
    ) -> None:
        super().__init__(model)
        if loss is None and ntxent is None:
            raise ValueError("ClipTask needs an image-text loss, an NT-Xent loss, or both")
        self.pair_loss, self.ntxent = loss, ntxent
        self.simclr_weight = simclr_weight if loss is not None else 1.0
        self.max_log_scale, self.scale_lr = max_log_scale, scale_lr
        causal_text = getattr(getattr(model, "config", None), "backbone", "clip") == "clip"
        self.text_buckets = max(1, text_buckets) if causal_text else 1
        self.uses_bias = loss is not None and getattr(model, "logit_bias", None) is not None
        if regions is not None and loss is None:
            raise ValueError("region-text alignment needs an image-text loss (it uses the text tower)")
        self.regions = regions
        self.last_region_loss: float | None = None

    # ------------------------------------------------------------------------------------ features

    def features(self, batch: dict[str, Any]) -> Features:
        """Normalised embeddings of one chunk: ``image``/``text`` and, for SimCLR, ``view1``/``view2``."""
        m = self.model
        out: Features = {}
        with self.autocast():
            if self.pair_loss is not None and self.regions is not None and "region_targets" in batch:
                pooled, patches = m.encode_image_tokens(batch["pixel_values"])
                out["image"] = F.normalize(pooled, dim=-1)
                out["region"] = self.region_loss(patches, batch["region_boxes"], batch["region_targets"])
                out["text"] = self.encode_text(batch["input_ids"], batch.get("attention_mask"))
            elif self.pair_loss is not None:
                out["image"] = m.encode_image(batch["pixel_values"], normalize=True)
                out["text"] = self.encode_text(batch["input_ids"], batch.get("attention_mask"))
            if self.ntxent is not None:
                out["view1"] = m.encode_image(batch["view1"], normalize=True)
                out["view2"] = m.encode_image(batch["view2"], normalize=True)
        return {k: v.float() for k, v in out.items()}

    def region_loss(self, patches: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The region-text loss of one chunk: its boxes pooled from the patch embeddings, against the pool."""
        from mmstack.models.regions import pool_regions

        term = self.regions
        regions = pool_regions(patches, boxes).flatten(0, 1)  # (B * K, D)
        phrases = self.encode_text(term.phrase_ids.to(patches.device), term.phrase_mask.to(patches.device))
        return term.loss(regions.float(), phrases.float(), targets.flatten().to(patches.device))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Normalised text features, computed per length bucket (see ``text_buckets``)."""
        m = self.model
        if self.text_buckets == 1 or attention_mask is None or len(input_ids) < 2 * self.text_buckets:
            return m.encode_text(input_ids, attention_mask, normalize=True)
        lengths = attention_mask.sum(1)
        order = lengths.argsort(stable=True)
        parts = []
        for idx in order.tensor_split(self.text_buckets):
            width = int(lengths[idx].max())
            parts.append(m.encode_text(input_ids[idx, :width], attention_mask[idx, :width], normalize=True))
        return torch.cat(parts)[order.argsort()]  # back to batch order

    def full_loss(self, feats: Features, with_scale_grad: bool = True) -> torch.Tensor:
        """The loss of the whole batch from its (possibly partly cached) features."""
        m = self.model
        scale = m.logit_scale if with_scale_grad else m.logit_scale.detach()
        total = feats[next(iter(feats))].new_zeros(())
        if self.pair_loss is not None:
            if self.uses_bias:
                bias = m.logit_bias if with_scale_grad else m.logit_bias.detach()
                total = total + self.pair_loss(feats["image"], feats["text"], scale.exp(), bias)
            else:
                total = total + self.pair_loss(feats["image"], feats["text"], scale.exp())
        if "region" in feats:
            self.last_region_loss = float(feats["region"].detach())
            total = total + self.regions.weight * feats["region"]
        if self.ntxent is not None and self.simclr_weight > 0:
            # SimCLR keeps its own fixed temperature: the image-text scale is tuned for another task.
            total = total + self.simclr_weight * self.ntxent(feats["view1"], feats["view2"])
        return total

    # ---------------------------------------------------------------------------------------- steps

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """Forward + backward of one optimiser step; the loss always sees every chunk's features."""
        if len(micro_batches) == 1:
            loss = self.forward_pass(lambda b: self.full_loss(self.features(b)), micro_batches[0])
            loss.backward()
        else:
            loss = self._cached_step(micro_batches)
        region = {"region_loss": self.last_region_loss} if self.last_region_loss is not None else {}
        return {"loss": float(loss.detach()), **region, **self._scale_metrics()}

    def _cached_step(self, micro_batches: list[dict[str, Any]]) -> torch.Tensor:
        with torch.no_grad():
            cache = [self.forward_pass(self.features, b) for b in micro_batches]
        shares = self._region_shares(micro_batches)
        loss = None
        for j, batch in enumerate(micro_batches):
            chunk_loss = self.forward_pass(self._chunk_loss, j, batch, cache, shares[j])
            chunk_loss.backward()
            loss = chunk_loss if loss is None else loss
        if "region" in cache[0]:
            self.last_region_loss = float(sum(float(c["region"]) * w for c, w in zip(cache, shares, strict=True)))
        return loss

    @staticmethod
    def _region_shares(micro_batches: list[dict[str, Any]]) -> list[float]:
        """Each chunk's share of the labelled regions: the region loss is a mean over all of them."""
        from mmstack.models.regions import IGNORE

        if "region_targets" not in micro_batches[0]:
            return [0.0] * len(micro_batches)
        counts = [int((b["region_targets"] != IGNORE).sum()) for b in micro_batches]
        return [c / max(1, sum(counts)) for c in counts]

    def _chunk_loss(self, j: int, batch: dict[str, Any], cache: list[Features], share: float) -> torch.Tensor:
        """The full-batch loss with chunk ``j``'s features recomputed with gradients; the region term
        (which couples no samples) is chunk ``j``'s own, weighted by its ``share`` of the regions."""
        fresh = self.features(batch)
        merged = {
            k: torch.cat([fresh[k] if i == j else c[k] for i, c in enumerate(cache)]) for k in fresh if k != "region"
        }
        if "region" in fresh:
            merged["region"] = fresh["region"] * share
        return self.full_loss(merged, with_scale_grad=j == 0)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The model's groups, with the logit scale/bias in a group of their own when ``scale_lr`` is set."""
        groups = super().param_groups(weight_decay)
        if self.scale_lr is None:
            return groups
        scalars = [p for p in (self.model.logit_scale, getattr(self.model, "logit_bias", None)) if p is not None]
        ids = {id(p) for p in scalars}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        trainable = [p for p in scalars if p.requires_grad]
        extra = [{"params": trainable, "weight_decay": 0.0, "lr": self.scale_lr}] if trainable else []
        return [g for g in rest if g["params"]] + extra

    def after_step(self) -> None:
        """Clamp the log scale to [0, ln 100] after every optimiser step (CLIP paper, open_clip)."""
        from mmstack.models.losses import clamp_logit_scale_

        clamp_logit_scale_(self.model, self.max_log_scale)

    def _scale_metrics(self) -> dict[str, float]:
        scale = float(self.model.logit_scale.detach().exp())
        out = {"scale": scale, "temperature": 1.0 / scale}
        if self.uses_bias:
            out["bias"] = float(self.model.logit_bias.detach())
        return out
