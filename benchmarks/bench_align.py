"""Alignment benchmarks: reward-model accuracy, DPO's effect on hallucination and VQA, PPO beside DPO.

- reward: ``configs/reward-demo.yaml`` from the stage-2 demo VLM on the train world's pairs; pairwise
  accuracy on held-out pairs of the val world (target >= 0.95), by rejection kind.
- DPO: ``configs/dpo-demo.yaml``; hallucination rate and VQA accuracy on the val world before and after
  (targets: rate at most half, VQA down by at most 2 points).
- PPO: ``configs/ppo-demo.yaml`` against that reward model; the same evaluation.
- DPO and PPO side by side: mean reward-model score of sampled answers on held-out prompts, KL to the
  start model per answer, VQA accuracy, hallucination rate, wall time.

The VLM is ``$MMSTACK_ALIGN_VLM``, else the demo's (``demo-output/models/vlm``), else the llava demo
recipe is trained first (long). Worlds (``train/`` and ``val/``) are ``$MMSTACK_ALIGN_WORLD``, else the
demo's (``demo-output/world``), else generated (20k train, 1k val at 64 px). ``quick``
trains a micro VLM on a small world and runs the micro recipes (about a minute) to check that it all runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-output" / "align"
DEMO = ROOT / "demo-output"


def worlds(quick: bool) -> dict[str, Path]:
    """Train and val worlds: the demo's (full run) or small generated ones (val from another seed)."""
    from mmstack.world import generate_world

    for root in (os.environ.get("MMSTACK_ALIGN_WORLD"), None if quick else DEMO / "world"):
        if root and all((Path(root) / s / "scenes.jsonl").is_file() for s in ("train", "val")):
            return {s: Path(root) / s for s in ("train", "val")}
    sizes = {"train": 200, "val": 60} if quick else {"train": 20000, "val": 1000}
    dirs = {}
    for offset, (split, n) in enumerate(sizes.items()):
        d = OUT / ("world-quick" if quick else "world") / split
        if not (d / "scenes.jsonl").is_file():
            generate_world(d, n=n, seed=1000 * offset, split=split, image_size=32 if quick else 64, clips=0)
        dirs[split] = d
    return dirs


def stage2_vlm(dirs: dict[str, Path], quick: bool) -> Path:
    """The VLM to align (see the module docstring)."""
    from mmstack.config import configs_dir, load_config
    from mmstack.demo.align_stage import vlm_checkpoint
    from mmstack.train.llava import LlavaRecipeConfig, train_llava

    if os.environ.get("MMSTACK_ALIGN_VLM"):
        return vlm_checkpoint(Path(os.environ["MMSTACK_ALIGN_VLM"]))
    if not quick and (DEMO / "models" / "vlm").is_dir():
        return vlm_checkpoint(DEMO / "models" / "vlm")
    name = "llava-micro.yaml" if quick else "llava-demo.yaml"
    overrides = [f"data.train={dirs['train']}", f"data.cache={OUT / 'cache'}"]
    if quick:
        overrides += ["stage2.data=[{kind: conversations}, {kind: captions}]", "stage2.resolution=[]"]
    cfg = load_config(LlavaRecipeConfig, configs_dir() / name, overrides=overrides)
    return Path(train_llava(cfg, OUT / ("vlm-quick" if quick else "vlm"))["model"])


def _recipe(cls: type, name: str, overrides: dict[str, Any]):
    from mmstack.config import configs_dir, load_config

    return load_config(cls, configs_dir() / name, overrides=overrides)


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - t0, 1)


