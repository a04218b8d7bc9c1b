"""VQA scoring (standard normalisation), evaluation by kind, and the eval/chat commands."""

from __future__ import annotations

import io
import json

import pytest

from _bridge_helpers import solid, tiny_model
from mmstack.eval.vqa import load_vqa_items, normalize_answer, score_items, vqa_score


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("the red circle.", "red circle"),
        ("A  top-left!", "top left"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes\n", "yes"),
        ("an apple, a pear", "apple pear"),
    ],
)
def test_normalize_answer_follows_the_vqa_script(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_score_single_and_multiple_references():
    assert vqa_score("Red.", ["red"]) == 1.0
    assert vqa_score("blue", ["red"]) == 0.0
    refs = ["2", "two", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_score("two", refs) == 1.0  # three humans said 2
    assert vqa_score("4", refs) == 1.0
    assert vqa_score("5", refs) == 0.0
    assert vqa_score("3", ["3", "4"]) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("vqa") / "val"
    generate_world(root, n=6, seed=5, split="val", image_size=32, clips=2)
    return root


def test_items_carry_kinds_and_clips(world):
    items = load_vqa_items(world)
    kinds = {it.kind for it in items}
    assert {"colour", "count", "motion"} <= kinds
    assert all(it.answers and it.question and "<image>" not in it.question for it in items)
    assert sum(bool(it.frames) for it in items) > 0
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    first = {q["question"]: (q["answer"], q["kind"]) for q in scenes[0]["questions"]}
    for it in items:
        if it.id == scenes[0]["id"]:
            assert first[it.question] == (it.answers[0], it.kind)


def test_score_items_by_kind(world):
    items = load_vqa_items(world, clips=False)
    preds = [it.answers[0] if it.kind == "colour" else "wrong" for it in items]
    report = score_items(items, preds)
    assert report["by_kind"]["colour"]["accuracy"] == 1.0
    assert report["by_kind"]["count"]["accuracy"] == 0.0
    n_colour = report["by_kind"]["colour"]["n"]
    assert report["accuracy"] == pytest.approx(n_colour / len(items))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vlm"
    tiny_model().save_pretrained(path)
    return path


def test_eval_vqa_command(world, checkpoint, run_cli):
    res = run_cli("eval", "vqa", "--model", checkpoint, "--data", world, "--limit", "3", "--json")
    assert res.code == 0, res.err
    out = res.json()
    assert 0.0 <= out["accuracy"] <= 1.0 and out["n"] == sum(v["n"] for v in out["by_kind"].values())
    assert "motion" in out["by_kind"]
    bad = run_cli("eval", "vqa", "--model", world, "--data", world)
    assert bad.code == 2 and "error" in bad.err


def test_chat_command_once_and_interactive(checkpoint, tmp_path, run_cli, monkeypatch):
    img = tmp_path / "red.png"
    solid("red").save(img)
    once = run_cli(
        "chat", "--model", checkpoint, "--image", img, "What colour is the star?", "--max-new-tokens", "3", "--json"
    )
    assert once.code == 0, once.err
    answer = once.json()["answer"]
    assert isinstance(answer, str)
    streamed = run_cli(
        "chat", "--model", checkpoint, "--image", img, "What colour is the star?", "--max-new-tokens", "3"
    )
    assert streamed.out.strip() == answer
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is the star?\nHow many objects are there?\n/quit\n"))
    chat = run_cli("chat", "--model", checkpoint, "--image", img, "--max-new-tokens", "3")
    assert chat.code == 0, chat.err
    assert len(chat.out.strip().splitlines()) == 2
    missing = run_cli("chat", "--model", checkpoint, "--image", tmp_path / "nope.png", "hi")
    assert missing.code == 2 and "nope.png" in missing.err
