"""The CLIP recipe: train a two-tower model (CLIP / SigLIP loss, optional SimCLR term) on image-text pairs.

    cfg = load_config(ClipRecipeConfig, "configs/clip-demo.yaml", overrides=["train.lr=1e-3"])
    result = train_clip(cfg, data="world/train", out="models/clip", val="world/val")

Steps: read the pairs; train the caption tokenizer on the training captions (or take the processor of
``model.init_from``); build the model; cache the preprocessed pixels and tokens (``clip_data``); run the
shared trainer with ``ClipTask``; evaluate on ``val`` when given; save the checkpoint folder with
``save_pretrained`` (its model card holds the training config and the eval numbers), together with the
run's ``metrics.jsonl``, ``train_config.json`` and ``train_state/`` (so a longer run can continue).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmstack.config import to_dict
from mmstack.errors import ConfigError, DataError
from mmstack.train.checkpoint import RunInfo, RunResult, finish_run, work_dir
from mmstack.train.clip_data import (
    AugmentConfig,
    PairTensors,
    cache_home,
    cached_pixels,
    scene_captions,
    scene_regions,
    scene_twins,
)
from mmstack.train.clip_task import ClipTask
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.progress import console
from mmstack.utils.seeding import seed_everything


@dataclass
class ModelSection:
    """Which model to train: a named preset with overrides, or an existing checkpoint to fine-tune.

    ``overrides`` are ``TwoTowerConfig`` fields merged onto the preset (e.g. ``{"vision": {"patch_size": 16}}``).
    ``freeze_image`` / ``freeze_text`` keep a tower and its projection fixed (locked-image tuning, LiT).
    """

    preset: str = "shapes-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    freeze_image: bool = False
    freeze_text: bool = False

    def __post_init__(self) -> None:
        if self.freeze_image and self.freeze_text:
            raise ConfigError("model.freeze_image and model.freeze_text are both true: nothing would train")


@dataclass
class TokenizerSection:
    """The caption tokenizer trained on the training captions (ignored with ``model.init_from``)."""

    kind: Literal["wordlevel", "bpe"] = "wordlevel"
    vocab_size: int = 4096
    min_frequency: int = 1


@dataclass
class LossSection:
    """``type``: clip (softmax InfoNCE), siglip (sigmoid) or simclr (image-only NT-Xent pretraining).

    ``simclr_weight`` > 0 adds SimCLR on two augmented views to the clip/siglip loss. Hard negatives
    (``hard_negative_beta`` / ``hard_negative_topk``) are passed to the loss (see ``mmstack.models.losses``).
    ``scale_lr``: learning rate of the logit scale/bias (default: ``train.lr``; see ``ClipTask``).
    ``region_weight`` > 0 adds region-text alignment on the patch tokens (``mmstack.models.regions``) for
    data with grounded phrases (``data.cell_regions``), at the fixed ``region_temperature``.
    """

    type: Literal["clip", "siglip", "simclr"] = "clip"
    simclr_weight: float = 0.0
    simclr_temperature: float = 0.1
    hard_negative_beta: float = 0.0
    hard_negative_topk: int | None = None
    scale_lr: float | None = None
    region_weight: float = 0.0
    region_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.simclr_weight < 0 or self.simclr_temperature <= 0:
            raise ConfigError("loss.simclr_weight must be >= 0 and loss.simclr_temperature > 0")
        if self.region_weight < 0 or self.region_temperature <= 0:
            raise ConfigError("loss.region_weight must be >= 0 and loss.region_temperature > 0")


@dataclass
class DataSection:
    """``captions``: ``pair`` (the one caption per image) or ``all`` (every caption of the scene from the
    shapes world's scenes.jsonl, one drawn per step; falls back to ``pair`` for other data).
    ``cache_dir``: where preprocessed uint8 pixels are cached (default ``$MMSTACK_CACHE`` or
    ``~/.cache/mmstack``). ``text_buckets``: encode captions in that many length buckets (see ``ClipTask``).
    ``image_stats``: normalise pixels with the processor's mean/std (``processor``: CLIP's ImageNet-derived
    values) or with the per-channel mean/std of the training images (``data``, for a fresh model only;
    the values are stored in the checkpoint's processor, so evaluation and serving use them too).
    ``twins``: share of each batch given to hard-negative twins (shapes world only, at most 0.5): the last
    ``twins * batch`` items are replaced by twins of the first ones, each the same scene with one object's
    shape, colour, size or cell changed (``mmstack.world.twins``), rendered once at preparation.
    ``shape_captions``: with ``captions: all``, add that many copies of each scene's two colour-free captions
    (``mmstack.world.language.shape_captions``) to its list; colour identifies most scenes of a batch, so
    without them a small model learns shapes late. ``object_captions``: the same for captions naming one
    object of the scene by colour and shape (``mmstack.world.language.object_captions``), the form of a
    search query about a busy scene. ``cell_regions``: give every image its 3 x 3 cells with the phrase of
    each cell's object ("a small red circle", or "an empty cell") for region-text alignment (shapes world
    only; needs ``loss.region_weight`` > 0)."""

    captions: Literal["pair", "all"] = "all"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: str | None = None
    text_buckets: int = 1
    image_stats: Literal["processor", "data"] = "processor"
    twins: float = 0.0
    shape_captions: int = 0
    object_captions: int = 0
    cell_regions: bool = False

    def __post_init__(self) -> None:
        for name in ("shape_captions", "object_captions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0 (copies per scene), got {getattr(self, name)}")
        if not 0.0 <= self.twins <= 0.5:
            raise ConfigError(f"data.twins must be in [0, 0.5] (share of each batch), got {self.twins}")


@dataclass
class ClipRecipeConfig:
    """Everything ``mmstack train clip`` needs besides the data and output paths."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if self.data.cell_regions != (self.loss.region_weight > 0):
            raise ConfigError(
                "data.cell_regions and loss.region_weight go together: set both (region-text alignment) or neither"
            )
        if self.data.cell_regions and self.loss.type == "simclr":
            raise ConfigError("region-text alignment needs the text tower: use loss.type clip or siglip")


