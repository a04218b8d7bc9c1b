"""How a recipe ends a run: the result it reports and the checkpoint folder it writes (rank 0 only).

    summary = trainer.fit(stop_at_step=stop_after)
    return finish_run(model, summary, RunInfo("mmstack train vq", out, work, run_config, max_steps, t0, prepare_s),
                      evaluate=lambda: evaluate_reconstruction(model, val_pixels) if val else None)

A run stopped early (``stop_at_step``) keeps only its training state in ``work`` and reports that folder; a
finished run is evaluated and saved as ``out`` (``save_pretrained`` files, the model card with the config,
summary and eval numbers, and the run files). Under torch.distributed, evaluation and writing happen on rank 0
while the other ranks wait, so a later stage that loads the checkpoint finds it on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmstack.train.distributed import run_on_main
from mmstack.train.trainer import TrainSummary
from mmstack.utils.atomic import atomic_dir, atomic_write_json
from mmstack.utils.progress import console

RUN_FILES = ("metrics.jsonl", "train_config.json")


@dataclass
class RunResult:
    """What a single-checkpoint recipe (clip, vq, native) returns and ``mmstack train ... --json`` prints.

    ``metric_keys``: last-step metrics reported beside the loss (e.g. ``temperature``).
    """

    out: str
    summary: TrainSummary
    parameters: int
    prepare_s: float
    total_s: float
    val: dict[str, Any] | None = None
    metric_keys: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        s = self.summary
        return {
            "out": self.out,
            "steps": s.steps,
            "start_step": s.start_step,
            "train_s": round(s.seconds, 2),
            "prepare_s": round(self.prepare_s, 2),
            "total_s": round(self.total_s, 2),
            "samples_per_s": round(s.samples_per_s, 1),
            "final_loss": s.final_loss,
            **{k: s.last_metrics.get(k) for k in self.metric_keys},
            "parameters": self.parameters,
            "val": self.val,
        }


@dataclass
class RunInfo:
    """What ``finish_run`` needs to know about the run besides the model and the trainer's summary."""

    recipe: str  # the command, for the model card ("mmstack train clip")
    out: Path  # the checkpoint folder to write
    work: Path  # where the run files live until then
    run_config: dict[str, Any]
    max_steps: int
    t0: float  # time.perf_counter() at the start of the recipe
    prepare_s: float
    metric_keys: tuple[str, ...] = field(default_factory=tuple)


def work_dir(out: Path) -> Path:
    """Run files (state, metrics) live in ``out`` once it is a checkpoint, else beside it until the end."""
    out = Path(out)
    return out if (out / "train_state").is_dir() else out.parent / f".{out.name}.run"


def finish_run(
    model: Any, summary: TrainSummary, run: RunInfo, evaluate: Callable[[], dict[str, Any] | None]
) -> RunResult:
    """Report a stopped run, or evaluate a finished one and save its checkpoint (rank 0; others wait)."""
    n_params = model.num_parameters()

    def result(out: Path, val: dict[str, Any] | None = None) -> RunResult:
        total = time.perf_counter() - run.t0
        return RunResult(str(out), summary, n_params, run.prepare_s, total, val, run.metric_keys)

    if summary.steps < run.max_steps:
        return result(run.work)

    def evaluate_and_save() -> RunResult:
        metrics = evaluate()
        done = result(run.out, metrics)
        card = {
            "training": {"recipe": run.recipe, "config": run.run_config, "summary": done.as_dict()},
            "metrics": {"val": metrics} if metrics else {},
        }
        save_checkpoint(model, run.out, run.work, card)
        return done

    return run_on_main(evaluate_and_save) or result(run.out)


def save_checkpoint(model: Any, out: Path, work: Path, card: dict[str, Any]) -> None:
    """Write the checkpoint folder ``out`` atomically: ``save_pretrained`` files plus the run files.

    The run files are hard-linked (copied across file systems) from ``work`` so a crash while saving
    never loses the training state.
    """
    with atomic_dir(out) as tmp:
        model_dir = tmp / "model"
        model.save_pretrained(model_dir, card=card)
        for item in model_dir.iterdir():
            os.replace(item, tmp / item.name)
        model_dir.rmdir()
        for name in RUN_FILES:
            if (work / name).is_file():
                shutil.copy2(work / name, tmp / name)
        if (work / "train_state").is_dir():
            shutil.copytree(work / "train_state", tmp / "train_state", copy_function=link_or_copy)
    if work != out:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"saved checkpoint {out}")


def save_finished_run(
    model: Any, run_dir: Path, run_config: dict[str, Any], key: str, summary: dict[str, Any], eval_key: str
) -> None:
    """The multi-stage and alignment recipes' ending: ``RUN/model`` (card with config, summary and
    ``summary[eval_key]``) and ``RUN/done.json`` (the run key, so an unchanged rerun is reused); rank 0 writes,
    every rank waits for it."""

    def save() -> None:
        card = {"training": {**run_config, "summary": summary}, "eval": summary.get(eval_key)}
        model.save_pretrained(Path(run_dir) / "model", card=card)
        atomic_write_json(Path(run_dir) / "done.json", {"key": key, "summary": summary})

    run_on_main(save)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (a copy across file systems): checkpoint files are never edited in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fingerprint(path: str | Path | None) -> str | None:
    """Identity of an input file or checkpoint folder: path, size and modification time of its files."""
    if not path:
        return None
    path = Path(path)
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def run_key(run_config: dict[str, Any]) -> str:
    """A short stable hash of a run's config and input fingerprints (what decides reuse vs retrain)."""
    return hashlib.sha256(json.dumps(run_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
