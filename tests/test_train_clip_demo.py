"""The demo's ``clip`` stage at smoke size: trains, evaluates, draws retrieval.png, reuses an unchanged model."""

from __future__ import annotations

import pytest

from mmstack.demo.pipeline import DemoContext


@pytest.mark.slow
def test_clip_stage_smoke(tmp_path):
    from mmstack.demo import clip_stage

    ctx = DemoContext(out=tmp_path, config={}, smoke=True)
    cfg = {"config": "clip-micro.yaml", "max_steps": 8, "n_train": 160, "n_val": 40, "n_compositional": 20,
           "overrides": {"train": {"threads": 1}}}  # fmt: skip
    result = clip_stage.run(ctx, cfg)
    m = result.metrics
    assert m["steps"] == 8 and m["parameters"] > 0
    for key in ("val_t2i_r1", "val_i2t_r1", "compositional_t2i_r1", "zeroshot_shape_acc", "zeroshot_colour_acc"):
        assert 0.0 <= m[key] <= 1.0, key
    assert (tmp_path / "retrieval.png").stat().st_size > 1000
    assert all((tmp_path / p).exists() for p in result.outputs)
    assert "retrieval.png" in result.html

    again = clip_stage.run(ctx, cfg)  # same config and data: the checkpoint is reused, not retrained
    assert again.metrics["train_s"] == m["train_s"] and again.metrics["val_t2i_r1"] == m["val_t2i_r1"]