# ---------------------------------------------------------------------------------------------- data


def read_training_pairs(
    data: str | Path, mode: str, shape_copies: int = 0, object_copies: int = 0
) -> tuple[list[Path], list[list[str]]]:
    """Image paths and, per image, the captions to draw from (see ``DataSection``)."""
    from mmstack.data.pairs import read_pairs

    pairs = read_pairs(data)
    if not pairs:
        raise DataError(f"{data}: no image-text pairs found; check the path (a folder with pairs.jsonl, a .jsonl/.csv)")
    captions = (
        scene_captions(Path(data), [p.id for p in pairs], shape_copies, object_copies)
        if mode == "all" and Path(data).is_dir()
        else None
    )
    if captions is None:
        captions = [[p.caption] for p in pairs]
    return [p.image for p in pairs], captions


def read_regions(data: str | Path, cfg: ClipRecipeConfig) -> tuple[torch.Tensor, list[str], torch.Tensor] | None:
    """The grounded cell phrases of the training scenes when ``data.cell_regions`` asks for them."""
    if not cfg.data.cell_regions:
        return None
    from mmstack.data.pairs import read_pairs

    regions = scene_regions(Path(data), [p.id for p in read_pairs(data)]) if Path(data).is_dir() else None
    if regions is None:
        raise DataError(
            f"{data}: data.cell_regions needs a shapes-world folder with scenes.jsonl for every pair; "
            "set data.cell_regions: false and loss.region_weight: 0 for other data"
        )
    return regions


