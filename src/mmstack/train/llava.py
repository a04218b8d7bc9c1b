"""The llava recipe: train a bridge VLM in stages with the shared trainer.

    cfg = load_config(LlavaRecipeConfig, "configs/llava-demo.yaml")
    train_llava(cfg, out="runs/vlm", stage="all")       # or stage 0, 1, 2, 3

- **stage 0** pretrains the tiny language model on the world's text (captions, questions, answers): it
  stands in for a pretrained LLM. Skipped when ``model.text.pretrained`` names a real one.
- **stage 1** trains the connector alone on captions (vision encoder and LM frozen, larger lr).
- **stage 2** trains the connector and the LM (full, or LoRA through peft), optionally the vision
  tower, on instruction conversations (and clips), with a smaller lr.
- **stage 3** (off unless ``stage3.enabled``) is a short final phase on a re-weighted mixture at a small lr,
  for what stage 2's mixture underweights: the demo spends it half on clip questions (motion).

Each stage has its own data mixture (sources with repeat factors or weights), optional progressive
resolution schedule and ``TrainConfig``. Stage ``s`` writes ``OUT/stage{s}/`` (``metrics.jsonl``,
``train_config.json``, ``train_state/`` for resume) and its checkpoint ``OUT/stage{s}/model``; the next
stage starts from that checkpoint. A stage whose checkpoint exists for the same config is reused.
``OUT/model`` is the final model: the last enabled stage's checkpoint (hard-linked), published once that
stage is up to date (and removed while it is not, so it never names a stale stage).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmstack.config import merge, to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.models.bridge import BridgeModel, _quiet_transformers, count_parameters
from mmstack.models.connectors import ConnectorConfig
from mmstack.processing.bridge_processor import BridgeProcessor
from mmstack.train.checkpoint import fingerprint, run_key, save_finished_run
from mmstack.train.llava_data import DESCRIBE, FolderData, SourceSpec, VlmBatches
from mmstack.train.optim import default_param_groups
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.progress import console
from mmstack.utils.seeding import seed_everything

STAGES = (0, 1, 2, 3)


# -------------------------------------------------------------------------------------------- config


@dataclass
class VisionSection:
    """The vision encoder: ``pretrained`` (a two-tower checkpoint, an HF CLIP/SigLIP/vision folder) or a
    fresh HF vision model from ``config`` (an HF config dict with ``model_type``)."""

    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    feature_layer: int | list[int] = -1
    select_strategy: Literal["default", "full"] = "full"


@dataclass
class TextSection:
    """The language model: ``pretrained`` (an HF causal-LM folder; stage 0 is then skipped) or a fresh
    one from ``config`` (an HF config dict; ``vocab_size`` comes from the world tokenizer).

    A fresh LM's weights start at ``initializer_range`` = ``hidden_size ** -0.5`` unless ``config`` names
    one: HF's default 0.02 is tuned for widths of 768 and more, and at the demo's 128 it leaves attention
    near uniform for long (a Llama question reader of the demo tokens: 0.589 at 0.02, 0.726 at 1/sqrt(d)
    after 1,500 steps; BENCHMARKS.md, session 15). The native decoder does the same (``NativeConfig.init_std``).
    """

    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # filled in here, so the saved config, the model and every stage's cache key see the same value
        if not self.pretrained and "hidden_size" in self.config and "initializer_range" not in self.config:
            self.config = {**self.config, "initializer_range": round(int(self.config["hidden_size"]) ** -0.5, 6)}


@dataclass
class ModelSection:
    vision: VisionSection = field(default_factory=VisionSection)
    text: TextSection = field(default_factory=TextSection)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    max_frames: int = 8
    video_pool: int = 2

    def __post_init__(self) -> None:
        if not self.vision.pretrained and "model_type" not in self.vision.config:
            raise ConfigError(
                "model.vision needs 'pretrained' or a 'config' with a model_type (e.g. clip_vision_model)"
            )
        if not self.text.pretrained and "model_type" not in self.text.config:
            raise ConfigError("model.text needs 'pretrained' or a 'config' with a model_type (e.g. llama)")


@dataclass
class LoraSection:
    """LoRA adapters (peft) on the language model's attention/MLP projections; merged after training."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StageSection:
    """One training stage.

    Args:
        train: optimisation (lr, steps, batch, schedule; see ``TrainConfig``).
        data: the sources of this stage's mixture.
        mix_length: 0: each source's ``factor`` is a repeat factor; > 0: factors are weights and the
            mixture has ``mix_length`` items.
        language: ``"frozen"``, ``"full"`` or ``"lora"`` training of the language model.
        train_vision: also train the vision tower, at ``vision_lr_scale`` times the stage's lr.
        connector_lr_scale: the connector (and the temporal/grid embeddings) learns at this multiple of the
            stage's lr, as LLaVA-style recipes give the new projector a larger rate than the pretrained LM.
        resolution: progressive resolution schedule ``[[fraction_of_steps, size], ...]``.
        enabled: false skips the stage.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    data: list[SourceSpec] = field(default_factory=list)
    mix_length: int = 0
    language: Literal["frozen", "full", "lora"] = "frozen"
    train_connector: bool = True
    train_vision: bool = False
    vision_lr_scale: float = 1.0
    connector_lr_scale: float = 1.0
    resolution: list[tuple[float, int]] = field(default_factory=list)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.enabled and not self.data:
            raise ConfigError("an enabled stage needs at least one data source (stageN.data)")
        if not (self.train_connector or self.train_vision or self.language != "frozen"):
            raise ConfigError("a stage must train something: connector, vision or language")
        if self.vision_lr_scale <= 0 or self.connector_lr_scale <= 0:
            raise ConfigError(
                f"vision_lr_scale and connector_lr_scale must be > 0, got {self.vision_lr_scale}, "
                f"{self.connector_lr_scale} (freeze a part with train_vision / train_connector instead)"
            )
        for frac, size in self.resolution:
            if not 0.0 <= frac <= 1.0 or size <= 0:
                raise ConfigError(f"resolution entries are [fraction in 0..1, size > 0], got {[frac, size]}")


@dataclass
class DataSection:
    """``train``: the data folder sources are relative to; ``val``: a folder for the end-of-run VQA eval."""

    train: str = ""
    val: str | None = None
    val_limit: int = 0
    cache: str | None = None


def _stage0_default() -> StageSection:
    return StageSection(data=[SourceSpec(kind="text")], language="full", train_connector=False)


@dataclass
class LlavaRecipeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    processor: dict[str, Any] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    stage0: StageSection = field(default_factory=_stage0_default)
    stage1: StageSection = field(default_factory=lambda: StageSection(data=[SourceSpec(kind="captions")]))
    stage2: StageSection = field(default_factory=lambda: StageSection(data=[SourceSpec()], language="full"))
    stage3: StageSection = field(default_factory=lambda: StageSection(language="full", enabled=False))

    def __post_init__(self) -> None:
        if not any(self.stage(s).enabled for s in STAGES):
            raise ConfigError("every stage is disabled (stageN.enabled=false); enable at least one of stages 0-3")

    def stage(self, s: int) -> StageSection:
        return getattr(self, f"stage{s}")

    def final_stage(self) -> int:
        """The last enabled stage: its checkpoint is the run's final model (``OUT/model``)."""
        return max(s for s in STAGES if self.stage(s).enabled)


