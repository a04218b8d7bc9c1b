"""PPO: the KL to the reference is zero when policy equals reference, responses end at the end token (or a
placeholder), rollouts are reused for the inner epochs with fixed old log-probs, and a micro run logs
reward, KL and entropy and saves the policy."""

from __future__ import annotations

import json

import pytest
import torch

from _align_helpers import micro_world_and_vlm
from mmstack.config import configs_dir, load_config
from mmstack.models.bridge import BridgeModel
from mmstack.models.reward import RewardModel
from mmstack.train.align.common import frozen_reference
from mmstack.train.align.data import PromptBatches, load_preferences
from mmstack.train.align.ppo import PpoSection, PpoTask
from mmstack.train.align.rollout import response_mask
from mmstack.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    world, vlm = micro_world_and_vlm(tmp_path_factory)
    torch.manual_seed(0)
    reward = tmp_path_factory.getbasetemp() / "align-micro" / "reward"
    if not (reward / "config.json").is_file():
        RewardModel.from_bridge(vlm).save_pretrained(reward)
    return world, vlm, reward


def _task(vlm, reward, **ppo) -> tuple[PpoTask, PromptBatches]:
    policy = BridgeModel.from_pretrained(vlm)
    task = PpoTask(
        policy.train(),
        RewardModel.from_pretrained(reward).train(),
        frozen_reference(policy),
        frozen_reference(RewardModel.from_pretrained(reward)),
        PpoSection(**{"max_new_tokens": 6, **ppo}),
    )
    return task, PromptBatches(load_preferences(vlm.parent / "world"), policy.processor)


def test_response_mask_stops_at_end_token_or_placeholder():
    response = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [9, 5, 2, 6]])
    mask, ended, placeholder = response_mask(response, eos_ids=[2], placeholder_ids=[9])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert ended.tolist() == [True, False, False]  # the third row hit a placeholder first
    assert placeholder.tolist() == [[False] * 4, [False] * 4, [True, False, False, False]]


def test_kl_is_zero_when_policy_equals_reference(micro):
    _, vlm, reward = micro
    task, prompts = _task(vlm, reward, kl_coef=0.3)
    r = task.rollout(prompts.batch(torch.arange(6)))
    assert r.samples.mask.any()
    assert torch.equal(r.kl, torch.zeros_like(r.kl))
    assert torch.equal(r.logps * r.samples.mask, r.ref_logps * r.samples.mask)
    # with no KL the shaped reward is the score alone, at each response's last token
    last = r.samples.mask.long().cumsum(-1).argmax(-1)
    assert torch.allclose(r.rewards.sum(-1), r.scores) and torch.allclose(r.rewards[torch.arange(6), last], r.scores)
    assert r.stats(0.3)["kl"] == 0.0


def test_a_samples_reward_adds_its_log_likelihood_under_the_reward_model(micro):
    from mmstack.models.reward import last_token_index

    _, vlm, reward = micro
    task, prompts = _task(vlm, reward, missing_eos_penalty=0.0)
    r = task.rollout(prompts.batch(torch.arange(6)))
    with torch.no_grad():
        inputs = r.samples.model_inputs()
        head = task.reward_model(**inputs).values[torch.arange(6), last_token_index(inputs["attention_mask"])]
    # the reward model starts from the same VLM as the reference: its likelihood term is the reference's log-probs
    answer = inputs["attention_mask"][:, r.samples.prompt_len :].bool()  # placeholders are not read back
    assert torch.allclose(r.scores - head, (r.ref_logps * answer).sum(-1), atol=1e-4)


def test_kl_grows_once_the_policy_moves(micro):
    _, vlm, reward = micro
    task, prompts = _task(vlm, reward)
    with torch.no_grad():
        for p in task.policy.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    r = task.rollout(prompts.batch(torch.arange(6)))
    assert r.kl.abs().sum() > 0


def test_rollout_is_reused_for_the_inner_epochs(micro, tmp_path):
    _, vlm, reward = micro
    task, prompts = _task(vlm, reward, epochs=2)
    rows = []
    cfg = TrainConfig(lr=1e-3, warmup_steps=0, max_steps=4, batch_size=4, weight_decay=0.0, log_every=1)
    Trainer(task, prompts, cfg, tmp_path / "run", on_step_end=lambda step, m: rows.append(m)).fit()
    # a fresh rollout's old log-probs are the policy's own (ratio 1); the reused one sees the updated policy
    assert rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-10) and rows[2]["approx_kl"] == pytest.approx(
        0.0, abs=1e-10
    )
    assert rows[1]["approx_kl"] > 0 and rows[3]["approx_kl"] > 0
    assert rows[0]["score"] == rows[1]["score"] and rows[2]["score"] != rows[0]["score"]


def test_micro_ppo_run_logs_reward_kl_entropy_and_saves_the_policy(micro, tmp_path, run_cli):
    world, vlm, reward = micro
    args = ["train", "ppo", "--config", "ppo-micro", "--model", vlm, "--reward", reward, "--data", world]
    res = run_cli(*args, "--out", tmp_path / "ppo", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    assert summary["steps"] == 4 and summary["rollouts"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("score", "kl", "entropy", "clipfrac", "vf_loss", "pg_loss", "response_tokens"):
        assert all(key in row for row in rows), key
    assert rows[-1]["entropy"] > 0
    policy = BridgeModel.from_pretrained(tmp_path / "ppo" / "model")
    start = BridgeModel.from_pretrained(vlm)
    assert not all(
        torch.equal(a, b) for a, b in zip(policy.state_dict().values(), start.state_dict().values(), strict=True)
    )


def test_ppo_refuses_a_reward_model_with_another_tokenizer(micro, tmp_path):
    from mmstack.errors import ModelError
    from mmstack.train.align.ppo import PpoRecipeConfig, train_ppo
    from mmstack.train.llava import LlavaRecipeConfig, build_model

    world, vlm, _ = micro
    cfg = load_config(LlavaRecipeConfig, configs_dir() / "llava-micro.yaml")
    other = build_model(cfg, ["a completely different vocabulary of words"])
    RewardModel(other).save_pretrained(tmp_path / "rm")
    ppo = load_config(
        PpoRecipeConfig,
        configs_dir() / "ppo-micro.yaml",
        overrides=[f"model={vlm}", f"reward={tmp_path / 'rm'}", f"data.train={world}"],
    )
    with pytest.raises(ModelError, match="tokenizer differs"):
        train_ppo(ppo, tmp_path / "ppo")


def test_sampled_placeholders_end_the_response_and_are_never_fed_back(micro):
    from mmstack.models.bridge import lm_parts
    from mmstack.train.align.rollout import response_logps, sample

    world, vlm, _ = micro
    policy = BridgeModel.from_pretrained(vlm)
    _, _, head = lm_parts(policy.language_model)
    with torch.no_grad():
        head.weight.zero_()  # a uniform next-token distribution: placeholders get sampled too
    prompts = PromptBatches(load_preferences(world), policy.processor)
    s = sample(policy, prompts.batch(torch.arange(32)), max_new_tokens=16, seed=0)
    proc = policy.processor
    placeholders = torch.tensor([proc.image_token_id, proc.video_token_id])
    assert torch.isin(s.response, placeholders).any()
    n_image = (s.input_ids == proc.image_token_id).sum(-1)
    assert (n_image == n_image[0]).all() and not (s.input_ids == proc.video_token_id).any()
    logps, _ = response_logps(policy, s)
    vocab = head.weight.shape[0]
    assert torch.allclose(logps[s.mask], torch.full_like(logps[s.mask], -torch.log(torch.tensor(float(vocab)))))
