"""Dataset folders written by ``generate_world`` / ``mmstack world generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmstack.errors import ConfigError
from mmstack.world import HELD_OUT_PAIRS, contact_sheet, generate_world, is_held_out, sample_scenes
from mmstack.world import generate as generate_module

FILES = ("pairs.jsonl", "conversations.json", "preferences.jsonl", "scenes.jsonl", "clips.jsonl", "world.json")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_gives_byte_identical_folders_and_another_seed_does_not(tmp_path):
    args = {"n": 12, "clips": 2, "noise": 0.05, "texture": True, "rotation": True, "clip_frames": 4}
    generate_world(tmp_path / "a", seed=3, **args)
    generate_world(tmp_path / "b", seed=3, **args)
    generate_world(tmp_path / "c", seed=4, **args)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert set(a) == set(c) and all(a[k] != c[k] for k in ("pairs.jsonl", "images/000000.png", "scenes.jsonl"))


def test_output_does_not_depend_on_the_process(tmp_path):
    """Another interpreter with another hash seed writes the same bytes (no set/dict-order leaks)."""
    generate_world(tmp_path / "here", n=6, seed=1, clips=1, clip_frames=3)
    code = f"from mmstack.world import generate_world; generate_world({str(tmp_path / 'there')!r}, n=6, seed=1, clips=1, clip_frames=3)"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "MMSTACK_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert _tree(tmp_path / "here") == _tree(tmp_path / "there")


def test_layout_and_formats(tmp_path):
    out = tmp_path / "world"
    summary = generate_world(out, n=10, seed=0, split="train", image_size=48, clips=2, height=40)
    assert summary["n_scenes"] == 10 and summary["n_clips"] == 2
    assert all((out / f).is_file() for f in FILES)
    pairs = _jsonl(out / "pairs.jsonl")
    assert [p["id"] for p in pairs] == [f"{i:06d}" for i in range(10)]
    for p in pairs:
        assert set(p) == {"image", "caption", "id"} and p["image"] == f"images/{p['id']}.png"
        assert Image.open(out / p["image"]).size == (48, 40)
    convs = json.loads((out / "conversations.json").read_text())
    for rec in convs:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 10
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        assert len(rec["kinds"]) == len(turns) // 2
    prefs = _jsonl(out / "preferences.jsonl")
    assert len(prefs) == 20
    assert all({"image", "prompt", "chosen", "rejected", "rejection"} <= set(p) for p in prefs)
    scenes = _jsonl(out / "scenes.jsonl")
    assert scenes[0]["width"] == 48 and scenes[0]["height"] == 40 and scenes[0]["caption"] in scenes[0]["captions"]
    # scenes.jsonl holds the very scenes that sample_scenes gives.
    truth = sample_scenes(10, seed=0)
    assert [[o["shape"] for o in s["objects"]] for s in scenes] == [[o.shape for o in t.objects] for t in truth]
    clips = _jsonl(out / "clips.jsonl")
    assert all(len(c["frames"]) == 8 and all((out / f).is_file() for f in c["frames"]) for c in clips)
    assert all(len(c["motions"]) == len(c["objects"]) and c["questions"] for c in clips)
    world = json.loads((out / "world.json").read_text())
    assert world["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    assert {"seed", "split", "image_size", "vocabulary", "generator_version", "n_scenes"} <= set(world)


def test_compositional_folder_holds_held_out_pairs(tmp_path):
    generate_world(tmp_path / "comp", n=20, seed=0, split="compositional")
    for s in _jsonl(tmp_path / "comp" / "scenes.jsonl"):
        assert any(is_held_out(o["shape"], o["colour"]) for o in s["objects"])


def test_interrupted_run_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    out = tmp_path / "world"
    generate_world(out, n=3, seed=0)
    before = _tree(out)
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = generate_module.render_scene
    monkeypatch.setattr(generate_module, "render_scene", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_world(out, n=10, seed=1)
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary leftovers


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a shapes-world folder"):
        generate_world(tmp_path, n=2)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"n": 0}, "--n"), ({"n": 2, "image_size": 15}, "--image-size"), ({"n": 2, "split": "test"}, "--split")],
)
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        generate_world(tmp_path / "w", **kwargs)


def test_contact_sheet(tmp_path):
    generate_world(tmp_path / "w", n=5, seed=0)
    images = sorted((tmp_path / "w" / "images").glob("*.png"))
    path = contact_sheet(images, ["a long caption " * 6 + "\nQ: what? A: red"] * 5, tmp_path / "sheet.png", cols=3)
    sheet = Image.open(path)
    assert sheet.width == 3 * (160 + 12) and sheet.height > 2 * 160


# ---------------------------------------------------------------- CLI


def test_cli_generate_and_parse_json(run_cli, tmp_path):
    res = run_cli("world", "generate", "--out", tmp_path / "w", "--n", "4", "--seed", "2", "--clips", "1", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    assert summary["n_scenes"] == 4 and summary["n_clips"] == 1 and Path(summary["out"]).is_dir()
    res = run_cli("world", "parse", tmp_path / "w" / "images" / "000000.png", "--json")
    assert res.code == 0, res.err
    parsed = res.json()
    truth = _jsonl(tmp_path / "w" / "scenes.jsonl")[0]["objects"]
    assert sorted((o["shape"], o["colour"], o["cell"]) for o in parsed["objects"]) == sorted(
        (o["shape"], o["colour"], o["cell"]) for o in truth
    )
    res = run_cli("world", "sheet", tmp_path / "w", "--out", tmp_path / "s.png", "--json")
    assert res.code == 0 and res.json()["n_images"] == 4 and (tmp_path / "s.png").is_file()
    assert run_cli("world", "generate", "--help").code == 0 and run_cli("world", "parse", "--help").code == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n", "0"], "--n"),
        (["--n", "-3"], "--n"),
        (["--n", "2", "--image-size", "8"], "--image-size"),
        (["--n", "2", "--split", "test"], "--split"),
        (["--n", "2", "--noise", "2"], "--noise"),
    ],
)
def test_cli_bad_generate_arguments_are_one_line_errors(run_cli, tmp_path, args, needle):
    res = run_cli("world", "generate", "--out", tmp_path / "w", *args)
    assert res.code == 2 and needle in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_cli_parse_bad_files_are_one_line_errors(run_cli, tmp_path):
    (tmp_path / "junk.png").write_text("hello")
    for path, needle in ((tmp_path / "missing.png", "does not exist"), (tmp_path / "junk.png", "not a readable")):
        res = run_cli("world", "parse", path)
        assert res.code == 2 and needle in res.err and len(res.err.strip().splitlines()) == 1
