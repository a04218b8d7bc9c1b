"""The multimodal reward model: last-token scores plus the answer's likelihood, padding, save/load, gradients,
and a micro run in which the chosen answers' reward rises above the rejected ones'."""

from __future__ import annotations

import pytest
import torch

from _align_helpers import micro_world_and_vlm
from mmstack.config import configs_dir, load_config
from mmstack.eval.alignment import pairwise_accuracy
from mmstack.models.alignment_losses import bradley_terry_loss
from mmstack.models.reward import RewardModel, last_token_index
from mmstack.train.align.data import PreferenceBatches, load_preferences, model_inputs, reward_inputs
from mmstack.train.align.reward import RewardRecipeConfig, build_reward_model, train_reward


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_world_and_vlm(tmp_path_factory)


@pytest.fixture(scope="module")
def reward_model(micro) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel.from_bridge(micro[1]).eval()


def test_last_token_index_for_left_right_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 3, 0]


def test_head_only_reward_is_the_score_of_the_last_real_token_and_ignores_padding(micro):
    torch.manual_seed(0)
    reward_model = RewardModel.from_bridge(micro[1], likelihood=False).eval()
    data = PreferenceBatches(load_preferences(micro[0], limit=4), reward_model.processor)
    batch = data.batch(torch.arange(4))  # 8 rows of different lengths, right-padded
    with torch.no_grad():
        out = reward_model(**model_inputs(batch))
        lengths = batch["attention_mask"].sum(-1)
        assert torch.equal(out.rewards, out.values[torch.arange(8), lengths - 1])
        for row in (0, 5):  # the same row alone (no padding) gets the same reward
            n = int(lengths[row])
            alone = reward_model(
                input_ids=batch["input_ids"][row : row + 1, :n],
                attention_mask=batch["attention_mask"][row : row + 1, :n],
                pixel_values=batch["pixel_values"][row : row + 1],
            )
            assert alone.rewards.item() == pytest.approx(out.rewards[row].item(), abs=1e-5)


def test_likelihood_term_adds_the_answers_log_probs_under_the_vlm(reward_model, micro):
    from mmstack.errors import ModelError

    data = PreferenceBatches(load_preferences(micro[0], limit=4), reward_model.processor)
    batch = data.batch(torch.arange(4))
    with torch.no_grad():
        out = reward_model(**reward_inputs(batch))
        logits = reward_model.vlm(**model_inputs(batch)).logits[:, :-1]  # the VLM's own next-token logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        expected = (logp * (labels != -100)).sum(-1)
        lengths = batch["attention_mask"].sum(-1)
        head = out.values[torch.arange(8), lengths - 1]
        assert reward_model.likelihood_scale.item() == 1.0
        assert torch.allclose(out.rewards - head, expected, atol=1e-4) and (expected < 0).all()
        # the answer's log-probs do not depend on the padding of the other rows
        n = int(lengths[5])
        alone = reward_model(
            **reward_inputs(
                {k: batch[k][5:6, :n] for k in ("input_ids", "attention_mask", "labels")}
                | {"pixel_values": batch["pixel_values"][5:6]}
            )
        )
        assert alone.rewards.item() == pytest.approx(out.rewards[5].item(), abs=1e-4)
    with pytest.raises(ModelError, match="pass answer_mask"):
        _ = reward_model(**model_inputs(batch)).rewards


@pytest.mark.parametrize("language", ["full", "lora"])
def test_every_trainable_parameter_gets_a_gradient(micro, language):
    cfg = load_config(
        RewardRecipeConfig, {"model": str(micro[1]), "trainable": {"language": language, "connector": True}}
    )
    rm = build_reward_model(cfg)
    data = PreferenceBatches(load_preferences(micro[0], limit=4), rm.processor)
    chosen, rejected = rm(**reward_inputs(data.batch(torch.arange(4)))).rewards.chunk(2)
    bradley_terry_loss(chosen, rejected).backward()
    # the temporal embedding belongs to the connector but only clips reach it; preference pairs are images
    trainable = {n: p for n, p in rm.named_parameters() if p.requires_grad and n != "vlm.temporal_embedding"}
    assert "score.weight" in trainable and "likelihood_scale" in trainable
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


def test_save_load_round_trip_through_mmstack_load(reward_model, micro, tmp_path):
    import mmstack

    reward_model.save_pretrained(tmp_path / "rm")
    loaded = mmstack.load(str(tmp_path / "rm"))
    assert isinstance(loaded, RewardModel)
    prefs = load_preferences(micro[0], limit=3)
    from mmstack.data.images import load_image

    images = [load_image(p.image) for p in prefs]
    args = ([p.prompt for p in prefs], [p.chosen for p in prefs], images)
    assert loaded.likelihood and torch.allclose(loaded.score_texts(*args), reward_model.score_texts(*args), atol=1e-6)
    assert "reward model" in (tmp_path / "rm" / "README.md").read_text()


def test_loading_a_bridge_checkpoint_as_reward_model_is_a_clear_error(micro):
    from mmstack.errors import ModelError

    with pytest.raises(ModelError, match="not a reward model"):
        RewardModel.from_pretrained(micro[1])


def test_micro_run_raises_chosen_reward_above_rejected(micro, tmp_path, run_cli):
    world, vlm = micro
    torch.manual_seed(0)
    before = pairwise_accuracy(RewardModel.from_bridge(vlm, likelihood=False), world)  # as reward-micro.yaml
    args = ["train", "reward", "--config", "reward-micro", "--model", vlm, "--data", world, "--out", tmp_path / "rm"]
    res = run_cli(*args, "--train.max_steps", "16", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    assert summary["steps"] == 16 and summary["pairs"] == 48
    ev = run_cli("eval", "reward", "--model", tmp_path / "rm" / "model", "--data", world, "--json")
    assert ev.code == 0, ev.err
    after = ev.json()
    assert after["n"] == 48 and set(after["by_kind"]) <= {"hallucinated_object", "wrong_colour", "wrong_count", "terse"}
    assert after["margin"] > 0 and after["margin"] > before["margin"] + 0.5
    assert after["accuracy"] >= 0.75 and after["accuracy"] > before["accuracy"]
    again = run_cli(*args, "--train.max_steps", "16", "--json")  # unchanged config and inputs: reused
    assert again.code == 0 and again.json()["cached"] is True


def test_cli_without_model_is_a_one_line_error(micro, tmp_path, run_cli):
    res = run_cli("train", "reward", "--config", "reward-micro", "--data", micro[0], "--out", tmp_path / "rm")
    assert res.code != 0
    assert "--model" in res.err and "Traceback" not in res.err


def test_recipe_config_rejects_typos():
    from mmstack.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'trainable'"):
        load_config(RewardRecipeConfig, configs_dir() / "reward-micro.yaml", overrides=["trainabel.language=full"])


def test_train_reward_with_lora_saves_a_plain_checkpoint(micro, tmp_path):
    world, vlm = micro
    cfg = load_config(
        RewardRecipeConfig,
        configs_dir() / "reward-micro.yaml",
        overrides=[f"model={vlm}", f"data.train={world}", "trainable.language=lora", "train.max_steps=2"],
    )
    train_reward(cfg, tmp_path / "rm")
    rm = RewardModel.from_pretrained(tmp_path / "rm" / "model")
    assert not hasattr(rm.vlm.language_model, "peft_config")
