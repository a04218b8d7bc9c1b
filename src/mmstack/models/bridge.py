"""The bridge VLM (LLaVA-style): a vision encoder, a connector, and a causal language model.

    vision tower (any HF vision model) -> hidden states of ``vision_feature_layer`` -> connector
    (MLP or Perceiver resampler) -> visual tokens replace the ``<image>`` placeholders of the text
    -> HF causal LM (``AutoModelForCausalLM``) -> logits

Images may come as several views (dynamic resolution, or a global view plus tiles); videos as ``K``
frames, each encoded like an image, spatially pooled, and marked with a learned temporal embedding.
The processor expands each placeholder to the exact number of visual tokens; ``forward`` checks that
count and raises ``ModelError`` showing both numbers when they differ.

Layout of this file: config, vision/LM loading helpers, the model (encode, forward, prefill/decode),
save/load. Generation loops live in ``bridge_generate.py``; HF Llava import/export in ``bridge_hf.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmstack.config import from_dict, to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.models.connectors import ConnectorConfig, GridPositionEmbedding, build_connector
from mmstack.utils.atomic import atomic_dir

FAMILY = "bridge"
IGNORE_INDEX = -100
PixelInput = torch.Tensor | list[torch.Tensor] | None


@dataclass
class BridgeConfig:
    """Everything needed to rebuild a bridge model's architecture (weights live in model.safetensors).

    Args:
        vision: HF config dict of the vision encoder (with ``model_type``, e.g. ``clip_vision_model``).
        text: HF config dict of the causal language model (e.g. ``model_type: llama``).
        connector: MLP or resampler (see ``mmstack.models.connectors``).
        vision_feature_layer: hidden-state index (or indices, concatenated) fed to the connector; LLaVA
            uses -2, the shapes world -1.
        vision_feature_select_strategy: ``"default"`` drops the CLS token (LLaVA), ``"full"`` keeps all.
        image_token_id, video_token_id: placeholder ids in the language model's vocabulary.
        max_frames: frames per clip that get their own temporal embedding.
        video_pool: average-pool each frame's patch grid by this factor before the connector (LLaVA-NeXT-Video).
    """

    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: Literal["default", "full"] = "full"
    image_token_id: int = -1
    video_token_id: int = -1
    max_frames: int = 8
    video_pool: int = 1

    def __post_init__(self) -> None:
        for name in ("vision", "text"):
            if not isinstance(getattr(self, name), dict) or "model_type" not in getattr(self, name):
                raise ConfigError(f"bridge {name} config must be an HF config dict with a 'model_type'")
        if self.image_token_id < 0:
            raise ConfigError("bridge image_token_id must be set (the id of <image> in the tokenizer)")
        if self.max_frames <= 0 or self.video_pool <= 0:
            raise ConfigError("bridge max_frames and video_pool must be > 0")

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)


@dataclass
class BridgeOutput:
    """``forward``'s result: the loss (when labels were given), logits, and the KV cache (when asked for)."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None
    past_key_values: Any = None
    n_label_tokens: int = 0


# ------------------------------------------------------------------------------------ building blocks


def hf_config(cfg: dict[str, Any]):
    """An HF ``PretrainedConfig`` from a dict with ``model_type``."""
    from transformers import AutoConfig

    data = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(cfg["model_type"], **data)
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"HF config with model_type={cfg.get('model_type')!r} is invalid: {err}") from None


