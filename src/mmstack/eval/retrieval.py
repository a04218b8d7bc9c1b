"""Image-text retrieval: recall@K in both directions, mean and median rank of the first relevant item.

A hit is any gallery item of the query's group: with the shapes world every item showing the same scene
(see ``mmstack.eval.data``), so several captions of one scene, or two renderings of it, all count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmstack.errors import DataError

KS = (1, 5, 10)


def first_hit_ranks(
    similarity: torch.Tensor, query_groups: torch.Tensor, gallery_groups: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """1-based rank of the best-scored relevant gallery item for every query.

    Args:
        similarity: ``(Q, G)`` scores, higher is better.
        query_groups, gallery_groups: ``(Q,)`` / ``(G,)`` group ids; relevant means equal ids.

    Returns:
        ``(Q,)`` float ranks: 1 + the number of gallery items scored strictly above the best relevant one
        (ties count for the query). Queries with no relevant item raise ``DataError``.
    """
    ranks = []
    for lo in range(0, similarity.shape[0], chunk):
        sim = similarity[lo : lo + chunk]
        relevant = query_groups[lo : lo + chunk, None] == gallery_groups[None, :]  # (q, G)
        if not relevant.any(dim=1).all():
            raise DataError("a query has no relevant item in the gallery; every group needs a gallery item")
        best = sim.masked_fill(~relevant, float("-inf")).max(dim=1).values  # (q,)
        ranks.append((sim > best[:, None]).sum(dim=1) + 1)
    return torch.cat(ranks).float()


def rank_metrics(ranks: torch.Tensor, prefix: str, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``{prefix}_r{k}`` for each k, ``{prefix}_mean_rank`` and ``{prefix}_median_rank``."""
    out = {f"{prefix}_r{k}": float((ranks <= k).float().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.mean())
    out[f"{prefix}_median_rank"] = float(ranks.quantile(0.5))
    return out


def retrieval_metrics(
    similarity: torch.Tensor,
    image_groups: torch.Tensor | None = None,
    text_groups: torch.Tensor | None = None,
    ks: tuple[int, ...] = KS,
) -> dict[str, float]:
    """Text->image (``t2i_*``) and image->text (``i2t_*``) metrics of an image-text similarity matrix.

    Args:
        similarity: ``(N_img, N_txt)`` scores.
        image_groups, text_groups: group id of each image / text; default: text i belongs to image i only.
    """
    n_img, n_txt = similarity.shape
    if image_groups is None:
        image_groups = torch.arange(n_img)
    if text_groups is None:
        if n_img != n_txt:
            raise ValueError(f"pass text_groups: {n_txt} texts for {n_img} images")
        text_groups = image_groups
    out = rank_metrics(first_hit_ranks(similarity.T, text_groups, image_groups), "t2i", ks)
    out.update(rank_metrics(first_hit_ranks(similarity, image_groups, text_groups), "i2t", ks))
    return out


def evaluate_retrieval(
    model: Any, data: str | Path, batch_size: int = 512, all_captions: bool = False
) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on the pairs in ``data``.

    Scene-level metrics (``t2i_r1`` ...; hits are items of the same scene) come first; ``pair_*`` metrics
    count only each caption's own image. ``all_captions`` queries with every caption of every scene
    (``scenes.jsonl``) instead of the one in ``pairs.jsonl``.
    """
    from mmstack.eval.data import read_eval_pairs, scene_groups
    from mmstack.eval.embed import embed_images, embed_texts

    pairs = read_eval_pairs(data)
    groups = scene_groups(pairs)
    texts, owners = pairs.captions, torch.arange(len(pairs))
    if all_captions:
        if pairs.scenes is None:
            raise DataError(f"{data} has no scenes.jsonl, so only its pair captions exist; drop all_captions")
        caps = [s.get("captions") or [c] for s, c in zip(pairs.scenes, pairs.captions, strict=True)]
        texts = [c for cs in caps for c in cs]
        owners = torch.repeat_interleave(torch.arange(len(pairs)), torch.tensor([len(cs) for cs in caps]))
    img = embed_images(model, pairs.images, batch_size=batch_size)
    txt = embed_texts(model, texts, batch_size=batch_size)
    sim = img @ txt.T  # (N_img, N_txt)
    out: dict[str, Any] = {"n_images": len(pairs), "n_texts": len(texts), "n_scenes": int(groups.max()) + 1}
    out["grouping"] = "scene" if pairs.scenes is not None else "pair"
    out.update(retrieval_metrics(sim, groups, groups[owners]))
    pair_level = retrieval_metrics(sim, torch.arange(len(pairs)), owners)
    out.update({f"pair_{k}": v for k, v in pair_level.items()})
    return out
