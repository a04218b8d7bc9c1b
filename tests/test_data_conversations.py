"""LLaVA-Instruct conversations: the world's files read, JSON and JSONL round trips, every rule enforced."""

from __future__ import annotations

import copy
import json

import pytest

from _data_world import make_world, write_lines
from mmstack.data.conversations import (
    Conversation,
    Turn,
    read_conversations,
    to_record,
    write_conversations,
)
from mmstack.data.records import SkipReport
from mmstack.errors import DataError


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "world", n=3)


def test_reads_world_conversations_keeping_unknown_keys(world):
    convs = read_conversations(world / "conversations.json")
    assert [c.id for c in convs] == ["000000", "000001", "000002"]
    first = convs[0]
    assert first.image == world.resolve() / "images" / "000000.png"
    assert first.meta == {"kinds": ["colour", "count"]}
    assert [t.role for t in first.turns] == ["human", "gpt", "human", "gpt"]
    assert first.turns[0].value == "<image>\nWhat colour is the square?" and first.turns[1].value == "red"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(tmp_path, world, suffix):
    convs = read_conversations(world / "conversations.json")
    convs.append(
        Conversation("text-1", None, [Turn("human", "Say hi."), Turn("gpt", "hi", {"kind": "greeting"})], {"src": "x"})
    )
    out = write_conversations(convs, world / f"copy{suffix}")
    assert read_conversations(out) == convs
    records = (
        json.loads(out.read_text()) if suffix == ".json" else [json.loads(x) for x in out.read_text().splitlines()]
    )
    original = json.loads((world / "conversations.json").read_text())
    assert records[:3] == original  # the world's own records come back unchanged, unknown keys included
    assert "image" not in records[3] and records[3]["conversations"][1] == {
        "from": "gpt",
        "kind": "greeting",
        "value": "hi",
    }


def test_image_root_and_relative_paths(tmp_path, world):
    record = {
        "id": "a",
        "image": "000001.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "ok"}],
    }
    path = write_lines(tmp_path / "llava.jsonl", [record])
    with pytest.raises(DataError, match=r"line 1 of .*llava\.jsonl: field 'image': image file not found"):
        read_conversations(path)
    (conv,) = read_conversations(path, image_root=world / "images")
    assert conv.image == world.resolve() / "images" / "000001.png"
    assert to_record(conv, world)["image"] == "images/000001.png"
    assert read_conversations(path, check_images=False)[0].image == tmp_path / "000001.png"


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


GOOD = turns(("human", "<image>\nWhat is it?"), ("gpt", "a square"))
BAD_RECORDS = [
    (
        {"conversations": turns(("gpt", "<image> hi"), ("human", "x"))},
        r"record 0 \(id 'r'\) of .*c\.json: conversations\[0\]\.from is 'gpt', expected 'human'; turns must alternate",
    ),
    (
        {"conversations": turns(("human", "<image> a"), ("human", "b"))},
        r"conversations\[1\]\.from is 'human', expected 'gpt'",
    ),
    (
        {"conversations": turns(("human", "What is it?"), ("gpt", "x"))},
        r"<image> appears 0 times; a record with an 'image'",
    ),
    (
        {"conversations": turns(("human", "<image> <image>"), ("gpt", "x"))},
        r"<image> appears 2 times",
    ),
    (
        {"conversations": turns(("human", "hi"), ("gpt", "<image>"))},
        r"conversations\[1\]\.value \(a gpt turn\) contains <image>",
    ),
    (
        {"image": None, "conversations": GOOD},
        r"conversations\[0\]\.value contains <image> but the record has no 'image'",
    ),
    ({"conversations": GOOD[:1]}, r"conversations\[0\] is a human turn with no gpt answer"),
    (
        {"conversations": turns(("human", "<image>"), ("gpt", 3))},
        r"field 'conversations\[1\]\.value' must be a string, got a number",
    ),
    (
        {"conversations": turns(("human", "<image>"), ("robot", "x"))},
        r"conversations\[1\]\.from is 'robot'; use 'human' or 'gpt'",
    ),
    ({"conversations": []}, r"field 'conversations' has no turns"),
    ({"conversations": "hello"}, r"field 'conversations' must be a list of turns, got a string"),
    ({"image": "images/none.png", "conversations": GOOD}, r"field 'image': image file not found: .*none\.png"),
    ({"id": None, "conversations": GOOD}, r"record 0 of .*: missing field 'id'"),
]


@pytest.mark.parametrize(("override", "message"), BAD_RECORDS)
def test_invalid_conversations_are_explained(world, override, message):
    record = {"id": "r", "image": "images/000000.png", **copy.deepcopy(override)}
    if record.get("image") is None:
        record.pop("image")
    path = world / "c.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def test_malformed_files(world):
    broken = world / "broken.json"
    broken.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(DataError, match=r"line 3, column 22 of .*broken\.json: malformed JSON"):
        read_conversations(broken)
    (world / "obj.json").write_text('{"id": "a"}')
    with pytest.raises(DataError, match="expected a JSON list of records, got an object"):
        read_conversations(world / "obj.json")
    lines = write_lines(
        world / "c.jsonl", [{"id": "a", "conversations": turns(("human", "hi"), ("gpt", "yo"))}, "{oops"]
    )
    with pytest.raises(DataError, match=r"line 2 of .*c\.jsonl: column 2: malformed JSON"):
        read_conversations(lines)
    with pytest.raises(DataError, match=r"conversations file not found: .*missing\.json"):
        read_conversations(world / "missing.json")


def test_skip_bad_reports_locations(world):
    records = json.loads((world / "conversations.json").read_text())
    records[1]["conversations"][0]["value"] = "no placeholder"
    records.insert(0, ["not", "an", "object"])
    (world / "c.json").write_text(json.dumps(records))
    report = SkipReport()
    convs = read_conversations(world / "c.json", skip_bad=True, report=report)
    assert [c.id for c in convs] == ["000000", "000002"]
    assert [loc.split(" of ")[0] for loc, _ in report.skipped] == ["record 0", "record 2 (id '000001')"]
    assert "expected a JSON object, got a list" in report.skipped[0][1]


def test_dataclasses_validate_on_construction(tmp_path):
    with pytest.raises(DataError, match="turn role must be 'human' or 'gpt'"):
        Turn("assistant", "hi")
    with pytest.raises(DataError, match="appears 0 times"):
        Conversation("x", tmp_path / "a.png", [Turn("human", "hi"), Turn("gpt", "yo")])
    conv = Conversation("x", None, [Turn("human", "hi"), Turn("gpt", "yo")])
    assert to_record(conv, tmp_path) == {"id": "x", "conversations": turns(("human", "hi"), ("gpt", "yo"))}
