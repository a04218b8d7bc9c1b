"""Tiny bridge models and data for the bridge/llava/vqa tests (seconds on one core)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from mmstack.models.bridge import BridgeConfig, BridgeModel
from mmstack.models.connectors import ConnectorConfig
from mmstack.processing.bridge_processor import BridgeProcessor, train_chat_tokenizer

WORDS = [
    "a red circle at the top left",
    "What colour is the star? How many objects are there? Which way does it move?",
    "red green blue yellow 1 2 3 left right circle square star",
    "Describe the image.",
]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 50), "blue": (30, 70, 230), "yellow": (235, 230, 40)}


def tiny_vision(image_size: int = 32, model_type: str = "clip_vision_model") -> dict:
    return {
        "model_type": model_type,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }


def tiny_text(vocab: int, tok) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def tiny_model(
    connector: str = "mlp",
    select: str = "full",
    feature_layer: int | list[int] = -1,
    seed: int = 0,
    image_size: int = 32,
    vision_type: str = "clip_vision_model",
    position_embedding: bool = False,
    input_norm: bool = False,
    standardize: bool = False,
    **processor: object,
) -> BridgeModel:
    """A random tiny bridge model with a word-level tokenizer and its processor attached."""
    torch.manual_seed(seed)
    tok = train_chat_tokenizer(WORDS)
    cfg = BridgeConfig(
        vision=tiny_vision(image_size, vision_type),
        text=tiny_text(len(tok), tok),
        connector=ConnectorConfig(
            type=connector,
            num_queries=4,
            depth=1,
            heads=2,
            position_embedding=position_embedding,
            max_grid=8,
            input_norm=input_norm,
            standardize=standardize,
        ),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        max_frames=4,
        video_pool=2,
    )
    model = BridgeModel(cfg).eval()
    image = {"size": [image_size, image_size], "resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    model.processor = BridgeProcessor.for_model(model, tok, image=image, **processor)
    return model


def solid(colour: str, w: int = 32, h: int = 32) -> Image.Image:
    return Image.new("RGB", (w, h), COLOURS[colour])


def qa(question: str, answer: str, image: bool = True) -> list[dict]:
    prefix = "<image>\n" if image else ""
    return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]


def colour_world(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """A folder in the LLaVA-Instruct layout: one large blob per image on grey, asked for its colour."""
    from PIL import ImageDraw

    rng = torch.Generator().manual_seed(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names, shapes = list(COLOURS), ["circle", "square", "star", "triangle"]
    records = []
    for i in range(n):
        c, s = (int(x) for x in torch.randint(0, 4, (2,), generator=rng))
        x0, y0 = (int(v) for v in torch.randint(0, size // 3, (2,), generator=rng))
        img = Image.new("RGB", (size, size), (40, 40, 40))
        ImageDraw.Draw(img).ellipse((x0, y0, x0 + size * 2 // 3, y0 + size * 2 // 3), fill=COLOURS[names[c]])
        rel = f"images/{i:06d}.png"
        img.save(root / rel)
        turns = qa(f"What colour is the {shapes[s]}?", names[c])
        records.append({"id": f"{i:06d}", "image": rel, "conversations": turns, "kinds": ["colour"]})
    (root / "conversations.json").write_text(json.dumps(records))
    return root
