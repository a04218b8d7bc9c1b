"""On-policy DPO pairs: the start model's own wrong or hallucinating answers against the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _align_helpers import micro_world_and_vlm
from mmstack.config import configs_dir, load_config
from mmstack.data.preferences import read_preferences
from mmstack.errors import ConfigError
from mmstack.eval.alignment import HallucinationItem
from mmstack.train.align.dpo import DpoRecipeConfig, train_dpo
from mmstack.train.align.on_policy import PAIRS_FILE, pairs_from_answers

MICRO = configs_dir() / "dpo-micro.yaml"
SCENE = {("red", "circle"), ("blue", "square")}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_world_and_vlm(tmp_path_factory)


def _item(question: str, kind: str, answer: str) -> HallucinationItem:
    return HallucinationItem(question, Path("img.png"), kind, SCENE, [answer], id="s0")


def test_wrong_and_hallucinating_answers_become_pairs_and_right_ones_do_not():
    items = [
        _item("How many circles are there?", "count", "1"),
        _item("How many circles are there?", "count", "1"),
        _item("What colour is the square?", "colour", "blue"),
        _item("Describe the image.", "describe", "a red circle and a blue square"),
        _item("Describe the image.", "describe", "a red circle and a blue square"),
        _item("Is there a red circle?", "existence", "yes"),
        _item("What shape is red?", "shape", "circle"),
    ]
    answers = ["one", "3", "green", "a red circle and a blue square on the left", "a green star", "", "square"]
    pairs = pairs_from_answers(items, [[a] for a in answers])
    got = [(p.prompt, p.chosen, p.rejected, p.meta["rejection"]) for p in pairs]
    assert got == [
        ("How many circles are there?", "1", "3", "on_policy_wrong"),  # "one" scores as "1": not a pair
        ("What colour is the square?", "blue", "green", "on_policy_hallucination"),  # no green object
        ("Describe the image.", "a red circle and a blue square", "a green star", "on_policy_hallucination"),
        ("What shape is red?", "circle", "square", "on_policy_hallucination"),  # a square exists, a red one not
    ]  # a faithful description that is not the caption, and an empty answer, make no pair
    assert [p.meta["kind"] for p in pairs] == ["count", "colour", "describe", "shape"]
    assert {p.meta["chosen_from"] for p in pairs} == {"truth"}


def test_sampled_answers_pair_a_wrong_sample_with_a_right_one():
    count, describe = _item("How many circles are there?", "count", "1"), _item("Describe the image.", "describe", "x")
    samples = [["2", "one", "3"], ["a red circle", "a blue square"], ["1", "one"]]
    pairs = pairs_from_answers([count, describe, count], samples)
    assert [(p.chosen, p.rejected, p.meta["chosen_from"]) for p in pairs] == [("one", "2", "sample")]


def test_dpo_on_policy_samples_pairs_once_and_reuses_them_on_resume(micro, tmp_path):
    world, vlm = micro
    overrides = [f"model={vlm}", f"data.train={world}", "on_policy.scenes=6", "train.max_steps=2"]
    cfg = load_config(DpoRecipeConfig, MICRO, overrides=overrides)
    summary = train_dpo(cfg, tmp_path / "dpo")
    sampled = summary["on_policy"]
    assert sampled["asked"] > 6 and sampled["pairs"] == summary["pairs"] > 0  # untrained: most answers wrong
    pairs = read_preferences(tmp_path / "dpo" / PAIRS_FILE)
    assert len(pairs) == sampled["pairs"] and all(p.image.is_file() for p in pairs)
    assert {p.meta["rejection"] for p in pairs} <= {"on_policy_hallucination", "on_policy_wrong"}
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    truth = {(q["question"], str(q["answer"])) for s in scenes for q in s["questions"]}
    assert all((p.prompt, p.chosen) in truth for p in pairs if p.prompt != "Describe the image.")
    # a rerun with more steps (same pairs key) reads the pairs back instead of sampling again
    more = load_config(DpoRecipeConfig, MICRO, overrides=[*overrides, "train.max_steps=3"])
    assert train_dpo(more, tmp_path / "dpo")["on_policy"]["cached"] is True
    # scripted pairs join the sampled ones on request
    both = load_config(DpoRecipeConfig, MICRO, overrides=[*overrides, "on_policy.scripted=true"])
    assert train_dpo(both, tmp_path / "both")["pairs"] == sampled["pairs"] + len(read_preferences(world))


def test_dpo_rounds_sample_each_round_from_the_previous_policy(micro, tmp_path):
    from mmstack.train.align.common import fingerprint

    world, vlm = micro
    overrides = [f"model={vlm}", f"data.train={world}", "on_policy.scenes=6", "train.max_steps=3", "rounds=2"]
    overrides += [f"eval.data={world}", "eval.limit=3", "eval.vqa=false"]
    summary = train_dpo(load_config(DpoRecipeConfig, MICRO, overrides=overrides), tmp_path / "dpo")
    first, last = summary["rounds"]
    assert first["model"] == str(tmp_path / "dpo" / "round-1" / "model") and summary["model"] == last["model"]
    assert last["model"] == str(tmp_path / "dpo" / "model")
    # round 2 starts from round 1's policy: its start (and reference) is round 1's output, not the start model
    card = (tmp_path / "dpo" / "model" / "README.md").read_text()
    assert fingerprint(first["model"]) in card and fingerprint(vlm) not in card
    # the summary compares the start model with the final policy; round 2's start is round 1's end
    assert summary["eval"]["before"] == first["eval"]["before"] and summary["eval"]["after"] == last["eval"]["after"]
    assert last["eval"]["before"] == first["eval"]["after"]
    assert summary["train_s"] == pytest.approx(first["train_s"] + last["train_s"], abs=0.02)
    assert summary["steps"] == first["steps"] + last["steps"] == 6
    # a rerun reuses both rounds
    again = train_dpo(load_config(DpoRecipeConfig, MICRO, overrides=overrides), tmp_path / "dpo")
    assert [r.get("cached") for r in again["rounds"]] == [True, True]


def test_dpo_rounds_need_on_policy_pairs():
    with pytest.raises(ConfigError, match=r"rounds: 2 .* needs on_policy\.scenes > 0"):
        load_config(DpoRecipeConfig, MICRO, overrides=["rounds=2"])


def test_on_policy_needs_a_world_folder(micro, tmp_path):
    world, vlm = micro
    overrides = [f"model={vlm}", f"data.train={world / 'preferences.jsonl'}", "on_policy.scenes=4"]
    with pytest.raises(ConfigError, match=r"on_policy\.scenes needs data\.train to be a shapes-world folder"):
        train_dpo(load_config(DpoRecipeConfig, MICRO, overrides=overrides), tmp_path / "dpo")


def test_sampling_pairs_read_their_samples_from_the_policy(micro):
    from mmstack.models.bridge import BridgeModel
    from mmstack.train.align.on_policy import OnPolicySection, sample_pairs

    world, vlm = micro
    model = BridgeModel.from_pretrained(vlm).train()
    pairs, stats = sample_pairs(model, world, OnPolicySection(scenes=3, samples=2, temperature=1.5))
    assert stats["answers"] == 2 * stats["asked"] and stats["pairs"] == len(pairs) > 0
    assert all(p.meta["chosen_from"] in ("sample", "truth") for p in pairs)
    assert model.training  # sampling ran in eval mode and restored the caller's mode
    again, _ = sample_pairs(model, world, OnPolicySection(scenes=3, samples=2, temperature=1.5))
    assert [p.rejected for p in again] == [p.rejected for p in pairs]  # seeded samples: reproducible


@pytest.mark.parametrize(
    ("override", "message"),
    [("on_policy.temperature=0", r"on_policy\.temperature must be > 0"), ("on_policy.samples=-1", r">= 0")],
)
def test_bad_on_policy_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DpoRecipeConfig, MICRO, overrides=[override])
