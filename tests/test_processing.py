"""Caption tokenizer, image preprocessing (parity with HF's CLIP image processor) and processor save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmstack.errors import ConfigError, ModelError
from mmstack.processing import ImageProcessingConfig, TwoTowerProcessor, train_caption_tokenizer
from mmstack.processing.image import normalize, stack_uint8, to_uint8

CAPTIONS = [
    "A red circle is left of a blue square.",
    "a small green star at the top left",
    "two objects: a large yellow heart and a purple cross",
]


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def test_wordlevel_tokenizer_pads_truncates_and_keeps_end_token():
    tok = train_caption_tokenizer(CAPTIONS, max_length=8)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    proc = TwoTowerProcessor(ImageProcessingConfig(size=(16, 16)), tok, max_length=8)
    enc = proc.text(["a red circle", CAPTIONS[0] + " " + CAPTIONS[1]])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == torch.long
    # short text: <start> a red circle <end> <pad> <pad> <pad>
    words = [tok.convert_tokens_to_ids(w) for w in ("a", "red", "circle")]
    assert ids[0].tolist() == [2, *words, 3, 0, 0, 0] and mask[0].tolist() == [1] * 5 + [0] * 3
    assert tok.unk_token_id not in words
    assert tok.decode(ids[0], skip_special_tokens=True) == "a red circle"
    # long text: truncated to 8 with the end token kept last
    assert ids[1, 0] == 2 and ids[1, -1] == 3 and mask[1].all()
    # words never seen are <unk>
    assert proc.text(["a zebra"])["input_ids"][0, 2] == tok.unk_token_id


def test_bpe_tokenizer_has_no_unknown_words():
    tok = train_caption_tokenizer(CAPTIONS, vocab_size=300, kind="bpe", max_length=16)
    ids = tok("a zebra circle")["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a zebra circle"


def test_tokenizer_bad_arguments():
    with pytest.raises(ConfigError, match="no texts"):
        train_caption_tokenizer([])
    with pytest.raises(ConfigError, match="kind"):
        train_caption_tokenizer(CAPTIONS, kind="sentencepiece")


@pytest.mark.parametrize("resize_mode", ["shortest+center-crop", "squash"])
@pytest.mark.parametrize("hw", [(50, 80), (97, 61), (32, 32)])
def test_image_preprocessing_matches_hf_clip_image_processor(resize_mode, hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = ImageProcessingConfig(size=(32, 32), resize_mode=resize_mode, interpolation="bicubic")
    hf_kwargs = {k: v for k, v in cfg.to_hf().items() if k != "image_processor_type"}
    img = _image(*hw)
    expected = CLIPImageProcessorPil(**hf_kwargs)(images=[img], return_tensors="pt")["pixel_values"]
    ours = normalize(stack_uint8([to_uint8(img, cfg)]), cfg)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # the HF config reads back into the same preprocessing
    assert ImageProcessingConfig.from_hf(cfg.to_hf()) == cfg


def test_normalize_and_uint8_path():
    cfg = ImageProcessingConfig(size=(8, 12), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), resize_mode="squash")
    img = _image(20, 20, seed=1)
    arr = to_uint8(img, cfg)
    assert arr.shape == (8, 12, 3) and arr.dtype == np.uint8
    px = stack_uint8([arr])
    manual = (
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - torch.tensor(cfg.mean).view(3, 1, 1)
    ) / torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(normalize(px, cfg)[0], manual, atol=1e-6, rtol=0)
    # an image already at the model's size is not resampled
    same = _image(8, 12, seed=2)
    assert np.array_equal(to_uint8(same, cfg), np.asarray(same))
    # grey and RGBA inputs become RGB
    assert to_uint8(same.convert("L"), cfg).shape == (8, 12, 3)


def test_image_config_errors():
    with pytest.raises(ConfigError, match="resize_mode"):
        ImageProcessingConfig(resize_mode="stretch")
    with pytest.raises(ConfigError, match="interpolation"):
        ImageProcessingConfig(interpolation="cubic")
    with pytest.raises(ConfigError, match="std"):
        ImageProcessingConfig(std=(0.0, 1.0, 1.0))


def test_processor_round_trip(tmp_path):
    tok = train_caption_tokenizer(CAPTIONS, max_length=12)
    cfg = ImageProcessingConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    proc = TwoTowerProcessor(cfg, tok, max_length=12)
    proc.save_pretrained(tmp_path)
    back = TwoTowerProcessor.from_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast

    assert isinstance(back.tokenizer, PreTrainedTokenizerFast)
    assert back.image_config == cfg and back.max_length == 12
    imgs = [_image(40, 30, seed=i) for i in range(3)]
    a, b = proc(images=imgs, text=CAPTIONS), back(images=imgs, text=CAPTIONS)
    for key in ("pixel_values", "input_ids", "attention_mask"):
        assert torch.equal(a[key], b[key])
    # the HF files alone (preprocessor_config.json + tokenizer) load too
    hf_dir = tmp_path / "hf"
    proc.save_hf(hf_dir)
    hf_back = TwoTowerProcessor.from_pretrained(hf_dir, max_length=12)
    assert torch.equal(hf_back.images(imgs), a["pixel_values"])


def test_processor_from_folder_without_preprocessing(tmp_path):
    with pytest.raises(ModelError, match="no preprocessing"):
        TwoTowerProcessor.from_pretrained(tmp_path)
