"""Saving, loading and HF export of two-tower checkpoints (kept apart from the model's maths).

An mmstack checkpoint folder holds ``config.json`` (``family: two_tower``, the model config and the card),
``model.safetensors``, the processor files and a ``README.md`` model card. ``load_pretrained`` also reads
HF ``CLIPModel``/``SiglipModel`` folders and hub ids; ``export_hf`` writes folders transformers loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmstack.errors import ConfigError, ModelError
from mmstack.processing.two_tower import TwoTowerProcessor
from mmstack.utils.atomic import atomic_dir, atomic_write_json, atomic_write_text

CONFIG_FILE = "config.json"
HF_TYPES = ("clip", "siglip")


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide transformers' own progress bars (loading/writing shards): our CLI keeps stderr for its own."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(model: Any, path: Path) -> None:
    """Write ``model`` (a ``TwoTowerModel``) to folder ``path`` atomically."""
    from safetensors.torch import save_file

    from mmstack import __version__
    from mmstack.models.two_tower import FAMILY, FORMAT_VERSION, WEIGHTS_FILE, config_to_dict

    if model.processor is None:
        raise ModelError("the model has no processor attached; build it with from_config(config, processor)")
    meta = {
        "family": FAMILY,
        "format_version": FORMAT_VERSION,
        "mmstack_version": __version__,
        "model": config_to_dict(model.config),
        "card": model.card,
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / CONFIG_FILE, meta)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "family": FAMILY})
        model.processor.save_pretrained(tmp)
        atomic_write_text(tmp / "README.md", render_card(model, path.name))


def render_card(model: Any, name: str) -> str:
    """A README.md model card: architecture, preprocessing, training and evaluation numbers."""
    cfg, proc, card = model.config, model.processor, model.card or {}
    v, t = cfg.vision_hf(), cfg.text_hf()
    img = proc.image_config
    lines = [
        f"# {name}",
        "",
        f"mmstack two-tower model: {cfg.backbone} towers, {cfg.loss_type} loss, "
        f"{model.num_parameters() / 1e6:.2f}M parameters, {cfg.embed_dim}-d embeddings.",
        "",
        "## Architecture",
        "",
        "| tower | width | layers | heads | input |",
        "| --- | --- | --- | --- | --- |",
        f"| image | {v.hidden_size} | {v.num_hidden_layers} | {v.num_attention_heads} | "
        f"{v.image_size} px, patch {getattr(v, 'patch_size', '-')} |",
        f"| text | {t.hidden_size} | {t.num_hidden_layers} | {t.num_attention_heads} | "
        f"{t.max_position_embeddings} tokens, vocab {t.vocab_size} |",
        "",
        "## Preprocessing",
        "",
        f"- image: {img.size[0]}x{img.size[1]}, {img.resize_mode}, {img.interpolation}, "
        f"mean {list(img.mean)}, std {list(img.std)}",
        f"- text: padded/truncated to {proc.max_length} tokens",
    ]
    if card.get("training"):
        lines += ["", "## Training", ""] + [f"- {k}: {_fmt(val)}" for k, val in card["training"].items()]
    if card.get("metrics"):
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(val)} |" for k, val in _flat(card["metrics"]).items()]
    if card.get("notes"):
        lines += ["", "## Notes", "", str(card["notes"])]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import mmstack",
        f'model = mmstack.load("{name}")',
        'emb = model.encode_text(**model.processor.text(["a red circle"]), normalize=True)',
        "```",
        "",
    ]
    return "\n".join(lines)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


# ---------------------------------------------------------------------------------------------- load


def load_pretrained(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """Load from an mmstack folder, an HF CLIP/SigLIP folder, or an HF hub id (``org/name``)."""
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise ModelError(f"{folder} is a file; pass a checkpoint folder (with config.json)")
        folder = _download(str(path))
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelError(f"checkpoint {folder} has no config.json: is it a two-tower checkpoint folder?")
    meta = _read_json(cfg_path)
    from mmstack.models.two_tower import FAMILY

    family = meta.get("family")
    if family == FAMILY:
        model = _load_mmstack(cls, folder, meta)
    elif family:
        raise ModelError(f"{folder} holds a {family!r} model, not a two-tower model; load it with mmstack.load")
    elif meta.get("model_type") in HF_TYPES:
        model = _load_hf(cls, folder, meta["model_type"])
    else:
        raise ModelError(
            f"{cfg_path} is neither an mmstack two-tower checkpoint ('family': 'two_tower') nor an HF CLIP/SigLIP "
            f"model (model_type {meta.get('model_type')!r}); pass a two-tower checkpoint"
        )
    return model.eval()


def _download(repo_id: str) -> Path:
    looks_like_id = repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelError(f"checkpoint {repo_id} does not exist; pass a checkpoint folder or an HF hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as err:  # network, auth, offline mode: all mean "not available here"
        raise ModelError(
            f"{repo_id} is not a local folder and could not be fetched from the HF hub "
            f"({type(err).__name__}: {err}); pass a local checkpoint folder or check the id and network"
        ) from None


def _load_mmstack(cls: type, folder: Path, meta: dict[str, Any]) -> Any:
    from mmstack.models.two_tower import FORMAT_VERSION, WEIGHTS_FILE, TwoTowerConfig

    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(f"{folder} was written by a newer mmstack (format {version}); upgrade mmstack to load it")
    try:
        config = TwoTowerConfig.from_dict(meta.get("model") or {}, f"{folder / CONFIG_FILE}: model")
    except ConfigError as err:
        raise ModelError(f"{err}; the checkpoint config is damaged or from another version") from None
    processor = TwoTowerProcessor.from_pretrained(folder)
    model = cls(config, processor)
    load_state(model, read_weights(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE))
    model.card = meta.get("card") or {}
    return model


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict, or ``ModelError`` naming the file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path} is missing; the checkpoint is incomplete, re-save or re-download it")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelError(f"{path} cannot be read ({err}); the weights file is damaged, re-save it") from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load ``state``; missing, unexpected or mis-shaped tensors raise ``ModelError`` listing them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})")
    if problems:
        raise ModelError(
            f"{where} does not match the model config: tensors {', '.join(problems)}; the weights "
            "belong to another config or the checkpoint is damaged"
        )
    model.load_state_dict(state, strict=True)


def _arch_dict(hf_sub_config: Any) -> dict[str, Any]:
    """The architecture fields of an HF sub-config (those our ``TwoTowerConfig`` accepts)."""
    from mmstack.models.two_tower import _HF_GENERIC

    known = {f.name for f in dataclasses.fields(type(hf_sub_config))} - _HF_GENERIC
    return {k: v for k, v in hf_sub_config.to_dict().items() if k in known}


def _load_hf(cls: type, folder: Path, model_type: str) -> Any:
    import transformers as tf

    from mmstack.models.two_tower import TwoTowerConfig

    hf_cls = tf.CLIPModel if model_type == "clip" else tf.SiglipModel
    try:
        with quiet_hf():
            hf = hf_cls.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ModelError(f"transformers cannot load {folder} as {hf_cls.__name__}: {err}") from None
    vision, text = _arch_dict(hf.config.vision_config), _arch_dict(hf.config.text_config)
    if model_type == "clip":
        config = TwoTowerConfig(
            "clip", vision, text, int(hf.config.projection_dim), "linear", "clip", float(hf.logit_scale.detach())
        )
    else:
        embed = int(hf.config.vision_config.hidden_size)
        config = TwoTowerConfig(
            "siglip",
            vision,
            text,
            embed,
            "none",
            "siglip",
            float(hf.logit_scale.detach()),
            float(hf.logit_bias.detach()),
        )
    processor = TwoTowerProcessor.from_pretrained(folder, max_length=config.context_length)
    model = cls(config, processor)
    state = hf.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state:
            state[key] = state[key].reshape(())
    load_state(model, state, f"{folder} ({hf_cls.__name__})")
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}); the checkpoint is damaged, re-save it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object; the checkpoint is damaged, re-save it")
    return data


# -------------------------------------------------------------------------------------------- export


def export_hf(model: Any, path: Path, kind: str) -> None:
    """Write an HF ``CLIPModel`` (kind "clip") or ``SiglipModel`` (kind "siglip") folder for ``model``."""
    import transformers as tf

    cfg = model.config
    if cfg.backbone == "auto":
        raise ModelError(
            "a two-tower model with 'auto' towers has no HF two-tower class to export to; use save_pretrained"
        )
    if kind != cfg.backbone:
        raise ModelError(f"a {cfg.backbone} two-tower model cannot be exported as an HF {kind} model; use export_hf()")
    if model.processor is None:
        raise ModelError("the model has no processor attached; HF folders need its preprocessing and tokenizer")
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    vision, text = model.vision_model.config.to_dict(), model.text_model.config.to_dict()
    if kind == "clip":
        if cfg.projection != "linear":
            raise ModelError(
                "HF CLIPModel has linear projections; a projection 'none' model cannot be exported as CLIP"
            )
        hf_cfg = tf.CLIPConfig(
            text_config=text,
            vision_config=vision,
            projection_dim=cfg.embed_dim,
            logit_scale_init_value=float(model.logit_scale.detach()),
        )
        hf = tf.CLIPModel(hf_cfg)
        state.pop("logit_bias", None)  # CLIPModel has no bias: logits differ by it, rankings do not
    else:
        if cfg.projection != "none":
            raise ModelError(
                "HF SiglipModel has no projections after its pooling heads; only projection 'none' models export"
            )
        with quiet_hf():  # SiglipConfig warns about its default sub-config's ids before taking ours
            hf = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        state["logit_scale"] = state["logit_scale"].reshape(1)
        state["logit_bias"] = state["logit_bias"].reshape(1)
    load_state(hf, state, f"export of {type(model).__name__}")
    with atomic_dir(path) as tmp, quiet_hf():
        hf.save_pretrained(str(tmp))
        model.processor.save_hf(tmp)
