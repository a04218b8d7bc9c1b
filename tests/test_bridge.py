"""The bridge VLM: HF Llava parity and interop, KV-cache and batching equivalence, connectors, video."""

from __future__ import annotations

import pytest
import torch

from _bridge_helpers import qa, solid, tiny_model
from mmstack.errors import ModelError
from mmstack.models.bridge import BridgeModel, positions_from_mask
from mmstack.models.bridge_generate import GenerationConfig, choose, generate_text, stream_text
from mmstack.models.bridge_hf import export_llava, import_llava, to_hf_llava


def _batch(model, padding_side: str = "right"):
    """Two images of different colours, a text-only row, a two-turn row: lengths differ, so padding shows."""
    convs = [
        qa("What colour is the star?", "red"),
        qa("How many objects are there?", "2", image=False),
        qa("What colour is the circle?", "blue") + qa("How many objects are there?", "1", image=False),
    ]
    images = [solid("red"), None, solid("blue", 40, 24)]
    return model.processor(convs, images, padding_side=padding_side)


@pytest.mark.parametrize(("select", "layer", "padding"), [("default", -2, "right"), ("full", -1, "left")])
def test_logits_match_hf_llava_on_padded_batch(select, layer, padding):
    model = tiny_model(select=select, feature_layer=layer)
    hf = to_hf_llava(model)
    batch = _batch(model, padding)
    mask = batch["attention_mask"]
    pos = positions_from_mask(mask)
    with torch.no_grad():
        ours = model(batch["input_ids"], mask, batch["pixel_values"]).logits
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"], position_ids=pos
        ).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_export_loads_in_transformers_and_generates_the_same(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = tiny_model(select="default", feature_layer=-2)
    export_llava(model, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf.generation_config.eos_token_id = None  # both decode exactly 6 tokens
    batch = model.processor.prompts(["What colour is the star?", "How many?"], [solid("green"), solid("red", 40, 24)])
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ours = model.generate(ids, mask, pix, max_new_tokens=6, eos_token_ids=[])
    theirs = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, max_new_tokens=6, do_sample=False)
    theirs = theirs[:, ids.shape[1] :]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("placement", ["as_written", "after_text"])
def test_hf_chat_template_renders_like_the_processor(tmp_path, placement):
    from transformers import AutoTokenizer

    model = tiny_model()
    model.processor.config.image_placement = placement
    export_llava(model, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    image, text = {"type": "image"}, {"type": "text", "text": "What colour is the star?"}
    messages = [
        {"role": "user", "content": [image, text]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "Is this "}, image, {"type": "text", "text": "a star?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        {"role": "user", "content": "How many objects are there?"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [
        *qa("What colour is the star?", "red"),
        {"from": "human", "value": "Is this <image>\na star?"},
        {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "How many objects are there?"},
    ]
    assert rendered == model.processor.render(turns, add_generation_prompt=True)[0]
    first_image, question = rendered.index("<image>"), rendered.index("What colour")
    assert (first_image > question) == (placement == "after_text")


def test_exported_hf_processor_gives_the_same_inputs(tmp_path):
    from transformers import AutoProcessor

    model = tiny_model(select="default")
    export_llava(model, tmp_path / "hf")
    hf_proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    text = model.processor.render([{"from": "human", "value": "<image>\nWhat colour is the star?"}], True)[0]
    theirs = hf_proc(images=[solid("red", 40, 24)], text=[text], return_tensors="pt")
    ours = model.processor.prompts(["What colour is the star?"], [solid("red", 40, 24)])
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-5)


def test_import_hf_llava_folder_round_trips(tmp_path):
    model = tiny_model(select="default", feature_layer=-2)
    export_llava(model, tmp_path / "hf")
    back = import_llava(tmp_path / "hf")
    assert isinstance(BridgeModel.from_pretrained(tmp_path / "hf"), BridgeModel)
    batch = _batch(model)
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = back(batch["input_ids"], batch["attention_mask"], back.processor(
            [qa("What colour is the star?", "red"), qa("How many objects are there?", "2", image=False),
             qa("What colour is the circle?", "blue") + qa("How many objects are there?", "1", image=False)],
            [solid("red"), None, solid("blue", 40, 24)],
        )["pixel_values"]).logits  # fmt: skip
    assert torch.allclose(a, b, atol=1e-5)


def test_resampler_cannot_be_exported(tmp_path):
    with pytest.raises(ModelError, match="resampler"):
        export_llava(tiny_model(connector="resampler"), tmp_path / "hf")


def test_save_load_round_trip(tmp_path):
    import mmstack

    model = tiny_model(connector="resampler")
    model.save_pretrained(tmp_path / "ckpt", card={"training": {"steps": 3}})
    back = mmstack.load(tmp_path / "ckpt")
    assert isinstance(back, BridgeModel)
    assert "resampler" in (tmp_path / "ckpt" / "README.md").read_text()
    batch = _batch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, back(**batch).loss)


def test_kv_cache_generation_equals_full_recompute():
    model = tiny_model()
    batch = model.processor.prompts(["What colour is the star?"], [solid("red")])
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    fast = model.generate(ids, mask, pix, max_new_tokens=5)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = model(seq, torch.ones_like(seq), pix).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, seq[:, ids.shape[1] :])


