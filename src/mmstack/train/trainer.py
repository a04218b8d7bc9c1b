"""The shared training loop: one small trainer for every recipe (CLIP now; bridge, native, align later).

    task = Task(model, loss_fn)                  # or a recipe's task (ClipTask, ...)
    summary = Trainer(task, data, TrainConfig(max_steps=100), out_dir).fit()

``data`` is any object with ``len(data)`` and ``data.batch(indices) -> batch`` (a batch is whatever the task
takes): recipes index pre-built tensors, so a step costs no Python per sample. The run folder gets
``train_config.json`` (the resolved config), ``metrics.jsonl`` (one line per log step) and ``train_state/``
(model, optimiser, scheduler, RNG states, step), written atomically every ``save_every`` steps and at the
end; a later ``fit`` in the same folder resumes from it and, on CPU, ends bit-identical to an uninterrupted
run. Under torchrun (``WORLD_SIZE > 1``) the trainer starts the process group, wraps the model in DDP (or FSDP,
``train.parallel``; see ``mmstack.train.distributed``), the sampler gives each rank its slice of the same global
batch, the logged loss is the mean over ranks, and only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from rich.progress import TextColumn

from mmstack.config import to_dict
from mmstack.errors import ConfigError, ModelError
from mmstack.train.attention import ATTENTION_CHOICES, AttentionChoice, set_attention
from mmstack.train.compile import compiled_blocks
from mmstack.train.distributed import PARALLEL_MODES, Parallel, barrier, init_distributed, mean_over_ranks
from mmstack.train.optim import build_optimizer, build_scheduler
from mmstack.train.sampler import DistInfo, StepSampler
from mmstack.train.state import load_state, rng_state, save_state, set_rng_state
from mmstack.train.task import Task
from mmstack.utils.atomic import atomic_write_json, atomic_write_text
from mmstack.utils.malloc import keep_freed_memory
from mmstack.utils.precision import effective_precision
from mmstack.utils.progress import console, make_progress
from mmstack.utils.seeding import seed_everything

# Keys that may change between a run and its resumption (they do not change what a step computes).
RESUMABLE_CHANGES = ("max_steps", "log_every", "save_every", "threads", "parallel", "attention")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    ``batch_size`` is the global batch of one optimiser step; it is split into ``accum_steps`` chunks
    (and, under torch.distributed, among ranks). ``parallel``: how several processes train one model,
    ``ddp`` (replicas, gradients averaged), ``fsdp`` (parameters, gradients and optimiser state sharded) or
    ``none``; a single process ignores it. ``attention``: the HF attention kernel while training: ``auto``
    (every HF model goes ``eager`` on a CPU, where ``sdpa``'s backward is slow; see
    ``mmstack.train.attention``), ``eager`` or ``sdpa``. ``group_by_length``: batches of items of similar
    length (the data source must have ``lengths()``; see ``mmstack.train.sampler``). ``compile``: run the
    model's repeated blocks through ``torch.compile`` while training (see ``mmstack.train.compile``).
    ``optimizer``: ``adamw``, or ``muon`` (Muon on the hidden matrices, AdamW on the rest, one learning rate;
    see ``mmstack.train.muon``).
    """

    lr: float = 1e-3
    warmup_steps: int = 50
    max_steps: int = 500
    batch_size: int = 256
    accum_steps: int = 1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 0.0
    min_lr_ratio: float = 0.0
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    threads: int = 0
    parallel: Literal["ddp", "fsdp", "none"] = "ddp"
    attention: AttentionChoice = "auto"
    group_by_length: bool = False
    compile: bool = False
    optimizer: Literal["adamw", "muon"] = "adamw"

    def __post_init__(self) -> None:
        positive = {
            "lr": self.lr,
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "log_every": self.log_every,
            "eps": self.eps,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"train.{name} must be > 0, got {value}")
        for name in ("warmup_steps", "save_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be in [0, 1), got {list(self.betas)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"train.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer=muon needs whole matrices: use train.parallel=ddp, not fsdp")
        if self.batch_size % self.accum_steps:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by train.accum_steps={self.accum_steps}"
            )