def build_dataset(
    processor: Any,
    images: list[Path],
    captions: list[list[str]],
    cfg: ClipRecipeConfig,
    twins: tuple[list[Any], list[list[str]]] | None = None,
    regions: tuple[torch.Tensor, list[str], torch.Tensor] | None = None,
) -> PairTensors:
    """Cached pixels + tokenised captions as a trainer ``BatchSource``.

    With ``data.image_stats: data`` the processor's mean/std are set here from the pixels (the processor is
    saved with the checkpoint, so evaluation uses the same values). ``twins`` (PIL images and captions, one
    per item, see ``DataSection.twins``) are appended after the items; ``regions`` (boxes, phrase pool, targets; see ``read_regions``)
    label each item's boxes for region-text alignment.
    """
    from mmstack.data.images import load_image

    def to_uint8(path: Path):
        return processor.image_to_uint8(load_image(path))

    spec = {"image": {k: v for k, v in to_dict(processor.image_config).items() if k not in ("mean", "std")}}
    pixels = cached_pixels(images, to_uint8, spec, _cache_dir(cfg))
    if cfg.data.image_stats == "data" and not cfg.model.init_from:
        processor.image_config = dataclasses.replace(processor.image_config, **pixel_stats(pixels))
    if twins is not None:
        twin_pixels = torch.from_numpy(np.stack([processor.image_to_uint8(im) for im in twins[0]]))
        pixels = torch.cat([pixels, twin_pixels.permute(0, 3, 1, 2)])  # (2N, 3, H, W)
        captions = [*captions, *twins[1]]
    flat = [c for cs in captions for c in cs]
    tokens = processor.text(flat)
    cut = int((tokens["attention_mask"].sum(1) >= processor.max_length).sum())
    if cut:
        console.print(
            f"[yellow]warning:[/] {cut} of {len(flat)} captions fill the {processor.max_length}-token context and "
            "may be cut; raise model.overrides.text.max_position_embeddings"
        )
    offsets = torch.tensor([0, *torch.tensor([len(cs) for cs in captions]).cumsum(0).tolist()])
    img = processor.image_config
    loss = cfg.loss
    return PairTensors(
        pixels,
        tokens["input_ids"],
        tokens["attention_mask"],
        offsets,
        list(img.mean),
        list(img.std),
        augment=cfg.data.augment,
        views=loss.type == "simclr" or loss.simclr_weight > 0,
        pairs=loss.type != "simclr",
        twins=cfg.data.twins if twins is not None else 0.0,
        regions=(regions[0], regions[2]) if regions is not None else None,
    )


def build_twins(data: str | Path, cfg: ClipRecipeConfig) -> tuple[list[Any], list[list[str]]] | None:
    """The hard-negative twins of the training scenes when ``data.twins`` asks for them."""
    if cfg.data.twins <= 0:
        return None
    from mmstack.data.pairs import read_pairs

    ids = [p.id for p in read_pairs(data)]
    console.print(f"rendering {len(ids)} hard-negative twins (data.twins={cfg.data.twins})")
    return scene_twins(Path(data), ids, cfg.train.seed, cfg.data.captions == "all")


