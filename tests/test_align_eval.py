"""Alignment evaluation and data: shape/colour mentions, hallucination scoring against the scene ground
truth, the hallucination CLI, and preference batches from user files (with and without images)."""

from __future__ import annotations

import json

import pytest
import torch

from _align_helpers import micro_world_and_vlm
from mmstack.eval.alignment import (
    HallucinationItem,
    claimed_objects,
    coloured_shapes,
    hallucination_items,
    mentions,
    score_hallucinations,
)
from mmstack.models.bridge import BridgeModel
from mmstack.train.align.data import PreferenceBatches, PromptBatches, load_preferences


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_world_and_vlm(tmp_path_factory)


def test_mentions_reads_shapes_plurals_and_colours():
    shapes, colours = mentions("Two red stars, a Blue cross and three crosses; no hexagons.")
    assert shapes == {"star", "cross", "hexagon"} and colours == {"red", "blue"}
    assert mentions("3") == (set(), set()) and mentions("top left") == (set(), set())


def test_hallucination_scoring_against_ground_truth(tmp_path):
    scene = {"objects": {("red", "circle"), ("blue", "star")}}
    items = [
        HallucinationItem("Describe the image.", tmp_path, "describe", **scene),
        HallucinationItem("What colour is the star?", tmp_path, "colour", **scene),
        HallucinationItem("What shape is the red object?", tmp_path, "shape", **scene),
        HallucinationItem("What colour is the circle?", tmp_path, "colour", **scene),
        HallucinationItem("What is left of the circle?", tmp_path, "relation", **scene),
    ]
    # green heart: absent words and object | blue (star) | square: absent word, (red square) absent object |
    # red (circle) | red star: both words present, the object absent (a binding error)
    answers = ["a red circle and a green heart", "blue", "square", "red", "red star"]
    res = score_hallucinations(items, answers)
    assert res["rate"] == pytest.approx(3 / 5) and res["n"] == 5
    assert res["word_rate"] == pytest.approx(2 / 5) and res["object_rate"] == pytest.approx(3 / 5)
    # named 15: red circle green heart + 2 objects | blue + (blue star) | square + (red square) | red + (red circle)
    # | red star + (red star); absent 6: green heart (green heart) | square (red square) | (red star)
    assert res["mention_rate"] == pytest.approx(6 / 15)
    assert res["by_kind"]["colour"] == {"rate": 0.0, "n": 2} and res["by_kind"]["shape"]["rate"] == 1.0
    assert res["by_kind"]["relation"]["rate"] == 1.0
    assert res["examples"][0]["absent"] == ["heart", "green", "green heart"]


def test_claimed_objects_read_the_answer_and_its_question():
    assert coloured_shapes("a large red star and two blue crosses; red") == {("red", "star"), ("blue", "cross")}
    assert claimed_objects("What colour is the cross at the top left?", "pink") == {("pink", "cross")}
    assert claimed_objects("What shape is the large pink object?", "crosses") == {("pink", "cross")}
    # the question names no single object, or the answer names its own: nothing is implied
    assert claimed_objects("What colour is the large object?", "pink") == set()
    assert claimed_objects("What is right of the red star?", "blue cross") == {("blue", "cross")}
    assert claimed_objects("How many objects are there?", "3") == set()


def test_hallucination_items_ask_only_what_names_things(micro):
    world, _ = micro
    items = hallucination_items(world, limit=5)
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()[:5]]
    assert sum(it.kind == "describe" for it in items) == 5
    for it in items:
        if it.kind != "describe":
            assert any(mentions(it.answers[0]))  # e.g. colour/shape/relation answers, never yes/no or counts
    first = scenes[0]
    assert items[0].shapes == {o["shape"] for o in first["objects"]} and not items[0].absent(first["caption"])
    assert items[0].objects == {(o["colour"], o["shape"]) for o in first["objects"]}
    for it in items:  # the reference answers never hallucinate, not even through their question
        assert not it.absent(it.answers[0]), (it.question, it.answers[0])


def test_cli_hallucination_reports_rate_and_vqa(micro, run_cli):
    world, vlm = micro
    res = run_cli("eval", "hallucination", "--model", vlm, "--data", world, "--limit", "3", "--vqa", "--json")
    assert res.code == 0, res.err
    out = res.json()
    h = out["hallucination"]
    assert 0.0 <= h["rate"] <= 1.0 and h["n"] == len(hallucination_items(world, limit=3))
    assert "describe" in h["by_kind"] and out["vqa"]["n"] > 0


def test_cli_hallucination_needs_a_world_folder(micro, tmp_path, run_cli):
    res = run_cli("eval", "hallucination", "--model", micro[1], "--data", tmp_path)
    assert res.code != 0 and "scenes.jsonl" in res.err and "Traceback" not in res.err


def test_user_preference_file_with_and_without_images(micro, tmp_path):
    world, vlm = micro
    from shutil import copy

    copy(world / "images" / "000000.png", tmp_path / "a.png")
    rows = [
        {"image": "a.png", "prompt": "What colour is the star?", "chosen": "red", "rejected": "blue", "id": "p1"},
        {"prompt": "Is red a colour?", "chosen": "yes", "rejected": "no", "id": "p2"},
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = BridgeModel.from_pretrained(vlm).processor
    data = PreferenceBatches(load_preferences(tmp_path / "prefs.jsonl"), proc)
    batch = data.batch(torch.tensor([0, 1]))
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 2  # the image for both answers
    image_rows = (batch["input_ids"] == proc.image_token_id).sum(-1)
    assert (
        image_rows.tolist()[0] == image_rows.tolist()[2] > 0 and image_rows.tolist()[1] == image_rows.tolist()[3] == 0
    )
    labelled = batch["labels"] != -100
    assert proc.tokenizer.decode(batch["labels"][0][labelled[0]]).startswith("red")
    prompts = PromptBatches(load_preferences(tmp_path / "prefs.jsonl"), proc).batch(torch.tensor([0, 1]))
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left-padded for generation


def test_bad_preference_line_names_file_and_line(tmp_path):
    from mmstack.errors import DataError

    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match=r"line 1 of .*prefs\.jsonl"):
        load_preferences(tmp_path / "prefs.jsonl")
    (tmp_path / "ok.jsonl").write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "rejection": "terse"}) + "\n"
    )
    with pytest.raises(DataError, match="no preference pairs of kinds"):
        load_preferences(tmp_path / "ok.jsonl", kinds=["wrong_count"])
