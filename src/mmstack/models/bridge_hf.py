"""Interop with HF transformers' ``LlavaForConditionalGeneration`` (MLP connector).

In memory (transformers 5.x) HF Llava holds ``model.vision_tower.*`` (the HF vision model),
``model.multi_modal_projector.linear_{1,2}.*``, ``model.language_model.*`` (the LM's decoder) and
``lm_head.weight``; ours holds ``vision_tower.*``, ``connector.*`` and ``language_model.<decoder prefix>.*``
/ ``language_model.lm_head.*``. Conversion maps these names on live modules and lets transformers write
and read its own on-disk format. The temporal (video) embeddings have no Llava counterpart and are not
exported; a resampler connector cannot be exported at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmstack.errors import ModelError
from mmstack.models.bridge import BridgeModel, _quiet_transformers, config_dict, vision_has_cls
from mmstack.models.connectors import ConnectorConfig

# The chat template of ``BridgeProcessor.render`` as Jinja, for HF ``apply_chat_template``: a head, the parts of a
# user message's content list (images where they stand, or behind the text: ``image_placement``), a tail.
_TEMPLATE_HEAD = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
)
_TEMPLATE_TAIL = (
    "{% endif %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_PARTS_AS_WRITTEN = (
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
)
_PARTS_AFTER_TEXT = (  # images before the first text part move behind the text (placeholders_after_text)
    "{% set ns = namespace(lead=0, text=false) %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' and not ns.text %}{% set ns.lead = ns.lead + 1 %}"
    "{% elif c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{% set ns.text = true %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for _ in range(ns.lead) %}{{ '\n<image>' if ns.text else '<image>\n' }}{% endfor %}"
)
CHAT_TEMPLATE = _TEMPLATE_HEAD + _PARTS_AS_WRITTEN + _TEMPLATE_TAIL
CHAT_TEMPLATE_IMAGES_AFTER_TEXT = _TEMPLATE_HEAD + _PARTS_AFTER_TEXT + _TEMPLATE_TAIL


def _decoder_prefix(lm: Any) -> str:
    return lm.base_model_prefix


def llava_config(model: BridgeModel):
    """The ``LlavaConfig`` of ``model`` (MLP connector only)."""
    from transformers import LlavaConfig

    cfg = model.config
    if cfg.connector.type != "mlp":
        raise ModelError("only the MLP connector has an HF Llava equivalent; this model uses a resampler")
    if cfg.connector.position_embedding:
        raise ModelError(
            "this model adds grid position embeddings to its visual tokens, which HF Llava has no place for; "
            "export a model trained with connector.position_embedding: false"
        )
    if cfg.connector.input_norm:
        raise ModelError(
            "this model layer-normalises its visual features before the MLP, which HF Llava's projector lacks; "
            "export a model trained with connector.input_norm: false"
        )
    strategy = cfg.vision_feature_select_strategy if vision_has_cls(cfg.vision) else "full"
    size = int(model.vision_tower.config.image_size)
    return LlavaConfig(
        vision_config=model.vision_tower.config.to_dict(),
        text_config=model.language_model.config.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=model.tokens_per_view(size, size),
        projector_hidden_act=cfg.connector.act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        multimodal_projector_bias=cfg.connector.bias,
        tie_word_embeddings=bool(getattr(model.language_model.config, "tie_word_embeddings", False)),
    )


def to_hf_llava(model: BridgeModel):
    """A live ``LlavaForConditionalGeneration`` with ``model``'s weights."""
    from transformers import LlavaForConditionalGeneration

    with _quiet_transformers():
        hf = LlavaForConditionalGeneration(llava_config(model))
    prefix = _decoder_prefix(model.language_model) + "."
    state: dict[str, torch.Tensor] = {}
    for k, v in model.vision_tower.state_dict().items():
        state[f"model.vision_tower.{k}"] = v
    for k, v in model.connector.folded_state_dict().items():  # connector.standardize folded into linear_1
        state[f"model.multi_modal_projector.{k}"] = v
    for k, v in model.language_model.state_dict().items():
        if k.startswith(prefix):
            state[f"model.language_model.{k[len(prefix) :]}"] = v
        elif k == "lm_head.weight":
            state["lm_head.weight"] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"cannot map weights to HF Llava: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


