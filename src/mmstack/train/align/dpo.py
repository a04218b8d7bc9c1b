"""The DPO recipe: direct preference optimisation of a bridge VLM against a frozen reference copy.

    cfg = load_config(DpoRecipeConfig, "configs/dpo-demo.yaml", overrides=["model=runs/vlm/model"])
    train_dpo(cfg, out="runs/dpo")            # -> runs/dpo/model (a bridge checkpoint)

The reference is the start checkpoint, frozen. Its log-probabilities of every chosen and rejected answer
are computed once before training and cached in ``OUT/reference_logps.pt`` (keyed by the start
checkpoint, the data and the template), so a resumed run does not recompute them and the reference model
is not kept in memory while the policy trains. The policy trains fully or through LoRA adapters (merged
into the saved checkpoint). With ``eval.data`` (a world folder) the hallucination rate and VQA accuracy
are measured before and after training. With ``on_policy.scenes: N`` the pairs are the start model's own
wrong or hallucinating answers to N scenes of the world (``mmstack.train.align.on_policy``), optionally beside
the scripted ones. With ``rounds: R`` (and on-policy pairs) DPO is iterated: each round samples its pairs from
the previous round's policy, which is also that round's frozen reference (iterative DPO: Xu et al. 2023,
"Some things are more CRINGE than others"; Pang et al. 2024, "Iterative Reasoning Preference Optimization"), so a
later round trains on the failures the earlier one left. Rounds before the last train in ``OUT/round-N``; the
last in ``OUT``, so ``OUT/model`` is always the final policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmstack.config import to_dict
from mmstack.errors import ConfigError
from mmstack.models.alignment_losses import dpo_loss, sequence_logps
from mmstack.train.align.common import (
    AlignDataSection,
    LoraSection,
    TrainableSection,
    apply_trainable,
    fingerprint,
    frozen_reference,
    merge_lora,
    require_bridge,
    reuse_or_restart,
    run_key,
)
from mmstack.train.align.data import PreferenceBatches, load_preferences, model_inputs
from mmstack.train.align.on_policy import OnPolicySection, load_or_sample_pairs
from mmstack.train.checkpoint import save_finished_run
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils.atomic import atomic_write_bytes
from mmstack.utils.progress import console
from mmstack.utils.seeding import seed_everything

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DpoSection:
    """DPO's knobs.

    Args:
        beta: inverse strength of the implicit KL penalty (0.1 as in the paper; larger stays closer).
        label_smoothing: cDPO's label-noise rate (0: plain DPO).
        sft_weight: adds ``sft_weight`` x the chosen answers' per-token NLL (RPO, Pang et al. 2024), which
            keeps the likelihood of good answers from falling while the margin grows.
        reference_batch_size: pairs per forward pass when caching the reference log-probs.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    reference_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0 or self.reference_batch_size <= 0:
            raise ConfigError("dpo.sft_weight must be >= 0 and dpo.reference_batch_size > 0")


@dataclass
class EvalSection:
    """Before/after evaluation: ``data`` is a world folder (scenes.jsonl + conversations.json); ``limit``
    caps the scenes (0: all); ``vqa`` also measures VQA accuracy (else only the hallucination rate)."""

    data: str | None = None
    limit: int = 0
    vqa: bool = True
    batch_size: int = 64


def _default_train() -> TrainConfig:
    return TrainConfig(lr=5e-6, warmup_steps=10, max_steps=200, batch_size=16, weight_decay=0.0, log_every=10)


