"""Region-text alignment: a dense objective that makes an image tower's patch tokens say what is where.

A CLIP trained on whole-image captions computes *what* is in an image in its pooled (CLS) token, but its
patch tokens need not hold the object at their location: on the shapes world a probe reads a cell's shape
from them at about 0.55 (8 shapes) while zero-shot shape from the CLS token is 0.81, and a bridge VLM reading
those tokens cannot bind shapes to places. RegionCLIP (Zhong et al., CVPR 2022) aligns pooled region features
with the text embeddings of a pool of concepts; here each training image carries boxes with phrases (the
shapes world: its 3 x 3 cells, "small red circle" or "nothing"), the patch tokens under each box are pooled
by overlap area, projected like the CLS token and classified against the text tower's embeddings of every
phrase in the pool (softmax cross-entropy at a fixed temperature).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def box_weights(boxes: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Pooling weights of boxes over a patch grid: ``(..., 4)`` boxes (x0, y0, x1, y1 in [0, 1]) ->
    ``(..., grid_h * grid_w)``, each patch weighted by the share of the box it covers (rows sum to 1; a
    box covering no patch gets zero weights)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    ex = torch.linspace(0, 1, grid_w + 1, device=boxes.device, dtype=boxes.dtype)
    ey = torch.linspace(0, 1, grid_h + 1, device=boxes.device, dtype=boxes.dtype)
    ox = (torch.minimum(x1[..., None], ex[1:]) - torch.maximum(x0[..., None], ex[:-1])).clamp_min(0)  # (..., gw)
    oy = (torch.minimum(y1[..., None], ey[1:]) - torch.maximum(y0[..., None], ey[:-1])).clamp_min(0)  # (..., gh)
    area = (oy[..., :, None] * ox[..., None, :]).flatten(-2)  # (..., gh * gw), row-major like the patches
    return area / area.sum(-1, keepdim=True).clamp_min(1e-12)


def pool_regions(tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` patch tokens on a square grid and ``(B, K, 4)`` boxes -> ``(B, K, D)`` region features."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"region pooling needs a square patch grid; got {tokens.shape[1]} patch tokens")
    weights = box_weights(boxes.to(tokens.dtype), side, side)  # (B, K, T)
    return weights @ tokens


class RegionTextLoss(nn.Module):
    """Each region must pick its phrase among all phrases of the pool (RegionCLIP's region-concept loss).

    ``forward(regions (R, D), phrases (P, D), targets (R,))``: features are normalised here; targets index
    the phrase pool, ``-100`` marks padding regions (ignored). ``temperature`` is fixed: the pool holds a
    hundred-odd short phrases, not a batch of captions, so the learnable image-text scale does not fit it.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, regions: torch.Tensor, phrases: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not bool((targets != IGNORE).any()):
            return regions.sum() * 0.0  # no labelled region in this batch (e.g. only twins): no signal
        logits = F.normalize(regions, dim=-1) @ F.normalize(phrases, dim=-1).T / self.temperature  # (R, P)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)
