"""Evaluation: retrieval metrics, zero-shot ensembling, classification reports, probes, runners and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from mmstack.errors import DataError
from mmstack.eval.classification import LinearProbe, classification_report, format_classification_report
from mmstack.eval.retrieval import first_hit_ranks, retrieval_metrics
from mmstack.eval.zeroshot import ensemble_embeddings, prompts_from_templates, world_prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root / "train", n=24, seed=3)
    generate_world(root / "val", n=16, seed=4, split="val")
    return root


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    from mmstack.data.pairs import read_pairs
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer

    caps = [p.caption for p in read_pairs(world / "train")]
    cfg = TwoTowerConfig.from_preset("shapes-micro", {"text": {"max_position_embeddings": 64}})
    torch.manual_seed(0)
    model = TwoTowerModel.from_config(cfg, default_processor(cfg, train_caption_tokenizer(caps, max_length=64)))
    path = tmp_path_factory.mktemp("ckpt") / "micro"
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------- retrieval


def test_retrieval_metrics_on_a_hand_built_matrix():
    # rows: images 0..3, columns: texts 0..3; text j belongs to image j
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.3],
            [0.8, 0.7, 0.1, 0.2],
            [0.2, 0.9, 0.5, 0.1],
            [0.1, 0.0, 0.6, 0.4],
        ]
    )
    m = retrieval_metrics(sim, ks=(1, 2))
    # text->image ranks (column j, own image j): t0: 1, t1: 2 (image 2 scores 0.9 > 0.7), t2: 2, t3: 1
    assert m["t2i_r1"] == 0.5 and m["t2i_r2"] == 1.0
    assert m["t2i_mean_rank"] == 1.5 and m["t2i_median_rank"] == 1.5
    # image->text ranks (row i, own text i): i0: 1, i1: 2, i2: 2, i3: 2
    assert m["i2t_r1"] == 0.25 and m["i2t_mean_rank"] == 1.75 and m["i2t_median_rank"] == 2.0
    # images 1 and 2 show the same scene, so their texts are interchangeable
    groups = torch.tensor([0, 1, 1, 2])
    g = retrieval_metrics(sim, groups, ks=(1,))
    assert g["t2i_r1"] == 0.75  # t1 now hits through image 2; t2 still ranks image 3 first
    assert g["i2t_r1"] == 0.5  # i0 and i2 (through t1) hit; i1 prefers t0, i3 prefers t2


def test_first_hit_ranks_chunking_and_missing_groups():
    torch.manual_seed(0)
    sim = torch.randn(50, 30)
    q, g = torch.randint(0, 5, (50,)), torch.arange(30) % 5
    assert torch.equal(first_hit_ranks(sim, q, g), first_hit_ranks(sim, q, g, chunk=7))
    with pytest.raises(DataError, match="no relevant item"):
        first_hit_ranks(sim, torch.full((50,), 9), g)


def test_several_captions_per_image():
    # 2 images, 4 texts: texts 0, 1 describe image 0; texts 2, 3 image 1
    sim = torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.1, 0.7, 0.3, 0.6]])
    m = retrieval_metrics(sim, torch.tensor([0, 1]), torch.tensor([0, 0, 1, 1]), ks=(1,))
    assert m["t2i_r1"] == 0.5  # t0 and t3 hit; t1 prefers image 1, t2 image 0
    assert m["i2t_r1"] == 0.5  # image 0's best text is t0 (hit); image 1's is t1 (miss)


# ----------------------------------------------------------------------------------------- zero-shot


def test_template_ensembling_normalises_before_and_after_the_mean():
    per_class = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, -3.0]])]
    emb = ensemble_embeddings(per_class)
    h = 1 / math.sqrt(2)
    # the plain mean of [2, 0] and [0, 1] would point at [0.89, 0.45]; normalising first weighs prompts equally
    torch.testing.assert_close(emb, torch.tensor([[h, h], [0.0, -1.0]]))
    assert prompts_from_templates(["cat"], ["a {}", "the {}"]) == {"cat": ["a cat", "the cat"]}


def test_world_prompts_cover_every_class_in_caption_words():
    prompts = world_prompts("colour")
    assert len(prompts) == 8 and all(len(v) == len(next(iter(prompts.values()))) for v in prompts.values())
    assert "an image with an orange circle" not in prompts["orange"]  # sizes come first, as in captions
    assert "an image with a large orange circle" in prompts["orange"]
    with pytest.raises(DataError, match="shape, colour or size"):
        world_prompts("count")


def test_class_embeddings_match_manual_ensembling(checkpoint):
    import mmstack
    from mmstack.eval.zeroshot import class_embeddings

    model = mmstack.load(str(checkpoint))
    prompts = {"a": ["a red circle", "a blue circle"], "b": ["a red square"]}
    got = class_embeddings(model, prompts)
    with torch.no_grad():
        enc = model.processor.text(["a red circle", "a blue circle", "a red square"])
        e = model.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True)
    torch.testing.assert_close(got, ensemble_embeddings([e[:2], e[2:]]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ classification


def test_classification_report_numbers_and_text():
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    r = classification_report(y_true, y_pred, target_names=["circle", "square", "star"])
    assert r["circle"] == {"precision": 0.5, "recall": 0.5, "f1-score": 0.5, "support": 2}
    assert r["square"]["precision"] == pytest.approx(2 / 3) and r["square"]["recall"] == 1.0
    assert r["square"]["f1-score"] == pytest.approx(0.8)
    assert r["star"]["precision"] == 1.0 and r["star"]["recall"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["macro avg"]["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert r["macro avg"]["f1-score"] == pytest.approx(0.7)
    assert r["weighted avg"]["precision"] == pytest.approx((0.5 * 2 + 2 / 3 * 2 + 3) / 7)
    assert r["weighted avg"]["recall"] == pytest.approx(5 / 7) and r["weighted avg"]["support"] == 7
    text = format_classification_report(r)
    lines = text.splitlines()
    assert lines[0] == "              precision    recall  f1-score   support"
    assert lines[2] == "      circle       0.50      0.50      0.50         2"
    assert lines[6] == "    accuracy                           0.71         7"
    assert lines[7] == "   macro avg       0.72      0.72      0.70         7"


def test_classification_report_zero_division_and_label_subsets():
    r = classification_report([0, 0, 1], [0, 0, 0], labels=[0, 1, 2])
    assert r["1"] == {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 1}
    assert r["2"]["support"] == 0 and r["accuracy"] == pytest.approx(2 / 3)
    sub = classification_report([0, 1, 2, 2], [0, 1, 1, 2], labels=[1, 2])
    assert "accuracy" not in sub and sub["micro avg"]["precision"] == pytest.approx(2 / 3)
    assert "micro avg" in format_classification_report(sub)


def test_linear_probe_separates_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 16, generator=g)
    probe = LinearProbe.fit(x[:60], y[:60], 3)
    assert (probe.predict(x[60:]) == y[60:]).float().mean() == 1.0
    again = LinearProbe.fit(x[:60], y[:60], 3)
    assert torch.equal(probe.linear.weight, again.linear.weight)  # deterministic


# -------------------------------------------------------------------------------------------- runners


def test_evaluate_retrieval_runner_is_consistent(world, checkpoint):
    import mmstack
    from mmstack.data.pairs import read_pairs
    from mmstack.eval.retrieval import evaluate_retrieval

    model = mmstack.load(str(checkpoint))
    res = evaluate_retrieval(model, world / "val", batch_size=5)
    pairs = read_pairs(world / "val")
    assert res["n_images"] == res["n_texts"] == len(pairs) == 16 and res["grouping"] == "scene"
    with torch.no_grad():
        img = model.encode_image(model.processor.images([p.load_image() for p in pairs]), normalize=True)
        txt = model.encode_text(**model.processor.text([p.caption for p in pairs]), normalize=True)
    manual = retrieval_metrics(img @ txt.T)
    for k, v in manual.items():
        assert res[f"pair_{k}"] == pytest.approx(v, abs=1e-6)
    every = evaluate_retrieval(model, world / "val", all_captions=True)
    assert every["n_texts"] > 16 and every["n_images"] == 16


def test_scene_grouping_from_scenes_jsonl(world, tmp_path):
    import shutil

    from mmstack.eval.data import read_eval_pairs, scene_groups

    folder = tmp_path / "dup"
    shutil.copytree(world / "val", folder)
    lines = (folder / "scenes.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    second["objects"] = [{**o, "jitter": [0.0, 0.0], "angle": 5.0} for o in first["objects"]]  # same scene
    lines[1] = json.dumps(second)
    (folder / "scenes.jsonl").write_text("\n".join(lines) + "\n")
    groups = scene_groups(read_eval_pairs(folder))
    assert groups[0] == groups[1] and len(set(groups.tolist())) == 15


def test_zeroshot_and_probe_runners(world, checkpoint):
    import mmstack
    from mmstack.eval.probe import evaluate_probe
    from mmstack.eval.zeroshot import evaluate_zeroshot

    model = mmstack.load(str(checkpoint))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zs = evaluate_zeroshot(model, world / "val", "colour")
    assert zs["n"] == sum(zs["report"][c]["support"] for c in world_prompts("colour")) > 0
    res = evaluate_probe(model, world / "train", world / "val", attribute="count", finetune=True, epochs=1)
    assert res["n_train"] == 24 and res["n_test"] == 16
    assert 0.0 <= res["probe"]["accuracy"] <= 1.0 and 0.0 <= res["finetune"]["accuracy"] <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # fine-tuning used a copy


def test_retrieval_grid_png(world, checkpoint, tmp_path):
    import mmstack
    from mmstack.data.pairs import read_pairs
    from mmstack.eval.grid import retrieval_grid_png

    model = mmstack.load(str(checkpoint))
    pairs = read_pairs(world / "val")
    queries = [pairs[0].caption, "a large red circle"]
    out = retrieval_grid_png(
        model, queries, [p.image for p in pairs], tmp_path / "grid.png", k=5, relevant=[{0}, set()]
    )
    img = Image.open(tmp_path / "grid.png")
    assert img.size[1] > 2 * 96 and img.size[0] > 5 * 96
    assert len(out["top"]) == 2 and len(out["top"][0]) == 5
    assert out["scores"][0] == sorted(out["scores"][0], reverse=True)


# ------------------------------------------------------------------------------------------------ CLI


def test_eval_cli(run_cli, world, checkpoint, tmp_path):
    res = run_cli("eval", "retrieval", "--model", checkpoint, "--data", world / "val", "--json")
    assert res.code == 0, res.err
    data = res.json()
    assert data["n_images"] == 16 and 0 <= data["t2i_r1"] <= 1 and "i2t_median_rank" in data
    res = run_cli("eval", "zeroshot", "--model", checkpoint, "--data", world / "val", "--attribute", "shape", "--json")
    assert res.code == 0 and res.json()["attribute"] == "shape"
    human = run_cli("eval", "zeroshot", "--model", checkpoint, "--data", world / "val")
    assert human.code == 0 and "precision" in human.out and "weighted avg" in human.out
    bad = run_cli("eval", "retrieval", "--model", tmp_path / "missing", "--data", world / "val")
    assert bad.code == 2 and "does not exist" in bad.err and "Traceback" not in bad.err
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (folder / "a.txt").write_text("a red circle")
    no_scenes = run_cli("eval", "zeroshot", "--model", checkpoint, "--data", folder)
    assert no_scenes.code == 2 and "scenes.jsonl" in no_scenes.err


def test_embed_images_pipelined_batches_match_one_pass_and_bf16_stays_close(world, checkpoint, monkeypatch):
    monkeypatch.setenv("MMSTACK_BF16", "force")  # real bf16 autocast even on a CPU without native bf16
    from mmstack.data.images import load_image
    from mmstack.data.pairs import read_pairs
    from mmstack.errors import ConfigError
    from mmstack.eval.embed import embed_images, embed_texts
    from mmstack.models.two_tower import TwoTowerModel

    model = TwoTowerModel.from_pretrained(checkpoint).eval()
    pairs = read_pairs(world / "val")
    paths = [p.image for p in pairs]
    with torch.inference_mode():
        direct = model.encode_image(model.processor.images([load_image(p) for p in paths]), normalize=True)
    batched = embed_images(model, paths, batch_size=5)  # 16 images: 4 batches, decoded one batch ahead
    torch.testing.assert_close(batched, direct, rtol=1e-5, atol=1e-5)
    bf16 = embed_images(model, paths, batch_size=5, precision="bf16")
    assert bf16.dtype == torch.float32 and float((bf16 * direct).sum(-1).min()) > 0.98
    texts = [p.caption for p in pairs]
    assert float((embed_texts(model, texts, precision="bf16") * embed_texts(model, texts)).sum(-1).min()) > 0.98
    with pytest.raises(ConfigError, match="precision must be fp32 or bf16"):
        embed_images(model, paths, precision="fp16")
