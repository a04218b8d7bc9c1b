"""Deterministic, resumable batch order: the indices of optimiser step ``s`` follow from (seed, s) alone.

Each epoch is a fresh permutation drawn from ``seed + epoch``; a step takes the next ``batch_size``
slice of it (the incomplete tail of an epoch is dropped, so every step sees a full contrastive batch).
Because the order is a pure function of the step, resuming needs only the step number, and a run under
torch.distributed gives each rank its own contiguous slice of the same global batch.

With ``lengths`` (``train.group_by_length``), each epoch's permutation is cut into megabatches of
``MEGABATCH`` batches, each megabatch is sorted by length and cut into batches, and the batches are shuffled:
HF's ``LengthGroupedSampler`` idea (and LLaVA's ``group_by_modality_length``), so a few long rows (a clip, a
multi-turn conversation) no longer pad a batch of short ones, while each batch stays a random draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmstack.errors import ConfigError, DataError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) torch.distributed job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics and progress bars."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read ``RANK`` / ``WORLD_SIZE`` as set by torchrun (a plain run is rank 0 of 1)."""
        return cls(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))


class StepSampler:
    """Indices of the global batch of each optimiser step, sliced for this rank.

    Args:
        n: dataset size.
        batch_size: global batch per optimiser step (all ranks and accumulation chunks together).
        seed: order seed; epoch ``e`` uses ``seed + e``.
        dist: this process's rank and the world size; ``batch_size`` must divide evenly among ranks.
        lengths: one length per item: group items of similar length into the same batch (module docstring).
    """

    MEGABATCH = 50

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        dist: DistInfo | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.dist = dist or DistInfo()
        if batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} must be divisible by the number of processes ({self.dist.world_size})"
            )
        if n < batch_size:
            raise DataError(
                f"the training set has {n} items, fewer than one batch (train.batch_size={batch_size}); "
                "use more data or a smaller batch"
            )
        if lengths is not None and len(lengths) != n:
            raise DataError(f"group_by_length got {len(lengths)} lengths for {n} items")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = torch.as_tensor(lengths, dtype=torch.long) if lengths is not None else None
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=gen)
        if self.lengths is None:
            return perm
        perm = perm[: self.steps_per_epoch * self.batch_size]
        mega = [
            chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            for chunk in perm.split(self.MEGABATCH * self.batch_size)
        ]
        batches = torch.cat(mega).view(self.steps_per_epoch, self.batch_size)
        return batches[torch.randperm(self.steps_per_epoch, generator=gen)].flatten()

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """The indices this rank trains on at optimiser ``step`` (0-based)."""
        epoch = self.epoch_of(step)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._epoch_order(epoch)
        start = (step % self.steps_per_epoch) * self.batch_size
        per_rank = self.batch_size // self.dist.world_size
        start += self.dist.rank * per_rank
        return self._perm[start : start + per_rank]