class BatchSource(Protocol):
    """What the trainer reads: a length and a way to build the batch of some indices."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> Any: ...


@dataclass
class TrainSummary:
    """What a finished (or stopped) ``fit`` reports."""

    steps: int
    start_step: int
    seconds: float
    samples_per_s: float
    final_loss: float
    last_metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Trainer:
    """Runs ``task`` on ``data`` for ``cfg.max_steps`` optimiser steps, writing into ``out_dir``.

    Args:
        task: pairs model and loss; does forward + backward of one step (see ``mmstack.train.task``).
        data: a ``BatchSource``.
        cfg: the optimisation config.
        out_dir: run folder (metrics, resolved config, ``train_state/``).
        run_config: the full resolved config to save with the run and to check on resume (default: ``cfg``).
        dist: rank and world size (default: from the torchrun environment, starting the process group).
        resume: continue from ``out_dir/train_state`` when present.
        on_step_end: optional ``fn(step, metrics)`` called after each step (hooks, tests).
    """

    def __init__(
        self,
        task: Task,
        data: BatchSource,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        run_config: dict[str, Any] | None = None,
        dist: DistInfo | None = None,
        resume: bool = True,
        on_step_end: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.task, self.data, self.cfg = task, data, cfg
        self.out = Path(out_dir)
        self.run_config = run_config if run_config is not None else {"train": to_dict(cfg)}
        self.dist = dist or init_distributed()
        self.resume, self.on_step_end = resume, on_step_end
        self.sampler = StepSampler(len(data), cfg.batch_size, cfg.seed, self.dist, _lengths(data, cfg))
        task.precision = effective_precision(cfg.precision, task.device)  # bf16 only where it is native
        set_attention(task.model, cfg.attention)  # eager on CPU: see mmstack.train.attention
        # wrap before building the optimiser: FSDP replaces the parameters with sharded ones
        self.parallel = Parallel(task.model, cfg.parallel, self.dist)
        task.parallel = self.parallel if self.parallel.mode != "none" else None
        groups = task.param_groups(cfg.weight_decay)
        self.optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, cfg.optimizer, task.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        self.step = 0

    # ------------------------------------------------------------------------------------------ loop

    def fit(self, stop_at_step: int | None = None) -> TrainSummary:
        """Train up to ``cfg.max_steps`` (or stop early after ``stop_at_step``, keeping the schedule)."""
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.task.device.type == "cpu":
            keep_freed_memory()  # glibc would hand activations back to the kernel each step (mmstack.utils.malloc)
        start = self._start()
        end = min(self.cfg.max_steps, stop_at_step or self.cfg.max_steps)
        self.task.model.train()
        window: list[dict[str, float]] = []
        t_run = t_window = time.perf_counter()
        n_run = n_window = 0
        last_row: dict[str, float] = {}
        with compiled_blocks(self.task.model, self.cfg.compile), self._progress(start) as (progress, bar):
            while self.step < end:
                metrics, n = self._train_one_step()
                window.append(metrics)
                n_run, n_window = n_run + n, n_window + n
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    last_row = self._log(window, n_window / max(now - t_window, 1e-9), now - t_run)
                    window, t_window, n_window = [], now, 0
                    progress.update(bar, completed=self.step, info=self._progress_text(last_row))
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < end:
                    self._save()
                if self.on_step_end is not None:
                    self.on_step_end(self.step, metrics)
        seconds = time.perf_counter() - t_run  # the loop only: the final save is bookkeeping
        self._save()
        self.parallel.unwrap()
        barrier()  # every rank goes on once rank 0 has written the state
        return self._summary(start, seconds, n_run, last_row)

    def _train_one_step(self) -> tuple[dict[str, float], int]:
        indices = self.sampler.indices(self.step)
        chunks = torch.tensor_split(indices, self.cfg.accum_steps)
        micro = [self.data.batch(c) for c in chunks]
        self.optimizer.zero_grad(set_to_none=True)
        calls = self.parallel.calls
        metrics = dict(self.task.train_step(micro))
        if self.parallel.mode != "none" and self.parallel.calls == calls:
            raise ModelError(
                f"{type(self.task).__name__}.train_step ran no pass through Task.forward_pass, so "
                f"{self.parallel.mode} would not synchronise gradients; wrap the task's forward passes in it"
            )
        self.parallel.sync_gradients()
        metrics["loss"] = mean_over_ranks(metrics["loss"])
        if self.cfg.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.task.after_step()
        self.step += 1
        return metrics, len(indices) * self.dist.world_size  # the global batch: every rank takes a slice

    # ------------------------------------------------------------------------------------ bookkeeping

    def _start(self) -> int:
        """Resume from ``train_state/`` when present, else seed and start a fresh run; returns the start step."""
        # rank 0 reads the state and sends it to the others, so their folders need not hold it (another node)
        state = load_state(self.out) if self.resume and self.dist.is_main else None
        state = _broadcast_object(state)
        if state is None:
            seed_everything(self.cfg.seed + self.dist.rank)  # ranks draw their own dropout masks
            self.step = 0
        else:
            self._restore(state)
        if self.dist.is_main:
            atomic_write_json(self.out / "train_config.json", self.run_config)
            self._trim_metrics(self.step)
        return self.step

    def _restore(self, state: dict[str, Any]) -> None:
        _check_same_run(state.get("run_config", {}), self.run_config, self.out)
        saved_format = state.get("state_format", "plain")
        if saved_format != self.parallel.state_format:
            raise ConfigError(
                f"{self.out / 'train_state'} holds {saved_format} optimiser state; this run keeps "
                f"{self.parallel.state_format} state; resume with the train.parallel it was written with"
            )
        self.parallel.load(self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.step = int(state["step"])
        if self.dist.is_main:
            console.print(f"resuming from {self.out / 'train_state'} at step {self.step}")

    def _save(self) -> None:
        model_state, optim_state = self.parallel.state(self.optimizer)  # a collective under FSDP
        rngs = _gather_objects(rng_state())
        if not self.dist.is_main:
            return
        save_state(
            self.out,
            {
                "step": self.step,
                "epoch": self.sampler.epoch_of(self.step),
                "model": model_state,
                "optimizer": optim_state,
                "state_format": self.parallel.state_format,
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs[0],
                "rng_ranks": rngs if len(rngs) > 1 else None,
                "run_config": json.loads(json.dumps(self.run_config, default=str)),
            },
        )

    def _log(self, window: list[dict[str, float]], samples_per_s: float, elapsed: float) -> dict[str, float]:
        row = {"step": self.step, "epoch": self.sampler.epoch_of(self.step - 1), **window[-1]}
        row["loss"] = sum(m["loss"] for m in window) / len(window)  # mean over the log window
        row["samples_per_s"] = samples_per_s
        row["elapsed_s"] = elapsed
        if self.dist.is_main:
            with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss became {row['loss']} at step {self.step}; lower train.lr")
        return row

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines past the resumed step (logged after the last save of an interrupted run)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def _progress(self, start: int):
        return _ProgressBar(self.cfg.max_steps, start, enabled=self.dist.is_main)

    def _progress_text(self, row: dict[str, float]) -> str:
        parts = [f"loss {row['loss']:.4f}", f"{row['samples_per_s']:.0f} samples/s"]
        parts += [f"{k} {row[k]:.4g}" for k in self.task.progress_keys if k in row]
        return " · ".join(parts)

    def _summary(self, start: int, seconds: float, samples: int, row: dict[str, float]) -> TrainSummary:
        summary = TrainSummary(
            steps=self.step,
            start_step=start,
            seconds=seconds,
            samples_per_s=samples / max(seconds, 1e-9),
            final_loss=row.get("loss", float("nan")),
            last_metrics=row,
        )
        if self.dist.is_main and self.step > start:
            console.print(
                f"trained steps {start}..{self.step} in {seconds:.1f} s "
                f"({summary.samples_per_s:.0f} samples/s), final loss {summary.final_loss:.4f}"
            )
        return summary


class _ProgressBar:
    """A rich bar with a free-text column (loss, samples/s, temperature); silent off the main rank."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.progress = make_progress(TextColumn("{task.fields[info]}"))
        self.progress.disable = self.progress.disable or not enabled
        self.total, self.start = total, start

    def __enter__(self):
        self.progress.__enter__()
        bar = self.progress.add_task("train", total=self.total, completed=self.start, info="")
        return self.progress, bar

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _lengths(data: BatchSource, cfg: TrainConfig) -> list[int] | None:
    if not cfg.group_by_length:
        return None
    if not hasattr(data, "lengths"):
        raise ConfigError(
            f"train.group_by_length needs item lengths, and {type(data).__name__} has no lengths(); "
            "set group_by_length: false for this recipe"
        )
    return list(data.lengths())


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Resuming with another config would silently mix two runs: name the first difference instead."""
    a = _flatten(json.loads(json.dumps(saved, default=str)))
    b = _flatten(json.loads(json.dumps(current, default=str)))
    for key in sorted(set(a) | set(b)):
        if key.rsplit(".", 1)[-1] in RESUMABLE_CHANGES:
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(
                f"{out / 'train_state'} was written by a run with {key}={a.get(key)!r}, now {key}={b.get(key)!r}; "
                "use another --out, delete train_state/, or pass --no-resume"
            )
