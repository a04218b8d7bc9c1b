"""The llava recipe: stages through the CLI, freezing, LoRA, mixtures, progressive resolution, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _bridge_helpers import colour_world
from mmstack.config import configs_dir, load_config
from mmstack.errors import ConfigError, DataError
from mmstack.models.bridge import BridgeModel
from mmstack.train.llava import LlavaRecipeConfig, build_batches, build_model, train_llava
from mmstack.train.llava_data import SourceSpec

MICRO = configs_dir() / "llava-micro.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("world") / "train"
    generate_world(root, n=48, seed=0, split="train", image_size=32, clips=6)
    return root


def _cfg(world: Path, *overrides: str) -> LlavaRecipeConfig:
    return load_config(LlavaRecipeConfig, MICRO, overrides=[f"data.train={world}", *overrides])


@pytest.fixture(scope="module")
def staged(world, tmp_path_factory) -> Path:
    """All four micro stages, trained once for the tests that inspect them."""
    out = tmp_path_factory.mktemp("run")
    train_llava(_cfg(world), out, "all")
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return BridgeModel.from_pretrained(path).state_dict()


def _same(a: dict, b: dict, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_stage1_trains_only_the_connector(staged):
    s0, s1 = _state(staged / "stage0" / "model"), _state(staged / "stage1" / "model")
    assert _same(s0, s1, "vision_tower.") and _same(s0, s1, "language_model.")
    assert not _same(s0, s1, "connector.")


def test_stage0_trains_only_the_language_model(staged, world):
    from mmstack.train.llava import _tokenizer_texts
    from mmstack.utils.seeding import seed_everything

    cfg = _cfg(world)
    seed_everything(cfg.stage0.train.seed)  # the recipe's seed: the same fresh model stage 0 started from
    start = build_model(cfg, _tokenizer_texts(cfg)).state_dict()
    s0 = _state(staged / "stage0" / "model")
    assert _same(start, s0, "vision_tower.") and _same(start, s0, "connector.")
    assert not _same(start, s0, "language_model.")
    assert len((staged / "stage0" / "metrics.jsonl").read_text().splitlines()) == 2  # log_every 2 of 4 steps


def test_stage2_trains_language_and_vision(staged):
    s1, s2 = _state(staged / "stage1" / "model"), _state(staged / "stage2" / "model")
    assert not _same(s1, s2, "language_model.") and not _same(s1, s2, "vision_tower.")


def test_stage3_continues_stage2_and_is_published_as_the_final_model(staged):
    s2, s3, final = (_state(staged / p) for p in ("stage2/model", "stage3/model", "model"))
    assert _same(s2, s3, "vision_tower.") and not _same(s2, s3, "language_model.")
    assert _same(s3, final, "") and set(s3) == set(final)
    assert (staged / "model" / "model.safetensors").stat().st_ino == (
        staged / "stage3/model/model.safetensors"
    ).stat().st_ino


def test_final_model_follows_the_last_enabled_stage_and_is_never_stale(world, staged, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(staged, out)
    res = train_llava(_cfg(world, "stage3.enabled=false"), out, "all")
    assert res["model"] == str(out / "model") and all(res[f"stage{s}"]["cached"] for s in (0, 1, 2))
    assert _same(_state(out / "model"), _state(out / "stage2" / "model"), "")
    res = train_llava(_cfg(world, "stage1.train.lr=1e-3"), out, 1)  # stages 2 and 3 are now out of date
    assert not (out / "model").exists() and res["model"] == str(out / "stage1" / "model")


def test_cli_runs_stages_and_reuses_unchanged_ones(world, tmp_path, run_cli):
    args = ["train", "llava", "--config", MICRO, "--data", world, "--out", tmp_path / "run", "--json"]
    first = run_cli(*args, "--stage", "all")
    assert first.code == 0, first.err
    res = first.json()
    assert [res[f"stage{s}"]["steps"] for s in (0, 1, 2, 3)] == [4, 4, 4, 2]
    assert res["model"] == str(tmp_path / "run" / "model")
    again = run_cli(*args, "--stage", "2")
    assert again.code == 0 and again.json()["stage2"]["cached"] is True
    changed = run_cli(*args, "--stage", "2", "--stage2.train.lr", "1e-3")
    assert changed.code == 0 and "cached" not in changed.json()["stage2"]


def test_lora_stage_merges_into_a_plain_checkpoint(world, staged, tmp_path):
    import shutil

    out = tmp_path / "run"
    for s in (0, 1):
        shutil.copytree(staged / f"stage{s}", out / f"stage{s}")
    cfg = _cfg(world, "stage2.language=lora", "stage2.train_vision=false", "lora.r=4")
    res = train_llava(cfg, out, 2)
    assert res["stage2"]["trainable_parameters"] < res["stage2"]["parameters"] / 2
    s1, s2 = _state(out / "stage1" / "model"), _state(out / "stage2" / "model")
    assert not any("lora" in k for k in s2)
    assert _same(s1, s2, "vision_tower.")
    assert not torch.equal(s1["language_model.model.layers.0.self_attn.q_proj.weight"],
                           s2["language_model.model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert torch.equal(s1["language_model.model.layers.0.mlp.up_proj.weight"],
                       s2["language_model.model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_connector_standardization_is_measured_once_in_stage1(world, tmp_path):
    out = tmp_path / "run"
    train_llava(_cfg(world, "model.connector.standardize=true", "stage2.train_vision=false"), out, "all")
    s0, s1, s2 = (_state(out / f"stage{s}" / "model") for s in (0, 1, 2))
    assert not bool(s0["connector.stats_measured"]) and bool(s1["connector.stats_measured"])
    assert s1["connector.feature_std"].min() > 0 and not torch.equal(
        s1["connector.feature_std"], s0["connector.feature_std"]
    )
    assert torch.equal(s1["connector.feature_mean"], s2["connector.feature_mean"])  # stage 2 keeps stage 1's
    cfg = _cfg(world, "model.connector.standardize=true", "stage1.data=[{kind: text}]")
    with pytest.raises(ConfigError, match="has no images"):
        train_llava(cfg, tmp_path / "text-only", "all")


def test_connector_and_vision_learning_rate_scales(world):
    from mmstack.train.llava import LlavaTask

    model = build_model(_cfg(world), ["a red circle", "What colour?"])
    model.set_trainable(vision=True, connector=True, language=True)
    groups = LlavaTask(model, vision_lr_scale=0.1, lr=1e-3, connector_lr_scale=5.0).param_groups(0.05)
    lr = {id(p): g.get("lr", 1e-3) for g in groups for p in g["params"]}
    assert len(lr) == sum(1 for p in model.parameters())  # every parameter exactly once
    assert lr[id(model.connector.linear_1.weight)] == lr[id(model.temporal_embedding)] == pytest.approx(5e-3)
    assert all(lr[id(p)] == pytest.approx(1e-4) for p in model.vision_tower.parameters())
    assert all(lr[id(p)] == 1e-3 for p in model.language_model.parameters())
    with pytest.raises(ConfigError, match="connector_lr_scale must be > 0"):
        _cfg(world, "stage2.connector_lr_scale=0")


def test_mixture_repeat_factors_and_weights(world, tmp_path):
    cfg = _cfg(world)
    model = build_model(cfg, ["a red circle", "What colour?"])
    stage = cfg.stage2
    data = build_batches(cfg, stage, model.processor, tmp_path)
    assert len(data) == 48 + 2 * 6  # conversations x1, clips x2
    stage.data = [SourceSpec(kind="conversations", factor=1), SourceSpec(kind="text_qa", factor=3)]
    stage.mix_length = 40
    data = build_batches(cfg, stage, model.processor, tmp_path)
    visual = sum(s.image >= 0 for s, _ in data.samples)
    assert len(data) == 40 and visual == 10  # 1 : 3


def test_single_turn_conversation_samples(world, tmp_path):
    import json

    cfg = _cfg(world)
    model = build_model(cfg, ["a red circle", "What colour?"])
    stage = cfg.stage2
    stage.data = [SourceSpec(kind="conversations", single_turns=True)]
    data = build_batches(cfg, stage, model.processor, tmp_path)
    convs = json.loads((world / "conversations.json").read_text())
    assert len(data) == sum(len(c["conversations"]) // 2 for c in convs)  # one sample per question
    batch = data.batch(torch.arange(8))
    per_image = model.tokens_per_view(*batch["pixel_values"].shape[-2:])
    assert batch["pixel_values"].shape[0] == 8
    assert ((batch["input_ids"] == model.config.image_token_id).sum(1) == per_image).all()  # each row its image
    eos = model.processor.tokenizer.eos_token_id
    assert ((batch["labels"] == eos).sum(1) == 1).all()  # each row one answer
    assert torch.isfinite(model(**batch).loss)
    stage.data.append(SourceSpec(kind="clips"))  # group_by_length reads each row's expanded length
    data = build_batches(cfg, stage, model.processor, tmp_path)
    lengths = data.lengths()
    for i in range(len(data)):
        assert lengths[i] == data.batch(torch.tensor([i]))["input_ids"].shape[1]
    assert any(s.clip >= 0 for s, _ in data.samples) and len(set(lengths)) > 1
    clips = [json.loads(line) for line in (world / "clips.jsonl").read_text().splitlines() if line.strip()]
    stage.data = [SourceSpec(kind="clips", single_turns=True)]
    data = build_batches(cfg, stage, model.processor, tmp_path)
    assert len(data) == sum(len(c["questions"]) for c in clips)  # one sample per clip question
    batch = data.batch(torch.arange(len(clips[0]["questions"])))
    assert ((batch["labels"] == eos).sum(1) == 1).all()  # each row one answer, each with the whole clip
    assert len(batch["video_values"]) == len(clips[0]["questions"]) and batch["pixel_values"] is None
    with pytest.raises(ConfigError, match="single_turns splits conversations and clips"):
        SourceSpec(kind="captions", single_turns=True)


def test_progressive_resolution_changes_pixels_and_tokens(world, tmp_path):
    cfg = _cfg(world)
    model = build_model(cfg, ["a red circle", "What colour?"])
    data = build_batches(cfg, cfg.stage2, model.processor, tmp_path)
    idx = torch.arange(8)
    data.set_step(0)
    small = data.batch(idx)
    data.set_step(cfg.stage2.train.max_steps - 1)
    big = data.batch(idx)
    assert small["pixel_values"].shape[-1] == 16 and big["pixel_values"].shape[-1] == 32
    n_img = small["pixel_values"].shape[0]
    per_small, per_big = model.tokens_per_view(16, 16), model.tokens_per_view(32, 32)
    assert (small["input_ids"] == model.config.image_token_id).sum() == n_img * per_small
    assert (big["input_ids"] == model.config.image_token_id).sum() == n_img * per_big
    assert torch.isfinite(model(**small).loss) and torch.isfinite(model(**big).loss)


def test_training_truncation_that_cuts_an_image_fails(world, tmp_path):
    with pytest.raises(DataError, match="cut an image"):
        train_llava(_cfg(world, "processor.max_length=12"), tmp_path / "run", 1)
    with pytest.raises(DataError, match="no assistant token is left"):
        train_llava(_cfg(world, "processor.max_length=21"), tmp_path / "run", 1)
    assert not (tmp_path / "run" / "stage1" / "metrics.jsonl").exists()  # failed before the first step


def test_bad_configs_fail_clearly(world):
    with pytest.raises(ConfigError, match="typo"):
        _cfg(world, "stage2.langauge=full")
    with pytest.raises(ConfigError, match="at least one data source"):
        _cfg(world, "stage1.data=[]")
    with pytest.raises(ConfigError, match="must train something"):
        _cfg(world, "stage1.train_connector=false")
    with pytest.raises(ConfigError, match="enable at least one"):
        _cfg(world, *(f"stage{s}.enabled=false" for s in range(4)))
    with pytest.raises(ConfigError, match="--stage must be 0, 1, 2, 3 or all"):
        train_llava(_cfg(world), "unused", 4)


@pytest.mark.slow
def test_micro_training_answers_colour_questions_far_above_chance(tmp_path):
    from mmstack.eval.vqa import evaluate_vqa

    train, val = colour_world(tmp_path / "train", 256, seed=0), colour_world(tmp_path / "val", 64, seed=1)
    cfg = load_config(
        LlavaRecipeConfig,
        MICRO,
        overrides=[
            f"data.train={train}",
            "stage0.enabled=false",
            "stage1.enabled=false",
            "stage3.enabled=false",
            "stage2.data=[{kind: conversations}]",
            "stage2.resolution=[]",
            "stage2.train={lr: 3.0e-3, warmup_steps: 5, max_steps: 60, batch_size: 32, log_every: 20}",
        ],
    )
    res = train_llava(cfg, tmp_path / "run", "all")
    acc = evaluate_vqa(BridgeModel.from_pretrained(res["model"]), val)["accuracy"]
    assert acc >= 0.8, acc  # chance is 0.25 (four colours)


def test_demo_stage_trains_reports_and_writes_dialogues(tmp_path):
    from mmstack.demo import vlm_stage
    from mmstack.demo.pipeline import DemoContext
    from mmstack.world import generate_world

    ctx = DemoContext(out=tmp_path, config={}, smoke=True)
    for split, seed in (("train", 0), ("val", 1000), ("compositional", 2000)):
        generate_world(
            ctx.path("world", split),
            n=24,
            seed=seed,
            split=split,
            image_size=32,
            clips=3 if split != "compositional" else 0,
        )
    res = vlm_stage.run(ctx, {"val_limit": 4, "dialogues": 2})
    assert 0.0 <= res.metrics["val_accuracy"] <= 1.0 and "val_motion" in res.metrics
    assert all((tmp_path / p).is_file() for p in res.outputs)
    assert res.html.count("<li>") >= 2 and "vlm/" in res.html
    again = vlm_stage.run(ctx, {"val_limit": 4, "dialogues": 2})  # every stage reused
    assert again.metrics["val_accuracy"] == res.metrics["val_accuracy"]


def test_vision_tower_from_a_two_tower_checkpoint(world, tmp_path):
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer

    cfg = TwoTowerConfig.from_preset("shapes-micro", {"text": {"max_position_embeddings": 64}})
    tt = TwoTowerModel.from_config(
        cfg, default_processor(cfg, train_caption_tokenizer(["a red circle"], max_length=64))
    )
    tt.save_pretrained(tmp_path / "clip")
    model = build_model(_cfg(world, f"model.vision.pretrained={tmp_path / 'clip'}"), ["a red circle", "What colour?"])
    mine, theirs = model.vision_tower.state_dict(), tt.vision_model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert model.processor.config.image == tt.processor.image_config  # the tower's own preprocessing
    # a recipe's processor.image settings change only the keys they name: the tower's statistics stay
    smaller = build_model(
        _cfg(
            world,
            f"model.vision.pretrained={tmp_path / 'clip'}",
            "processor.image.size=[16, 16]",
            "model.vision.feature_layer=[0, -2]",
        ),
        ["a red circle", "What colour?"],
    )
    image = smaller.processor.config.image
    assert tuple(image.size) == (16, 16) and image.mean == tt.processor.image_config.mean
    assert image.std == tt.processor.image_config.std
    assert smaller.config.feature_layers == [0, -2]
    width = tt.vision_model.config.hidden_size
    assert smaller.vision_features(torch.zeros(1, 3, 16, 16)).shape[-1] == 2 * width


def test_retrained_vision_checkpoint_invalidates_every_stage(world, tmp_path):
    from mmstack.train.llava import stage_run_config

    ckpt = tmp_path / "clip"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    cfg = _cfg(world, f"model.vision.pretrained={ckpt}")
    before = [stage_run_config(cfg, s, tmp_path / "run") for s in (0, 1, 2)]
    assert [stage_run_config(cfg, s, tmp_path / "run") for s in (0, 1, 2)] == before
    (ckpt / "model.safetensors").write_bytes(b"weights v2")  # same path, retrained weights
    after = [stage_run_config(cfg, s, tmp_path / "run") for s in (0, 1, 2)]
    assert all(a != b for a, b in zip(after, before, strict=True))


def test_fresh_language_model_starts_at_unit_scale(world):
    from mmstack.train.llava import stage_run_config

    cfg = _cfg(world)
    width = cfg.model.text.config["hidden_size"]
    model = build_model(cfg, ["is there a red circle ? yes"])
    assert model.language_model.config.initializer_range == pytest.approx(width**-0.5, rel=1e-4)
    q_proj = next(w for n, w in model.language_model.named_parameters() if n.endswith("q_proj.weight"))
    assert q_proj.std().item() == pytest.approx(width**-0.5, rel=0.15)  # not HF's 0.02
    explicit = _cfg(world, "model.text.config.initializer_range=0.02")
    assert build_model(explicit, ["a"]).language_model.config.initializer_range == 0.02
    # the effective config is part of the stage key: a changed default retrains, it never reuses stale stages
    assert stage_run_config(cfg, 0, Path("run")) != stage_run_config(explicit, 0, Path("run"))
