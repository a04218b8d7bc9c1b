"""bf16 autocast only where the hardware computes bf16 natively; fp32 (with a warning) elsewhere."""

from __future__ import annotations

import torch

from mmstack.train.task import Task
from mmstack.train.trainer import TrainConfig, Trainer
from mmstack.utils import precision


class _Batches:
    def __len__(self) -> int:
        return 8

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(len(indices), 4)}


def _trainer(tmp_path, asked: str) -> Trainer:
    model = torch.nn.Linear(4, 1)
    task = Task(model, lambda m, b: m(b["x"]).pow(2).mean())
    cfg = TrainConfig(max_steps=1, batch_size=4, warmup_steps=0, precision=asked, log_every=1)
    return Trainer(task, _Batches(), cfg, tmp_path / "run")


def test_emulated_bf16_falls_back_to_fp32_with_a_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.delenv("MMSTACK_BF16", raising=False)
    trainer = _trainer(tmp_path, "bf16")
    assert trainer.task.precision == "fp32"
    with trainer.task.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert "no native bf16" in " ".join(capsys.readouterr().err.split())  # console wraps long lines
    assert _trainer(tmp_path / "b", "bf16").task.precision == "fp32" and "native" not in capsys.readouterr().err
    monkeypatch.setenv("MMSTACK_BF16", "force")
    forced = _trainer(tmp_path / "c", "bf16")
    assert forced.task.precision == "bf16"
    with forced.task.autocast():
        assert torch.is_autocast_enabled("cpu")


def test_native_bf16_and_fp32_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    assert _trainer(tmp_path, "bf16").task.precision == "bf16"
    assert _trainer(tmp_path / "b", "fp32").task.precision == "fp32"
    assert precision.effective_precision("fp32", "cpu") == "fp32"


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision.native_bf16("cpu")
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert not precision.native_bf16("cpu")
