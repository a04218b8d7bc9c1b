"""Preference pairs: the world's file reads with its extra key, round trips, and bad lines are explained."""

from __future__ import annotations

import json

import pytest

from _data_world import make_world, write_lines
from mmstack.data.preferences import Preference, read_preferences, write_preferences
from mmstack.data.records import SkipReport
from mmstack.errors import DataError


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "world", n=3)


def test_reads_world_preferences_and_round_trips(tmp_path, world):
    prefs = read_preferences(world / "preferences.jsonl")
    assert [(p.chosen, p.rejected) for p in prefs] == [("red", "green"), ("green", "blue"), ("blue", "yellow")]
    assert prefs[0].meta == {"rejection": "wrong_colour"} and prefs[0].prompt == "What colour is the square?"
    assert prefs[0].image == world.resolve() / "images" / "000000.png"
    prefs.append(Preference(None, "Say something kind.", "You did well.", "no", id="t1"))
    out = write_preferences(prefs, tmp_path / "other" / "prefs.jsonl")
    assert read_preferences(out) == prefs
    first = json.loads(out.read_text().splitlines()[0])
    assert first["image"] == str(world.resolve() / "images" / "000000.png")  # outside the folder: absolute
    same_dir = write_preferences(prefs[:1], world / "copy.jsonl")
    assert json.loads(same_dir.read_text()) == json.loads((world / "preferences.jsonl").read_text().splitlines()[0])


BAD = [
    ({"chosen": "red", "rejected": " red "}, r"line 1 of .*p\.jsonl: 'chosen' equals 'rejected' \('red'\)"),
    ({"chosen": ""}, r"line 1 of .*: field 'chosen' is empty"),
    ({"prompt": None}, r"line 1 of .*: missing field 'prompt'; each line needs"),
    ({"rejected": ["x"]}, r"field 'rejected' must be a string, got a list"),
    ({"image": "images/gone.png"}, r"field 'image': image file not found: .*gone\.png"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_preferences_are_explained(world, override, message):
    record = {"image": "images/000000.png", "prompt": "colour?", "chosen": "red", "rejected": "blue"} | override
    path = write_lines(world / "p.jsonl", [{k: v for k, v in record.items() if v is not None}])
    with pytest.raises(DataError, match=message):
        read_preferences(path)


def test_skip_bad_preferences(world):
    good = {"prompt": "colour?", "chosen": "red", "rejected": "blue"}
    path = write_lines(world / "p.jsonl", [good, good | {"rejected": "red"}, "not json", good])
    report = SkipReport()
    assert len(read_preferences(path, skip_bad=True, report=report)) == 2
    assert [loc.split(" of ")[0] for loc, _ in report.skipped] == ["line 2", "line 3"]
    with pytest.raises(DataError, match=r"'chosen' equals 'rejected'"):
        Preference(None, "q", "same", "same")
