"""The native model: token layout, both output heads, constrained decoding, guidance, KV cache, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmstack
from mmstack.errors import ConfigError
from mmstack.models.native import NativeConfig, NativeModel
from mmstack.models.native_generate import decode, guide, image_template
from mmstack.models.vq import VQConfig, VQModel
from mmstack.processing.native_tokens import BOS_ID, IMAGE, TEXT, VIDEO, LayoutError, NativeVocab

CAPTIONS = ["a large red circle at the top left", "a small blue square in the center", "a green star on the right"]
HEADS = ("shared", "per_modality")


def micro_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    vq = VQModel(VQConfig(image_size=16, patch=4, codebook_size=16, channels=8, pixel_channels=4, kmeans_iters=2))
    vq.init_codebook(torch.rand(8, 3, 16, 16))
    return vq.eval()


def micro_model(head: str = "shared", seed: int = 0) -> NativeModel:
    from mmstack.processing.tokenizer import train_caption_tokenizer

    tok = train_caption_tokenizer(CAPTIONS, kind="wordlevel")
    vq = micro_vq(seed)
    torch.manual_seed(seed)
    config = NativeConfig(hidden_size=32, layers=2, heads=2, max_positions=256, head=head)
    return NativeModel(config, NativeVocab(len(tok), vq.codebook_size, vq.grid), tok, vq).eval()


# ------------------------------------------------------------------------------------------ layout


def test_layout_round_trip_equals_vq_reconstruction():
    from mmstack.world import render_scene, sample_scenes

    vq = micro_vq()
    images = torch.stack([torch.from_numpy(np.array(render_scene(s, 16))) for s in sample_scenes(3, seed=0)])
    pixels = images.permute(0, 3, 1, 2).float() / 255.0
    vocab = NativeVocab(n_text=20, n_codes=vq.codebook_size, grid=vq.grid)
    codes = vq.encode(pixels)
    for img_codes, px in zip(codes, pixels, strict=True):
        ids = vocab.image_tokens(img_codes)
        assert len(ids) == vocab.image_len and int(ids[0]) == vocab.boi and int(ids[-1]) == vocab.eoi
        assert (ids[1:-1].view(vq.grid, vq.grid + 1)[:, -1] == vocab.eol).all()
        back = vocab.parse_image(ids)
        assert torch.equal(back, img_codes)
        assert torch.equal(vq.decode(back[None]), vq.decode(vq.encode(px[None])))
    clip = vocab.video_tokens(codes)
    assert torch.equal(vocab.parse_video(clip), codes)


def test_malformed_blocks_are_rejected():
    vocab = NativeVocab(n_text=20, n_codes=16, grid=2)
    good = vocab.image_tokens(torch.tensor([[1, 2], [3, 4]]))
    bad_eol = good.clone()
    bad_eol[3] = vocab.code_offset  # a code where the first row's <eol> belongs
    text_inside = good.clone()
    text_inside[1] = 7  # a word inside the block
    for bad in (bad_eol, text_inside, good[:-1]):
        with pytest.raises(LayoutError):
            vocab.parse_image(bad)


def test_modality_types_groups_and_targets():
    vocab = NativeVocab(n_text=20, n_codes=16, grid=2)
    caption = torch.tensor([5, 6])
    ids, target = vocab.build_sequence("t2i", caption, torch.tensor([[1, 2], [3, 4]]))
    assert ids.tolist()[:4] == [BOS_ID, 5, 6, vocab.boi] and ids.tolist()[-1] == vocab.eoi  # the block ends it
    assert target.tolist() == [False, False, False] + [True] * (len(ids) - 3)  # caption is the condition
    types = vocab.modality_types(ids[None])[0].tolist()
    assert types == [TEXT] * 3 + [IMAGE] * vocab.image_len
    nxt = vocab.next_is_image(ids)
    assert nxt.tolist() == [False] * 3 + [True] * (vocab.image_len - 1) + [False]
    assert vocab.block_positions(ids[None])[0].tolist() == [-1] * 3 + list(range(vocab.image_len))
    _, target2 = vocab.build_sequence("i2t", caption, torch.tensor([[1, 2], [3, 4]]))
    assert target2.tolist() == [False] * (1 + vocab.image_len) + [True] * 3  # caption and <eos>
    uncond, _ = vocab.build_sequence("t2i", caption, torch.tensor([[1, 2], [3, 4]]), drop_condition=True)
    assert uncond.tolist()[:2] == [BOS_ID, vocab.boi]
    clip, _ = vocab.build_sequence("v2t", caption, torch.zeros(2, 2, 2, dtype=torch.long))
    types = vocab.modality_types(clip[None])[0]
    assert (types[1 : 2 * vocab.image_len + 3] == VIDEO).all() and types[-1] == TEXT
    pos = vocab.block_positions(clip[None])[0].tolist()  # <bos> <bov> frame <sep> frame <eov> caption <eos>
    frame = list(range(vocab.image_len))
    assert pos == [-1, -1, *frame, -1, *frame, -1] + [-1] * 3
    with pytest.raises(ConfigError):
        vocab.build_sequence("x2y", caption, torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("head", HEADS)
def test_forward_and_every_parameter_gets_a_gradient(head):
    from mmstack.train.native import NativeTask
    from mmstack.train.native_data import pad_examples

    model = micro_model(head).train()
    v = model.vocab
    codes = torch.randint(0, v.n_codes, (v.grid, v.grid))
    batch = {
        "image": pad_examples([v.build_sequence(t, model.encode_text(CAPTIONS[0]), codes) for t in ("t2i", "i2t")])
    }
    loss, metrics = NativeTask(model).loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss_text"] > 0 and metrics["loss_image"] > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert missing == [], missing


@pytest.mark.parametrize("head", HEADS)
def test_task_loss_on_selected_logits_equals_the_full_logits_loss(head):
    """The task runs the head only where a target follows; its loss is the one from full-sequence logits."""
    import torch.nn.functional as F

    from mmstack.train.native import NativeTask
    from mmstack.train.native_data import pad_examples

    model = micro_model(head).eval()
    v = model.vocab
    codes = torch.randint(0, v.n_codes, (v.grid, v.grid), generator=torch.Generator().manual_seed(0))
    group = pad_examples(
        [v.build_sequence(t, model.encode_text(c), codes) for t, c in (("t2i", CAPTIONS[0]), ("i2t", CAPTIONS[1]))]
    )
    with torch.no_grad():
        loss, _ = NativeTask(model, text_weight=2.0).loss({"image": group})
        ids, mask = group["input_ids"], group["target_mask"][:, 1:]
        logits = model(ids, attention_mask=group["attention_mask"]).logits[:, :-1][mask]
        targets = ids[:, 1:][mask]
        is_image = v.is_code(targets) | (targets == v.eol) | (targets == v.eoi)
        ce = F.cross_entropy(logits, targets, reduction="none")
        expected = (torch.where(is_image, 1.0, 2.0) * ce).sum() / len(targets)
    assert bool(is_image.any()) and bool((~is_image).any())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_codebook_init_gives_look_alike_codes_look_alike_embeddings(head):
    """code_init=codebook: each code's nearest code in embedding space (input and output rows) is its nearest
    code in the VQ codebook, and the rows keep the random init's scale; random init has neither property."""
    vq = micro_vq()
    cb = vq.quantizer.codebook
    vocab = NativeVocab(20, vq.codebook_size, vq.grid)
    config = NativeConfig(hidden_size=32, layers=1, heads=2, head=head, code_init="codebook")

    def nearest(x: torch.Tensor) -> torch.Tensor:
        return (torch.cdist(x, x) + torch.eye(len(x)) * 1e9).argmin(1)

    model = NativeModel(config, vocab, vq=vq)
    rows = model.backbone.embed_tokens.weight[vocab.code_offset :].detach()
    out = model.head.weight[vocab.code_offset :] if head == "shared" else model.heads["image"].weight[2:]
    assert torch.equal(nearest(rows), nearest(cb)) and torch.equal(nearest(out.detach()), nearest(cb))
    assert float(rows.norm(dim=1).mean()) == pytest.approx(config.init_std * 32**0.5, rel=1e-4)
    text_rows = model.backbone.embed_tokens.weight[1 : vocab.n_text].detach()  # untouched: random
    assert float(text_rows.std()) == pytest.approx(config.init_std, rel=0.3)
    plain = NativeConfig(hidden_size=32, layers=1, heads=2, code_init="random")
    random_rows = NativeModel(plain, vocab, vq=vq).backbone.embed_tokens
    assert not torch.equal(nearest(random_rows.weight[vocab.code_offset :].detach()), nearest(cb))
    with pytest.raises(ConfigError, match="code_init"):
        NativeConfig(code_init="pca")


