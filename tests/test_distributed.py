"""Two gloo processes on CPU: DDP/FSDP training equals single-process training on the same global batches.

The toy runs spawn two ranks with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and use the
real trainer (process group, wrapper, sampler slicing, loss averaging, rank-0 files, resume); the CLI test
runs ``torchrun --nproc_per_node 2 -m mmstack train clip`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _net import free_port
from mmstack.train.distributed import teardown
from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).parents[1]
TOY = {"lr": 1e-2, "warmup_steps": 2, "max_steps": 6, "batch_size": 16, "accum_steps": 2, "log_every": 1}


class ToyData:
    """y = x @ w + noise, indexed like the recipes' cached tensors."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 2, generator=g) + 0.01 * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": self.x[indices], "y": self.y[indices]}


def toy_task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))
    return Task(model, lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]))


def _toy_rank(rank: int, port: int, out: str, parallel: str) -> None:
    """One rank: train half-way, then resume in a fresh trainer to the end; save the final weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run_dir = Path(out) / f"rank{rank}"  # each rank its own folder: rank 1's must stay empty
    cfg = TrainConfig(**TOY, parallel=parallel, grad_clip=1.0)
    Trainer(toy_task(), ToyData(), cfg, run_dir).fit(stop_at_step=3)
    task = toy_task()
    summary = Trainer(task, ToyData(), cfg, run_dir).fit()
    state = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    torch.save({"state": state, "start_step": summary.start_step}, Path(out) / f"final{rank}.pt")
    teardown()  # ranks leave together (a monitored barrier first), as at exit


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_training_with_resume_equals_single_process(tmp_path, parallel):
    import torch.multiprocessing as mp

    mp.spawn(_toy_rank, args=(free_port(), str(tmp_path), parallel), nprocs=2, join=True)
    single = toy_task()
    Trainer(single, ToyData(), TrainConfig(**TOY, grad_clip=1.0), tmp_path / "single").fit()
    for rank in range(2):
        final = torch.load(tmp_path / f"final{rank}.pt")
        assert final["start_step"] == 3  # the second trainer resumed from rank 0's state
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(final["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    # rank 0 logged the mean loss over ranks, which is the single-process loss of each global batch
    rows = [json.loads(line) for line in (tmp_path / "rank0" / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(rows, single_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        "metrics.jsonl",
        "train_config.json",
        "train_state",
    ]
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").iterdir())


def test_parallel_none_with_two_processes_is_refused():
    from mmstack.errors import ConfigError
    from mmstack.train.distributed import Parallel
    from mmstack.train.sampler import DistInfo

    with pytest.raises(ConfigError, match="unrelated"):
        Parallel(nn.Linear(2, 2), "none", DistInfo(0, 2))
    with pytest.raises(ConfigError, match=r"train\.parallel"):
        TrainConfig(parallel="zero")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_torchrun_clip_micro_equals_single_process(tmp_path, loss):
    """The real command on two processes: one checkpoint, one JSON line, weights of the one-process run
    (the gathered CLIP and SigLIP losses see the global batch)."""
    from safetensors.torch import load_file

    from test_train_clip import make_world

    data = make_world(tmp_path / "world", 64, seed=3)
    common = ["--config", "configs/clip-micro.yaml", "--data", str(data), "--max-steps", "4", "--json"]
    common += ["--train.batch_size", "32", "--train.log_every", "1", f"--data.cache_dir={tmp_path / 'cache'}"]
    common += [f"--loss.type={loss}"]
    env = {**os.environ, "MMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    two = subprocess.run(
        [*torchrun, str(free_port()), "-m", "mmstack", "train", "clip", *common, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 4
    one = subprocess.run(
        [sys.executable, "-m", "mmstack", "train", "clip", *common, "--out", str(tmp_path / "one")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("k_proj.bias"):
            # its true gradient is 0 (softmax ignores a shift shared by every key): Adam turns the rounding
            # noise into full-size steps, which differ with the summation order
            continue
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    loss_two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    loss_one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    assert not list(tmp_path.glob(".two*"))  # the work folder was folded into the checkpoint, by rank 0 only


@pytest.mark.parametrize("recipe", ["clip", "llava", "vq", "native", "reward", "dpo", "ppo"])
def test_every_train_command_takes_max_steps(run_cli, recipe):
    result = run_cli("train", recipe, "--help")
    assert result.code == 0 and "--max-steps" in result.out