def side_by_side(vlm: Path, reward: Path, policies: dict[str, Path], val: Path, n_prompts: int) -> dict[str, Any]:
    """Reward of sampled answers and KL to the start model on held-out prompts, for each policy."""
    from mmstack.models.bridge import BridgeModel
    from mmstack.models.reward import RewardModel
    from mmstack.train.align.common import frozen_reference
    from mmstack.train.align.data import PromptBatches, load_preferences
    from mmstack.train.align.rollout import reward_and_kl

    reference = frozen_reference(BridgeModel.from_pretrained(vlm))
    rm = RewardModel.from_pretrained(reward)
    prompts = PromptBatches(load_preferences(val, limit=n_prompts), reference.processor)
    out = {}
    for name, path in {"start": vlm, **policies}.items():
        out[name] = reward_and_kl(BridgeModel.from_pretrained(path), reference, rm, prompts, max_new_tokens=40)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from mmstack.train.align import (
        DpoRecipeConfig,
        PpoRecipeConfig,
        RewardRecipeConfig,
        train_dpo,
        train_ppo,
        train_reward,
    )

    torch.manual_seed(0)
    dirs = worlds(quick)
    vlm = stage2_vlm(dirs, quick)
    tag = "-quick" if quick else ""
    suffix = "micro" if quick else "demo"
    data = {"train": str(dirs["train"]), "cache": str(OUT / "cache")}
    evaluation = {"data": str(dirs["val"]), "limit": 20 if quick else 0}  # 0: the whole val world

    reward_cfg = _recipe(
        RewardRecipeConfig, f"reward-{suffix}.yaml", {"model": str(vlm), "data": {**data, "val": str(dirs["val"])}}
    )
    reward, reward_s = _timed(train_reward, reward_cfg, OUT / f"reward{tag}", False)
    dpo_cfg = _recipe(DpoRecipeConfig, f"dpo-{suffix}.yaml", {"model": str(vlm), "data": data, "eval": evaluation})
    dpo, dpo_s = _timed(train_dpo, dpo_cfg, OUT / f"dpo{tag}", False)
    ppo_fields = {"model": str(vlm), "reward": reward["model"], "data": data, "eval": evaluation}
    ppo, ppo_s = _timed(train_ppo, _recipe(PpoRecipeConfig, f"ppo-{suffix}.yaml", ppo_fields), OUT / f"ppo{tag}", False)
    policies = {"dpo": Path(dpo["model"]), "ppo": Path(ppo["model"])}
    sampled = side_by_side(vlm, Path(reward["model"]), policies, dirs["val"], 64 if quick else 500)

    change = dpo["eval"]["change"]
    rows = {}
    for name, res, wall in (("dpo", dpo, dpo_s), ("ppo", ppo, ppo_s)):
        c = res["eval"]["change"]
        rows[name] = {
            "reward": round(sampled[name]["reward"], 4),
            "kl": round(sampled[name]["kl"], 4),
            "vqa_accuracy": round(c["vqa_after"], 4),
            "hallucination_rate": round(c["hallucination_after"], 4),
            "train_s": res["train_s"],
            "wall_s": wall,
        }
    return {
        "machine_note": "2 CPU cores shared with other jobs while measured",
        "vlm": str(vlm),
        "reward_model": {
            "val_accuracy": round(reward["val"]["accuracy"], 4),
            "by_kind": {k: round(v["accuracy"], 4) for k, v in reward["val"]["by_kind"].items()},
            "n": reward["val"]["n"],
            "train_s": reward["train_s"],
            "wall_s": reward_s,
            "target_accuracy": 0.95,
            "meets_target": reward["val"]["accuracy"] >= 0.95,
        },
        "dpo_vs_start": {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in change.items()},
            "hallucination_by_kind_before": dpo["eval"]["before"]["hallucination"]["by_kind"],
            "hallucination_by_kind_after": dpo["eval"]["after"]["hallucination"]["by_kind"],
            "meets_halving": change["hallucination_after"] <= 0.5 * change["hallucination_before"],
            "meets_vqa": change["vqa_change_points"] >= -2.0,
        },
        "start": {
            "reward": round(sampled["start"]["reward"], 4),
            "kl": 0.0,
            "vqa_accuracy": round(change["vqa_before"], 4),
            "hallucination_rate": round(change["hallucination_before"], 4),
        },
        "dpo": rows["dpo"],
        "ppo": rows["ppo"],
    }
