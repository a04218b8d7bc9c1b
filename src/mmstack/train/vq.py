"""The VQ recipe: train the native model's image tokenizer (``mmstack.models.vq``) on a folder of images.

    cfg = load_config(VQRecipeConfig, "configs/vq-demo.yaml")
    result = train_vq(cfg, data="world/train", out="models/vq", val="world/val")

Steps: read the pairs (and the world's clip frames); decode the images once into a uint8 cache; initialise
the codebook by k-means over the encoder vectors of ``data.kmeans_images`` images; train with the shared
trainer (MSE + commitment; the codebook follows its EMA); evaluate reconstruction PSNR and codebook usage
over the whole validation set; save the checkpoint folder with the run files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmstack.config import to_dict
from mmstack.errors import DataError
from mmstack.eval.native import evaluate_reconstruction
from mmstack.models.vq import VQConfig, VQModel
from mmstack.train.checkpoint import RunInfo, RunResult, finish_run, work_dir
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.seeding import seed_everything


@dataclass
class VQDataSection:
    """``kmeans_images``: images whose encoder vectors seed the codebook; ``clips``: also train on the frames
    of the world's clips; ``max_images``: use at most this many training images (None: all);
    ``cache_dir``: where decoded pixels are cached (default ``$MMSTACK_CACHE`` or ``~/.cache/mmstack``)."""

    kmeans_images: int = 2000
    clips: bool = True
    max_images: int | None = None
    cache_dir: str | None = None


@dataclass
class VQRecipeConfig:
    """Everything ``mmstack train vq`` needs besides the data and output paths."""

    model: VQConfig = field(default_factory=VQConfig)
    data: VQDataSection = field(default_factory=VQDataSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=30, batch_size=32))


class PixelData:
    """A ``BatchSource`` of uint8 pixels (N, 3, H, W); a batch is floats in [0, 1]."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.pixels[indices].float().div_(255.0)


class VQTask(Task):
    """Reconstruction MSE + ``beta`` x commitment; the codebook itself is updated by its EMA in forward."""

    progress_keys = ("psnr", "restarts")

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.model(batch)
        mse = F.mse_loss(out.recon.float(), batch)
        loss = mse + self.model.config.beta * out.commit_loss
        metrics = {
            "mse": float(mse.detach()),
            "psnr": 10 * math.log10(1.0 / max(float(mse.detach()), 1e-10)),
            "commit": float(out.commit_loss.detach()),
            "restarts": float(self.model.quantizer.restarts),
        }
        return loss, metrics


# ---------------------------------------------------------------------------------------------- data


def image_paths(data: str | Path, clips: bool, max_images: int | None = None) -> list[Path]:
    """The training images of ``data`` (any pairs layout) plus, optionally, the frames of its clips."""
    from mmstack.data.pairs import read_pairs

    paths = [p.image for p in read_pairs(data)][:max_images]
    clip_file = Path(data) / "clips.jsonl"
    if clips and clip_file.is_file():
        for line in clip_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                paths += [Path(data) / f for f in json.loads(line)["frames"]]
    if not paths:
        raise DataError(f"{data}: no images found; pass a folder with pairs.jsonl (mmstack world generate)")
    return paths


def load_pixels(paths: list[Path], size: int, cache_dir: str | None) -> torch.Tensor:
    """uint8 (N, 3, size, size) pixels of ``paths``, decoded once and cached."""
    from mmstack.train.clip_data import cache_home, cached_pixels
    from mmstack.train.native_data import _to_uint8

    cache = Path(cache_dir) if cache_dir else cache_home()
    return cached_pixels(paths, lambda p: _to_uint8(p, size), {"vq_pixels": size}, cache / "pixels")


# -------------------------------------------------------------------------------------------- recipe


def train_vq(
    cfg: VQRecipeConfig,
    data: str | Path,
    out: str | Path,
    val: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train the tokenizer per ``cfg`` on the images of ``data``; write the checkpoint ``out``; evaluate on
    ``val`` (a pairs folder). ``stop_after`` stops early keeping the full schedule (a later call resumes)."""
    t0 = time.perf_counter()
    out = Path(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    size = cfg.model.image_size
    pixels = load_pixels(image_paths(data, cfg.data.clips, cfg.data.max_images), size, cfg.data.cache_dir)
    model = VQModel(cfg.model)
    work = work_dir(out)
    if not (resume and (work / "train_state").is_dir()):
        # k-means on the first images (the trainer restores the codebook when it resumes instead)
        model.init_codebook(pixels[: cfg.data.kmeans_images].float() / 255.0)
    run_config = {**to_dict(cfg), "data_path": str(Path(data).resolve())}
    trainer = Trainer(VQTask(model), PixelData(pixels), cfg.train, work, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    summary = trainer.fit(stop_at_step=stop_after)

    def evaluate() -> dict[str, Any] | None:
        if val is None:
            return None
        return evaluate_reconstruction(model, load_pixels(image_paths(val, clips=False), size, cfg.data.cache_dir))

    run = RunInfo("mmstack train vq", out, work, run_config, cfg.train.max_steps, t0, prepare_s)
    return finish_run(model, summary, run, evaluate)
