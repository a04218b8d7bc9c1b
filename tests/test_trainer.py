"""The shared trainer on a toy regression task: schedule, accumulation, resume, freezing, logging, errors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from mmstack.errors import ConfigError, DataError
from mmstack.train.optim import warmup_cosine
from mmstack.train.sampler import DistInfo, StepSampler
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer


class ToyData:
    """y = x @ w_true + noise, served by index like the recipes' cached tensors."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 2, generator=g) + 0.01 * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices):
        return {"x": self.x[indices], "y": self.y[indices]}


def toy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # dropout makes the run depend on the torch RNG, so resume must restore it
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Dropout(0.1), nn.GELU(), nn.Linear(16, 2))


def mse(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


def make_trainer(tmp, seed=0, on_step_end=None, **cfg) -> Trainer:
    base = {"lr": 1e-2, "warmup_steps": 2, "max_steps": 6, "batch_size": 16, "log_every": 1, "seed": 3}
    return Trainer(Task(toy_model(seed), mse), ToyData(), TrainConfig(**{**base, **cfg}), tmp, on_step_end=on_step_end)


def test_warmup_cosine_values():
    assert warmup_cosine(0, 4, 100) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 100) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 100) == pytest.approx(1.0)
    assert warmup_cosine(52, 4, 100) == pytest.approx(0.5)  # half way through the cosine
    assert warmup_cosine(100, 4, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    lrs = [warmup_cosine(s, 4, 100) for s in range(4, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_scheduler_drives_optimizer_lr(tmp_path):
    trainer = make_trainer(tmp_path, lr=0.1, warmup_steps=2, max_steps=6)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [0.1 * warmup_cosine(s, 2, 6) for s in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)


def test_training_reduces_loss_and_writes_run_files(tmp_path):
    trainer = make_trainer(tmp_path, lr=3e-2, max_steps=60, warmup_steps=5, log_every=10)
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert summary.steps == 60 and summary.samples_per_s > 0 and math.isfinite(summary.final_loss)
    assert json.loads((tmp_path / "train_config.json").read_text())["train"]["max_steps"] == 60
    assert (tmp_path / "train_state" / "state.pt").is_file()


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=7, save_every=2)
    full.fit()

    def crash(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "cut", max_steps=7, save_every=2, on_step_end=crash).fit()
    # a fresh process: other initial weights, other global RNG; everything must come from train_state/
    torch.manual_seed(1234)
    resumed = make_trainer(tmp_path / "cut", seed=99, max_steps=7, save_every=2)
    summary = resumed.fit()
    assert summary.start_step == 4
    for (name, a), b in zip(
        full.task.model.state_dict().items(), resumed.task.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    full_rows = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in ("samples_per_s", "elapsed_s")} for r in full_rows]
    assert strip == [
        {k: v for k, v in json.loads(r).items() if k not in ("samples_per_s", "elapsed_s")} for r in cut_rows
    ]


def test_stop_and_resume_keeps_the_schedule(tmp_path):
    a = make_trainer(tmp_path / "a")
    a.fit()
    make_trainer(tmp_path / "b").fit(stop_at_step=3)
    b = make_trainer(tmp_path / "b", seed=5)
    b.fit()
    assert all(torch.equal(x, y) for x, y in zip(a.task.model.parameters(), b.task.model.parameters(), strict=True))


def test_resume_with_other_config_is_refused(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(ConfigError, match=r"train\.lr="):
        make_trainer(tmp_path, max_steps=4, lr=0.5).fit()
    assert make_trainer(tmp_path, max_steps=4).fit().start_step == 2  # a longer run may continue


def test_frozen_parameters_stay_bit_identical(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.5)
    first = trainer.task.model[0]
    for p in first.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in first.parameters()]
    last_before = trainer.task.model[4].weight.clone()
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, first.parameters(), strict=True))
    assert not torch.equal(last_before, trainer.task.model[4].weight)


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    trainer = make_trainer(tmp_path, weight_decay=0.3)
    groups = {g["weight_decay"]: g["params"] for g in trainer.optimizer.param_groups}
    assert all(p.ndim == 2 for p in groups[0.3]) and all(p.ndim == 1 for p in groups[0.0])
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.98) and trainer.optimizer.defaults["eps"] == 1e-6


def test_plain_accumulation_matches_big_batch():
    data = ToyData()
    grads = []
    for accum in (1, 4):
        model = toy_model()
        model.eval()  # no dropout: the two passes must see the same function
        task = Task(model, mse)
        idx = torch.arange(16)
        task.train_step([data.batch(c) for c in torch.tensor_split(idx, accum)])
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sampler_is_deterministic_and_sharded():
    s = StepSampler(100, 32, seed=7)
    assert s.steps_per_epoch == 3
    epoch0 = torch.cat([s.indices(i) for i in range(3)])
    assert len(set(epoch0.tolist())) == 96  # no repeats inside an epoch
    assert torch.equal(StepSampler(100, 32, seed=7).indices(4), s.indices(4))
    assert not torch.equal(s.indices(0), s.indices(3))  # a new permutation each epoch
    ranks = [StepSampler(100, 32, 7, DistInfo(r, 2)).indices(1) for r in range(2)]
    assert torch.equal(torch.cat(ranks), s.indices(1))


