"""``mmstack data validate`` and ``mmstack data convert``: JSON output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from _data_world import make_world, write_lines
from mmstack.data.pairs import read_pairs


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "world", n=4)


def test_validate_a_good_world(run_cli, world):
    for target, kind, fmt in [
        (world, "pairs", "jsonl"),
        (world / "conversations.json", "conversations", "json"),
        (world / "preferences.jsonl", "preferences", "jsonl"),
    ]:
        res = run_cli("data", "validate", target, "--json")
        assert res.code == 0, res.err
        out = res.json()
        assert (out["kind"], out["format"], out["n_ok"], out["n_bad"], out["ok"]) == (kind, fmt, 4, 0, True)
    for kind in ("conversations", "preferences"):  # a world folder stands for its standard file
        assert run_cli("data", "validate", world, "--kind", kind, "--json").json()["n_ok"] == 4
    human = run_cli("data", "validate", world)
    assert human.code == 0 and "n_ok" in human.out


def test_validate_reports_bad_records_and_exits_2(run_cli, world):
    good = {"image": "images/000000.png", "caption": "fine"}
    path = write_lines(world / "mixed.jsonl", [good, {"image": "images/000001.png"}, "{bad json", good])
    res = run_cli("data", "validate", path, "--json")
    assert res.code == 2
    out = res.json()
    assert (out["n_ok"], out["n_bad"], out["ok"]) == (2, 2, False)
    assert out["bad"][0]["location"] == f"line 2 of {path}" and "missing field 'caption'" in out["bad"][0]["reason"]
    assert out["bad"][1]["location"] == f"line 3 of {path}" and "malformed JSON" in out["bad"][1]["reason"]
    assert run_cli("data", "validate", path, "--json", "--skip-bad").code == 0
    assert len(run_cli("data", "validate", path, "--json", "--show", "1").json()["bad"]) == 1


def test_validate_decode_finds_truncated_images(run_cli, world):
    assert run_cli("data", "validate", world, "--json", "--decode").json()["ok"] is True
    image = world / "images" / "000002.png"
    image.write_bytes(image.read_bytes()[:-20])  # IEND and the end of IDAT gone
    out = run_cli("data", "validate", world, "--json", "--decode")
    assert out.code == 2
    result = out.json()
    assert result["n_ok"] == 3 and result["bad"][0]["location"] == str(image.resolve())
    assert "truncated or corrupt" in result["bad"][0]["reason"]


def test_validate_kind_override_and_errors(run_cli, world, tmp_path):
    res = run_cli("data", "validate", world / "preferences.jsonl", "--kind", "pairs", "--json")
    assert res.code == 2 and "missing field 'caption'" in res.json()["bad"][0]["reason"]
    missing = run_cli("data", "validate", tmp_path / "nope.jsonl", "--json")
    assert missing.code == 2 and "pairs source not found" in missing.err and "Traceback" not in missing.err
    assert missing.out == ""
    bad_kind = run_cli("data", "validate", world, "--kind", "videos")
    assert bad_kind.code == 2 and "--kind must be one of pairs, conversations, preferences" in bad_kind.err


def test_convert_between_all_formats(run_cli, world, tmp_path):
    original = [(p.caption, p.id, p.read_image_bytes()) for p in read_pairs(world)]
    res = run_cli("data", "convert", world, tmp_path / "tars" / "s-{000..009}.tar", "--shard-size", "3", "--json")
    assert res.code == 0, res.err
    out = res.json()
    assert (out["src_format"], out["dst_format"], out["n_pairs"], out["n_skipped"]) == ("jsonl", "webdataset", 4, 0)
    assert [p.rsplit("/", 1)[1] for p in out["written"]] == ["s-000.tar", "s-001.tar"]
    shards = out["read_with"]
    assert shards == str(tmp_path / "tars" / "s-{000..001}.tar")
    assert run_cli("data", "validate", shards, "--json").json()["n_ok"] == 4
    steps = [
        (shards, tmp_path / "p.csv"),
        (tmp_path / "p.csv", tmp_path / "p.tsv"),
        (tmp_path / "p.tsv", tmp_path / "folder"),
    ]
    steps.append((tmp_path / "folder", tmp_path / "final.jsonl"))
    for src, dst in steps:
        res = run_cli("data", "convert", src, dst, "--json")
        assert res.code == 0, res.err
        assert res.json()["n_pairs"] == 4
    back = read_pairs(tmp_path / "final.jsonl")
    assert [(p.caption, p.id, p.read_image_bytes()) for p in back] == original
    assert json.loads((tmp_path / "final.jsonl").read_text().splitlines()[0])["image"] == "folder/000000.png"


def test_convert_bad_input(run_cli, world, tmp_path):
    path = write_lines(world / "mixed.jsonl", [{"image": "images/000000.png", "caption": "ok"}, {"caption": "x"}])
    res = run_cli("data", "convert", path, tmp_path / "o.csv", "--json")
    assert res.code == 2 and "line 2 of" in res.err and "missing field 'image'" in res.err
    assert not (tmp_path / "o.csv").exists()
    res = run_cli("data", "convert", path, tmp_path / "o.csv", "--skip-bad", "--json")
    assert res.code == 0 and res.json()["n_skipped"] == 1 and res.json()["skipped"][0]["location"].startswith("line 2")
    res = run_cli("data", "convert", path, tmp_path / "o.parquet")
    assert res.code == 2 and "unknown output format" in res.err


def test_reads_a_real_shapes_world(tmp_path):
    """The contract with ``mmstack world generate``: its three files read cleanly (skipped until it exists)."""
    world = pytest.importorskip("mmstack.world")
    if not hasattr(world, "generate_world"):
        pytest.skip("mmstack.world.generate_world is not written yet")
    from mmstack.data import read_conversations, read_preferences

    out = tmp_path / "w"
    world.generate_world(out, n=6, seed=0)
    pairs = read_pairs(out)
    assert len(pairs) == 6 and all(p.image.is_file() and p.caption for p in pairs)
    assert len(read_conversations(out / "conversations.json")) == 6
    prefs = read_preferences(out / "preferences.jsonl")
    assert prefs and all("rejection" in p.meta for p in prefs)