def test_per_modality_heads_speak_only_their_group():
    model = micro_model("per_modality")
    v = model.vocab
    ids = v.build_sequence("t2i", model.encode_text(CAPTIONS[1]), torch.zeros(v.grid, v.grid, dtype=torch.long))[0]
    logits = model(ids[None]).logits[0]  # (L, V)
    image_state = v.next_is_image(ids)
    image_cols = torch.zeros(v.size, dtype=torch.bool)
    image_cols[v.image_group()] = True
    assert (
        torch.isinf(logits[image_state][:, ~image_cols]).all()
        and torch.isfinite(logits[image_state][:, image_cols]).all()
    )
    assert (
        torch.isinf(logits[~image_state][:, image_cols]).all()
        and torch.isfinite(logits[~image_state][:, ~image_cols]).all()
    )


@pytest.mark.parametrize("head", HEADS)
def test_kv_cache_generation_equals_recomputation(head):
    model = micro_model(head)
    prompts = [torch.cat([torch.tensor([BOS_ID]), model.encode_text(c)]) for c in CAPTIONS]
    kw = {
        "template": image_template(model.vocab),
        "top_k": 8,
        "seed": 3,
        "guidance": 2.5,
        "uncond_prompt": torch.tensor([BOS_ID]),
    }
    cached = decode(model, prompts, use_cache=True, **kw)
    plain = decode(model, prompts, use_cache=False, **kw)
    assert [c.tolist() for c in cached] == [p.tolist() for p in plain]
    # incremental logits equal the full forward's (left padding included)
    from mmstack.models.native_generate import _Decoder

    dec = _Decoder(model, prompts, use_cache=True)
    dec.next_logits()
    for t in cached[0][:5].tolist():
        dec.append(torch.full((3,), t))
        step = dec.next_logits()
    full = _Decoder(model, [torch.cat([p, cached[0][:5]]) for p in prompts], use_cache=False).next_logits()
    assert torch.allclose(step, full, atol=1e-4)
    texts = model.generate(torch.rand(2, 3, 16, 16), "text", use_cache=True).tokens
    texts_plain = model.generate(torch.rand(2, 3, 16, 16), "text", use_cache=False).tokens
    assert len(texts) == 2 and all(len(t) > 0 for t in texts_plain)