def test_length_grouped_sampler_makes_homogeneous_batches_of_a_full_permutation():
    lengths = [40] * 180 + [200] * 20  # a few long rows (clips) among short ones
    plain = StepSampler(200, 20, seed=3)
    grouped = StepSampler(200, 20, seed=3, lengths=lengths)
    epoch = [grouped.indices(i) for i in range(grouped.steps_per_epoch)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(200))  # still every item once per epoch
    mixed = [len({lengths[i] for i in b.tolist()}) > 1 for b in epoch]
    assert sum(mixed) <= 1  # sorted within the megabatch: at most the boundary batch mixes lengths
    plain_mixed = sum(len({lengths[i] for i in plain.indices(k).tolist()}) > 1 for k in range(10))
    assert plain_mixed > 5  # without grouping the long rows spread over most batches
    assert torch.equal(StepSampler(200, 20, 3, lengths=lengths).indices(7), grouped.indices(7))  # resumable
    assert not torch.equal(grouped.indices(0), grouped.indices(10))  # a new order each epoch
    ranks = [StepSampler(200, 20, 3, DistInfo(r, 2), lengths).indices(1) for r in range(2)]
    assert torch.equal(torch.cat(ranks), grouped.indices(1))
    with pytest.raises(DataError, match="3 lengths for 200 items"):
        StepSampler(200, 20, 3, lengths=[1, 2, 3])


def test_group_by_length_needs_a_source_with_lengths(tmp_path):
    with pytest.raises(ConfigError, match="ToyData has no lengths"):
        make_trainer(tmp_path, group_by_length=True)


def test_bad_train_configs_and_data():
    with pytest.raises(ConfigError, match=r"divisible by train\.accum_steps"):
        TrainConfig(batch_size=10, accum_steps=3)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        StepSampler(10, 32, seed=0)
    with pytest.raises(ConfigError, match=r"train\.optimizer must be adamw or muon"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match=r"use train\.parallel=ddp"):
        TrainConfig(optimizer="muon", parallel="fsdp")


# ------------------------------------------------------------------------------------------- muon


def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_and_heads_to_adamw():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmstack.train.muon import hidden_matrices

    for tied in (True, False):
        cfg = LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, tie_word_embeddings=tied,
        )  # fmt: skip
        lm = LlamaForCausalLM(cfg)
        chosen = {name for name, p in lm.named_parameters() if id(p) in hidden_matrices(lm)}
        projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        assert chosen == {f"model.layers.{i}.{kind}.{p}.weight" for i in range(2) for kind, ps in
                          (("self_attn", projections[:4]), ("mlp", projections[4:])) for p in ps}  # fmt: skip
        assert id(lm.lm_head.weight) not in hidden_matrices(lm)


def test_muon_orthogonalises_matrix_updates_and_adamw_moves_the_rest():
    from mmstack.train.muon import MuonAdamW

    torch.manual_seed(0)
    layer = nn.Linear(16, 32)
    u, _ = torch.linalg.qr(torch.randn(32, 16))
    v, _ = torch.linalg.qr(torch.randn(16, 16))
    layer.weight.grad = u @ torch.diag(torch.logspace(1, -1, 16)) @ v.T  # condition number 100
    layer.bias.grad = torch.ones(32)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = MuonAdamW(
        [{"params": list(layer.parameters()), "weight_decay": 0.0}], {id(layer.weight)}, 0.01, (0.9, 0.98), 1e-8
    )
    opt.step()
    singular = torch.linalg.svdvals(layer.weight.detach() - w0)
    assert singular.max() / singular.min() < 3  # every direction moves about equally, not by the gradient's scale
    assert torch.allclose(layer.bias.detach() - b0, torch.full((32,), -0.01), atol=1e-4)  # Adam's first step: lr * sign


def test_muon_run_follows_the_schedule_and_resumes_exactly(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=6, save_every=2, optimizer="muon")
    full.fit()
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * warmup_cosine(s, 2, 6) for s in range(6)])

    def shares_groups(opt) -> bool:  # the scheduler sets the outer groups' lr: the inner optimisers must see it
        inner = opt.muon.param_groups + opt.adamw.param_groups
        return len(inner) == len(opt.param_groups) and all(a is b for a, b in zip(inner, opt.param_groups, strict=True))

    assert shares_groups(full.optimizer)
    make_trainer(tmp_path / "cut", max_steps=6, save_every=2, optimizer="muon").fit(stop_at_step=4)
    resumed = make_trainer(tmp_path / "cut", seed=7, max_steps=6, save_every=2, optimizer="muon")
    assert resumed.fit().start_step == 4
    assert shares_groups(resumed.optimizer)
    assert all(
        torch.equal(a, b) for a, b in zip(full.task.model.parameters(), resumed.task.model.parameters(), strict=True)
    )
    with pytest.raises(ConfigError, match=r"train\.optimizer="):
        make_trainer(tmp_path / "cut", max_steps=8).fit()  # an AdamW run cannot continue Muon state


def test_batched_muon_steps_as_torch_muon():
    from mmstack.train.muon import BatchedMuon

    torch.manual_seed(0)
    shapes = [(32, 16), (32, 16), (16, 32), (8, 8)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    kw = {"lr": 0.1, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    a, b = BatchedMuon(ours, **kw), torch.optim.Muon(ref, **kw)
    for _ in range(3):
        for p, q in zip(ours, ref, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, ref, start, strict=True):
        assert (q.detach() - p0).abs().max() > 0.1  # the steps moved the weights far beyond the tolerance
        assert torch.allclose(p, q, atol=2e-3), float((p - q).abs().max())
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys()
