"""A task pairs a model with its loss for the shared trainer (open_clip's task wrapper, STYLE.md item 3).

The trainer owns the loop (data order, optimiser, schedule, checkpoints, logging); the task owns one
optimiser step's forward and backward passes. ``Task`` does plain gradient accumulation; recipes whose loss
couples the samples of a batch (contrastive losses) override ``train_step`` (see ``mmstack.train.clip_task``).
Every pass that touches the trained parameters runs through ``forward_pass``, which under torch.distributed
goes through the DDP/FSDP wrapper (``mmstack.train.distributed``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mmstack.train.optim import default_param_groups

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


class Task:
    """Forward + backward of one optimiser step over its accumulation chunks.

    Args:
        model: the module being trained (its trainable parameters go to the optimiser).
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``(loss, metrics)``; the default ``train_step``
            calls it once per chunk and back-propagates ``loss / n_chunks`` (equal-size chunks assumed).
    """

    #: metric names shown in the progress bar beside the loss (e.g. ``("temperature",)``)
    progress_keys: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, loss_fn: LossFn | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.precision = "fp32"
        self.parallel: Callable[..., Any] | None = None  # set by the trainer under torch.distributed

    def forward_pass(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args)``, one forward pass whose outputs the next ``backward`` follows.

        Under DDP/FSDP it runs inside the wrapper, so gradients are all-reduced (DDP) or parameters gathered
        (FSDP). Compute everything that uses trained parameters, the loss included, in one call.
        """
        if self.parallel is None:
            return fn(*args, **kwargs)
        return self.parallel(fn, *args, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for forward passes when the trainer runs in ``precision="bf16"``."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one chunk and any extra metrics."""
        if self.loss_fn is None:
            raise NotImplementedError("pass loss_fn or override Task.loss")
        out = self.loss_fn(self.model, batch)
        return out if isinstance(out, tuple) else (out, {})

    def train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """Plain gradient accumulation: each chunk's loss / n is back-propagated; returns the mean loss."""
        n = len(micro_batches)
        total, extra = 0.0, {}
        for batch in micro_batches:
            with self.autocast():
                loss, metrics = self.forward_pass(self.loss, batch)
            (loss / n).backward()
            total += float(loss.detach()) / n
            extra = metrics
        return {"loss": total, **extra}

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. to clamp a learnable temperature)."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups; the model's own ``param_groups`` helper wins when it has one."""
        helper = getattr(self.model, "param_groups", None)
        if callable(helper):
            return helper(weight_decay)
        return default_param_groups(self.model, weight_decay)

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a chunk (for samples/s); the first tensor's leading dimension by default."""
        for value in _tensors(batch):
            return int(value.shape[0])
        return 0


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)