def test_cfg_scale_one_equals_plain_conditional_sampling():
    model = micro_model("shared")
    prompts = [torch.cat([torch.tensor([BOS_ID]), model.encode_text(c)]) for c in CAPTIONS]
    kw = {"template": image_template(model.vocab), "top_k": None, "temperature": 1.0, "seed": 11}
    plain = decode(model, prompts, **kw)
    guided = decode(model, prompts, guidance=1.0, uncond_prompt=torch.tensor([BOS_ID]), **kw)
    assert [a.tolist() for a in plain] == [b.tolist() for b in guided]
    strong = decode(model, prompts, guidance=4.0, uncond_prompt=torch.tensor([BOS_ID]), **kw)
    assert [a.tolist() for a in plain] != [b.tolist() for b in strong]  # guidance does change the samples
    c, u = torch.tensor([[1.0, float("-inf"), 3.0]]), torch.tensor([[2.0, float("-inf"), 1.0]])
    assert torch.equal(guide(c, u, 3.0), torch.tensor([[-1.0, float("-inf"), 7.0]]))


@pytest.mark.parametrize("head", HEADS)
def test_constrained_decoding_never_emits_text_inside_an_image_block(head):
    model = micro_model(head)
    v = model.vocab
    with torch.no_grad():  # make words and <eos> overwhelmingly likely everywhere
        if head == "shared":
            model.head.weight[: v.n_text] += 5.0 * model.backbone.norm.weight.sign()[None]
        else:
            model.heads["text"].weight += 5.0 * model.backbone.norm.weight.sign()[None]
            model.heads["image"].weight[:2] += 5.0 * model.backbone.norm.weight.sign()[None]  # <eoi>, <eol>
    gen = model.generate(CAPTIONS * 3, "image", guidance=3.0, top_k=None, seed=0)
    for tokens in gen.tokens:
        assert len(tokens) == v.image_len
        body = tokens[1:-1].view(v.grid, v.grid + 1)
        assert bool(v.is_code(body[:, :-1]).all()) and bool((body[:, -1] == v.eol).all())
    assert all(gen.valid) and gen.outputs[0].size == (16, 16)
    free = model.generate(CAPTIONS * 3, "image", guidance=3.0, top_k=None, seed=0, constrained=False)
    assert not any(free.valid)  # the same model without constraints breaks the layout
    video = model.generate(CAPTIONS[:1], "video", frames=3, guidance=None, seed=0)
    assert video.codes[0].shape == (3, v.grid, v.grid) and len(video.outputs[0]) == 3


