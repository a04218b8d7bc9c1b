"""train.attention: the trainer switches HF models to eager attention on a CPU; the switch changes speed only."""

from __future__ import annotations

import pytest
import torch

from mmstack.errors import ConfigError
from mmstack.models.losses import ClipLoss
from mmstack.train.attention import attention_of, resolve_attention, set_attention
from mmstack.train.clip_task import ClipTask
from mmstack.train.trainer import TrainConfig, Trainer
from test_train_clip_task import grads_after_step, micro_model, random_batch


class _Batches:
    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.data = batch

    def __len__(self) -> int:
        return len(self.data["pixel_values"])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[indices] for k, v in self.data.items()}


def test_auto_picks_eager_on_cpu_and_explicit_choices_win():
    model = micro_model()
    assert resolve_attention("auto", model) == "eager"
    assert resolve_attention("sdpa", model) == "sdpa"
    assert attention_of(model) == {"sdpa"}  # transformers' own default
    switched = set_attention(model, "auto")
    assert sorted(switched) == ["CLIPTextModel", "CLIPVisionModel"]
    assert attention_of(model) == {"eager"}
    assert set_attention(model, "eager") == []  # already eager: nothing to do


def test_eager_and_sdpa_give_the_same_gradients():
    batch = random_batch(12)
    grads = {}
    for impl in ("sdpa", "eager"):
        model = micro_model(seed=3)
        set_attention(model, impl)
        grads[impl] = grads_after_step(ClipTask(model, ClipLoss()), batch, 1)
    assert grads["sdpa"].keys() == grads["eager"].keys()
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["eager"][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_applies_the_choice_and_rejects_unknown_ones(tmp_path):
    model = micro_model()
    cfg = TrainConfig(max_steps=1, batch_size=8, warmup_steps=0, log_every=1)
    Trainer(ClipTask(model, ClipLoss()), _Batches(random_batch(8)), cfg, tmp_path / "run").fit()
    assert attention_of(model) == {"eager"}
    with pytest.raises(ConfigError, match=r"train\.attention must be one of auto, eager, sdpa"):
        TrainConfig(attention="flash")  # type: ignore[arg-type]


def test_auto_switches_causal_decoders_too():
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    lm = tf.LlamaForCausalLM(config)
    assert attention_of(lm) == {"sdpa"}
    assert set_attention(lm, "auto") == ["LlamaForCausalLM"] and attention_of(lm) == {"eager"}
    assert set_attention(lm, "sdpa") == ["LlamaForCausalLM"] and attention_of(lm) == {"sdpa"}
