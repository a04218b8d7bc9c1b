"""The native recipe: train one decoder over text and image codes on a mixture of tasks.

    cfg = load_config(NativeRecipeConfig, "configs/native-demo.yaml")
    result = train_native(cfg, data="world/train", tokenizer="models/vq", out="models/native", val="world/val")

Steps: read pairs, scene captions and clips (``native_data``); train the caption tokenizer on every caption;
tokenize images and clip frames once with the frozen VQ tokenizer (cached); build the decoder over the
unified vocabulary; run the shared trainer with ``NativeTask`` on the mixture (text->image, image->text,
clip->text, text->clip) with condition dropout; evaluate on ``val`` (``mmstack.eval.native``); save the
checkpoint folder (decoder, caption tokenizer, a copy of the VQ tokenizer, run files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mmstack.config import to_dict
from mmstack.errors import ConfigError
from mmstack.eval.native import NativeEvalConfig, evaluate_native
from mmstack.models.native import NativeConfig, NativeModel
from mmstack.models.vq import VQModel
from mmstack.processing.native_tokens import TASKS, NativeVocab
from mmstack.train.checkpoint import RunInfo, RunResult, finish_run, work_dir
from mmstack.train.native_data import NativeData, NativeRecords, read_native_data, tokenize_visuals, vq_fingerprint
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.seeding import seed_everything

PROMPT_MODES = ("canonical", "complete", "all", "pair")


@dataclass
class NativeDataSection:
    """The task mixture and how examples are drawn.

    ``mix``: items per task per epoch, as a multiple of the number of images (t2i, i2t, t2v, v2t).
    ``p_uncond``: condition dropout of generation examples (5-10% gives guidance its unconditional branch).
    ``prompts``: which captions prompt generation: ``canonical`` (the scene's first caption, the same one
    captioning writes), or ``complete``, ``all``, ``pair`` (see ``native_data``).
    ``clip_frames``: frames per clip (evenly spaced). ``cache_dir``: where codes are cached.
    ``train_visual``: captioning examples also train their image/clip block as an unconditional image.
    """

    mix: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "i2t": 1.0})
    p_uncond: float = 0.1
    prompts: str = "complete"
    clip_frames: int = 4
    train_visual: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(TASKS)
        if unknown:
            raise ConfigError(f"data.mix has unknown task(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
        if any(v < 0 for v in self.mix.values()) or not any(v > 0 for v in self.mix.values()):
            raise ConfigError(f"data.mix weights must be >= 0 with at least one > 0, got {self.mix}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"data.p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.prompts not in PROMPT_MODES:
            raise ConfigError(f"data.prompts must be one of {', '.join(PROMPT_MODES)}, got {self.prompts!r}")
        if self.clip_frames < 1:
            raise ConfigError(f"data.clip_frames must be >= 1, got {self.clip_frames}")


@dataclass
class NativeLossSection:
    """Per-modality loss weights: ``text`` (caption words, <eos>, <boi>, ...) and ``image`` (codes, <eol>,
    <eoi>, in images and clip frames). The loss is the weighted sum over trained tokens / their count."""

    text: float = 1.0
    image: float = 1.0

    def __post_init__(self) -> None:
        if self.text < 0 or self.image < 0 or self.text + self.image <= 0:
            raise ConfigError(f"loss weights must be >= 0 and not both 0, got text={self.text}, image={self.image}")


@dataclass
class NativeRecipeConfig:
    """Everything ``mmstack train native`` needs besides the data, tokenizer and output paths."""

    model: NativeConfig = field(default_factory=NativeConfig)
    tokenizer_vocab_size: int = 4096
    data: NativeDataSection = field(default_factory=NativeDataSection)
    loss: NativeLossSection = field(default_factory=NativeLossSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, warmup_steps=30, batch_size=64))
    eval: NativeEvalConfig = field(default_factory=NativeEvalConfig)


class NativeTask(Task):
    """Next-token cross-entropy on the target tokens of each sequence, weighted per modality.

    A batch is ``{"image": group, "clip": group}`` (see ``NativeData.batch``); each group is one forward pass.
    """

    progress_keys = ("loss_text", "loss_image")

    def __init__(self, model: NativeModel, text_weight: float = 1.0, image_weight: float = 1.0) -> None:
        super().__init__(model)
        self.text_weight, self.image_weight = text_weight, image_weight

    def loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        vocab = self.model.vocab
        total, count = 0.0, 0
        sums = {"text": [0.0, 0], "image": [0.0, 0]}
        for group in batch.values():
            ids = group["input_ids"].to(self.device)
            mask = group["target_mask"][:, 1:].to(self.device)  # token t+1 is predicted at position t
            at = F.pad(mask, (0, 1))  # positions whose next token is a target: the head runs only there
            out = self.model(ids, attention_mask=group["attention_mask"].to(self.device), logits_mask=at)
            targets = ids[:, 1:][mask]
            ce = F.cross_entropy(out.logits, targets, reduction="none")  # (N,)
            is_image = vocab.is_code(targets) | (targets == vocab.eol) | (targets == vocab.eoi)
            weights = torch.where(is_image, self.image_weight, self.text_weight)
            total = total + (weights * ce).sum()
            count += len(targets)
            for name, sel in (("image", is_image), ("text", ~is_image)):
                sums[name][0] += float(ce[sel].detach().sum())
                sums[name][1] += int(sel.sum())
        metrics = {f"loss_{k}": s / n for k, (s, n) in sums.items() if n}
        return total / max(count, 1), metrics

    def batch_size_of(self, batch: dict[str, dict[str, torch.Tensor]]) -> int:
        return sum(len(g["input_ids"]) for g in batch.values())


# -------------------------------------------------------------------------------------------- build


def canonical_prompts(records: NativeRecords) -> NativeRecords:
    """The records with each image's (and clip's) captioning target as its only generation prompt."""
    return replace(records, prompts=[[t] for t in records.targets], clip_prompts=[[t] for t in records.clip_targets])


def build_tokenizer(records: NativeRecords, vocab_size: int):
    """A word-level caption tokenizer over every caption of the data."""
    from mmstack.processing.tokenizer import train_caption_tokenizer

    texts = records.targets + [p for ps in records.prompts for p in ps]
    texts += records.clip_targets + [p for ps in records.clip_prompts for p in ps]
    return train_caption_tokenizer(texts, vocab_size, "wordlevel", max_length=128)


def build_dataset(cfg: NativeRecipeConfig, model: NativeModel, records: NativeRecords, codes: tuple) -> NativeData:
    """Tokenize every caption once (repeated captions share one tensor) and wrap the codes as a BatchSource."""
    cache: dict[str, torch.Tensor] = {}

    def ids(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = model.encode_text(text)
        return cache[text]

    image_codes, clip_codes = codes
    return NativeData(
        model.vocab,
        image_codes,
        [ids(t) for t in records.targets],
        [[ids(p) for p in ps] for ps in records.prompts],
        clip_codes,
        [ids(t) for t in records.clip_targets],
        [[ids(p) for p in ps] for ps in records.clip_prompts],
        mix=cfg.data.mix,
        p_uncond=cfg.data.p_uncond,
        train_visual=cfg.data.train_visual,
    )


def train_native(
    cfg: NativeRecipeConfig,
    data: str | Path,
    tokenizer: str | Path,
    out: str | Path,
    val: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train per ``cfg`` on ``data`` with the VQ tokenizer at ``tokenizer``; write ``out``; evaluate on ``val``."""
    t0 = time.perf_counter()
    out = Path(out)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    vq = VQModel.from_pretrained(tokenizer)
    canonical = cfg.data.prompts == "canonical"
    records = read_native_data(data, "all" if canonical else cfg.data.prompts, cfg.data.clip_frames)
    text_tok = build_tokenizer(records, cfg.tokenizer_vocab_size)  # every phrasing, so any prompt reads
    records = canonical_prompts(records) if canonical else records
    codes = tokenize_visuals(vq, records, _cache_dir(cfg))
    model = NativeModel(cfg.model, NativeVocab(len(text_tok), vq.codebook_size, vq.grid), text_tok, vq)
    dataset = build_dataset(cfg, model, records, codes)
    run_config = {**to_dict(cfg), "data_path": str(Path(data).resolve()), "vq": vq_fingerprint(vq)}
    task = NativeTask(model, cfg.loss.text, cfg.loss.image)
    work = work_dir(out)
    trainer = Trainer(task, dataset, cfg.train, work, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    summary = trainer.fit(stop_at_step=stop_after)
    keys = ("loss_text", "loss_image")
    run = RunInfo("mmstack train native", out, work, run_config, cfg.train.max_steps, t0, prepare_s, keys)
    return finish_run(
        model,
        summary,
        run,
        lambda: evaluate_native(model, val, cfg.eval, cfg.data.clip_frames) if val is not None else None,
    )


def _cache_dir(cfg: NativeRecipeConfig) -> Path:
    from mmstack.train.clip_data import cache_home

    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return cache_home() / "codes"