def export_llava(model: BridgeModel, path: str | Path) -> Path:
    """Write an HF Llava folder (weights, config, tokenizer, image processor, chat template)."""
    path = Path(path)
    hf = to_hf_llava(model)
    with _quiet_transformers():
        hf.save_pretrained(str(path))
    proc = model.processor
    if proc is not None:
        tok = proc.tokenizer
        after = proc.config.image_placement == "after_text"
        tok.chat_template = CHAT_TEMPLATE_IMAGES_AFTER_TEXT if after else CHAT_TEMPLATE
        tok.save_pretrained(str(path))
        size = int(model.vision_tower.config.image_size)
        image = proc.config.image.to_hf()
        image["crop_size"] = {"height": size, "width": size}
        (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
        processor_cfg = {
            "processor_class": "LlavaProcessor",
            "image_token": "<image>",
            "patch_size": model.patch_size,
            "vision_feature_select_strategy": hf.config.vision_feature_select_strategy,
            "num_additional_image_tokens": int(vision_has_cls(model.config.vision)),
        }
        (path / "processor_config.json").write_text(json.dumps(processor_cfg, indent=2) + "\n")
    return path


def from_hf_llava(hf: Any, processor: Any = None) -> BridgeModel:
    """Our model with the weights of a live ``LlavaForConditionalGeneration``."""
    from transformers import AutoModelForCausalLM

    cfg = hf.config
    if cfg.vision_config.model_type.startswith("siglip") and cfg.vision_feature_select_strategy == "default":
        raise ModelError("this Llava drops the first SigLIP patch ('default' strategy); only 'full' is supported")
    with _quiet_transformers():
        lm = AutoModelForCausalLM.from_config(cfg.text_config)
    prefix = _decoder_prefix(lm) + "."
    state = {prefix + k: v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    lm.load_state_dict(state, strict=True)
    connector = ConnectorConfig(type="mlp", act=cfg.projector_hidden_act, bias=cfg.multimodal_projector_bias)
    video = processor.video_token_id if processor is not None and processor.video_token_id is not None else -1
    model = BridgeModel.from_parts(
        hf.model.vision_tower,
        lm,
        connector=connector,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_token_id=int(cfg.image_token_index),
        video_token_id=video,
    )
    model.connector.load_state_dict(hf.model.multi_modal_projector.state_dict())
    model.processor = processor
    model.config.vision = config_dict(model.vision_tower.config)
    return model.eval()


def import_llava(path: str | Path) -> BridgeModel:
    """Load an HF Llava folder (weights, tokenizer, ``preprocessor_config.json``) as a ``BridgeModel``."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from mmstack.processing.bridge_processor import BridgeProcessor
    from mmstack.processing.image import ImageProcessingConfig

    path = Path(path)
    with _quiet_transformers():
        hf = LlavaForConditionalGeneration.from_pretrained(str(path))
    processor = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(path))
        pre = path / "preprocessor_config.json"
        image = ImageProcessingConfig.from_hf(json.loads(pre.read_text()), str(pre)) if pre.is_file() else None
        model_shell = _Shell(hf)
        extra = {"image": image} if image is not None else {}
        processor = BridgeProcessor.for_model(model_shell, tok, **extra)
    return from_hf_llava(hf, processor)


class _Shell:
    """Just enough of a ``BridgeModel`` for ``BridgeProcessor.for_model`` to read an HF Llava's geometry."""

    def __init__(self, hf: Any) -> None:
        from mmstack.models.bridge import BridgeConfig

        c = hf.config
        self.patch_size = int(c.vision_config.patch_size)
        self.config = BridgeConfig(
            vision=config_dict(c.vision_config),
            text=config_dict(c.text_config),
            connector=ConnectorConfig(type="mlp"),
            vision_feature_select_strategy=c.vision_feature_select_strategy,
            image_token_id=int(c.image_token_index),
        )
