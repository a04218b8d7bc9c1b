"""Demo stage ``align``: a reward model and DPO for the demo VLM; one question answered before and after.

The stage's config (the ``align:`` section of the demo YAML; defaults in brackets)::

    align:
      vlm: models/vlm              # the vlm stage's run folder (its final model, model/) or a checkpoint
      reward_config: reward-demo.yaml   # (smoke: reward-micro.yaml)
      dpo_config: dpo-demo.yaml         # (smoke: dpo-micro.yaml)
      ppo: false                   # also run PPO (ppo_config: ppo-demo.yaml) against the reward model
      eval_limit: 0                # val scenes for the hallucination/VQA comparison, 0: all (smoke: 10)
      overrides: {reward: {}, dpo: {}, ppo: {}}   # dotted-key dicts merged into each recipe

It trains ``models/reward`` (pairwise accuracy on the val world's pairs) and ``models/vlm-dpo`` (hallucination
rate and VQA accuracy on the val world, before and after), each reused when unchanged, and shows one val
question that the VLM answered with a hallucination before DPO, with its answer after.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult, recipe_name, vlm_checkpoint
from mmstack.utils.progress import console

SMOKE = {
    "eval_limit": 10,
}
DEFAULTS = {
    "eval_limit": 0,  # the whole val world: 300 scenes said x0.53 where all 1,000 said x0.58 (session 20)
}


def _recipe(cls: type, name: str, fields: dict[str, Any], extra: dict[str, Any] | None):
    from mmstack.config import configs_dir, load_config, merge

    return load_config(cls, configs_dir() / name, overrides=merge(fields, extra or {}))


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Train (or reuse) the reward model and the DPO policy (and PPO), compare, and show one question."""
    from mmstack.demo.clip_stage import world_dirs
    from mmstack.train.align.dpo import DpoRecipeConfig, train_dpo
    from mmstack.train.align.reward import RewardRecipeConfig, train_reward

    cfg = {**DEFAULTS, **(SMOKE if ctx.smoke else {}), **cfg}
    vlm = vlm_checkpoint(ctx.path(cfg.get("vlm", "models/vlm")), "align")
    dirs = world_dirs(ctx, cfg)
    extra = cfg.get("overrides") or {}
    cache = str(ctx.path("cache", "pixels"))
    data = {"train": str(dirs["train"]), "cache": cache}
    reward_cfg = _recipe(
        RewardRecipeConfig,
        recipe_name(ctx, cfg, "reward_config", "reward"),
        {"model": str(vlm), "data": {**data, "val": str(dirs["val"])}},
        extra.get("reward"),
    )
    reward = train_reward(reward_cfg, ctx.path("models", "reward"))
    evaluation = {"data": str(dirs["val"]), "limit": int(cfg["eval_limit"])}
    dpo_cfg = _recipe(
        DpoRecipeConfig,
        recipe_name(ctx, cfg, "dpo_config", "dpo"),
        {"model": str(vlm), "data": data, "eval": evaluation},
        extra.get("dpo"),
    )
    dpo = train_dpo(dpo_cfg, ctx.path("models", "vlm-dpo"))
    ppo = None
    if cfg.get("ppo"):
        from mmstack.train.align.ppo import PpoRecipeConfig, train_ppo

        fields = {"model": str(vlm), "reward": reward["model"], "data": data, "eval": evaluation}
        ppo = train_ppo(
            _recipe(PpoRecipeConfig, recipe_name(ctx, cfg, "ppo_config", "ppo"), fields, extra.get("ppo")),
            ctx.path("models", "vlm-ppo"),
        )
    example = before_after_example(vlm, Path(dpo["model"]), dirs["val"], ctx.path("align"))
    metrics = _metrics(reward, dpo, ppo)
    console.print(
        "align: reward accuracy {reward_accuracy:.3f} | hallucination {hallucination_before:.3f} -> "
        "{hallucination_after:.3f} | VQA {vqa_before:.3f} -> {vqa_after:.3f}".format(**metrics)
    )
    outputs = ["models/reward/model/config.json", "models/vlm-dpo/model/config.json", example["image"]]
    return StageResult(metrics=metrics, html=_section(reward, dpo, ppo, example), outputs=outputs)


