"""Data cleaning: every filter's reason, kept/rejected lists, untouched input, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmstack.data.clean import CleanConfig, clean_pairs
from mmstack.errors import ConfigError

COLOURS = [(220, 30, 30), (30, 180, 50), (30, 70, 230), (235, 230, 40), (140, 50, 210)]


def _draw(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), colour, dtype=np.uint8)
    arr[: size[1] // 2] = rng.integers(0, 255, (size[1] // 2, size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Five good pairs, then one of each defect (ids say which)."""
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    records = []

    def add(pid: str, img: Image.Image | None, caption: str) -> None:
        if img is not None:
            img.save(root / "images" / f"{pid}.png")
        records.append({"id": pid, "image": f"images/{pid}.png", "caption": caption, "source": "test"})

    for i, c in enumerate(COLOURS):
        add(f"good{i}", _draw(c, seed=i), f"a picture of thing number {i}")
    add("short", _draw(COLOURS[0], seed=10), "circle")
    add("tiny", _draw(COLOURS[1], (8, 8)), "a very small image")
    add("wide", _draw(COLOURS[2], (128, 20)), "a very wide image")
    add("dup", None, "the same picture again")
    (root / "images" / "dup.png").write_bytes((root / "images" / "good2.png").read_bytes())
    add("missing", None, "this image file does not exist")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def model():
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer

    cfg = TwoTowerConfig.from_preset("shapes-micro")
    tok = train_caption_tokenizer(["a picture of thing number one", "a very small image"], max_length=16)
    torch.manual_seed(0)
    return TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).eval()


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            st = p.stat()
            h.update(p.read_bytes() + f"{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_filters_without_a_model(dataset, tmp_path):
    before = _digest(dataset)
    summary = clean_pairs(dataset, tmp_path / "out", CleanConfig(min_caption_words=3, min_size=16, max_aspect=3.0))
    assert _digest(dataset) == before
    rejected = {r.get("id", r.get("location")): r for r in _read(tmp_path / "out" / "rejected.jsonl")}
    assert rejected["short"]["reason"] == "caption_too_short" and rejected["short"]["detail"] == "1 words < 3"
    assert rejected["tiny"]["reason"] == "image_too_small" and "8x8" in rejected["tiny"]["detail"]
    assert rejected["wide"]["reason"] == "bad_aspect_ratio" and "6.40 > 3.0" in rejected["wide"]["detail"]
    bad = [r for r in rejected.values() if r["reason"] == "bad_record"]
    assert len(bad) == 1 and "line 10" in bad[0]["location"] and "not found" in bad[0]["detail"]
    kept = _read(tmp_path / "out" / "kept.jsonl")
    assert [r["id"] for r in kept] == [f"good{i}" for i in range(5)] + ["dup"]  # no model: duplicates stay
    assert kept[0]["source"] == "test"  # extra fields survive
    assert summary["n_in"] == 10 and summary["n_kept"] == 6 and summary["n_rejected"] == 4
    assert summary["reasons"] == {"bad_aspect_ratio": 1, "bad_record": 1, "caption_too_short": 1, "image_too_small": 1}
    # kept.jsonl is itself a pairs file
    from mmstack.data.pairs import read_pairs

    again = read_pairs(tmp_path / "out" / "kept.jsonl")
    assert [p.id for p in again] == [r["id"] for r in kept]
    assert again[0].image == (dataset / "images" / "good0.png").resolve()


def test_score_and_near_duplicate_filters(dataset, tmp_path, model):
    cfg = CleanConfig(min_score=-1.0, dedup_threshold=1.0)
    clean_pairs(dataset, tmp_path / "all", cfg, model)
    scored = {r["id"]: r["score"] for r in _read(tmp_path / "all" / "kept.jsonl")}
    # the duplicate image scores like its original's image (captions differ) and is caught at cos ~ 1
    rejected = {r["id"]: r for r in _read(tmp_path / "all" / "rejected.jsonl") if "id" in r}
    assert rejected["dup"]["reason"] == "near_duplicate" and "near-duplicate of good2" in rejected["dup"]["detail"]
    # a threshold between the scores splits the good pairs accordingly
    values = sorted(scored.values())
    threshold = (values[1] + values[2]) / 2
    clean_pairs(dataset, tmp_path / "scored", CleanConfig(min_score=threshold, dedup_threshold=1.0), model)
    kept = {r["id"] for r in _read(tmp_path / "scored" / "kept.jsonl")}
    low = {r["id"]: r for r in _read(tmp_path / "scored" / "rejected.jsonl") if r["reason"] == "low_score"}
    assert kept == {k for k, v in scored.items() if v >= threshold}
    assert {k for k in low if k.startswith("good")} == {k for k, v in scored.items() if v < threshold}
    assert all(r["detail"].startswith("score ") and r["score"] < threshold for r in low.values())


def test_near_duplicates_by_threshold(dataset, tmp_path, model):
    from mmstack.eval.embed import embed_images

    goods = [dataset / "images" / f"good{i}.png" for i in range(5)]
    emb = embed_images(model, goods)
    sim = emb @ emb.T
    off = sim[~torch.eye(5, dtype=torch.bool)]
    threshold = float(off.max()) - 1e-4  # the most similar distinct pair now counts as duplicate
    clean_pairs(dataset, tmp_path / "out", CleanConfig(min_score=-1.0, dedup_threshold=threshold), model)
    rejected = [r for r in _read(tmp_path / "out" / "rejected.jsonl") if r["reason"] == "near_duplicate"]
    upper = sim.masked_fill(~torch.ones(5, 5, dtype=torch.bool).triu(1), -2.0)
    i, j = divmod(int(upper.argmax()), 5)  # i < j: the most similar distinct pair
    ids = {r["id"] for r in rejected}
    assert f"good{j}" in ids and f"good{i}" not in ids and "dup" in ids  # the later one of the pair goes


def test_bad_arguments(dataset, tmp_path):
    with pytest.raises(ConfigError, match="inside the input folder"):
        clean_pairs(dataset, dataset / "cleaned")
    with pytest.raises(ConfigError, match="need a model"):
        clean_pairs(dataset, tmp_path / "x", CleanConfig(min_score=0.3))
    with pytest.raises(ConfigError, match="max-aspect"):
        CleanConfig(max_aspect=0.5)


def test_clean_cli(run_cli, dataset, tmp_path, model):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    before = _digest(dataset)
    res = run_cli(
        "data", "clean", "--model", ckpt, "--in", dataset, "--out", tmp_path / "out", "--min-score", "-1", "--json"
    )
    assert res.code == 0, res.err
    summary = res.json()
    assert summary["thresholds"]["dedup_threshold"] == 0.98 and summary["reasons"]["near_duplicate"] >= 1
    assert (tmp_path / "out" / "kept.jsonl").is_file() and _digest(dataset) == before
    bad = run_cli("data", "clean", "--in", dataset, "--out", dataset / "sub")
    assert bad.code == 2 and "inside the input folder" in bad.err