@dataclass
class DpoRecipeConfig:
    """A DPO run; ``rounds`` > 1 iterates it on fresh on-policy pairs (see the module docstring)."""

    model: str = ""
    rounds: int = 1
    trainable: TrainableSection = field(default_factory=TrainableSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    data: AlignDataSection = field(default_factory=AlignDataSection)
    on_policy: OnPolicySection = field(default_factory=OnPolicySection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainConfig = field(default_factory=_default_train)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.rounds > 1 and not self.on_policy.enabled:
            raise ConfigError(
                f"rounds: {self.rounds} samples each round's pairs from the previous policy, so it needs "
                "on_policy.scenes > 0; set rounds: 1 to train on a preferences file"
            )


# ------------------------------------------------------------------------------------------ the task


class DpoTask(Task):
    """DPO loss of the policy's answer log-probs against the batch's cached reference log-probs."""

    progress_keys = ("reward_accuracy", "reward_margin")

    def __init__(self, model: nn.Module, cfg: DpoSection) -> None:
        super().__init__(model)
        self.cfg = cfg

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if "ref_chosen" not in batch:
            raise RuntimeError("the batch has no reference log-probs: call cache_reference_logps first")
        logits = self.model(**model_inputs(batch)).logits  # (2B, T, V)
        logps, n_tokens = sequence_logps(logits, batch["labels"])
        chosen, rejected = logps.chunk(2)
        loss, r_chosen, r_rejected = dpo_loss(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], self.cfg.beta, self.cfg.label_smoothing
        )
        n_chosen = n_tokens.chunk(2)[0].clamp(min=1)
        if self.cfg.sft_weight:
            loss = loss + self.cfg.sft_weight * (-(chosen / n_chosen).mean())
        metrics = {
            "reward_accuracy": float((r_chosen > r_rejected).float().mean()),
            "reward_margin": float((r_chosen - r_rejected).mean()),
            "reward_chosen": float(r_chosen.mean()),
            "reward_rejected": float(r_rejected.mean()),
            "logps_chosen": float(chosen.detach().mean()),
            "logps_rejected": float(rejected.detach().mean()),
        }
        return loss, metrics


# --------------------------------------------------------------------------------- reference log-probs


@torch.inference_mode()
def reference_logps(
    reference: nn.Module, data: PreferenceBatches, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of every pair under ``reference``: ``(chosen (N,), rejected (N,))``."""
    was_training = reference.training
    reference.eval()
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logps, _ = sequence_logps(reference(**model_inputs(batch)).logits, batch["labels"])
        c, r = logps.chunk(2)
        chosen.append(c.float())
        rejected.append(r.float())
    reference.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def cache_reference_logps(
    reference: nn.Module, data: PreferenceBatches, path: Path | None, key: str, batch_size: int = 32
) -> bool:
    """Attach the reference log-probs to ``data``: read from ``path`` when its key matches, else compute
    them and write ``path``. Returns True when they were computed (False: read from the cache)."""
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key and saved["chosen"].shape == (len(data),):
            data.set_reference(saved["chosen"], saved["rejected"])
            return False
    chosen, rejected = reference_logps(reference, data, batch_size)
    data.set_reference(chosen, rejected)
    if path is not None:
        import io

        buf = io.BytesIO()
        torch.save({"key": key, "chosen": chosen, "rejected": rejected}, buf)
        atomic_write_bytes(path, buf.getvalue())
    return True


# ---------------------------------------------------------------------------------------- the recipe


def evaluate_policy(model: nn.Module, section: EvalSection) -> dict[str, Any] | None:
    """Hallucination rate (and VQA accuracy) of ``model`` on ``section.data``; None when not configured."""
    if not section.data:
        return None
    from mmstack.eval.alignment import evaluate_alignment

    return evaluate_alignment(
        model, section.data, limit=section.limit or None, vqa=section.vqa, batch_size=section.batch_size
    )


def _preferences(
    cfg: DpoRecipeConfig, policy: nn.Module, train_path: Path, out: Path, run_config: dict[str, Any]
) -> tuple[list[Any], dict[str, Any] | None]:
    """The scripted pairs of ``train_path`` and/or the pairs sampled from the start model (``on_policy``)."""
    section = cfg.on_policy
    if not section.enabled:
        return load_preferences(train_path, cfg.data.kinds, cfg.data.limit), None
    key = run_key({"model": run_config["model"], "data": run_config["data"], "on_policy": to_dict(section)})
    sampled, stats = load_or_sample_pairs(policy, train_path, section, out, key)
    prefs = load_preferences(train_path, cfg.data.kinds, cfg.data.limit) if section.scripted else []
    if not prefs and not sampled:
        raise ConfigError(
            f"the start model answered all {stats['asked']} on-policy prompts of {train_path} correctly: no pairs; "
            "raise on_policy.scenes or set on_policy.scripted: true"
        )
    return prefs + sampled, stats


def train_dpo(cfg: DpoRecipeConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train (or reuse) a DPO policy into ``OUT/model``; returns the summary (with before/after eval).

    With ``cfg.rounds`` > 1 the summary is the last round's, with ``rounds`` (each round's summary) added,
    ``steps`` and ``train_s`` summed over the rounds and ``eval`` comparing the start model with the final policy."""
    out = Path(out)
    if cfg.rounds == 1:
        return _train_round(cfg, out, resume)
    rounds: list[dict[str, Any]] = []
    model, before = cfg.model, None
    for r in range(1, cfg.rounds + 1):
        round_out = out if r == cfg.rounds else out / f"round-{r}"
        console.print(f"dpo: round {r} of {cfg.rounds} from {model}")
        summary = _train_round(replace(cfg, model=model, rounds=1), round_out, resume, before)
        rounds.append(summary)
        model = summary["model"]
        before = (summary.get("eval") or {}).get("after")  # the next round starts from this policy
    first, last = rounds[0].get("eval"), rounds[-1].get("eval")
    combined = {
        **rounds[-1],
        "rounds": rounds,
        "steps": sum(r["steps"] for r in rounds),
        "train_s": round(sum(r["train_s"] for r in rounds), 2),
    }
    if first and last:
        from mmstack.eval.alignment import compare

        combined["eval"] = {
            "before": first["before"],
            "after": last["after"],
            "change": compare(first["before"], last["after"]),
        }
    return combined


def _train_round(cfg: DpoRecipeConfig, out: Path, resume: bool, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """One DPO run from ``cfg.model`` into ``OUT``; ``before``: the start model's eval when already known."""
    train_path = cfg.data.require_train()
    run_config = {"recipe": to_dict(cfg), "model": fingerprint(cfg.model), "data": fingerprint(train_path)}
    key, cached = reuse_or_restart(out, run_config, "dpo", resume)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    policy = require_bridge(cfg.model)
    reference = frozen_reference(policy)
    if before is None:
        before = evaluate_policy(reference, cfg.eval)
    prefs, sampled = _preferences(cfg, policy, train_path, out, run_config)
    data = PreferenceBatches(prefs, policy.processor, cfg.data.cache_dir(out))
    ref_key = run_key(
        {
            "model": run_config["model"],
            "data": run_config["data"],
            "kinds": cfg.data.kinds,
            "limit": cfg.data.limit,
            "on_policy": to_dict(cfg.on_policy),
        }
    )
    t_ref = time.perf_counter()
    computed = cache_reference_logps(reference, data, out / REFERENCE_FILE, ref_key, cfg.dpo.reference_batch_size)
    reference_s = time.perf_counter() - t_ref
    del reference  # the cache is all DPO needs from it
    apply_trainable(policy, cfg.trainable, cfg.lora)
    trainer = Trainer(DpoTask(policy.train(), cfg.dpo), data, cfg.train, out, run_config=run_config, resume=resume)
    prepare_s = time.perf_counter() - t0
    fit = trainer.fit()
    merge_lora(policy)
    policy.eval()
    summary: dict[str, Any] = {
        "out": str(out),
        "model": str(out / "model"),
        "steps": fit.steps,
        "pairs": len(data),
        **({"on_policy": sampled} if sampled else {}),
        "train_s": round(fit.seconds, 2),
        "prepare_s": round(prepare_s, 2),
        "reference_s": round(reference_s, 2),
        "reference_cached": not computed,
        "final_loss": fit.final_loss,
        **{k: fit.last_metrics[k] for k in ("reward_accuracy", "reward_margin") if k in fit.last_metrics},
    }
    after = evaluate_policy(policy, cfg.eval)
    if before is not None and after is not None:
        from mmstack.eval.alignment import compare

        summary["eval"] = {"before": before, "after": after, "change": compare(before, after)}
    save_finished_run(policy, out, run_config, key, summary, eval_key="eval")
    return summary
