"""train.compile: regional torch.compile of repeated blocks trains the same model and is undone afterwards."""

from __future__ import annotations

import pytest
import torch

from mmstack.models.losses import ClipLoss
from mmstack.train.clip_task import ClipTask
from mmstack.train.compile import compiled_blocks, repeated_blocks
from mmstack.train.trainer import TrainConfig, Trainer
from test_train_attention import _Batches
from test_train_clip_task import micro_model, random_batch


def test_repeated_blocks_are_the_layers_of_both_towers():
    model = micro_model()
    layers = [*model.vision_model.encoder.layers, *model.text_model.encoder.layers]
    assert [id(b) for b in repeated_blocks(model)] == [id(b) for b in layers]
    with compiled_blocks(model, enabled=False) as n:
        assert n == 0


def test_compiled_training_matches_eager_and_leaves_an_eager_model(tmp_path):
    batches = _Batches(random_batch(16))
    trained = {}
    for compile_ in (False, True):
        model = micro_model(seed=1)
        cfg = TrainConfig(max_steps=3, batch_size=8, warmup_steps=0, log_every=1, compile=compile_, lr=1e-3)
        Trainer(ClipTask(model, ClipLoss()), batches, cfg, tmp_path / f"run-{compile_}").fit()
        trained[compile_] = model
        assert all(block._compiled_call_impl is None for block in repeated_blocks(model))  # eager again
    eager, compiled = (dict(trained[c].named_parameters()) for c in (False, True))
    assert eager.keys() == compiled.keys()  # nn.Module.compile does not wrap: checkpoints are unchanged
    moved = 0
    for name, p in eager.items():
        if name.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores it); Adam scales up the noise
            continue
        torch.testing.assert_close(compiled[name], p, rtol=1e-4, atol=1e-5, msg=name)
        moved += int(not torch.equal(p, dict(micro_model(seed=1).named_parameters())[name]))
    assert moved > 0  # the steps trained something


def test_without_a_cpp_compiler_training_warns_and_stays_eager(monkeypatch):
    import mmstack.train.compile as compile_module

    monkeypatch.setattr(compile_module, "cpp_compiler", lambda: None)
    model = micro_model()
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"), compiled_blocks(model, enabled=True) as n:
        assert n == 0
        assert all(block._compiled_call_impl is None for block in repeated_blocks(model))
