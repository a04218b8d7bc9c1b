"""The world RAG benchmark: deterministic, every question answered by exactly one record, files on disk."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mmstack.errors import ConfigError
from mmstack.world import generate_rag_world, parse_image, sample_rag_world
from mmstack.world.rag_world import HALLS, RAG_KINDS, load_rag_questions


@pytest.fixture(scope="module")
def world():
    return sample_rag_world(n_records=40, n_questions=60, seed=3)


def test_same_seed_same_world_other_seed_other_world(world):
    again = sample_rag_world(n_records=40, n_questions=60, seed=3)
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in world.records]
    assert [q.to_dict() for q in again.questions] == [q.to_dict() for q in world.questions]
    other = sample_rag_world(n_records=40, n_questions=60, seed=4)
    assert [r.note for r in other.records] != [r.note for r in world.records]


def test_records_have_unique_numbers_and_notes_that_name_them(world):
    assert len({r.number for r in world.records}) == len(world.records)
    for r in world.records:
        assert r.hall in HALLS and r.name in r.note.lower() and r.hall in r.note
        assert 1 <= len(r.scene.objects) <= 3


def _holders(world, colour: str, shape: str) -> list[str]:
    return [r.id for r in world.records if any((o.colour, o.shape) == (colour, shape) for o in r.scene.objects)]


def test_every_question_has_exactly_one_answering_record(world):
    assert {q.kind for q in world.questions} == set(RAG_KINDS)
    for q in world.questions:
        rec = world.by_id[q.record]
        text = q.question
        if q.kind == "attribute":
            assert rec.name + "?" in text
            m = re.match(r"What colour is the (\w+) in", text)
            if m:
                (obj,) = [o for o in rec.scene.objects if o.shape == m.group(1)]
                assert q.answer == obj.colour
            else:
                colour = re.match(r"What shape is the (\w+) object", text).group(1)
                (obj,) = [o for o in rec.scene.objects if o.colour == colour]
                assert q.answer == obj.shape
        elif q.kind in ("lookup", "fact"):
            colour, shape = re.search(r"an? (\w+) (\w+)\?$", text).groups()
            assert _holders(world, colour, shape) == [rec.id]
            assert q.answer == (rec.name if q.kind == "lookup" else rec.hall)
        elif q.kind == "note":
            assert rec.name in text and q.answer == rec.hall
        else:
            assert q.query_scene is not None and q.answer in (rec.name, rec.hall)


def test_query_photos_show_the_same_objects_differently(world):
    q = next(q for q in world.questions if q.kind == "image")
    rec = world.by_id[q.record]
    photo, original = q.render_query(), rec.render()
    assert not np.array_equal(np.asarray(photo), np.asarray(original))
    seen = sorted((o.shape, o.colour, o.cell) for o in parse_image(photo))
    assert seen == sorted((o.shape, o.colour, o.cell) for o in rec.scene.objects)


def test_generate_writes_the_benchmark_folder(tmp_path):
    out = tmp_path / "rag"
    summary = generate_rag_world(out, n_records=12, n_questions=10, seed=1, image_size=32)
    assert summary["n_records"] == 12 and sum(summary["question_kinds"].values()) == 10
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12 and all((out / p["image"]).is_file() for p in pairs)
    assert all(p["caption"].lower().count("exhibit") == 1 for p in pairs)
    questions = load_rag_questions(out)
    with_image = [q for q in questions if q["image"]]
    assert with_image and all(q["kind"] == "image" for q in with_image)
    assert all(json.loads(line)["id"] for line in (out / "records.jsonl").read_text().splitlines())
    before = (out / "questions.jsonl").read_bytes()
    generate_rag_world(out, n_records=12, n_questions=10, seed=1, image_size=32)
    assert (out / "questions.jsonl").read_bytes() == before


def test_bad_sizes_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="--records"):
        sample_rag_world(n_records=200)
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a RAG world"):
        generate_rag_world(tmp_path, n_records=5, n_questions=2)
