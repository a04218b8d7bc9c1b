"""Zero-shot classification with a two-tower model: class embeddings from prompt templates.

Each class's prompts are embedded, L2-normalised, averaged and re-normalised (CLIP's prompt ensembling);
an image's class is the one whose embedding has the highest cosine similarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmstack.errors import DataError

#: Sentence frames of the shapes world's captions; "{}" is a noun phrase such as "a large red circle".
WORLD_TEMPLATES: tuple[str, ...] = ("{}", "a picture of {}", "an image with {}", "there is {}", "one object: {}")


def ensemble_embeddings(per_class: list[torch.Tensor]) -> torch.Tensor:
    """Class embeddings ``(C, D)`` from each class's prompt embeddings ``(T_c, D)``: mean of the
    normalised prompt embeddings, re-normalised."""
    return torch.stack([F.normalize(F.normalize(e, dim=-1).mean(dim=0), dim=-1) for e in per_class])


def class_embeddings(model: Any, prompts: dict[str, list[str]], batch_size: int = 512) -> torch.Tensor:
    """``(C, D)`` class embeddings, in the order of ``prompts``' keys (one text batch for all prompts)."""
    from mmstack.eval.embed import embed_texts

    names = list(prompts)
    if any(not prompts[n] for n in names):
        raise DataError(f"class {next(n for n in names if not prompts[n])!r} has no prompts")
    flat = [p for n in names for p in prompts[n]]
    emb = embed_texts(model, flat, batch_size=batch_size, normalize=True, desc="embed prompts")
    sizes = [len(prompts[n]) for n in names]
    return ensemble_embeddings(list(emb.split(sizes)))


def prompts_from_templates(classes: list[str], templates: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``{class: [template.format(class) ...]}`` (open_clip's classnames x templates)."""
    return {c: [t.format(c) for t in templates] for c in classes}


def world_prompts(attribute: str, templates: tuple[str, ...] = WORLD_TEMPLATES) -> dict[str, list[str]]:
    """Prompts for a shapes-world attribute (shape, colour or size).

    The class word alone is not a caption the model saw, so each prompt is a full noun phrase in the
    world's own word order ("a large red circle"), ensembled over the other attributes' values.
    """
    from mmstack.world import COLOURS, SHAPES, SIZES
    from mmstack.world.language import article

    def phrases(shape: list[str], colour: list[str], size: list[str]) -> list[str]:
        words = [f"{z} {c} {s}" for z in size for c in colour for s in shape]
        return [f"{article(w)} {w}" for w in words]

    shapes, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    by_class = {
        "shape": {s: phrases([s], colours, sizes) for s in shapes},
        "colour": {c: phrases(shapes, [c], sizes) for c in colours},
        "size": {z: phrases(shapes, colours, [z]) for z in sizes},
    }
    if attribute not in by_class:
        raise DataError(f"zero-shot attribute must be shape, colour or size, got {attribute!r}")
    return {k: [t.format(p) for t in templates for p in v] for k, v in by_class[attribute].items()}


def evaluate_zeroshot(
    model: Any,
    data: str | Path,
    attribute: str = "shape",
    templates: tuple[str, ...] = WORLD_TEMPLATES,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot accuracy on the single-object scenes of a shapes-world folder, with a per-class report."""
    from mmstack.eval.classification import classification_report
    from mmstack.eval.data import attribute_labels, read_eval_pairs
    from mmstack.eval.embed import embed_images

    pairs = read_eval_pairs(data)
    index, labels, classes = attribute_labels(pairs, attribute)
    weights = class_embeddings(model, world_prompts(attribute, templates), batch_size)  # (C, D)
    img = embed_images(model, [pairs.images[i] for i in index], batch_size=batch_size)
    pred = (img @ weights.T).argmax(dim=1).tolist()
    report = classification_report(labels, pred, labels=list(range(len(classes))), target_names=classes)
    return {
        "attribute": attribute,
        "n": len(index),
        "n_prompts": sum(len(v) for v in world_prompts(attribute, templates).values()),
        "accuracy": report["accuracy"],
        "report": report,
    }
