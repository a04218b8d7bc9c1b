"""What the reward, DPO and PPO recipes share: config sections, freezing/LoRA, the frozen reference,
and the run bookkeeping that lets a finished run with an unchanged config and inputs be reused."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from mmstack.errors import ConfigError, ModelError
from mmstack.models.bridge import BridgeModel
from mmstack.train.checkpoint import fingerprint, run_key
from mmstack.train.llava import LoraSection, merge_lora
from mmstack.utils.atomic import atomic_write_json
from mmstack.utils.progress import console

__all__ = [
    "AlignDataSection",
    "LoraSection",
    "TrainableSection",
    "apply_trainable",
    "fingerprint",
    "finished_run",
    "frozen_reference",
    "mark_finished",
    "merge_lora",
    "require_bridge",
    "run_key",
]


@dataclass
class TrainableSection:
    """Which parts of the bridge VLM train: the language model (``full``, ``lora`` or ``frozen``), the
    connector and the vision tower. Alignment usually tunes the LM only."""

    language: Literal["full", "lora", "frozen"] = "full"
    connector: bool = False
    vision: bool = False

    def __post_init__(self) -> None:
        if self.language not in ("full", "lora", "frozen"):
            raise ConfigError(f"trainable.language must be full, lora or frozen, got {self.language!r}")


@dataclass
class AlignDataSection:
    """Preference data.

    Args:
        train: a folder with ``preferences.jsonl`` (a shapes world) or a preferences JSONL file.
        val: held-out pairs (or a world folder) evaluated after training.
        kinds: keep only pairs of these ``rejection`` kinds (empty: all).
        limit, val_limit: use the first N pairs (0: all).
        cache: folder for decoded pixels (default: ``OUT/../.cache``).
    """

    train: str = ""
    val: str | None = None
    kinds: list[str] = field(default_factory=list)
    limit: int = 0
    val_limit: int = 0
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.limit < 0 or self.val_limit < 0:
            raise ConfigError("data.limit and data.val_limit must be >= 0")

    def require_train(self) -> Path:
        if not self.train:
            raise ConfigError("data.train is not set: pass --data DIR (a shapes-world folder or a preferences JSONL)")
        return Path(self.train)

    def cache_dir(self, out: Path) -> Path:
        return Path(self.cache) if self.cache else Path(out).parent / ".cache"


def require_bridge(path: str | Path | None, what: str = "model") -> BridgeModel:
    """Load the bridge checkpoint a recipe starts from, with a clear error when it is not given or wrong."""
    if not path:
        raise ConfigError(f"{what} is not set: pass --model PATH (a bridge VLM checkpoint, e.g. a llava stage-2 model)")
    model = BridgeModel.from_pretrained(path)
    if model.processor is None:
        raise ModelError(f"{path} has no bridge processor; save the model with its processor (mmstack train llava)")
    return model


def apply_trainable(model: BridgeModel, section: TrainableSection, lora: LoraSection) -> None:
    """Freeze what does not train; wrap the language model with LoRA adapters for ``language: lora``."""
    model.set_trainable(vision=section.vision, connector=section.connector, language=section.language == "full")
    if section.language == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
        model.language_model = get_peft_model(model.language_model, cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing would train: set trainable.language to full or lora, or train the connector")


def frozen_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every parameter frozen (the DPO/PPO reference policy)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def finished_run(out: Path, key: str) -> dict[str, Any] | None:
    """The summary of a finished run in ``out`` with the same key (config and inputs), else None."""
    done = Path(out) / "done.json"
    if not done.is_file() or not (Path(out) / "model" / "config.json").is_file():
        return None
    data = json.loads(done.read_text())
    return data.get("summary") if data.get("key") == key else None


def mark_finished(out: Path, key: str, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / "done.json", {"key": key, "summary": summary})


def reuse_or_restart(out: Path, run_config: dict[str, Any], name: str, resume: bool) -> tuple[str, dict | None]:
    """``(key, summary)``: the summary of a finished run of the same config and inputs (to reuse), else
    None after clearing a finished run of another config so it is not resumed."""
    key = run_key(run_config)
    if resume and (summary := finished_run(out, key)) is not None:
        console.print(f"{name}: reusing {Path(out) / 'model'} (config and inputs unchanged)")
        return key, {**summary, "cached": True}
    restart_if_changed(out, key)
    return key, None


def restart_if_changed(out: Path, key: str) -> None:
    """A finished run of another config must not be resumed: drop its train state and metrics."""
    import shutil

    done = Path(out) / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("key") != key:
        shutil.rmtree(Path(out) / "train_state", ignore_errors=True)
        (Path(out) / "metrics.jsonl").unlink(missing_ok=True)
        done.unlink(missing_ok=True)  # another rank may have removed it first
