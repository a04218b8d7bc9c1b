"""The demo's align stage at smoke size: reward model, DPO, the before/after example, cached re-runs."""

from __future__ import annotations

import pytest

from _align_helpers import micro_world_and_vlm
from mmstack.demo.pipeline import DemoContext


@pytest.mark.slow
def test_align_stage_runs_at_smoke_size_and_reuses_its_models(tmp_path_factory, tmp_path):
    from mmstack.demo import align_stage

    world, vlm = micro_world_and_vlm(tmp_path_factory)
    for split in ("train", "val", "compositional"):
        (tmp_path / "world").mkdir(exist_ok=True)
        (tmp_path / "world" / split).symlink_to(world, target_is_directory=True)
    ctx = DemoContext(out=tmp_path, config={}, smoke=True)
    cfg = {"vlm": str(vlm), "eval_limit": 4}
    result = align_stage.run(ctx, cfg)
    m = result.metrics
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and "reward_accuracy_terse" in m
    assert {"hallucination_before", "hallucination_after", "vqa_before", "vqa_after"} <= set(m)
    assert all((tmp_path / p).exists() for p in result.outputs)
    assert "before DPO" in result.html and "after DPO" in result.html
    again = align_stage.run(ctx, cfg)  # unchanged: both models are reused, the same numbers come back
    assert again.metrics == m


def test_align_stage_needs_the_vlm(tmp_path):
    from mmstack.demo import align_stage
    from mmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="run the vlm stage first"):
        align_stage.run(DemoContext(out=tmp_path, config={}, smoke=True), {})