def test_batched_left_padded_generation_equals_one_at_a_time():
    model = tiny_model()
    prompts = ["What colour is the star?", "How many objects are there? Which way does it move?", "Describe"]
    images = [solid("red"), solid("blue", 48, 24), None]
    cfg = GenerationConfig(max_new_tokens=5)
    together = generate_text(model, prompts, images, config=cfg)
    alone = [generate_text(model, [p], [im], config=cfg)[0] for p, im in zip(prompts, images, strict=True)]
    assert together == alone


def test_stream_text_equals_generate_text():
    model = tiny_model()
    cfg = GenerationConfig(max_new_tokens=6)
    streamed = "".join(stream_text(model, "What colour is the star?", image=solid("red"), config=cfg))
    assert streamed.strip() == generate_text(model, ["What colour is the star?"], [solid("red")], config=cfg)[0]


def test_stop_strings_cut_the_text():
    model = tiny_model()
    full = generate_text(
        model, ["What colour is the star?"], [solid("red")], config=GenerationConfig(max_new_tokens=6)
    )[0]
    words = full.split()
    assert len(words) >= 2, full
    cfg = GenerationConfig(max_new_tokens=6, stop_strings=[words[1]])
    assert (
        generate_text(model, ["What colour is the star?"], [solid("red")], config=cfg)[0]
        == full[: full.index(words[1])].strip()
    )


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    greedy = GenerationConfig()
    tight = GenerationConfig(do_sample=True, top_p=0.01)
    topk = GenerationConfig(do_sample=True, top_k=2)
    assert choose(logits, greedy, None).item() == 1
    assert choose(logits, tight, torch.Generator().manual_seed(0)).item() == 1
    draws = {choose(logits, topk, torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert draws == {1, 3}
    model = tiny_model()
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    a = generate_text(model, ["What colour?"], [solid("red")], config=cfg)
    assert a == generate_text(model, ["What colour?"], [solid("red")], config=cfg)


def test_token_count_mismatch_is_a_clear_error():
    model = tiny_model()
    batch = _batch(model)
    ids = batch["input_ids"].clone()
    first = (ids == model.config.image_token_id).nonzero()[0]
    ids[first[0], first[1]] = 5  # one placeholder fewer than the image gives
    with pytest.raises(ModelError, match=r"has \d+ image placeholder tokens but the images give \d+"):
        model(ids, batch["attention_mask"], batch["pixel_values"])


def test_resampler_shapes_and_gradients():
    from mmstack.models.connectors import PerceiverResampler

    res = PerceiverResampler(vision_dim=24, text_dim=40, num_queries=5, depth=2, heads=4, width=32)
    x = torch.randn(3, 17, 24, requires_grad=True)
    y = res(x)
    assert y.shape == (3, 5, 40)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in res.parameters())
    assert res(torch.randn(2, 64, 24)).shape == (2, 5, 40)  # any input length compresses to M


def test_every_parameter_gets_a_gradient_with_images_and_video():
    model = tiny_model(connector="resampler").train()
    proc = model.processor
    convs = [
        qa("What colour is the star?", "red"),
        [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "left"}],
    ]
    batch = proc(convs, [solid("red"), None], [None, [solid("red"), solid("blue"), solid("green")]])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    unused = {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}  # pooled output only
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert [n for n in missing if not n.startswith("temporal_embedding")] == []
    assert model.temporal_embedding.grad[:3].abs().sum() > 0 and model.temporal_embedding.grad[3:].abs().sum() == 0


def test_video_tokens_match_processor_and_too_many_frames_fail():
    model = tiny_model()
    proc = model.processor
    frames = proc.clip_frames([solid("red")] * 3)
    assert proc.video_tokens(frames) == model.encode_videos([frames]).shape[0] == 3 * model.tokens_per_frame(32, 32)
    with pytest.raises(ModelError, match="max_frames"):
        model.encode_videos([proc.clip_frames([solid("red")] * 5)])


@pytest.mark.parametrize("mode", ["dynamic", "anyres"])
def test_processor_and_model_agree_on_visual_tokens(mode):
    model = tiny_model(image_mode=mode, max_image_tokens=24, max_tiles=4)
    img = solid("red", 80, 30)
    views = model.processor.image_views(img)
    assert model.processor.image_tokens(views) == model.encode_images([views]).shape[0]
    batch = model.processor([qa("What colour is the star?", "red")], [img])
    assert torch.isfinite(model(**batch).loss)