# ---------------------------------------------------------------------------------------- the model


def load_vision(section: VisionSection) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The vision tower and the image preprocessing that suits it (from a two-tower checkpoint)."""
    from mmstack.models.bridge import build_vision_tower

    if not section.pretrained:
        return build_vision_tower(section.config), {}
    path = Path(section.pretrained)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"vision checkpoint {path} has no config.json; pass a two-tower or HF vision folder")
    raw = json.loads(cfg_path.read_text())
    if raw.get("family") == "two_tower":
        from mmstack import load

        tt = load(str(path))
        image = to_dict(tt.processor.image_config)
        return tt.vision_model, {"image": image}
    from transformers import AutoConfig, AutoModel

    hf = AutoConfig.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path))
    vision = getattr(model, "vision_model", model) if hf.model_type in ("clip", "siglip") else model
    return vision, {}


def build_model(cfg: LlavaRecipeConfig, texts: list[str]) -> BridgeModel:
    """A fresh bridge model: vision tower (pretrained or new), LM (pretrained or new), new connector,
    the world tokenizer (or the LM's own with the placeholders added), and its processor."""
    from mmstack.processing.bridge_processor import add_placeholder_tokens, train_chat_tokenizer

    ms = cfg.model
    with _quiet_transformers():
        vision, image_cfg = load_vision(ms.vision)
        if ms.text.pretrained:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = add_placeholder_tokens(AutoTokenizer.from_pretrained(ms.text.pretrained))
            lm = AutoModelForCausalLM.from_pretrained(ms.text.pretrained)
            lm.resize_token_embeddings(len(tok))
        else:
            from mmstack.models.bridge import build_language_model

            tok = train_chat_tokenizer(texts)
            specials = {
                "pad_token_id": tok.pad_token_id,
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
            }
            lm = build_language_model({**ms.text.config, "vocab_size": len(tok), **specials})
        model = BridgeModel.from_parts(
            vision,
            lm,
            connector=ms.connector,
            vision_feature_layer=ms.vision.feature_layer,
            vision_feature_select_strategy=ms.vision.select_strategy,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            video_token_id=tok.convert_tokens_to_ids("<video>"),
            max_frames=ms.max_frames,
            video_pool=ms.video_pool,
        )
    size = int(model.vision_tower.config.image_size)
    # the vision tower's own size and pixel statistics, under the recipe's processor settings (key by key)
    proc_cfg = merge(merge({"image": {"size": [size, size], "resize_mode": "squash"}}, image_cfg), cfg.processor)
    model.processor = BridgeProcessor.for_model(model, tok, **proc_cfg)
    return model


# ------------------------------------------------------------------------------------------ the task


class LlavaTask(Task):
    """Next-token loss on assistant tokens; the vision tower and the connector may get scaled learning rates."""

    def __init__(
        self, model: BridgeModel, vision_lr_scale: float = 1.0, lr: float = 1e-3, connector_lr_scale: float = 1.0
    ) -> None:
        super().__init__(model)
        self.vision_lr_scale, self.lr, self.connector_lr_scale = vision_lr_scale, lr, connector_lr_scale

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.model(**batch)
        return out.loss, {"label_tokens": float(out.n_label_tokens)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        model = self.model
        scale = {id(p): self.vision_lr_scale for p in model.vision_tower.parameters()}
        connector = [model.connector, model.grid_position] if model.grid_position is not None else [model.connector]
        scale.update({id(p): self.connector_lr_scale for m in connector for p in m.parameters()})
        scale[id(model.temporal_embedding)] = self.connector_lr_scale
        groups = []
        for g in default_param_groups(model, weight_decay):
            by_scale: dict[float, list] = {}
            for p in g["params"]:
                by_scale.setdefault(scale.get(id(p), 1.0), []).append(p)
            for s, params in by_scale.items():
                groups.append({**g, "params": params} if s == 1.0 else {**g, "params": params, "lr": self.lr * s})
        return groups


class LlavaTrainer(Trainer):
    """The shared trainer, telling the data source the step (for the progressive resolution schedule)."""

    def _train_one_step(self):
        if hasattr(self.data, "set_step"):
            self.data.set_step(self.step)
        return super()._train_one_step()


def apply_stage(model: BridgeModel, stage: StageSection, lora: LoraSection) -> None:
    """Freeze what the stage does not train; wrap the LM with LoRA adapters for ``language: lora``."""
    model.set_trainable(vision=stage.train_vision, connector=stage.train_connector, language=stage.language == "full")
    if stage.language == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
        model.language_model = get_peft_model(model.language_model, lcfg)


def merge_lora(model: BridgeModel) -> None:
    """Fold LoRA adapters into the LM's weights so the checkpoint is a plain model."""
    if hasattr(model.language_model, "merge_and_unload"):
        model.language_model = model.language_model.merge_and_unload()


# ----------------------------------------------------------------------------------------- the recipe


def _folder(cfg: LlavaRecipeConfig, spec: SourceSpec) -> Path:
    if not cfg.data.train:
        raise ConfigError("data.train is not set: pass --data DIR (a shapes-world folder or LLaVA data)")
    root = Path(cfg.data.train)
    return (root / spec.path) if spec.path else root


def build_batches(cfg: LlavaRecipeConfig, stage: StageSection, proc: BridgeProcessor, out: Path) -> VlmBatches:
    """The stage's mixture of sources as a ``VlmBatches`` source."""
    from mmstack.data.mixture import Mixture

    cache = Path(cfg.data.cache) if cfg.data.cache else out.parent / ".cache"
    folders: dict[Path, FolderData] = {}
    parts = []
    for spec in stage.data:
        folder = _folder(cfg, spec)
        fd = folders.setdefault(folder, FolderData(folder, proc, cache, proc.config.video_frames))
        parts.append((fd, fd.samples(spec), spec.factor))
    visuals = {f: fd.visuals() for f, fd in folders.items()}
    paired = [([(s, visuals[fd.folder]) for s in samples], factor) for fd, samples, factor in parts]
    mixture = Mixture(paired, seed=stage.train.seed, length=stage.mix_length or None)
    batches = VlmBatches(mixture, proc, stage.resolution, stage.train.max_steps)
    for part, _ in paired:
        batches.validate(part)
    return batches


def measure_connector_stats(model: BridgeModel, data: VlmBatches, n_samples: int = 512) -> None:
    """``connector.standardize``: fix the connector's feature statistics on up to ``n_samples`` of the stage's
    samples, once (the first stage that trains the connector); later stages and resumed runs keep them."""
    connector = model.connector
    if not getattr(connector, "standardize", False) or bool(connector.stats_measured):
        return
    picks = torch.linspace(0, len(data) - 1, min(n_samples, len(data))).long()
    pixels = [data.batch(chunk)["pixel_values"] for chunk in picks.split(64)]
    pixels = [p for p in pixels if p is not None]
    if not pixels:
        raise ConfigError(
            "connector.standardize measures feature statistics on the first stage that trains the connector, "
            "but its data has no images; give that stage an image source (e.g. {kind: captions})"
        )
    n = model.measure_feature_stats(torch.cat(pixels))
    console.print(f"connector: feature statistics measured on {n} visual tokens")


def stage_dir(out: Path, s: int) -> Path:
    return Path(out) / f"stage{s}"


def run_stage(cfg: LlavaRecipeConfig, s: int, out: Path, resume: bool = True) -> dict[str, Any]:
    """Train stage ``s`` (0 to 3), starting from stage ``s - 1``'s checkpoint; returns its summary."""
    stage = cfg.stage(s)
    run = stage_dir(out, s)
    if not stage.enabled or (s == 0 and cfg.model.text.pretrained):
        return {"stage": s, "skipped": True}
    run_config = stage_run_config(cfg, s, out)
    key = run_key(run_config)
    done = run / "done.json"
    if resume and done.is_file() and json.loads(done.read_text()).get("key") == key and (run / "model").is_dir():
        console.print(f"stage {s}: reusing {run / 'model'} (config unchanged)")
        return {**json.loads(done.read_text())["summary"], "cached": True}
    if done.is_file():  # a finished run of another config (or of an earlier stage that changed): start over
        console.print(f"stage {s}: config or earlier stage changed; retraining from scratch")
        shutil.rmtree(run / "train_state", ignore_errors=True)
        (run / "metrics.jsonl").unlink(missing_ok=True)
        done.unlink(missing_ok=True)  # another rank may have removed it first
    t0 = time.perf_counter()
    seed_everything(stage.train.seed)
    model = _initial_model(cfg, s, out)
    apply_stage(model, stage, cfg.lora)
    data = build_batches(cfg, stage, model.processor, out)
    if stage.train_connector:
        measure_connector_stats(model, data)
    task = LlavaTask(model, stage.vision_lr_scale, stage.train.lr, stage.connector_lr_scale)
    trainer = LlavaTrainer(task, data, stage.train, run, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    summary = trainer.fit()
    merge_lora(model)
    model.eval()
    result = {
        "stage": s,
        "steps": summary.steps,
        "train_s": round(summary.seconds, 2),
        "prepare_s": round(prepare_s, 2),
        "samples": len(data),
        "final_loss": summary.final_loss,
        "trainable_parameters": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
        "parameters": count_parameters(model),
    }
    if s >= 2 and cfg.data.val:  # stage 3's eval beside stage 2's shows what the final phase adds
        from mmstack.eval.vqa import evaluate_vqa

        result["val"] = evaluate_vqa(model, cfg.data.val, limit=cfg.data.val_limit or None)
    save_finished_run(model, run, run_config, key, result, eval_key="val")
    return result


def stage_run_config(cfg: LlavaRecipeConfig, s: int, out: Path) -> dict[str, Any]:
    """What stage ``s`` depends on: its own section, the model/processor/data, and the previous stage's key
    (so editing stage 2 reuses stages 0 and 1, and retraining stage 0 invalidates 1 and 2)."""
    full = to_dict(cfg)
    deps = {k: full[k] for k in ("model", "processor")}
    deps["data"] = {"train": full["data"]["train"], "val": full["data"]["val"] if s >= 2 else None}
    # Every stage's model carries the pretrained towers' weights: retraining them (a new demo CLIP) must
    # invalidate the stages even though their paths did not change.
    deps["weights"] = {t: fingerprint(getattr(cfg.model, t).pretrained) for t in ("vision", "text")}
    if cfg.stage(s).language == "lora":
        deps["lora"] = full["lora"]
    return {**deps, "stage": s, f"stage{s}": full[f"stage{s}"], "previous": _previous_hash(out, s)}


def _previous_hash(out: Path, s: int) -> str | None:
    """The key of the stage this one starts from, so a retrained earlier stage invalidates later ones."""
    for prev in range(s - 1, -1, -1):
        done = stage_dir(out, prev) / "done.json"
        if done.is_file():
            return json.loads(done.read_text()).get("key")
    return None


def _initial_model(cfg: LlavaRecipeConfig, s: int, out: Path) -> BridgeModel:
    for prev in range(s - 1, -1, -1):
        ckpt = stage_dir(out, prev) / "model"
        if ckpt.is_dir():
            return BridgeModel.from_pretrained(ckpt).train()
    if s >= 2 and not cfg.model.text.pretrained:
        console.print(f"[yellow]stage {s} without earlier stages: training from a fresh model[/]")
    texts = _tokenizer_texts(cfg) if not cfg.model.text.pretrained else []
    return build_model(cfg, texts).train()


def _tokenizer_texts(cfg: LlavaRecipeConfig) -> list[str]:
    """Text the world tokenizer is trained on: every caption, question and answer of the training folder
    (``scenes.jsonl``, ``conversations.json``, ``clips.jsonl``, whichever exist) and the recipe's prompts."""
    from mmstack.train.llava_data import read_clips, text_corpus

    root = Path(cfg.data.train)
    texts: list[str] = []
    if (root / "scenes.jsonl").is_file():
        texts += text_corpus(root)
    conv = root / "conversations.json" if root.is_dir() else root
    if conv.is_file():
        texts += [t["value"] for rec in json.loads(conv.read_text(encoding="utf-8")) for t in rec["conversations"]]
    if (root / "clips.jsonl").is_file():
        for rec in read_clips(root):
            texts += [rec.get("caption", "")] + [f"{q['question']} {q['answer']}" for q in rec.get("questions", [])]
    if not texts:
        raise ConfigError(f"data.train={root} has no scenes.jsonl, conversations.json or clips.jsonl to read")
    return [*texts, "Scene:", *DESCRIBE]


def train_llava(
    cfg: LlavaRecipeConfig, out: str | Path, stage: int | str = "all", resume: bool = True
) -> dict[str, Any]:
    """Run one stage (0 to 3) or all of them in order, then publish ``OUT/model``; returns a summary per
    stage, the final model's path and the total time."""
    out = Path(out)
    stages = STAGES if str(stage) == "all" else (int(stage),) if str(stage).isdigit() else ()
    if not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"--stage must be 0, 1, 2, 3 or all, got {stage!r}")
    t0 = time.perf_counter()
    results = {f"stage{s}": run_stage(cfg, s, out, resume) for s in stages}
    final = publish_final_model(cfg, out)
    if final is None:  # the final stage is not up to date: point at what this call trained
        final = next(
            (stage_dir(out, s) / "model" for s in reversed(stages) if (stage_dir(out, s) / "model").is_dir()), None
        )
    return {
        "out": str(out),
        "model": str(final) if final else None,
        "total_s": round(time.perf_counter() - t0, 2),
        **results,
    }


def publish_final_model(cfg: LlavaRecipeConfig, out: Path) -> Path | None:
    """Hard-link the last enabled stage's checkpoint to ``OUT/model`` when every stage up to it is up to date
    (its ``done.json`` key matches the config) and return that path; otherwise remove a stale ``OUT/model``
    and return None."""
    from mmstack.train.checkpoint import link_or_copy
    from mmstack.train.distributed import run_on_main
    from mmstack.utils.atomic import atomic_dir

    final, target = cfg.final_stage(), out / "model"
    ckpt = stage_dir(out, final) / "model"
    if ckpt.is_dir() and all(_up_to_date(cfg, out, s) for s in STAGES if s <= final):

        def publish() -> None:
            with atomic_dir(target) as tmp:
                shutil.copytree(ckpt, tmp, dirs_exist_ok=True, copy_function=link_or_copy)

        run_on_main(publish)
        return target
    if target.is_dir():
        console.print(f"[yellow]{target} removed: stage {final} is not up to date; run --stage all[/]")
        run_on_main(lambda: shutil.rmtree(target, ignore_errors=True))
    return None


def _up_to_date(cfg: LlavaRecipeConfig, out: Path, s: int) -> bool:
    """Stage ``s`` is skipped, or finished under its current config (which names the previous stage's key:
    checked stage by stage from 0, this covers the whole chain)."""
    if not cfg.stage(s).enabled or (s == 0 and cfg.model.text.pretrained):
        return True
    done = stage_dir(out, s) / "done.json"
    return done.is_file() and json.loads(done.read_text()).get("key") == run_key(stage_run_config(cfg, s, out))
