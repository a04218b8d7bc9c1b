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
    assert cache["result"]["metrics"]["train_scenes"] == 200

    res = run_cli("demo", "--smoke", "--out", out)
    assert res.code == 0
    assert "cached" in res.err


def test_demo_rejects_unknown_stage(tmp_path, run_cli):
    res = run_cli("demo", "--smoke", "--out", tmp_path, "--only", "nope")
    assert res.code == 2
    assert "unknown stage 'nope'" in res.err