def pixel_stats(pixels: torch.Tensor, max_images: int = 4096) -> dict[str, tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``(N, 3, H, W)`` pixels in [0, 1] (a deterministic subsample)."""
    step = max(1, len(pixels) // max_images)
    x = pixels[::step].float().div_(255.0).transpose(0, 1).reshape(3, -1)  # (3, N*H*W)
    std = x.std(dim=1).clamp_min(1e-3)
    return {"mean": tuple(round(float(v), 6) for v in x.mean(dim=1)), "std": tuple(round(float(v), 6) for v in std)}


def _cache_dir(cfg: ClipRecipeConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return cache_home() / "pixels"


# --------------------------------------------------------------------------------------------- model


def build_model(cfg: ClipRecipeConfig, captions: list[list[str]]):
    """A fresh model (preset + overrides, tokenizer trained on ``captions``) or the ``init_from`` checkpoint."""
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing.tokenizer import train_caption_tokenizer

    m = cfg.model
    pair_loss = "siglip" if cfg.loss.type == "siglip" else "clip"
    if m.init_from:
        model = TwoTowerModel.from_pretrained(m.init_from)
        if cfg.loss.type != "simclr" and model.config.loss_type != pair_loss:
            raise ConfigError(
                f"model.init_from {m.init_from} was trained with loss {model.config.loss_type!r}, "
                f"but loss.type is {cfg.loss.type!r}; use the same loss"
            )
    else:
        overrides = dict(m.overrides)
        if overrides.setdefault("loss_type", pair_loss) != pair_loss:
            raise ConfigError(
                f"model.overrides.loss_type={overrides['loss_type']!r} contradicts loss.type={cfg.loss.type!r}; "
                "set the loss in loss.type only"
            )
        config = TwoTowerConfig.from_preset(m.preset, overrides)
        tok = cfg.tokenizer
        texts = [c for cs in captions for c in cs]
        tokenizer = train_caption_tokenizer(
            texts, tok.vocab_size, tok.kind, max_length=config.context_length, min_frequency=tok.min_frequency
        )
        model = TwoTowerModel.from_config(config, default_processor(config, tokenizer))
    model.freeze(image=m.freeze_image, text=m.freeze_text)
    return model


def build_task(model: Any, cfg: ClipRecipeConfig, phrases: list[str] | None = None) -> ClipTask:
    """The contrastive task; under torch.distributed its losses gather features from every rank with
    gradients (open_clip's local loss + gather-with-grad), so the loss is the global batch's. ``phrases``:
    the region phrase pool (with ``loss.region_weight`` > 0)."""
    from mmstack.models.losses import ClipLoss, NTXentLoss, SigLipLoss
    from mmstack.models.regions import RegionTextLoss
    from mmstack.train.clip_task import RegionTerm
    from mmstack.train.sampler import DistInfo

    loss = cfg.loss
    dist = DistInfo.from_env()
    ranks = {"rank": dist.rank, "world_size": dist.world_size}
    hn = {"hard_negative_beta": loss.hard_negative_beta, "hard_negative_topk": loss.hard_negative_topk}
    pair = {
        "clip": lambda: ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, **ranks, **hn),
        "siglip": lambda: SigLipLoss(**ranks, **hn),
    }
    pair_loss = pair[loss.type]() if loss.type in pair else None
    views = loss.type == "simclr" or loss.simclr_weight > 0
    ntxent = NTXentLoss(temperature=loss.simclr_temperature, **ranks) if views else None
    regions = None
    if phrases is not None and loss.region_weight > 0:
        tokens = model.processor.text(phrases)
        width = int(tokens["attention_mask"].sum(1).max())
        regions = RegionTerm(
            RegionTextLoss(loss.region_temperature),
            loss.region_weight,
            tokens["input_ids"][:, :width],
            tokens["attention_mask"][:, :width],
        )
    return ClipTask(
        model,
        pair_loss,
        ntxent,
        loss.simclr_weight,
        text_buckets=cfg.data.text_buckets,
        scale_lr=loss.scale_lr,
        regions=regions,
    )


# -------------------------------------------------------------------------------------------- recipe


def train_clip(
    cfg: ClipRecipeConfig,
    data: str | Path,
    out: str | Path,
    val: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train per ``cfg`` on the pairs in ``data``; write the checkpoint folder ``out``; evaluate on ``val``.

    ``stop_after`` ends the run after that many steps with the schedule of the full run, keeping only the
    training state (a later call continues it); the checkpoint is written when ``train.max_steps`` is reached.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    images, captions = read_training_pairs(data, cfg.data.captions, cfg.data.shape_captions, cfg.data.object_captions)
    twins = build_twins(data, cfg)
    regions = read_regions(data, cfg)
    model = build_model(cfg, captions + (twins[1] if twins else []) + ([regions[1]] if regions else []))
    dataset = build_dataset(model.processor, images, captions, cfg, twins, regions)
    run_config = {**to_dict(cfg), "data_path": str(Path(data).resolve()), "tokenizer_sha": _tokenizer_hash(model)}
    work = work_dir(out)
    task = build_task(model, cfg, regions[1] if regions else None)
    trainer = Trainer(task, dataset, cfg.train, work, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    summary = trainer.fit(stop_at_step=stop_after)
    run = RunInfo("mmstack train clip", out, work, run_config, cfg.train.max_steps, t0, prepare_s, ("temperature",))
    return finish_run(
        model, summary, run, lambda: evaluate_retrieval(model, val, cfg.eval_batch_size) if val is not None else None
    )


def finished_checkpoint(out: str | Path, cfg: ClipRecipeConfig, data: str | Path) -> dict[str, Any] | None:
    """The training summary of ``out`` when it is a finished run of ``cfg`` on ``data``, else None.

    Lets a pipeline (the demo) reuse a checkpoint instead of training again with an unchanged config.
    """
    path = Path(out) / "config.json"
    if not path.is_file() or not (Path(out) / "train_config.json").is_file():
        return None
    try:
        saved = json.loads((Path(out) / "train_config.json").read_text())
        training = json.loads(path.read_text())["card"]["training"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    saved.pop("tokenizer_sha", None)
    wanted = json.loads(json.dumps({**to_dict(cfg), "data_path": str(Path(data).resolve())}, default=str))
    summary = training.get("summary") or {}
    return summary if saved == wanted and summary.get("steps") == cfg.train.max_steps else None


def evaluate_retrieval(model: Any, data: str | Path, batch_size: int = 512) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on the pairs in ``data`` (M's ``mmstack.eval`` runner)."""
    from mmstack.eval.retrieval import evaluate_retrieval as run

    model.eval()
    return run(model, data, batch_size=batch_size)


def _tokenizer_hash(model: Any) -> str:
    vocab = model.processor.tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