def test_grid_positions_add_row_and_column_embeddings():
    model = tiny_model(position_embedding=True, select="full", image_mode="dynamic", max_image_tokens=64)
    pos = model.grid_position
    views = model.processor.image_views(solid("red", 64, 32))  # a 4 x 8 patch grid plus CLS
    with torch.no_grad():
        tokens = model.encode_images([views])
        plain = model.connector(model.vision_features(views))[0]
    assert tokens.shape[0] == plain.shape[0] == 1 + 4 * 8 == model.processor.image_tokens(views)
    assert torch.equal(tokens[0], plain[0])  # the CLS token gets no position
    r, c = 2, 5
    assert torch.allclose(tokens[1 + r * 8 + c], plain[1 + r * 8 + c] + pos.row[r] + pos.col[c])
    model.train()
    batch = model.processor([qa("What colour is the star?", "red")], [solid("red", 64, 32)])
    model(**batch).loss.backward()
    assert pos.row.grad[:4].abs().sum() > 0 and pos.row.grad[4:].abs().sum() == 0  # rows the grid used
    model.set_trainable(vision=False, connector=False, language=True)
    assert not pos.row.requires_grad


def test_grid_positions_need_an_mlp_fit_the_grid_and_cannot_be_exported(tmp_path):
    from mmstack.errors import ConfigError
    from mmstack.models.connectors import ConnectorConfig

    with pytest.raises(ConfigError, match="position_embedding needs type 'mlp'"):
        ConnectorConfig(type="resampler", position_embedding=True)
    model = tiny_model(position_embedding=True, image_mode="dynamic", max_image_tokens=256)
    with pytest.raises(ConfigError, match=r"exceeds connector\.max_grid=8"):
        model.encode_images([model.processor.image_views(solid("red", 96, 32))])  # 12 columns
    with pytest.raises(ModelError, match="grid position embeddings"):
        export_llava(model, tmp_path / "hf")
    model.save_pretrained(tmp_path / "ckpt")
    back = BridgeModel.from_pretrained(tmp_path / "ckpt")
    frames = model.processor.clip_frames([solid("red")] * 2)
    with torch.no_grad():
        assert torch.equal(model.encode_videos([frames]), back.encode_videos([frames]))


def test_connector_input_norm_normalises_features_trains_and_round_trips(tmp_path):
    from mmstack.errors import ConfigError
    from mmstack.models.connectors import ConnectorConfig

    with pytest.raises(ConfigError, match="input_norm needs type 'mlp'"):
        ConnectorConfig(type="resampler", input_norm=True)
    model = tiny_model(input_norm=True)
    views = model.processor.image_views(solid("red"))
    with torch.no_grad():
        feats = model.vision_features(views)
        shifted = model.connector(feats * 3.0 + 5.0)  # a shared offset and scale the norm removes
        assert torch.allclose(model.connector(feats), shifted, atol=1e-4)
        plain = tiny_model().connector
        assert not torch.allclose(plain(feats), plain(feats * 3.0 + 5.0))
    model.train()
    model(**model.processor([qa("What colour is the star?", "red")], [solid("red")])).loss.backward()
    assert model.connector.norm.weight.grad.abs().sum() > 0
    with pytest.raises(ModelError, match="input_norm: false"):
        export_llava(model, tmp_path / "hf")
    model.save_pretrained(tmp_path / "ckpt")
    back = BridgeModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model.encode_images([views]), back.encode_images([views]))


def test_standardized_connector_folds_into_hf_llava_and_round_trips(tmp_path):
    from mmstack.errors import ConfigError
    from mmstack.models.connectors import ConnectorConfig

    with pytest.raises(ConfigError, match="standardize needs type 'mlp'"):
        ConnectorConfig(type="resampler", standardize=True)
    model = tiny_model(standardize=True, select="full", feature_layer=-2)
    assert not bool(model.connector.stats_measured)
    sample = torch.cat([model.processor.image_views(solid(c)) for c in ("red", "green", "blue", "yellow")])
    assert model.measure_feature_stats(sample) == 4 * 17  # 4 x 4 patches + CLS per image
    conn = model.connector
    with torch.no_grad():
        feats = model.vision_features(sample).flatten(0, 1)
        assert torch.allclose(conn.feature_mean, feats.mean(0)) and torch.allclose(conn.feature_std, feats.std(0))
        standardized = (feats - feats.mean(0)) / feats.std(0)
        assert torch.allclose(standardized.mean(0), torch.zeros(feats.shape[1]), atol=1e-5)
        assert torch.allclose(conn(feats), conn.linear_2(conn.act(conn.linear_1(standardized))), atol=1e-5)
    hf = to_hf_llava(model)  # the standardisation folded into linear_1
    batch = _batch(model, "right")
    mask = batch["attention_mask"]
    with torch.no_grad():
        ours = model(batch["input_ids"], mask, batch["pixel_values"]).logits
        theirs = hf(input_ids=batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"]).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-4
    model.save_pretrained(tmp_path / "ckpt")
    back = BridgeModel.from_pretrained(tmp_path / "ckpt")
    assert bool(back.connector.stats_measured) and torch.equal(back.connector.feature_std, conn.feature_std)
    with pytest.raises(ConfigError, match="standardize: false"):
        tiny_model().connector.set_feature_stats(feats)


def test_siglip_vision_tower_works():
    model = tiny_model(vision_type="siglip_vision_model", select="full")
    assert model.tokens_per_view(32, 32) == 16  # no CLS token
    assert torch.isfinite(model(**_batch(model)).loss)


def test_positions_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask)[0, 2:].tolist() == [0, 1, 2]
    assert positions_from_mask(mask)[1].tolist() == [0, 1, 2, 3, 4]
