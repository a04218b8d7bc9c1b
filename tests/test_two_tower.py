"""Two-tower model: HF CLIP/SigLIP parity, export, save/load, init, freezing and clear errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mmstack
from mmstack.errors import ConfigError, ModelError
from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor, hf_features
from mmstack.processing import ImageProcessingConfig, TwoTowerProcessor, train_caption_tokenizer

CAPTIONS = ["a red circle", "a blue square left of a green star", "a small pink heart", "a large cyan cross"]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return train_caption_tokenizer(CAPTIONS, max_length=16)


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _micro(tokenizer, preset: str = "shapes-micro", **overrides) -> TwoTowerModel:
    cfg = TwoTowerConfig.from_preset(preset, overrides)
    torch.manual_seed(0)
    return TwoTowerModel.from_config(cfg, default_processor(cfg, tokenizer))


def _hf_folder(tmp_path, tokenizer, kind: str):
    """A tiny random HF CLIPModel/SiglipModel saved as a folder with tokenizer and preprocessor files."""
    import transformers as tf

    ids = {"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    text = {**TINY, **ids, "max_position_embeddings": 16}
    vision = {**TINY, "image_size": 32, "patch_size": 8}
    torch.manual_seed(1)
    if kind == "clip":
        hf = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        image = ImageProcessingConfig(size=(32, 32))
    else:
        hf = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # HF initialises both to zero; give them telling values
            hf.logit_scale.fill_(2.1)
            hf.logit_bias.fill_(-3.0)
        image = ImageProcessingConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode="squash")
    hf.eval()
    folder = tmp_path / f"hf-{kind}"
    hf.save_pretrained(str(folder))
    TwoTowerProcessor(image, tokenizer, 16).save_hf(folder)
    return hf, folder


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_features_match_hf_model(tmp_path, tokenizer, kind):
    hf, folder = _hf_folder(tmp_path, tokenizer, kind)
    ours = TwoTowerModel.from_pretrained(folder)
    assert ours.config.backbone == kind and ours.config.loss_type == kind
    batch = ours.processor(images=_images(3, seed=2), text=CAPTIONS[:3])
    with torch.no_grad():
        hf_img = hf_features(hf.get_image_features(pixel_values=batch["pixel_values"]))
        hf_txt = hf_features(hf.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        hf_out = hf(**batch)
        img = ours.encode_image(batch["pixel_values"])
        txt = ours.encode_text(batch["input_ids"], batch["attention_mask"])
        out = ours(**batch)
    torch.testing.assert_close(img, hf_img, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(txt, hf_txt, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_image, hf_out.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits_per_text, hf_out.logits_per_text, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(img[0], img[1])  # features depend on the input


@pytest.mark.parametrize("preset", ["shapes-micro", "shapes-siglip-tiny"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tokenizer, preset):
    import transformers as tf

    overrides = {} if preset == "shapes-micro" else {"vision": {**TINY, "hidden_size": 32}, "embed_dim": 32}
    if preset != "shapes-micro":
        overrides["text"] = {**TINY, "projection_size": 32}
    model = _micro(tokenizer, preset, **overrides).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # exported values, not the init ones
    size = model.config.image_size
    batch = model.processor(images=_images(4, size=size, seed=3), text=CAPTIONS)
    out_dir = tmp_path / "export"
    if preset == "shapes-micro":
        model.export_hf_clip(out_dir)
        hf = tf.CLIPModel.from_pretrained(str(out_dir)).eval()
    else:
        model.export_hf(out_dir)
        hf = tf.SiglipModel.from_pretrained(str(out_dir)).eval()
    with torch.no_grad():
        ours, theirs = model(**batch), hf(**batch)
        feats = hf_features(hf.get_image_features(pixel_values=batch["pixel_values"]))
        torch.testing.assert_close(feats, model.encode_image(batch["pixel_values"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, atol=1e-5, rtol=1e-5)
    # transformers' auto classes read the exported preprocessing and tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(str(out_dir))(images=_images(4, size=size, seed=3), return_tensors="pt")
    torch.testing.assert_close(pixels["pixel_values"], batch["pixel_values"], atol=1e-5, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(str(out_dir))("a red circle")["input_ids"] == batch["input_ids"][0][:5].tolist()
    )
    # and an export reads back into mmstack with the same outputs
    back = TwoTowerModel.from_pretrained(out_dir)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits_per_image, ours.logits_per_image, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path, tokenizer):
    model = _micro(tokenizer, loss_type="siglip")
    with torch.no_grad():
        model.logit_bias.fill_(-4.0)
    batch = model.processor(images=_images(3, seed=4), text=CAPTIONS[:3])
    path = tmp_path / "ckpt"
    model.save_pretrained(path, card={"training": {"steps": 5}, "metrics": {"val": {"t2i_r1": 0.5}}})
    back = mmstack.load(str(path))
    assert isinstance(back, TwoTowerModel) and not back.training
    model.eval()
    with torch.no_grad():
        a, b = model(**batch), back(**batch)
    assert torch.equal(a.logits_per_image, b.logits_per_image) and torch.equal(a.image_embeds, b.image_embeds)
    assert back.config == model.config and back.card["metrics"]["val"]["t2i_r1"] == 0.5
    meta = json.loads((path / "config.json").read_text())
    assert meta["family"] == "two_tower"
    card = (path / "README.md").read_text()
    assert "val.t2i_r1 | 0.5" in card and "steps: 5" in card
    # re-saving keeps the card
    back.save_pretrained(tmp_path / "again")
    assert "val.t2i_r1" in (tmp_path / "again" / "README.md").read_text()


def test_init_values_and_output_contract(tokenizer):
    clip = _micro(tokenizer)
    assert float(clip.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07)) and clip.logit_bias is None
    siglip = _micro(tokenizer, "shapes-siglip-tiny")
    assert float(siglip.logit_scale.detach()) == pytest.approx(math.log(10))
    assert float(siglip.logit_bias.detach()) == -10.0  # HF initialises it to 0; SigLIP's paper uses -10
    batch = clip.processor(images=_images(2), text=CAPTIONS[:3])
    out = clip(**batch)
    assert out.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.logit_scale, clip.logit_scale.exp())  # the exp'd scale
    sim = clip.similarity(clip.encode_image(batch["pixel_values"]), clip.encode_text(batch["input_ids"]))
    torch.testing.assert_close(out.logits_per_image, out.logit_scale * sim)


def test_freeze_and_param_groups(tokenizer):
    model = _micro(tokenizer)
    model.freeze(text=True)
    frozen = {id(p) for p in [*model.text_model.parameters(), *model.text_projection.parameters()]}
    groups = model.param_groups(0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert frozen.isdisjoint(id(p) for p in grouped)
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(model.logit_scale) in no_decay and id(model.vision_model.post_layernorm.weight) in no_decay
    assert id(model.visual_projection.weight) not in no_decay


def test_bad_configs_give_clear_errors(tokenizer):
    with pytest.raises(ConfigError, match="did you mean 'num_hidden_layers'"):
        TwoTowerConfig.from_preset("shapes-micro", {"vision": {"num_hidden_layer": 3}})
    with pytest.raises(ConfigError, match=r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"):
        TwoTowerConfig.from_preset("shapes-micro", {"text": {"hidden_size": 30, "num_attention_heads": 4}})
    with pytest.raises(ConfigError, match=r"image_size \(30\) must be divisible by patch_size \(8\)"):
        TwoTowerConfig.from_preset("shapes-micro", {"vision": {"image_size": 30}})
    with pytest.raises(ConfigError, match="embed_dim"):
        TwoTowerConfig.from_preset("shapes-siglip-tiny", {"embed_dim": 64})
    with pytest.raises(ConfigError, match="unknown key 'embed_dims'"):
        TwoTowerConfig.from_dict({"preset": "shapes-micro", "embed_dims": 3})
    with pytest.raises(ConfigError, match="unknown two-tower preset 'shapes-tiy' - did you mean 'shapes-tiny'"):
        TwoTowerConfig.from_preset("shapes-tiy")
    cfg = TwoTowerConfig.from_preset("shapes-micro")
    wrong_size = TwoTowerProcessor(ImageProcessingConfig(size=(64, 64)), tokenizer, 16)
    with pytest.raises(ConfigError, match="64x64 images but the vision tower takes 32x32"):
        TwoTowerModel.from_config(cfg, wrong_size)
    small_vocab = TwoTowerConfig.from_preset("shapes-micro", {"text": {"vocab_size": 5}})
    with pytest.raises(ConfigError, match="vocab_size"):
        TwoTowerModel.from_config(small_vocab, default_processor(small_vocab, tokenizer))


def test_wrong_inputs_name_both_shapes(tokenizer):
    model = _micro(tokenizer)
    with pytest.raises(ModelError, match=r"\(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        model.encode_image(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ModelError, match=r"L <= 48"):
        model.encode_text(torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(ModelError, match=r"token id 999 is outside the text tower's vocabulary"):
        model.encode_text(torch.tensor([[2, 999, 3]]))


def test_bad_checkpoints_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(ModelError, match="does not exist"):
        TwoTowerModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelError, match="could not be fetched"):
        TwoTowerModel.from_pretrained("no-such-org/no-such-model")  # offline in tests
    good = tmp_path / "good"
    _micro(tokenizer).save_pretrained(good)

    def broken(name, edit):
        path = tmp_path / name
        shutil.copytree(good, path)
        edit(path)
        return path

    no_weights = broken("no-weights", lambda p: (p / "model.safetensors").unlink())
    with pytest.raises(ModelError, match=r"model\.safetensors is missing"):
        TwoTowerModel.from_pretrained(no_weights)
    truncated = broken("truncated", lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00\x00"))
    with pytest.raises(ModelError, match="cannot be read"):
        TwoTowerModel.from_pretrained(truncated)
    bad_json = broken("bad-json", lambda p: (p / "config.json").write_text("{oops"))
    with pytest.raises(ModelError, match="not valid JSON"):
        TwoTowerModel.from_pretrained(bad_json)

    def resize(p):
        meta = json.loads((p / "config.json").read_text())
        meta["model"]["embed_dim"] = 48
        (p / "config.json").write_text(json.dumps(meta))

    with pytest.raises(ModelError, match=r"2 of another shape \(visual_projection\.weight \(32, 32\) != \(48, 32\)"):
        TwoTowerModel.from_pretrained(broken("resized", resize))

    def other_family(p):
        meta = json.loads((p / "config.json").read_text())
        meta["family"] = "bridge"
        (p / "config.json").write_text(json.dumps(meta))

    with pytest.raises(ModelError, match="'bridge' model, not a two-tower"):
        TwoTowerModel.from_pretrained(broken("bridge", other_family))
    with pytest.raises(ModelError, match="cannot be exported as an HF siglip"):
        from mmstack.models.two_tower_io import export_hf

        export_hf(_micro(tokenizer), tmp_path / "x", "siglip")


def test_hf_features_accepts_tensors_and_output_objects():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.randn(2, 3)
    assert hf_features(t) is t
    assert hf_features(BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 4, 3), pooler_output=t)) is t


def test_auto_backbone_with_any_hf_encoders(tmp_path, tokenizer):
    cfg = TwoTowerConfig.from_dict(
        {
            "backbone": "auto",
            "embed_dim": 24,
            "vision": {"model_type": "vit", **TINY, "image_size": 32, "patch_size": 8},
            "text": {"model_type": "bert", **TINY, "max_position_embeddings": 16},
        }
    )
    torch.manual_seed(0)
    model = TwoTowerModel.from_config(cfg, default_processor(cfg, tokenizer))
    assert type(model.vision_model).__name__ == "ViTModel" and type(model.text_model).__name__ == "BertModel"
    batch = model.processor(images=_images(3), text=CAPTIONS[:3])
    out = model(**batch)
    assert out.logits_per_image.shape == (3, 3)
    out.logits_per_image.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter gets a gradient"
    model.save_pretrained(tmp_path / "auto")
    back = TwoTowerModel.from_pretrained(tmp_path / "auto")
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits_per_image, model(**batch).logits_per_image)
    with pytest.raises(ModelError, match="no HF two-tower class"):
        model.export_hf(tmp_path / "x")
    with pytest.raises(ConfigError, match="model_type is required"):
        TwoTowerConfig(backbone="auto", vision={"hidden_size": 32}, text={"model_type": "bert"})
    with pytest.raises(ConfigError, match="did you mean 'bert'"):
        TwoTowerConfig(backbone="auto", vision={"model_type": "vit"}, text={"model_type": "berk"})
