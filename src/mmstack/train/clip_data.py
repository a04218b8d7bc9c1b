"""Image-text pairs as pre-built tensors, so a training step costs tensor indexing and no PNG decoding.

Images are decoded and resized by the checkpoint's processor once and cached as uint8 ``(N, 3, H, W)``
in a file keyed by the data and the preprocessing; a batch turns them into normalised floats with one
fused multiply-add. Captions are tokenised once; when the data folder has the shapes world's
``scenes.jsonl``, every caption of a scene is kept and one is drawn per step (caption augmentation),
otherwise each image has its one caption. Random draws use the torch global RNG, which the trainer saves
and restores, so resumed runs see the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmstack.errors import DataError
from mmstack.utils.atomic import atomic_write_bytes
from mmstack.utils.progress import console

EMPTY_REGION = "an empty cell"  # the phrase of a cell without an object (region-text alignment)


@dataclass
class AugmentConfig:
    """Light, label-preserving augmentation of the training images.

    ``shift`` moves each image by up to that many pixels (edge pixels repeat); shapes-world captions name
    positions on a 3x3 grid, so only small shifts keep captions true. ``simclr_*`` set the two views for
    the SimCLR term: random resized crops keeping ``simclr_min_scale`` of the area, optional flips.
    """

    shift: int = 0
    simclr_min_scale: float = 0.5
    simclr_flip: bool = True


class PairTensors:
    """A ``BatchSource`` for the trainer: cached pixels, tokenised captions, optional augmentation."""

    def __init__(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        owner_offsets: torch.Tensor,
        mean: list[float],
        std: list[float],
        augment: AugmentConfig | None = None,
        views: bool = False,
        pairs: bool = True,
        twins: float = 0.0,
        regions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.pixels = pixels  # (N, 3, H, W) uint8; with twins (2N, ...): item i's twin at N + i
        self.input_ids, self.attention_mask = input_ids, attention_mask  # (C, L): C >= N captions
        self.offsets = owner_offsets  # (N + 1,): captions of item i are offsets[i]:offsets[i+1]
        self.counts = owner_offsets[1:] - owner_offsets[:-1]
        mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.mul, self.add = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.augment = augment or AugmentConfig()
        self.views, self.pairs = views, pairs
        self.twins = twins
        self.n = int(self.pixels.shape[0]) // (2 if twins > 0 else 1)
        self.regions = None  # (boxes (N', K, 4), targets (N', K)) for region-text alignment
        if regions is not None:
            boxes, targets = regions
            if len(boxes) == self.n and self.twins > 0:  # twins carry no region labels: ignored (-100)
                boxes, targets = torch.cat([boxes, boxes]), torch.cat([targets, torch.full_like(targets, -100)])
            self.regions = (boxes, targets)

    def __len__(self) -> int:
        return self.n

    def with_twins(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` with its last ``twins`` share replaced by the twins of its first items, so each of
        those scenes meets, in the same batch, the negative that differs from it in one attribute only."""
        k = min(round(len(indices) * self.twins), len(indices) // 2)
        if k == 0:
            return indices
        out = indices.clone()
        out[len(indices) - k :] = indices[:k] + self.n
        return out

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the processor's normalised float pixels."""
        return torch.addcmul(self.add, pixels.float(), self.mul)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.twins > 0:
            indices = self.with_twins(indices)
        raw = self.pixels[indices]
        out: dict[str, torch.Tensor] = {}
        if self.pairs:
            images = self.normalise(raw)
            out["pixel_values"] = shift_images(images, self.augment.shift) if self.augment.shift else images
            out.update(self._captions(indices))
            if self.regions is not None:
                out["region_boxes"], out["region_targets"] = self.regions[0][indices], self.regions[1][indices]
        if self.views:
            images = self.normalise(raw)
            out["view1"] = random_resized_crop(images, self.augment.simclr_min_scale, self.augment.simclr_flip)
            out["view2"] = random_resized_crop(images, self.augment.simclr_min_scale, self.augment.simclr_flip)
        return out

    def _captions(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        counts = self.counts[indices]
        pick = self.offsets[indices]
        if bool((counts > 1).any()):
            pick = pick + (torch.rand(len(indices)) * counts).long()
        ids, mask = self.input_ids[pick], self.attention_mask[pick]
        # Right padding only: trimming to the longest caption of the batch leaves the text features unchanged.
        width = int(mask.sum(1).max())
        return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


def shift_images(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] (edge pixels repeat)."""
    b, _, h, w = images.shape
    dy = torch.randint(-max_shift, max_shift + 1, (b, 1, 1))
    dx = torch.randint(-max_shift, max_shift + 1, (b, 1, 1))
    rows = (torch.arange(h).view(1, h, 1) - dy).clamp(0, h - 1).expand(b, h, w)  # (B, H, W)
    cols = (torch.arange(w).view(1, 1, w) - dx).clamp(0, w - 1).expand(b, h, w)
    flat = (rows * w + cols).view(b, 1, h * w).expand(-1, images.shape[1], -1)
    return images.flatten(2).gather(2, flat).view_as(images)


def random_resized_crop(images: torch.Tensor, min_scale: float, flip: bool) -> torch.Tensor:
    """SimCLR's random resized crop (+ horizontal flip), batched with one affine ``grid_sample``."""
    b = images.shape[0]
    scale = torch.empty(b).uniform_(min_scale, 1.0).sqrt()  # side fraction of the crop
    cx = (torch.rand(b) * 2 - 1) * (1 - scale)
    cy = (torch.rand(b) * 2 - 1) * (1 - scale)
    sx = scale * (torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if flip else 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, scale, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# -------------------------------------------------------------------------------------------- building


def scene_twins(data_dir: Path, ids: list[str | None], seed: int, all_captions: bool):
    """One hard-negative twin per scene (see ``mmstack.world.twins``), rendered as the world renders its
    images: ``(PIL images, captions per twin)``. Needs the shapes world's scenes.jsonl and world.json."""
    import random

    from mmstack.world import captions_for, render_scene
    from mmstack.world.scene import Scene
    from mmstack.world.twins import twin_scene
    from mmstack.world.vocab import derive_seed

    data_dir = Path(data_dir)
    if not (data_dir / "scenes.jsonl").is_file() or not (data_dir / "world.json").is_file():
        raise DataError(
            f"{data_dir}: data.twins needs a shapes-world folder (scenes.jsonl and world.json); "
            "set data.twins: 0 for other data"
        )
    world = json.loads((data_dir / "world.json").read_text(encoding="utf-8"))
    options, split = world.get("options", {}), world.get("split", "train")
    scenes = {}
    for line in (data_dir / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            scenes[str(rec["id"])] = rec
    images, captions = [], []
    for i, sid in enumerate(ids):
        rec = scenes.get(str(sid))
        if rec is None:
            raise DataError(f"{data_dir / 'scenes.jsonl'}: no scene with id {sid!r}; regenerate the world folder")
        rng = random.Random(derive_seed("twin", int(seed), i))
        twin = twin_scene(Scene.from_dict(rec), rng, split)
        w, h = int(rec["width"]), int(rec["height"])
        noise, rot, tex = float(options.get("noise", 0.0)), bool(options.get("rotation")), bool(options.get("texture"))
        images.append(render_scene(twin, w, h, noise, rot, tex, seed=rng.getrandbits(32)))
        caps = captions_for(twin, complete_only=not all_captions)
        captions.append(caps if all_captions else [rng.choice(caps)])
    return images, captions


def scene_captions(
    data_dir: Path, ids: list[str | None], shape_copies: int = 0, object_copies: int = 0
) -> list[list[str]] | None:
    """All captions of each scene from the shapes world's ``scenes.jsonl``, or None if it is absent/partial.

    ``shape_copies`` > 0 adds that many copies of each colour-free caption (``world.language.shape_captions``)
    to every scene's list, so they are drawn that much more often; ``object_copies`` the same for the
    one-object captions (``world.language.object_captions``)."""
    from mmstack.world.language import object_captions, shape_captions
    from mmstack.world.scene import Scene

    path = Path(data_dir) / "scenes.jsonl"
    if not path.is_file():
        return None
    by_id: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if isinstance(rec.get("captions"), list) and rec["captions"]:
                captions = [str(c) for c in rec["captions"]]
                if shape_copies or object_copies:
                    scene = Scene.from_dict(rec)
                    captions += shape_captions(scene) * shape_copies + object_captions(scene) * object_copies
                by_id[str(rec.get("id"))] = captions
    if not all(i is not None and str(i) in by_id for i in ids):
        return None
    return [by_id[str(i)] for i in ids]


def scene_regions(data_dir: Path, ids: list[str | None]) -> tuple[torch.Tensor, list[str], torch.Tensor] | None:
    """Grounded phrases for region-text alignment (``mmstack.models.regions``) from the shapes world's
    ``scenes.jsonl``: every image's 3 x 3 cells as boxes, each with the noun phrase of its object ("a small
    red circle") or ``EMPTY_REGION``. Returns ``(boxes (N, 9, 4), phrase pool, targets (N, 9))`` with targets
    indexing the pool, or None when the folder has no (complete) scenes.jsonl."""
    from mmstack.world.language import noun_phrase
    from mmstack.world.scene import Scene

    path = Path(data_dir) / "scenes.jsonl"
    if not path.is_file():
        return None
    by_id = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_id[str(rec.get("id"))] = rec
    if not all(i is not None and str(i) in by_id for i in ids):
        return None
    cells = torch.tensor([[c / 3, r / 3, (c + 1) / 3, (r + 1) / 3] for r in range(3) for c in range(3)])  # (9, 4)
    pool: dict[str, int] = {EMPTY_REGION: 0}
    targets = torch.zeros(len(ids), 9, dtype=torch.long)
    for k, sid in enumerate(ids):
        for obj in Scene.from_dict(by_id[str(sid)]).objects:
            targets[k, obj.row * 3 + obj.col] = pool.setdefault(noun_phrase(obj), len(pool))
    return cells.expand(len(ids), 9, 4).contiguous(), list(pool), targets


def cache_home() -> Path:
    """Where training caches live unless a recipe names a folder: ``$MMSTACK_CACHE`` or ``~/.cache/mmstack``."""
    return Path(os.environ.get("MMSTACK_CACHE", Path.home() / ".cache" / "mmstack"))


def cache_key(paths: list[Path], spec: dict[str, Any]) -> str:
    """A hash of the image files (path, size, mtime) and of the preprocessing that turns them into pixels."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_pixel_cache(path: Path, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        pixels = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    return pixels if isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and len(pixels) == n else None


def decode_all(paths: list[Path], to_uint8, threads: int = 2) -> torch.Tensor:
    """Decode and resize every image with ``to_uint8(path) -> (H, W, 3) uint8``; returns (N, 3, H, W)."""
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL releases the GIL while decoding
        arrays = list(pool.map(to_uint8, paths, chunksize=64))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"preprocessed images differ in size ({sorted(shapes)[:3]}); check the processor")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def cached_pixels(paths: list[Path], to_uint8, spec: dict[str, Any], cache_dir: Path | None) -> torch.Tensor:
    """The uint8 pixels of ``paths``, from ``cache_dir`` when an identical cache exists, else decoded and saved."""
    cache = Path(cache_dir) / f"pixels-{cache_key(paths, spec)}.pt" if cache_dir else None
    if cache is not None and (pixels := load_pixel_cache(cache, len(paths))) is not None:
        return pixels
    console.print(f"decoding {len(paths)} images once (cached as uint8 for the whole run)")
    pixels = decode_all(paths, to_uint8)
    if cache is not None:
        import io

        buf = io.BytesIO()
        torch.save(pixels, buf)
        atomic_write_bytes(cache, buf.getvalue())
    return pixels
