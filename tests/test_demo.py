"""The demo pipeline end to end at smoke size: every stage runs, the report is written, a re-run is cached."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_smoke_runs_and_caches(tmp_path, run_cli):
    out = tmp_path / "demo"
    res = run_cli("demo", "--smoke", "--out", out)
    assert res.code == 0, res.err
    report = (out / "report.html").read_text()
    assert "The shapes world" in report and "world.png" in report
    assert (out / "world.png").stat().st_size > 1000
    cache = json.loads((out / ".cache" / "world.json").read_text())
    metrics = cache["result"]["metrics"]
    assert metrics["train_scenes"] == 200 and (metrics["train_clips"], metrics["val_clips"]) == (4, 2)

    res = run_cli("demo", "--smoke", "--out", out)
    assert res.code == 0
    assert "cached" in res.err


def test_demo_rejects_unknown_stage(tmp_path, run_cli):
    res = run_cli("demo", "--smoke", "--out", tmp_path, "--only", "nope")
    assert res.code == 2
    assert "unknown stage 'nope'" in res.err


def test_editing_a_recipe_file_invalidates_its_stage(tmp_path):
    from mmstack.demo.pipeline import DemoContext, Stage, StageResult, _stage_key

    recipe = tmp_path / "clip-demo.yaml"
    recipe.write_text("train: {max_steps: 900}\n")
    stage = Stage("clip", "t", lambda ctx, cfg: StageResult(), recipes=(("config", "clip"),))
    ctx = DemoContext(out=tmp_path, config={})
    cfg = {"config": str(recipe)}
    before = _stage_key(stage, cfg, ctx, {})
    assert _stage_key(stage, cfg, ctx, {}) == before  # unchanged file: cached
    recipe.write_text("train: {max_steps: 800}\n")
    assert _stage_key(stage, cfg, ctx, {}) != before  # edited recipe: the stage runs again
