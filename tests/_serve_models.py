"""Tiny random checkpoints for the server tests, saved with each family's own ``save_pretrained``."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

WORDS = [
    "what colour is the circle square star ?",
    "a red blue green yellow circle square star left right of above below",
    "yes no one two three",
]


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict:
    """{"clip": TwoTowerModel, "vlm": BridgeModel, "native": NativeModel}, each saved to a temporary folder
    with its family's ``save_pretrained`` and loaded back with its ``from_pretrained``."""
    from mmstack.models.bridge import BridgeModel
    from mmstack.models.native import NativeModel
    from mmstack.models.two_tower import TwoTowerModel

    root = tmp_path_factory.mktemp("serve-models")
    clip = TwoTowerModel.from_pretrained(save_clip(root / "clip"))
    vlm = BridgeModel.from_pretrained(save_vlm(root / "vlm"))
    native = NativeModel.from_pretrained(save_native(root / "native"))
    return {"clip": clip, "vlm": vlm, "native": native, "root": root}


def save_clip(folder: Path) -> Path:
    """A ``shapes-micro`` two-tower model (32 px, one layer per tower)."""
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer

    tok = train_caption_tokenizer(WORDS, max_length=16)
    cfg = TwoTowerConfig.from_preset("shapes-micro")
    torch.manual_seed(0)
    TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).save_pretrained(folder)
    return folder


def save_vlm(folder: Path, init_range: float = 0.02) -> Path:
    """A bridge VLM with a one-layer CLIP vision tower on 32 px and a one-layer Llama.

    ``init_range``: the Llama's weight init scale; a large one (0.5) makes its answers depend on every
    position and mask detail (HF's default 0.02 gives nearly uniform attention)."""
    from mmstack.models.bridge import BridgeConfig, BridgeModel
    from mmstack.processing.bridge_processor import BridgeProcessor, train_chat_tokenizer

    tok = train_chat_tokenizer(WORDS, max_length=128)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, **tiny}
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    text = {"model_type": "llama", "vocab_size": len(tok), "num_key_value_heads": 2, "max_position_embeddings": 256}
    text["initializer_range"] = init_range
    cfg = BridgeConfig(
        vision=vision,
        text={**text, **tiny, **ids},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
    )
    torch.manual_seed(0)
    model = BridgeModel(cfg).eval()
    image = {"size": [32, 32], "resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    model.processor = BridgeProcessor.for_model(model, tok, image=image)
    model.save_pretrained(folder)
    return folder


def save_native(folder: Path) -> Path:
    """A one-layer native decoder over a 4 x 4-code VQ tokenizer of 32 px images."""
    from mmstack.models.native import NativeConfig, NativeModel
    from mmstack.models.vq import VQConfig, VQModel
    from mmstack.processing import train_caption_tokenizer
    from mmstack.processing.native_tokens import NativeVocab

    tok = train_caption_tokenizer(WORDS, max_length=32)
    torch.manual_seed(0)
    vq = VQModel(VQConfig(image_size=32, patch=8, codebook_size=16, channels=16, pixel_channels=8))
    vocab = NativeVocab(n_text=len(tok), n_codes=16, grid=4)
    model = NativeModel(NativeConfig(hidden_size=32, layers=1, heads=2, max_positions=128), vocab, tok, vq.eval())
    model.save_pretrained(folder)
    return folder


def png_bytes(colour: tuple[int, int, int] | str = "red", size: int = 40, seed: int | None = None) -> bytes:
    if seed is not None:
        rng = np.random.default_rng(seed)
        img = Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))
    else:
        img = Image.new("RGB", (size, size), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(colour: tuple[int, int, int] | str = "red", size: int = 40, seed: int | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour, size, seed)).decode()