def build_vision_tower(cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised HF vision model (e.g. ``CLIPVisionModel``) from its config dict."""
    from transformers import AutoModel

    return AutoModel.from_config(hf_config(cfg))


def build_language_model(cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised HF causal LM (e.g. ``LlamaForCausalLM``) from its config dict."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(cfg))


def vision_has_cls(vision_cfg: dict[str, Any]) -> bool:
    """Whether the vision model prepends a CLS token (CLIP does, SigLIP does not)."""
    return not str(vision_cfg.get("model_type", "")).startswith("siglip")


def config_dict(hf_cfg) -> dict[str, Any]:
    """A JSON-ready dict of an HF config, without bookkeeping keys that change between versions."""
    d = hf_cfg.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        d.pop(key, None)
    return json.loads(json.dumps(d, default=str))


def lm_parts(lm: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(decoder, input embeddings, output head) of an HF causal LM, through a peft wrapper if present."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return getattr(base, base.base_model_prefix), base.get_input_embeddings(), base.get_output_embeddings()


# ---------------------------------------------------------------------------------------------- model


class BridgeModel(nn.Module):
    """Vision encoder + connector + causal LM; see the module docstring.

    Build with ``BridgeModel(config)`` (random weights), ``from_parts`` (pretrained towers) or
    ``from_pretrained`` (an mmstack checkpoint or an HF Llava folder). ``processor`` (a ``BridgeProcessor``)
    is attached by the recipe or by ``from_pretrained`` and saved with the weights.
    """

    def __init__(
        self, config: BridgeConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision)
        self.language_model = language_model if language_model is not None else build_language_model(config.text)
        vision_dim = int(self.vision_tower.config.hidden_size) * len(config.feature_layers)
        text_dim = int(self.language_model.config.hidden_size)
        self.connector = build_connector(config.connector, vision_dim, text_dim)
        self.temporal_embedding = nn.Parameter(torch.randn(config.max_frames, text_dim) * 0.02)
        self.grid_position = (
            GridPositionEmbedding(config.connector.max_grid, text_dim) if config.connector.position_embedding else None
        )
        self.processor = None

    @classmethod
    def from_parts(cls, vision_tower: nn.Module, language_model: nn.Module, **config_fields: Any) -> BridgeModel:
        """Join pretrained HF towers; ``config_fields`` fill the rest of ``BridgeConfig``."""
        cfg = BridgeConfig(
            vision=config_dict(vision_tower.config), text=config_dict(language_model.config), **config_fields
        )
        return cls(cfg, vision_tower, language_model)

    # ------------------------------------------------------------------------------------- geometry

    @property
    def patch_size(self) -> int:
        return int(self.vision_tower.config.patch_size)

    @property
    def text_dim(self) -> int:
        return int(self.language_model.config.hidden_size)

    def tokens_per_view(self, height: int, width: int) -> int:
        """Visual tokens one image view of ``height`` x ``width`` pixels becomes (the processor uses this)."""
        return self.connector.num_tokens(self._vision_tokens(*self.patch_grid(height, width)))

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Visual tokens one video frame becomes (after ``video_pool``)."""
        return self.connector.num_tokens(self._vision_tokens(*self.patch_grid(height, width, self.config.video_pool)))

    def patch_grid(self, height: int, width: int, pool: int = 1) -> tuple[int, int]:
        """Rows and columns of patches of a ``height`` x ``width`` view, after average pooling by ``pool``."""
        return math.ceil(height // self.patch_size / pool), math.ceil(width // self.patch_size / pool)

    def _vision_tokens(self, grid_h: int, grid_w: int) -> int:
        cls_kept = vision_has_cls(self.config.vision) and self.config.vision_feature_select_strategy == "full"
        return grid_h * grid_w + int(cls_kept)

    # ------------------------------------------------------------------------------------- encoding

    @torch.no_grad()
    def measure_feature_stats(self, pixel_values: PixelInput) -> int:
        """Fix the connector's standardisation (``connector.standardize``) from the vision features of these
        images, as the connector sees them; returns the number of feature vectors measured."""
        feats = [self.vision_features(v).flatten(0, 1) for v in _as_views(pixel_values)]
        if not feats:
            raise ConfigError("connector.standardize needs images to measure feature statistics; the batch had none")
        stacked = torch.cat(feats).float()
        self.connector.set_feature_stats(stacked)
        return stacked.shape[0]

    def vision_features(self, pixel_values: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """Selected hidden states of the vision tower for views of one size: (V, 3, H, W) -> (V, N, D_v)."""
        h, w = pixel_values.shape[-2:]
        kwargs = {}
        size = self.vision_tower.config.image_size
        if (h, w) != (size, size):  # HF vision models refuse other sizes unless asked to interpolate
            kwargs["interpolate_pos_encoding"] = True
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
        has_cls = vision_has_cls(self.config.vision)
        keep_cls = has_cls and self.config.vision_feature_select_strategy == "full"
        layers = []
        for idx in self.config.feature_layers:
            hs = out.hidden_states[idx]  # (V, [1 +] gh * gw, D_v)
            if has_cls and not keep_cls:
                hs = hs[:, 1:]
            if pool > 1:
                hs = _pool_grid(hs, h // self.patch_size, w // self.patch_size, pool, keep_cls)
            layers.append(hs)
        return torch.cat(layers, dim=-1)

    def _project(self, pixel_values: torch.Tensor, pool: int = 1) -> torch.Tensor:
        """Views of one size -> connector tokens (with grid positions when configured): (V, M, D_t)."""
        tokens = self.connector(self.vision_features(pixel_values, pool=pool))
        if self.grid_position is not None:
            tokens = self.grid_position(tokens, *self.patch_grid(*pixel_values.shape[-2:], pool))
        return tokens

    def encode_images(self, pixel_values: PixelInput) -> torch.Tensor:
        """Visual tokens of every image, in order, flattened: (total_tokens, D_text).

        ``pixel_values`` is a (B, 3, H, W) tensor (one view each) or a list with one (V, 3, H, W) or
        (3, H, W) tensor per image (dynamic resolution, tiles). Views of equal size are encoded together.
        """
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
            return self._project(pixel_values).flatten(0, 1)  # (B * M, D_t)
        views = _as_views(pixel_values)
        if not views:
            return torch.zeros(0, self.text_dim, device=self.temporal_embedding.device)
        flat = [v for group in views for v in group.unbind(0)]
        out: list[torch.Tensor | None] = [None] * len(flat)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, v in enumerate(flat):
            by_size.setdefault(tuple(v.shape[-2:]), []).append(i)
        for idx in by_size.values():
            tokens = self._project(torch.stack([flat[i] for i in idx]))  # (V, M, D_t)
            for j, i in enumerate(idx):
                out[i] = tokens[j]
        return torch.cat(out, dim=0)  # type: ignore[arg-type]

    def encode_videos(self, video_values: PixelInput) -> torch.Tensor:
        """Visual tokens of every clip: frames are encoded, pooled, projected and tagged with their index.

        ``video_values`` is (B, K, 3, H, W) or a list of (K, 3, H, W); returns (total_tokens, D_text).
        """
        clips = list(video_values) if video_values is not None else []
        if not clips:
            return torch.zeros(0, self.text_dim, device=self.temporal_embedding.device)
        out = []
        for frames in clips:
            k = frames.shape[0]
            if k > self.config.max_frames:
                raise ModelError(
                    f"a clip has {k} frames but the model embeds at most max_frames={self.config.max_frames}"
                )
            tokens = self._project(frames, pool=self.config.video_pool) + self.temporal_embedding[:k, None, :]
            out.append(tokens.flatten(0, 1))
        return torch.cat(out, dim=0)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: PixelInput = None, video_values: PixelInput = None
    ) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered into the placeholder positions: (B, T, D)."""
        _, embed_tokens, _ = lm_parts(self.language_model)
        embeds = embed_tokens(input_ids)
        for token_id, feats, what in (
            (self.config.image_token_id, self.encode_images(pixel_values), "image"),
            (self.config.video_token_id, self.encode_videos(video_values), "video"),
        ):
            mask = input_ids == token_id
            n_tokens = int(mask.sum())
            if n_tokens != feats.shape[0]:
                raise ModelError(
                    f"the text has {n_tokens} {what} placeholder tokens but the {what}s give {feats.shape[0]} "
                    f"visual tokens; the processor must expand each <{what}> to the model's token count"
                )
            if n_tokens:
                embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))
        return embeds

    # -------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: PixelInput = None,
        video_values: PixelInput = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """Teacher-forced pass. With ``labels`` (ignored = -100) the loss is the mean next-token
        cross-entropy over labelled tokens, and logits are only computed where a label exists."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        embeds = self.embed(input_ids, pixel_values, video_values)
        decoder, _, head = lm_parts(self.language_model)
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, D)
        if labels is None:
            return BridgeOutput(loss=None, logits=head(hidden))
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1)
        n = int(keep.sum())
        if n == 0:
            raise ModelError("every label of this batch is ignored (-100): nothing to learn; check the processor")
        logits = head(hidden[:, :-1][keep])  # (n, V)
        loss = F.cross_entropy(logits.float(), targets[keep])
        return BridgeOutput(loss=loss, logits=None, n_label_tokens=n)

    # ----------------------------------------------------------------------------- prefill / decode

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: PixelInput = None,
        video_values: PixelInput = None,
    ) -> tuple[torch.Tensor, Any]:
        """Run the prompt once; returns the last position's logits (B, V) and the KV cache.

        Prompts must be left-padded so that every row's last token is real.
        """
        from transformers import DynamicCache

        if bool((attention_mask[:, -1] == 0).any()):
            raise ModelError("prefill needs left-padded prompts (the last column must be real tokens)")
        embeds = self.embed(input_ids, pixel_values, video_values)
        decoder, _, head = lm_parts(self.language_model)
        cache = DynamicCache(config=self.language_model.config)
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            past_key_values=cache,
            use_cache=True,
        )
        return head(out.last_hidden_state[:, -1]), out.past_key_values

    @torch.no_grad()
    def decode(
        self, tokens: torch.Tensor, cache: Any, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One decoding step: ``tokens`` (B,) at ``positions`` (B,), ``attention_mask`` (B, T_past + 1)."""
        decoder, embed_tokens, head = lm_parts(self.language_model)
        out = decoder(
            inputs_embeds=embed_tokens(tokens[:, None]),
            attention_mask=attention_mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        return head(out.last_hidden_state[:, -1])  # (B, V)

    def generate(self, *args: Any, **kwargs: Any):
        """Batched generation with a KV cache; see ``mmstack.models.bridge_generate.generate``."""
        from mmstack.models.bridge_generate import generate

        return generate(self, *args, **kwargs)

    # ----------------------------------------------------------------------------------- stages

    def set_trainable(self, vision: bool, connector: bool, language: bool) -> None:
        """Freeze or unfreeze the three parts (training stages 0, 1 and 2)."""
        for module, flag in ((self.vision_tower, vision), (self.language_model, language)):
            for p in module.parameters():
                p.requires_grad_(flag)
        for p in self.connector.parameters():
            p.requires_grad_(connector)
        self.temporal_embedding.requires_grad_(connector)
        if self.grid_position is not None:
            self.grid_position.requires_grad_(connector)

    # ---------------------------------------------------------------------------------- save/load

    def save_pretrained(self, path: str | Path, card: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` (family ``bridge``), ``model.safetensors``, the processor and a model card."""
        if hasattr(self.language_model, "get_base_model"):
            raise ModelError("merge the LoRA adapters (merge_lora) before saving the model")
        config = {"family": FAMILY, **to_dict(self.config)}
        return write_checkpoint(self, path, config, self.processor, model_card(self, card or {}))

    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> BridgeModel:
        """Load an mmstack bridge checkpoint folder, or import an HF ``LlavaForConditionalGeneration`` folder."""

        path = Path(path)
        raw = read_checkpoint_config(path)
        if raw.get("model_type") == "llava" and "family" not in raw:
            from mmstack.models.bridge_hf import import_llava

            return import_llava(path)
        if raw.get("family") != FAMILY:
            raise ModelError(f"{path} holds a {raw.get('family')!r} checkpoint, not a bridge model")
        raw.pop("family")
        cfg = from_dict(BridgeConfig, raw, where=str(path / "config.json"))
        with _quiet_transformers():
            model = cls(cfg)
        model.processor = load_checkpoint_weights(model, path)
        return model.eval()


# -------------------------------------------------------------------------------------------- helpers


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions (HF's rule)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _as_views(pixel_values: PixelInput) -> list[torch.Tensor]:
    if pixel_values is None:
        return []
    if isinstance(pixel_values, torch.Tensor):
        if pixel_values.ndim == 4:
            return [pixel_values]  # (B, 3, H, W): one view per image, encoded as one group
        raise ModelError(
            f"pixel_values must be (B, 3, H, W) or a list of tensors, got shape {tuple(pixel_values.shape)}"
        )
    return [v if v.ndim == 4 else v.unsqueeze(0) for v in pixel_values]


def _pool_grid(hs: torch.Tensor, gh: int, gw: int, pool: int, has_cls: bool) -> torch.Tensor:
    """Average-pool the patch grid of (V, [1 +] gh * gw, D) by ``pool`` (ceil mode), keeping a CLS token."""
    cls, patches = (hs[:, :1], hs[:, 1:]) if has_cls else (None, hs)
    v, _, d = patches.shape
    grid = patches.transpose(1, 2).reshape(v, d, gh, gw)  # (V, D, gh, gw)
    pooled = F.avg_pool2d(grid, pool, ceil_mode=True).flatten(2).transpose(1, 2)  # (V, gh' * gw', D)
    return torch.cat([cls, pooled], dim=1) if cls is not None else pooled


def write_checkpoint(model: nn.Module, path: str | Path, config: dict[str, Any], processor: Any, readme: str) -> Path:
    """Atomically write a checkpoint folder: ``config.json``, ``model.safetensors``, the processor, README."""
    from safetensors.torch import save_model

    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_model(model, str(tmp / "model.safetensors"))
        if processor is not None:
            processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(readme)
    return path


def load_checkpoint_weights(model: nn.Module, path: Path) -> Any:
    """Load ``path/model.safetensors`` into ``model`` (every key must match); returns the saved
    ``BridgeProcessor`` when the folder has one, else None."""
    from safetensors.torch import load_model

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path} has no model.safetensors; the checkpoint is incomplete")
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{weights} does not match its config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    if not (path / "bridge_processor.json").is_file():
        return None
    from mmstack.processing.bridge_processor import BridgeProcessor

    return BridgeProcessor.from_pretrained(path)


def read_checkpoint_config(
    path: Path, what: str = "a bridge checkpoint folder (or an HF Llava folder)"
) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{path} has no config.json: pass {what}")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is damaged") from None


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and init warnings while building known-good models."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def model_card(model: BridgeModel, card: dict[str, Any]) -> str:
    """A short README for the checkpoint: architecture, size, how it was trained, eval numbers."""
    cfg = model.config
    lines = [
        "# mmstack bridge VLM",
        "",
        f"- vision: `{cfg.vision.get('model_type')}` (hidden {model.vision_tower.config.hidden_size}, "
        f"patch {model.patch_size}, image {model.vision_tower.config.image_size} px), feature layer "
        f"{cfg.vision_feature_layer}, select `{cfg.vision_feature_select_strategy}`",
        f"- connector: `{cfg.connector.type}`"
        + (f" ({cfg.connector.num_queries} queries)" if cfg.connector.type == "resampler" else ""),
        f"- language model: `{cfg.text.get('model_type')}` (hidden {model.text_dim}, "
        f"{model.language_model.config.num_hidden_layers} layers, vocab {model.language_model.config.vocab_size})",
        f"- parameters: {count_parameters(model):,}",
        "",
        'Load with `mmstack.load(path)`; chat with `mmstack chat --model PATH --image IMG "question"`.',
    ]
    for title, key in (("Training", "training"), ("Evaluation", "eval")):
        if card.get(key):
            lines += ["", f"## {title}", "", "```json", json.dumps(card[key], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"
