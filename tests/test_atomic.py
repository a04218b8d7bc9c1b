"""Atomic writes leave the old content in place when a write fails."""

from __future__ import annotations

import pytest

from mmstack.utils.atomic import atomic_dir, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]
    atomic_write_json(tmp_path / "b.json", {"b": 1, "a": 2})
    assert (tmp_path / "b.json").read_text().startswith('{\n  "a": 2')


def test_atomic_dir_keeps_old_on_error(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as d:
        (d / "w.bin").write_text("v2-partial")
        raise RuntimeError("crash mid-write")
    assert (target / "w.bin").read_text() == "v1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
    with atomic_dir(target) as d:
        (d / "w.bin").write_text("v2")
    assert (target / "w.bin").read_text() == "v2"
