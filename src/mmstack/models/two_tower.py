"""Two-tower (CLIP / SigLIP) models: an image tower and a text tower from HF transformers, aligned contrastively.

Top to bottom: the config (``TwoTowerConfig``, validated), the model (``TwoTowerModel``: ``encode_image``,
``encode_text``, ``forward``, ``similarity``), saving/loading (mmstack folders, HF ``CLIPModel`` /
``SiglipModel`` folders or hub ids), HF export, and the named presets for the shapes world.

Module names mirror HF's ``CLIPModel`` (``vision_model``, ``text_model``, ``visual_projection``,
``text_projection``, ``logit_scale``), so importing from and exporting to transformers is a plain state-dict
copy, never a key-renaming table. ``logit_scale`` is the *log* of the logit scale (exp it to multiply
cosine similarities), as in HF and open_clip; ``logit_bias`` exists only for the SigLIP loss.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.config import from_dict, merge, to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.processing.image import CLIP_MEAN, CLIP_STD, HALF, ImageProcessingConfig
from mmstack.processing.two_tower import TwoTowerProcessor

FAMILY = "two_tower"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
# Generic HF config fields that say nothing about the architecture; left out of our stored configs.
_HF_GENERIC = {
    "transformers_version",
    "architectures",
    "output_hidden_states",
    "return_dict",
    "dtype",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
}
_NO_IDS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


def _tower_class(backbone: str, tower: str, values: dict[str, Any]) -> type:
    """The HF config class of a tower: CLIP/SigLIP's, or for ``auto`` the one its ``model_type`` names."""
    import transformers as tf

    if backbone == "clip":
        return tf.CLIPVisionConfig if tower == "vision" else tf.CLIPTextConfig
    if backbone == "siglip":
        return tf.SiglipVisionConfig if tower == "vision" else tf.SiglipTextConfig
    model_type = values.get("model_type")
    example = "vit" if tower == "vision" else "bert"
    if not model_type:
        raise ConfigError(f"model.{tower}.model_type is required with backbone 'auto' (e.g. {example!r})")
    if model_type not in tf.CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(tf.CONFIG_MAPPING.keys()), n=1)
        hint = f" - did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.{tower}.model_type {model_type!r} is not a transformers model type{hint}")
    return tf.CONFIG_MAPPING[model_type]


def _check_keys(values: dict[str, Any], hf_cls: type, where: str) -> None:
    known = ({f.name for f in dataclasses.fields(hf_cls)} - _HF_GENERIC) | (
        {"model_type"} if "model_type" in values else set()
    )
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" - you probably got a typo, did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(sorted(known))})")


def _value(hf_cls: type, values: dict[str, Any], key: str) -> Any:
    """``values[key]``, else the HF config class's default (None when the class has no such field)."""
    if key in values:
        return values[key]
    return next((f.default for f in dataclasses.fields(hf_cls) if f.name == key), None)


def _make_hf(hf_cls: type, values: dict[str, Any], where: str) -> Any:
    """An HF config object; its own validation errors become ``ConfigError`` naming the section."""
    try:
        return hf_cls(**{k: v for k, v in values.items() if k != "model_type"})
    except (ValueError, TypeError) as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{where}: {cause}") from None


# ---------------------------------------------------------------------------------------------- config


