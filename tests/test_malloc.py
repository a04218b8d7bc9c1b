"""mmstack.utils.malloc: the trainer keeps freed memory on glibc; MMSTACK_MALLOC=default opts out."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from mmstack.utils import malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_the_settings_and_the_opt_out_skips_them(monkeypatch):
    assert ctypes.util.find_library("c")
    monkeypatch.delenv("MMSTACK_MALLOC", raising=False)
    assert malloc.keep_freed_memory.__wrapped__() is True  # every mallopt call returned success
    monkeypatch.setenv("MMSTACK_MALLOC", "default")
    assert malloc.keep_freed_memory.__wrapped__() is False


def test_trainer_sets_it_on_a_cpu(tmp_path, monkeypatch):
    from test_trainer import make_trainer

    calls = []
    monkeypatch.setattr("mmstack.train.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    make_trainer(tmp_path / "run", max_steps=1).fit()
    assert calls == [1]
