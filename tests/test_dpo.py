"""DPO: the reference stays frozen, its log-probs are computed once and cached, the first loss is log 2,
training separates chosen from rejected, LoRA runs save plain checkpoints, and the CLI reports
hallucination and VQA before and after."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _align_helpers import micro_world_and_vlm
from mmstack.config import configs_dir, load_config
from mmstack.models.bridge import BridgeModel
from mmstack.train.align.common import frozen_reference
from mmstack.train.align.data import PreferenceBatches, load_preferences
from mmstack.train.align.dpo import (
    DpoRecipeConfig,
    DpoSection,
    DpoTask,
    cache_reference_logps,
    reference_logps,
    train_dpo,
)
from mmstack.train.trainer import TrainConfig, Trainer

MICRO = configs_dir() / "dpo-micro.yaml"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_world_and_vlm(tmp_path_factory)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reference_stays_frozen_and_its_cached_logps_stay_exact(micro, tmp_path):
    world, vlm = micro
    policy = BridgeModel.from_pretrained(vlm)
    reference = frozen_reference(policy)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    data = PreferenceBatches(load_preferences(world), policy.processor)
    assert cache_reference_logps(reference, data, tmp_path / "ref.pt", key="k", batch_size=16)
    cached = (data.ref_chosen.clone(), data.ref_rejected.clone())
    before_ref, before_policy = _snapshot(reference), _snapshot(policy)

    policy.train()
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, max_steps=6, batch_size=8, weight_decay=0.0, log_every=3)
    Trainer(DpoTask(policy, DpoSection(beta=0.1)), data, cfg, tmp_path / "run").fit()

    after_ref = _snapshot(reference)
    assert all(torch.equal(before_ref[k], after_ref[k]) for k in before_ref)
    assert not all(torch.equal(before_policy[k], v) for k, v in _snapshot(policy).items())
    recomputed = reference_logps(reference, data, batch_size=16)
    assert torch.equal(recomputed[0], cached[0]) and torch.equal(recomputed[1], cached[1])
    fresh = reference_logps(BridgeModel.from_pretrained(vlm), data, batch_size=16)  # the start checkpoint itself
    assert torch.allclose(fresh[0], cached[0], atol=1e-5)


def test_reference_cache_is_read_back_unless_its_key_changes(micro, tmp_path):
    world, vlm = micro
    reference = frozen_reference(BridgeModel.from_pretrained(vlm))
    data = PreferenceBatches(load_preferences(world, limit=8), reference.processor)
    path = tmp_path / "ref.pt"
    assert cache_reference_logps(reference, data, path, key="a") is True
    first = data.ref_chosen.clone()
    data.ref_chosen = None
    assert cache_reference_logps(reference, data, path, key="a") is False  # read, not recomputed
    assert torch.equal(data.ref_chosen, first)
    assert cache_reference_logps(reference, data, path, key="b") is True  # another model or data: recomputed


def test_first_dpo_loss_is_log2_when_policy_is_the_reference(micro):
    world, vlm = micro
    policy = BridgeModel.from_pretrained(vlm)
    data = PreferenceBatches(load_preferences(world, limit=8), policy.processor)
    cache_reference_logps(frozen_reference(policy), data, None, key="", batch_size=3)  # other padding than below
    loss, metrics = DpoTask(policy, DpoSection(beta=0.1)).loss(data.batch(torch.arange(8)))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert abs(metrics["reward_margin"]) < 1e-5


def test_dpo_run_separates_chosen_from_rejected(micro, tmp_path):
    world, vlm = micro
    overrides = [f"model={vlm}", f"data.train={world}", "train.max_steps=16", "train.log_every=1"]
    train_dpo(load_config(DpoRecipeConfig, MICRO, overrides=overrides), tmp_path / "dpo")
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    trained = BridgeModel.from_pretrained(tmp_path / "dpo" / "model")
    start = BridgeModel.from_pretrained(vlm)
    data = PreferenceBatches(load_preferences(world), start.processor)
    ref_c, ref_r = reference_logps(start, data)
    pol_c, pol_r = reference_logps(trained, data)
    implicit_margin = (pol_c - ref_c) - (pol_r - ref_r)  # DPO's implicit reward gap / beta, over all pairs
    assert implicit_margin.mean() > 1.0 and (implicit_margin > 0).float().mean() > 0.75
    a, b = trained.state_dict(), start.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vision_tower."))  # only the LM trains
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("language_model."))


def test_lora_dpo_merges_adapters_and_keeps_base_weights_elsewhere(micro, tmp_path):
    world, vlm = micro
    overrides = [f"model={vlm}", f"data.train={world}", "trainable.language=lora", "train.max_steps=3", "train.lr=1e-2"]
    train_dpo(load_config(DpoRecipeConfig, MICRO, overrides=overrides), tmp_path / "dpo")
    trained = BridgeModel.from_pretrained(tmp_path / "dpo" / "model").state_dict()
    start = BridgeModel.from_pretrained(vlm).state_dict()
    assert set(trained) == set(start)  # a plain bridge checkpoint: adapters were merged
    changed = [k for k in start if not torch.equal(start[k], trained[k])]
    assert changed and all(k.startswith("language_model.") and "_proj" in k for k in changed)


def test_cli_reports_hallucination_and_vqa_before_and_after(micro, tmp_path, run_cli):
    world, vlm = micro
    args = ["train", "dpo", "--config", "dpo-micro", "--model", vlm, "--data", world, "--eval", world]
    res = run_cli(*args, "--out", tmp_path / "dpo", "--eval.limit", "4", "--train.max_steps", "2", "--json")
    assert res.code == 0, res.err
    ev = res.json()["eval"]
    for when in ("before", "after"):
        assert 0.0 <= ev[when]["hallucination"]["rate"] <= 1.0 and ev[when]["vqa"]["n"] > 0
    assert ev["change"]["hallucination_before"] == ev["before"]["hallucination"]["rate"]
    assert (tmp_path / "dpo" / "reference_logps.pt").is_file()


def test_bad_beta_is_a_config_error():
    from mmstack.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dpo\.beta must be > 0"):
        load_config(DpoRecipeConfig, MICRO, overrides=["dpo.beta=0"])


def test_resumed_dpo_run_ends_identical_to_an_uninterrupted_one(micro, tmp_path):
    world, vlm = micro

    def trainer(out):
        policy = BridgeModel.from_pretrained(vlm).train()
        data = PreferenceBatches(load_preferences(world, limit=16), policy.processor)
        cache_reference_logps(frozen_reference(policy), data, tmp_path / "ref.pt", key="k")
        cfg = TrainConfig(
            lr=1e-3, warmup_steps=1, max_steps=4, batch_size=4, weight_decay=0.0, log_every=1, save_every=2
        )
        return Trainer(DpoTask(policy, DpoSection(beta=0.1)), data, cfg, out), policy

    straight, p1 = trainer(tmp_path / "a")
    straight.fit()
    first, _ = trainer(tmp_path / "b")
    first.fit(stop_at_step=2)
    resumed, p2 = trainer(tmp_path / "b")
    assert resumed.fit().start_step == 2
    a, b = p1.state_dict(), p2.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