@dataclass
class TwoTowerConfig:
    """Architecture of a two-tower model.

    Args:
        backbone: ``"clip"`` (``CLIPVisionModel`` + ``CLIPTextModel``: CLS / end-token pooling),
            ``"siglip"`` (``SiglipVisionModel`` + ``SiglipTextModel``: attention-pool / last-token head) or
            ``"auto"`` (any ``AutoModel``: ``vision``/``text`` name a ``model_type`` such as "vit" / "bert";
            first-token pooling for images, masked mean pooling for text; ViT-style vision configs only).
        vision: fields of the HF vision config (``hidden_size``, ``num_hidden_layers``, ``image_size``,
            ``patch_size``, ...); unknown keys fail.
        text: fields of the HF text config (``hidden_size``, ``max_position_embeddings`` = context length,
            ...); ``vocab_size`` and the pad/bos/eos ids are filled from the tokenizer when left out.
        embed_dim: size of the shared embedding space.
        projection: ``"linear"`` (bias-free projections, as CLIP) or ``"none"`` (towers' pooled outputs are
            the embeddings, as HF ``SiglipModel``; both towers must then output ``embed_dim``).
        loss_type: ``"clip"`` (softmax InfoNCE, learnable scale) or ``"siglip"`` (sigmoid, scale and bias).
        init_logit_scale: log of the initial scale; None: ln(1/0.07) for clip, ln 10 for siglip.
        init_logit_bias: initial bias (siglip only); None: -10 (SigLIP paper; HF initialises it to 0).
    """

    backbone: Literal["clip", "siglip", "auto"] = "clip"
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 512
    projection: Literal["linear", "none"] = "linear"
    loss_type: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        if self.backbone not in ("clip", "siglip", "auto"):
            raise ConfigError(f"model.backbone must be 'clip', 'siglip' or 'auto', got {self.backbone!r}")
        if self.projection not in ("linear", "none"):
            raise ConfigError(f"model.projection must be 'linear' or 'none', got {self.projection!r}")
        if self.loss_type not in ("clip", "siglip"):
            raise ConfigError(f"model.loss_type must be 'clip' or 'siglip', got {self.loss_type!r}")
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.init_logit_scale is None:
            self.init_logit_scale = SIGLIP_INIT_LOGIT_SCALE if self.loss_type == "siglip" else CLIP_INIT_LOGIT_SCALE
        if self.loss_type == "siglip" and self.init_logit_bias is None:
            self.init_logit_bias = SIGLIP_INIT_LOGIT_BIAS
        if self.loss_type == "clip" and self.init_logit_bias is not None:
            raise ConfigError("model.init_logit_bias is for loss_type 'siglip' only; remove it or set loss_type")
        vcls, tcls = self._classes()
        _check_keys(self.vision, vcls, "model.vision")
        _check_keys(self.text, tcls, "model.text")
        self._check_dims()

    def _classes(self) -> tuple[type, type]:
        return _tower_class(self.backbone, "vision", self.vision), _tower_class(self.backbone, "text", self.text)

    def _check_dims(self) -> None:
        vcls, tcls = self._classes()
        for name, values, hf_cls in (("vision", self.vision, vcls), ("text", self.text, tcls)):
            width, heads = _value(hf_cls, values, "hidden_size"), _value(hf_cls, values, "num_attention_heads")
            if width is None or heads is None:
                continue
            if heads < 1 or width % heads:
                raise ConfigError(
                    f"model.{name}.hidden_size ({width}) must be divisible by num_attention_heads ({heads})"
                )
        v = _make_hf(vcls, self.vision, "model.vision")
        # ids come from the tokenizer later; HF's defaults would only trigger out-of-vocabulary warnings here
        t = _make_hf(tcls, {**{k: None for k in _NO_IDS if _value(tcls, {}, k) is not None}, **self.text}, "model.text")
        if not isinstance(getattr(v, "image_size", None), int):
            raise ConfigError(f"model.vision ({type(v).__name__}) has no integer image_size; use a ViT-style tower")
        if isinstance(getattr(v, "patch_size", None), int) and v.image_size % v.patch_size:
            raise ConfigError(
                f"model.vision.image_size ({v.image_size}) must be divisible by patch_size ({v.patch_size})"
            )
        if self.projection == "none":
            dims = {"vision.hidden_size": v.hidden_size, "text output": _text_out_dim(self.backbone, t)}
            if any(d != self.embed_dim for d in dims.values()):
                raise ConfigError(
                    f"model.projection 'none' needs both towers to output embed_dim ({self.embed_dim}); got {dims}. "
                    "Set projection: linear or change the sizes"
                )

    def vision_hf(self):
        """The HF vision config object."""
        return _make_hf(self._classes()[0], self.vision, "model.vision")

    def text_hf(self):
        """The HF text config object (ids must be set; see ``TwoTowerModel.from_config``)."""
        return _make_hf(self._classes()[1], self.text, "model.text")

    @property
    def image_size(self) -> int:
        return int(self.vision_hf().image_size)

    @property
    def context_length(self) -> int:
        return int(_value(self._classes()[1], self.text, "max_position_embeddings"))

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> TwoTowerConfig:
        """A named preset (see ``PRESETS``) with nested ``overrides`` merged in."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=1)
            hint = f" - did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown two-tower preset {name!r}{hint} (presets: {', '.join(sorted(PRESETS))})")
        return cls.from_dict(merge(copy.deepcopy(PRESETS[name]), overrides or {}), f"preset {name}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> TwoTowerConfig:
        """Build from a dict; a ``preset`` key starts from that preset and the other keys override it."""
        data = dict(data or {})
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.from_preset(str(preset), data)
        return from_dict(cls, data, where)


def _text_out_dim(backbone: str, t: Any) -> int:
    """Width of the text tower's pooled output (SigLIP's head may project it)."""
    return int(getattr(t, "projection_size", None) or t.hidden_size) if backbone == "siglip" else int(t.hidden_size)


def default_image_config(config: TwoTowerConfig) -> ImageProcessingConfig:
    """Preprocessing matching the backbone's convention at the model's image size."""
    size = (config.image_size, config.image_size)
    if config.backbone != "clip":
        return ImageProcessingConfig(size=size, mean=HALF, std=HALF, resize_mode="squash", interpolation="bicubic")
    return ImageProcessingConfig(size=size, mean=CLIP_MEAN, std=CLIP_STD)


def default_processor(
    config: TwoTowerConfig, tokenizer: Any, image: ImageProcessingConfig | None = None
) -> TwoTowerProcessor:
    """A processor for ``config``: ``image`` preprocessing (default: ``default_image_config``) + ``tokenizer``."""
    return TwoTowerProcessor(image or default_image_config(config), tokenizer, config.context_length)


# ---------------------------------------------------------------------------------------------- model


@dataclass
class TwoTowerOutput:
    """What ``TwoTowerModel.forward`` returns.

    ``image_embeds``/``text_embeds`` are L2-normalised ``(B, D)``; ``logit_scale`` is the *exp'd* scale
    (the multiplier, as open_clip's model output), ``logit_bias`` the SigLIP bias or None;
    ``logits_per_image`` = scale * cos + bias, ``(B_img, B_txt)``; ``logits_per_text`` is its transpose.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor


def hf_features(out: Any) -> torch.Tensor:
    """The feature tensor of an HF ``get_image_features``/``get_text_features`` result.

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected
    features; older versions return the tensor itself.
    """
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[1] if len(out) > 1 else out[0]
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find features in {type(out).__name__}")
    return pooled


class TwoTowerModel(nn.Module):
    """An image tower and a text tower with projections into one embedding space.

    Build with ``from_config(config, processor)`` (fresh weights) or ``from_pretrained(path)``.
    ``encode_image``/``encode_text`` return unnormalised embeddings unless ``normalize=True``.
    """

    def __init__(self, config: TwoTowerConfig, processor: TwoTowerProcessor | None = None) -> None:
        super().__init__()
        import transformers as tf

        self.config = config
        self.processor = processor
        self.card: dict[str, Any] = {}
        vcfg, tcfg = config.vision_hf(), config.text_hf()
        if config.backbone == "clip":
            self.vision_model = tf.CLIPVisionModel(vcfg)
            self.text_model = tf.CLIPTextModel(tcfg)
        elif config.backbone == "siglip":
            self.vision_model = tf.SiglipVisionModel(vcfg)
            self.text_model = tf.SiglipTextModel(tcfg)
        else:
            self.vision_model, self.text_model = _auto_model(vcfg), _auto_model(tcfg)
        if config.projection == "linear":
            self.visual_projection = nn.Linear(vcfg.hidden_size, config.embed_dim, bias=False)
            self.text_projection = nn.Linear(_text_out_dim(config.backbone, tcfg), config.embed_dim, bias=False)
            # HF CLIPModel's init: std = width ** -0.5
            nn.init.normal_(self.visual_projection.weight, std=vcfg.hidden_size**-0.5)
            nn.init.normal_(self.text_projection.weight, std=self.text_projection.in_features**-0.5)
        else:
            self.visual_projection = nn.Identity()
            self.text_projection = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias if config.loss_type == "siglip" else None
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self._image_size = int(vcfg.image_size)
        self._context = int(tcfg.max_position_embeddings)
        self._vocab = int(tcfg.vocab_size)

    @classmethod
    def from_config(cls, config: TwoTowerConfig, processor: TwoTowerProcessor) -> TwoTowerModel:
        """A freshly initialised model; the text config's vocabulary and special ids come from the tokenizer."""
        config = _resolve_text(copy.deepcopy(config), processor)
        _check_processor(config, processor)
        return cls(config, processor)

    # ------------------------------------------------------------------------------------ encoders

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels -> ``(B, D)`` image embeddings."""
        self._check_pixels(pixel_values)
        out = self.vision_model(pixel_values=pixel_values)
        # auto towers: the first (CLS) token; CLIP/SigLIP pool in their own way
        pooled = out.last_hidden_state[:, 0] if self.config.backbone == "auto" else out.pooler_output  # (B, width)
        feats = self.visual_projection(pooled)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One tower pass -> ``(B, D)`` image embeddings (as ``encode_image``) and ``(B, T, D)`` patch-token
        embeddings: the patch tokens through the same final norm and projection (dense CLIP features)."""
        self._check_pixels(pixel_values)
        out = self.vision_model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if self.config.backbone == "clip":
            tower = getattr(self.vision_model, "vision_model", self.vision_model)  # transformers < 5 nests it
            pooled, patches = out.pooler_output, tower.post_layernorm(hidden[:, 1:])
        elif self.config.backbone == "siglip":  # no CLS; last_hidden_state is already post-normed
            pooled, patches = out.pooler_output, hidden
        else:
            pooled, patches = hidden[:, 0], hidden[:, 1:]
        return self.visual_projection(pooled), self.visual_projection(patches)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """``(B, L)`` token ids -> ``(B, D)`` text embeddings."""
        self._check_ids(input_ids)
        if attention_mask is not None and self.config.backbone == "clip":
            input_ids, attention_mask = _trim_padding(input_ids, attention_mask)
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = (
            _mean_pool(out.last_hidden_state, attention_mask) if self.config.backbone == "auto" else out.pooler_output
        )
        feats = self.text_projection(pooled)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> TwoTowerOutput:
        """Normalised embeddings of both towers and their logits (see ``TwoTowerOutput``)."""
        img = self.encode_image(pixel_values, normalize=True)
        txt = self.encode_text(input_ids, attention_mask, normalize=True)
        scale = self.logit_scale.exp()
        logits = scale * img @ txt.T  # (B_img, B_txt)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return TwoTowerOutput(img, txt, scale, self.logit_bias, logits, logits.T)

    @staticmethod
    def similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix ``(N_img, N_txt)``; inputs need not be normalised."""
        return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T

    def _check_pixels(self, x: torch.Tensor) -> None:
        s = self._image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ModelError(
                f"encode_image expects pixels of shape (B, 3, {s}, {s}), got {tuple(x.shape)}; "
                "preprocess images with the model's processor"
            )

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.shape[1] > self._context:
            raise ModelError(
                f"encode_text expects token ids of shape (B, L <= {self._context}), got {tuple(ids.shape)}; "
                "tokenise with the model's processor"
            )
        if ids.numel() and int(ids.max()) >= self._vocab:
            raise ModelError(
                f"token id {int(ids.max())} is outside the text tower's vocabulary ({self._vocab} ids); "
                "tokenise with the model's own processor"
            )

    # ---------------------------------------------------------------------------------- training aids

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no weight decay on logit scale/bias, biases and norm weights (see ``losses``)."""
        from mmstack.models.losses import param_groups

        return param_groups(self, weight_decay)

    def freeze(self, image: bool = False, text: bool = False) -> None:
        """Stop training a tower and its projection (open_clip's ``lock_image_tower``/``lock_text_tower``)."""
        towers = {"image": (image, self.vision_model, self.visual_projection)}
        towers["text"] = (text, self.text_model, self.text_projection)
        for flag, tower, projection in towers.values():
            if flag:
                tower.requires_grad_(False)
                projection.requires_grad_(False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------ save/load

    def save_pretrained(self, path: str | Path, card: dict[str, Any] | None = None) -> None:
        """Write the checkpoint folder atomically: config.json, model.safetensors, processor, README.md.

        Args:
            path: the folder (replaced as a whole).
            card: optional ``{"training": {...}, "metrics": {...}, "notes": str}`` for the model card; kept
                in config.json so it survives loading and re-saving.
        """
        from mmstack.models.two_tower_io import save_checkpoint

        if card:
            self.card = merge(self.card, card)
        save_checkpoint(self, Path(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> TwoTowerModel:
        """Load an mmstack two-tower folder, an HF ``CLIPModel``/``SiglipModel`` folder, or an HF hub id."""
        from mmstack.models.two_tower_io import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def export_hf_clip(self, path: str | Path) -> None:
        """Write an HF ``CLIPModel`` folder (weights, config, preprocessor and tokenizer files)."""
        from mmstack.models.two_tower_io import export_hf

        export_hf(self, Path(path), "clip")

    def export_hf(self, path: str | Path) -> None:
        """Write the matching HF folder: ``CLIPModel`` (clip backbone) or ``SiglipModel`` (siglip backbone)."""
        from mmstack.models.two_tower_io import export_hf

        export_hf(self, Path(path), self.config.backbone)


def _auto_model(cfg: Any) -> nn.Module:
    from transformers import AutoModel

    try:  # BERT/ViT-style models: their pooler (dense + tanh) is unused here
        return AutoModel.from_config(cfg, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(cfg)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the real tokens' states: ``(B, L, D)`` -> ``(B, D)``."""
    if mask is None:
        return hidden.mean(dim=1)
    w = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def _trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row.

    Exact for CLIP's causal text tower (no real token attends to later positions, pooling takes the end
    token), and it saves most of the text compute: captions are padded to the context length but are
    usually much shorter.
    """
    used = mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return (ids[:, :length], mask[:, :length]) if length < ids.shape[1] else (ids, mask)


def _resolve_text(config: TwoTowerConfig, processor: TwoTowerProcessor) -> TwoTowerConfig:
    tok = processor.tokenizer
    text = config.text
    n_vocab = len(tok)
    text.setdefault("vocab_size", n_vocab)
    if text["vocab_size"] < n_vocab:
        raise ConfigError(
            f"model.text.vocab_size ({text['vocab_size']}) is smaller than the tokenizer's vocabulary ({n_vocab}); "
            "raise it or leave it out to take the tokenizer's"
        )
    fields = {f.name for f in dataclasses.fields(config._classes()[1])}
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    for key, value in ids.items():
        if value is not None and key in fields:
            text.setdefault(key, int(value))
    text.setdefault("max_position_embeddings", processor.max_length)
    return dataclasses.replace(config, text=text)  # re-validates


def _check_processor(config: TwoTowerConfig, processor: TwoTowerProcessor) -> None:
    size, want = tuple(processor.image_config.size), (config.image_size, config.image_size)
    if size != want:
        raise ConfigError(
            f"the processor makes {size[0]}x{size[1]} images but the vision tower takes {want[0]}x{want[1]}; "
            "set image.size or model.vision.image_size so they agree"
        )
    if processor.max_length > config.context_length:
        raise ConfigError(
            f"the processor pads text to {processor.max_length} tokens but the text tower has only "
            f"{config.context_length} positions; lower max_length or raise model.text.max_position_embeddings"
        )


def config_to_dict(config: TwoTowerConfig) -> dict[str, Any]:
    """JSON-ready dict of a config (the ``model`` entry of an mmstack checkpoint's config.json)."""
    return to_dict(config)


# -------------------------------------------------------------------------------------------- presets

# Shapes-world captions run to 42 word-level tokens; encode_text trims the padding of shorter batches.
_SHAPES_TEXT = {"max_position_embeddings": 48, "hidden_act": "gelu"}

#: Named sizes (data): start points for ``TwoTowerConfig.from_preset(name, overrides)``.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.7M parameters: ViT patch 8 on 64 px (64 tokens), width 128, 4 layers; text width 128, 3 layers.
    "shapes-tiny": {
        "backbone": "clip",
        "embed_dim": 128,
        "vision": {
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "hidden_act": "gelu",
        },
        "text": {
            **_SHAPES_TEXT,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
        },
    },
    # Wider/deeper vision tower for the shapes world.
    "shapes-small": {
        "backbone": "clip",
        "embed_dim": 192,
        "vision": {
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 6,
            "num_attention_heads": 3,
            "hidden_act": "gelu",
        },
        "text": {
            **_SHAPES_TEXT,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
    },
    # SigLIP towers, sigmoid loss, no projections (exports to an HF SiglipModel).
    "shapes-siglip-tiny": {
        "backbone": "siglip",
        "projection": "none",
        "loss_type": "siglip",
        "embed_dim": 128,
        "vision": {
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        "text": {
            "max_position_embeddings": 48,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "projection_size": 128,
        },
    },
    # Seconds-fast model for tests: patch 8 on 32 px (16 tokens), width 32, one layer per tower.
    "shapes-micro": {
        "backbone": "clip",
        "embed_dim": 32,
        "vision": {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        "text": {
            "max_position_embeddings": 48,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
    },
}
