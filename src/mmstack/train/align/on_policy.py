"""On-policy preference pairs: the VLM's own wrong answers against the world's ground truth.

Scripted pairs (the world's ``preferences.jsonl``) reject answers the model may never give, so DPO has little
to push down. Pairs whose rejected answer the policy itself produces teach more (Tajwar et al. 2024,
"Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data"; RLHF-V and LLaVA-RLHF collect
the model's own hallucinations). ``sample_pairs`` asks the start model every question of N scenes of a world
folder (and, optionally, for a description), greedily or N times by sampling, and turns each answer that is
wrong (VQA score 0) or names an object or colour the scene lacks into a pair: rejected = the model's answer,
chosen = an acceptable sample of the same prompt when there is one, else the ground truth (the scene's caption
for a description); ``rejection`` = ``on_policy_hallucination`` or ``on_policy_wrong``.

The pairs are written to ``OUT/on_policy_pairs.jsonl`` (with their key beside, so a resumed run reuses them
and a changed model or setting samples again) and can be read back by any recipe as a preferences file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmstack.data.preferences import Preference, read_preferences, write_preferences
from mmstack.errors import ConfigError
from mmstack.eval.alignment import HallucinationItem, answer_prompts, hallucination_items
from mmstack.eval.vqa import vqa_score
from mmstack.utils.atomic import atomic_write_json
from mmstack.utils.progress import console

PAIRS_FILE = "on_policy_pairs.jsonl"
META_FILE = "on_policy_pairs.json"  # the key the pairs were sampled under, and their counts


@dataclass
class OnPolicySection:
    """Pairs sampled from the start model (``scenes: 0`` turns sampling off).

    Args:
        scenes: scenes of ``data.train`` (a shapes-world folder) whose questions the start model answers.
        describe: also ask for each scene's description (a pair when the description hallucinates).
        samples: 0 answers each prompt greedily (chosen: the ground truth); N samples it N times at
            ``temperature`` and pairs a rejected sample with an acceptable one when there is one.
        scripted: keep the data file's scripted pairs (``data.kinds``, ``data.limit``) beside the sampled ones.
        batch_size: prompts per generation batch.
    """

    scenes: int = 0
    describe: bool = True
    samples: int = 0
    temperature: float = 1.0
    scripted: bool = False
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.scenes < 0 or self.samples < 0 or self.batch_size <= 0:
            raise ConfigError("on_policy.scenes and on_policy.samples must be >= 0, on_policy.batch_size > 0")
        if self.temperature <= 0:
            raise ConfigError(f"on_policy.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.scenes > 0


def judge(item: HallucinationItem, answer: str) -> str | None:
    """The rejection kind ``answer`` earns (``on_policy_hallucination`` when it names something absent from the
    scene, ``on_policy_wrong`` when a question's answer scores 0), or None when it is acceptable."""
    if item.absent(answer):
        return "on_policy_hallucination"
    if item.kind != "describe" and vqa_score(answer, item.answers) == 0.0:
        return "on_policy_wrong"
    return None


def pairs_from_answers(items: Sequence[HallucinationItem], answers: Sequence[Sequence[str]]) -> list[Preference]:
    """A pair for each prompt with a rejected answer among its ``answers`` (one greedy answer or several samples).

    Rejected: the first answer ``judge`` rejects. Chosen: the first acceptable answer among the same samples (both
    sides then come from the policy), else the ground truth. Empty answers are skipped (the scripted 'terse'
    kind covers them)."""
    pairs = []
    for k, (item, texts) in enumerate(zip(items, answers, strict=True)):
        truth = item.answers[0].strip()
        judged = [(text.strip(), judge(item, text.strip())) for text in texts if text.strip()]
        bad = [(text, kind) for text, kind in judged if kind is not None and text != truth]
        if not bad:
            continue
        good = [text for text, kind in judged if kind is None]
        rejected, rejection = bad[0]
        chosen, source = (good[0], "sample") if good else (truth, "truth")
        if chosen == rejected:
            continue
        meta = {"rejection": rejection, "kind": item.kind, "chosen_from": source}
        pairs.append(Preference(item.image, item.question, chosen, rejected, id=f"{item.id}:{k}", meta=meta))
    return pairs


def sample_pairs(model: Any, folder: str | Path, section: OnPolicySection) -> tuple[list[Preference], dict]:
    """Ask ``model`` about the first ``section.scenes`` scenes of ``folder``; returns the pairs and counts."""
    from mmstack.models.bridge_generate import GenerationConfig

    if not (Path(folder) / "scenes.jsonl").is_file():
        raise ConfigError(
            f"on_policy.scenes needs data.train to be a shapes-world folder with scenes.jsonl, got {folder}; "
            "set on_policy.scenes: 0 to train on a preferences file alone"
        )
    items = hallucination_items(folder, limit=section.scenes, describe=section.describe, named_only=False)
    sampled = [
        GenerationConfig(do_sample=True, temperature=section.temperature, seed=seed) for seed in range(section.samples)
    ]
    runs: list[GenerationConfig | None] = [*sampled] or [None]  # None: greedy
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        answers = [answer_prompts(model, items, section.batch_size, generation) for generation in runs]
    model.train(was_training)
    pairs = pairs_from_answers(items, list(zip(*answers, strict=True)))
    kinds = [p.meta["rejection"] for p in pairs]
    stats = {
        "asked": len(items),
        "answers": len(items) * len(runs),
        "pairs": len(pairs),
        **{k: kinds.count(k) for k in ("on_policy_hallucination", "on_policy_wrong")},
        "chosen_sampled": sum(p.meta["chosen_from"] == "sample" for p in pairs),
    }
    return pairs, stats


def load_or_sample_pairs(
    model: Any, folder: str | Path, section: OnPolicySection, out: Path, key: str
) -> tuple[list[Preference], dict]:
    """``OUT/on_policy_pairs.jsonl`` when it was sampled under ``key``, else sample and write it."""
    path, meta_path = Path(out) / PAIRS_FILE, Path(out) / META_FILE
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            return read_preferences(path), {**meta["stats"], "cached": True}
    pairs, stats = sample_pairs(model, folder, section)
    console.print(
        f"on-policy pairs: {stats['pairs']} from {stats['answers']} answers to {stats['asked']} prompts "
        f"({stats['on_policy_hallucination']} hallucinated, {stats['on_policy_wrong']} wrong)"
    )
    if pairs:
        write_preferences(pairs, path)
        atomic_write_json(meta_path, {"key": key, "stats": stats})
    return pairs, stats
