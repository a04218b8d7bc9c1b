"""torch.distributed for the shared trainer: the process group, DDP/FSDP wrapping, rank-0-only side effects.

    torchrun --nproc_per_node 2 -m mmstack train clip --config configs/clip-micro.yaml --data D --out O

``init_distributed()`` starts the process group from the environment that torchrun (and so SLURM's ``srun
torchrun ...`` and Ray Train's ``TorchTrainer``) sets: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``;
gloo on CPU, nccl with CUDA. ``Parallel`` wraps a task's model in ``DistributedDataParallel`` (default) or
FSDP2's ``fully_shard`` (``train.parallel: fsdp``) and runs the task's forward passes through the wrapper.

Why a closure module: tasks call model methods other than ``forward`` (``encode_image``, ``generate``...),
and DDP/FSDP only see calls of the wrapper itself. ``_Forward.forward(fn, *args)`` runs a task's whole pass
(``Task.forward_pass``) inside the wrapper, so DDP prepares its gradient all-reduce and FSDP gathers the
shards for it, whatever the pass calls. DDP averages gradients over ranks; the contrastive losses gather
features with gradients (open_clip's ``local_loss`` + ``gather_with_grad``), so each rank's feature gradient
is ``world_size`` times its share and the average is the single-process gradient of the global batch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from mmstack.errors import ConfigError, ModelError
from mmstack.train.sampler import DistInfo

PARALLEL_MODES = ("ddp", "fsdp", "none")


def init_distributed() -> DistInfo:
    """This process's rank and world size; starts the process group once when ``WORLD_SIZE > 1``."""
    info = DistInfo.from_env()
    if info.world_size <= 1:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE={info.world_size} but {var} is not set; launch with torchrun "
                    "(torchrun --nproc_per_node N -m mmstack train ...) or set the torch.distributed variables"
                )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
        atexit.register(teardown)
    if not info.is_main:
        from mmstack.utils.progress import console

        console.quiet = True  # logs and progress come from rank 0 only (errors still raise on every rank)
    if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
        raise ConfigError(
            f"RANK/WORLD_SIZE say {info.rank}/{info.world_size}, the process group {dist.get_rank()}/"
            f"{dist.get_world_size()}; launch every process with the same torchrun command"
        )
    return info


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process), e.g. until rank 0 has written a checkpoint."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def teardown(timeout_s: float = 60.0) -> None:
    """Leave the process group (registered at exit by ``init_distributed``).

    Ranks leave together: on gloo a ``monitored_barrier`` (bounded by ``timeout_s``) comes first, because a rank
    that exits while another is still destroying the group can abort it (SIGABRT in gloo's teardown). A
    process leaving on an uncaught exception skips the wait: its peers may be blocked in a collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    crashed = getattr(sys, "last_value", None) is not None  # set by the interpreter for an uncaught exception
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1 and not crashed:
        with contextlib.suppress(RuntimeError):  # a peer is gone or late: leave anyway
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    dist.destroy_process_group()


def mean_over_ranks(value: float) -> float:
    """The mean of a float over ranks (the global loss from each rank's local one)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes checkpoints, logs and progress bars."""
    return DistInfo.from_env().is_main


class _Forward(nn.Module):
    """The module DDP/FSDP wrap: ``forward(fn, *args)`` runs a task's pass over ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return fn(*args, **kwargs)


class Parallel:
    """How the model of one trainer runs across ranks: ``none`` (one process), ``ddp`` or ``fsdp``.

    Args:
        model: the task's model (trained in place; the wrapper shares its parameters).
        mode: ``ddp``, ``fsdp`` or ``none``; ignored (``none``) in a single process.
        dist: rank and world size.
    """

    def __init__(self, model: nn.Module, mode: str, dist: DistInfo) -> None:
        if mode not in PARALLEL_MODES:
            raise ConfigError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
        if dist.world_size > 1 and mode == "none":
            raise ConfigError(
                f"train.parallel=none with {dist.world_size} processes would train {dist.world_size} unrelated "
                "copies; use ddp or fsdp, or run a single process"
            )
        self.model, self.dist = model, dist
        self.mode = mode if dist.world_size > 1 else "none"
        self.adapter: _Forward | None = None
        self.wrapper: nn.Module | None = None
        self.replicated: list[nn.Parameter] = []  # FSDP cannot shard scalars: kept whole, gradients averaged here
        if self.mode != "none":
            if not is_distributed():
                raise ModelError("train.parallel needs the process group: call init_distributed() first")
            self._wrap()

    def _wrap(self) -> None:
        self.adapter = _Forward(self.model)
        cuda = torch.cuda.is_available()
        if cuda:
            self.model.to(torch.device("cuda", local_rank()))
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Some recipes leave parameters without a gradient in a step (frozen-by-data heads, the logit
            # scale in later accumulation chunks): find_unused_parameters keeps the reducer from waiting.
            self.wrapper = DistributedDataParallel(
                self.adapter, device_ids=[local_rank()] if cuda else None, find_unused_parameters=True
            )
        else:
            from torch.distributed.fsdp import fully_shard

            self.replicated = [p for p in self.model.parameters() if p.ndim == 0]  # a logit scale, a bias
            self.wrapper = fully_shard(self.adapter, ignored_params=set(self.replicated) or None)

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one forward pass ``fn(*args)`` through the wrapper (directly in a single process)."""
        if self.wrapper is None:
            return fn(*args, **kwargs)
        return self.wrapper(fn, *args, **kwargs)

    def sync_gradients(self) -> None:
        """After backward: average the gradients FSDP does not manage (its replicated scalars) over ranks."""
        trained = [p for p in self.replicated if p.requires_grad]
        if not trained:
            return
        import torch.distributed as dist

        has = torch.tensor([float(p.grad is not None) for p in trained])
        dist.all_reduce(has)  # the same decision on every rank keeps the collectives in step
        for p, n in zip(trained, has.tolist(), strict=True):
            if n:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad.div_(self.dist.world_size)

    @property
    def calls(self) -> int:
        return self.adapter.calls if self.adapter is not None else 0

    # ------------------------------------------------------------------------------- checkpoints

    def state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full model and optimiser state (a collective under FSDP: call it on every rank)."""
        if self.mode != "fsdp":
            return self.model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(self.model, optimizer, options=opts)

    def load(self, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
        """Restore what ``state`` returned (every rank reads the same file)."""
        if self.mode != "fsdp":
            self.model.load_state_dict(model_state)
            optimizer.load_state_dict(optim_state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_state_dict(self.model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=opts)

    @property
    def state_format(self) -> str:
        """Optimiser states are keyed by parameter index (``plain``) or by parameter name (``fsdp``)."""
        return "fsdp" if self.mode == "fsdp" else "plain"

    def unwrap(self) -> None:
        """After training: under FSDP, put the full parameters back as plain tensors (evaluation, saving)."""
        if self.mode != "fsdp":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        for name, param in list(self.model.named_parameters()):
            if isinstance(param, DTensor):
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner) if owner else self.model
                module._parameters[leaf] = nn.Parameter(full[name].detach().clone(), requires_grad=param.requires_grad)
        self.wrapper = self.adapter = None
        self.mode = "none"


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only, then let every rank continue once it is done (e.g. writing a checkpoint
    that the next stage loads). Returns ``fn()`` on rank 0 and None elsewhere."""
    result = fn() if is_main_process() else None
    barrier()
    return result