def _metrics(reward: dict[str, Any], dpo: dict[str, Any], ppo: dict[str, Any] | None) -> dict[str, Any]:
    change = dpo["eval"]["change"]
    out: dict[str, Any] = {
        "reward_accuracy": round(reward["val"]["accuracy"], 4),
        "reward_train_s": reward["train_s"],
        "dpo_train_s": dpo["train_s"],
        **{k: round(v, 4) for k, v in change.items() if isinstance(v, float)},
    }
    for kind, v in reward["val"]["by_kind"].items():
        out[f"reward_accuracy_{kind}"] = round(v["accuracy"], 4)
    if ppo is not None:
        out["ppo_train_s"] = ppo["train_s"]
        out.update({f"ppo_{k}": round(v, 4) for k, v in ppo["eval"]["change"].items() if isinstance(v, float)})
    return out


def before_after_example(before: Path, after: Path, val: Path, folder: Path, scenes: int = 40) -> dict[str, Any]:
    """The first val prompt the VLM answered with a hallucination that DPO fixed (else the first prompt),
    with both answers; the image is copied into ``folder``."""
    import torch

    from mmstack.eval.alignment import answer_prompts, hallucination_items
    from mmstack.models.bridge import BridgeModel

    items = hallucination_items(val, limit=scenes)
    with torch.inference_mode():
        old = answer_prompts(BridgeModel.from_pretrained(before), items, 64)
        new = answer_prompts(BridgeModel.from_pretrained(after), items, 64)
    pick = next((i for i, it in enumerate(items) if it.absent(old[i]) and not it.absent(new[i])), 0)
    it = items[pick]
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(it.image, folder / it.image.name)
    return {
        "image": f"{folder.name}/{it.image.name}",
        "question": it.question,
        "before": old[pick],
        "after": new[pick],
        "absent_before": it.absent(old[pick]),
        "absent_after": it.absent(new[pick]),
        "truth": it.answers[0],
    }


def _section(reward: dict[str, Any], dpo: dict[str, Any], ppo: dict[str, Any] | None, ex: dict[str, Any]) -> str:
    change = dpo["eval"]["change"]
    kinds = ", ".join(f"{html.escape(k)} {v['accuracy']:.3f}" for k, v in reward["val"]["by_kind"].items())
    rounds = f" over {len(dpo['rounds'])} rounds" if "rounds" in dpo else ""

    def answer(text: str, absent: list[str]) -> str:
        note = (
            f" <span class='meta'>(names {html.escape(', '.join(absent))}: not in the image)</span>" if absent else ""
        )
        return f"<b>{html.escape(text or '(nothing)')}</b>{note}"

    parts = [
        "<p>Preference pairs of the world (a correct answer against a hallucinated object or colour, a wrong "
        "count or a terse non-answer) train a reward model (the VLM with a scalar head, Bradley-Terry loss) "
        "and align the VLM with DPO against a frozen copy of itself.</p>",
        f"<p>Reward model: pairwise accuracy <b>{reward['val']['accuracy']:.3f}</b> on {reward['val']['n']} "
        f"held-out pairs ({kinds}).</p>",
        f"<p>DPO: hallucination rate {change['hallucination_before']:.3f} &rarr; <b>{change['hallucination_after']:.3f}</b>"
        + (
            f"; VQA accuracy {change['vqa_before']:.3f} &rarr; <b>{change['vqa_after']:.3f}</b>"
            if "vqa_before" in change
            else ""
        )
        + f" on the val world ({dpo['steps']} steps{rounds} in {dpo['train_s']:.0f} s).</p>",
    ]
    if ppo is not None:
        pc = ppo["eval"]["change"]
        parts.append(
            f"<p>PPO: hallucination {pc['hallucination_before']:.3f} &rarr; {pc['hallucination_after']:.3f}; "
            f"final rollout reward {ppo.get('score', float('nan')):.3f}, KL {ppo.get('kl', float('nan')):.3f} "
            f"({ppo['steps']} steps in {ppo['train_s']:.0f} s).</p>"
        )
    parts.append(
        f"<div style='display:flex;gap:1.5em;align-items:center'><img src='{ex['image']}' width='128' "
        f"alt='val image'><ul><li>{html.escape(ex['question'])}</li>"
        f"<li>before DPO: {answer(ex['before'], ex['absent_before'])}</li>"
        f"<li>after DPO: {answer(ex['after'], ex['absent_after'])}</li>"
        f"<li class='meta'>reference answer: {html.escape(ex['truth'])}</li></ul></div>"
    )
    return "".join(parts)
