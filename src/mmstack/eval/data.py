"""Evaluation data: image-text pairs plus, for the shapes world, each pair's ground-truth scene.

``DIR/scenes.jsonl`` (written by ``mmstack world generate``) gives every image its objects; two items whose
object sets are identical (shape, colour, size and cell of every object) show the same scene, so retrieval
counts either as a hit, and zero-shot / probe labels come from the objects' attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmstack.errors import DataError

ATTRIBUTES = ("shape", "colour", "size", "count")


@dataclass
class EvalPairs:
    """Pairs in file order; ``scenes[i]`` is pair i's scene record, or None without ``scenes.jsonl``."""

    images: list[Path]
    captions: list[str]
    ids: list[str]
    scenes: list[dict[str, Any]] | None

    def __len__(self) -> int:
        return len(self.images)


def read_eval_pairs(data: str | Path) -> EvalPairs:
    """Read the pairs in ``data`` (any layout ``read_pairs`` knows) and the scenes when the folder has them."""
    from mmstack.data.pairs import read_pairs

    pairs = read_pairs(data)
    if not pairs:
        raise DataError(f"{data} holds no image-text pairs; evaluate on a non-empty data set")
    ids = [str(p.id) if p.id is not None else str(i) for i, p in enumerate(pairs)]
    folder = Path(data) if Path(data).is_dir() else Path(data).parent if Path(data).name == "pairs.jsonl" else None
    scenes_path = folder / "scenes.jsonl" if folder is not None else None
    scenes = _read_scenes(scenes_path, ids) if scenes_path is not None and scenes_path.is_file() else None
    return EvalPairs([p.image for p in pairs], [p.caption for p in pairs], ids, scenes)


def _read_scenes(path: Path, ids: list[str]) -> list[dict[str, Any]]:
    by_id: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                by_id[str(rec["id"])] = rec
                _ = [(o["shape"], o["colour"], o["size"], o["cell"]) for o in rec["objects"]]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"line {lineno} of {path}: not a scene record ({err}); each line needs "
                    '{"id", "objects": [{"shape", "colour", "size", "cell"}, ...]}'
                ) from None
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"{path} has no scene for pair id {missing[0]!r} ({len(missing)} missing); regenerate the world"
        )
    return [by_id[i] for i in ids]


def scene_key(scene: dict[str, Any]) -> tuple:
    """What a scene shows, ignoring jitter and rotation: the sorted (shape, colour, size, cell) of its objects."""
    return tuple(sorted((o["shape"], o["colour"], o["size"], o["cell"]) for o in scene["objects"]))


def group_ids(keys: list[Any]) -> torch.Tensor:
    """``(N,)`` int64 ids, equal where ``keys`` are equal (first occurrence order)."""
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def scene_groups(data: EvalPairs) -> torch.Tensor:
    """Items showing the same scene share a group; without scenes every pair is its own group."""
    if data.scenes is None:
        return torch.arange(len(data))
    return group_ids([scene_key(s) for s in data.scenes])


def attribute_classes(attribute: str) -> list[str]:
    """Class names of a world attribute, in vocabulary order (count: "1".."4")."""
    from mmstack.world import COLOURS, SHAPES, SIZES

    classes = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES), "count": ["1", "2", "3", "4"]}
    if attribute not in classes:
        raise DataError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTES)}")
    return classes[attribute]


def attribute_labels(data: EvalPairs, attribute: str) -> tuple[list[int], list[int], list[str]]:
    """``(item indices, label ids, class names)`` for ``attribute``.

    shape/colour/size use single-object scenes (the only ones where the attribute has one value); count uses
    every scene.
    """
    classes = attribute_classes(attribute)
    if data.scenes is None:
        raise DataError(
            "labels come from the shapes world's scenes.jsonl, which this data folder lacks; "
            "evaluate on a folder written by `mmstack world generate`"
        )
    index, labels = [], []
    for i, scene in enumerate(data.scenes):
        objs = scene["objects"]
        if attribute == "count":
            value = str(len(objs))
        elif len(objs) == 1:
            value = objs[0][attribute]
        else:
            continue
        if value in classes:
            index.append(i)
            labels.append(classes.index(value))
    if not index:
        raise DataError(f"no scene has a single {attribute} to classify; use a world with single-object scenes")
    return index, labels, classes