def test_save_load_round_trip(tmp_path):
    model = micro_model("per_modality")
    model.save_pretrained(tmp_path / "native", card={"metrics": {"x": 1}})
    loaded = mmstack.load(tmp_path / "native")
    assert isinstance(loaded, NativeModel) and loaded.config.head == "per_modality"
    a = model.generate(CAPTIONS[:2], "image", seed=5).tokens
    b = loaded.generate(CAPTIONS[:2], "image", seed=5).tokens
    assert [x.tolist() for x in a] == [y.tolist() for y in b]
    assert loaded.generate(CAPTIONS[0], "image").outputs[0].size == (16, 16)


# ------------------------------------------------------------------------------------------ scoring


def test_object_scores_match_the_best_assignment():
    from mmstack.eval.native import caption_scores, object_scores

    truth = [
        {"shape": "circle", "colour": "red", "cell": "top left", "size": "large"},
        {"shape": "star", "colour": "blue", "cell": "center", "size": "small"},
    ]
    found = [
        {"shape": "star", "colour": "blue", "cell": "center", "size": "small"},  # listed first: order is free
        {"shape": "square", "colour": "red", "cell": "top left", "size": "large"},  # wrong shape
        {"shape": "heart", "colour": "pink", "cell": "bottom right", "size": "small"},  # an extra object
    ]
    s = object_scores([truth], [found])
    assert s["object_accuracy"] == 0.5 and s["shape_accuracy"] == 0.5
    assert s["colour_accuracy"] == 1.0 and s["cell_accuracy"] == 1.0 and s["scene_accuracy"] == 0.0
    assert object_scores([truth], [[*found[:1], dict(truth[0])]])["scene_accuracy"] == 1.0
    assert object_scores([truth], [[]])["object_accuracy"] == 0.0
    good = "a large red circle at the top left and a small blue star in the center"
    assert caption_scores([truth], [good]) == {"caption_accuracy": 1.0, "caption_exact": 1.0}
    vague = "a large red circle and a small blue star in the center"  # first object's cell unnamed
    assert caption_scores([truth], [vague])["caption_accuracy"] == 0.5
    extra = good + " and a small green heart at the bottom right"
    assert caption_scores([truth], [extra]) == {"caption_accuracy": 2 / 3, "caption_exact": 0.0}


def test_canonical_prompts_are_the_captioning_targets(tmp_path):
    """prompts=canonical: every generation prompt is the scene's first caption (what captioning writes and the
    eval prompts with), while the tokenizer still sees every phrasing, so other prompts do not read as <unk>."""
    from mmstack.config import load_config
    from mmstack.train.native import NativeRecipeConfig, build_tokenizer, canonical_prompts
    from mmstack.train.native_data import read_native_data
    from mmstack.world import generate_world

    generate_world(tmp_path, 6, seed=0, image_size=16)
    records = read_native_data(tmp_path, "all", clip_frames=2)
    assert any(len(set(ps)) > 1 for ps in records.prompts)
    tok = build_tokenizer(records, 256)
    narrowed = canonical_prompts(records)
    assert narrowed.prompts == [[t] for t in records.targets] and narrowed.images == records.images
    other = [p for ps in records.prompts for p in ps if p not in records.targets]
    assert other and all(1 not in tok(p, add_special_tokens=False)["input_ids"] for p in other)  # 1 = <unk>
    cfg = load_config(NativeRecipeConfig, {"data": {"prompts": "canonical"}})
    assert cfg.data.prompts == "canonical"
    with pytest.raises(ConfigError, match=r"data\.prompts"):
        load_config(NativeRecipeConfig, {"data": {"prompts": "first"}})
