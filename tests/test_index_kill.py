"""``kill -9`` during ``mmstack index build``, then a second run: nothing lost, nothing duplicated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from _index_fakes import save_micro_two_tower

N_IMAGES = 600


@pytest.fixture(scope="module")
def micro_two_tower(tmp_path_factory):
    return save_micro_two_tower(tmp_path_factory.mktemp("index-model") / "micro")


def _images(folder, n):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"img_{i:04d}.png")
    return folder


def _count(db_file) -> int:
    if not db_file.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=0.5)
        try:
            return con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # created but schema not there yet
        return 0


def _check_consistent(db_file) -> dict[str, tuple]:
    con = sqlite3.connect(db_file)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.execute("INSERT INTO fts(fts) VALUES ('integrity-check')")  # raises if BM25 index and rows disagree
        per_unit = con.execute(
            "SELECT u.uid, u.n_items, COUNT(i.id) FROM units u LEFT JOIN items i ON i.uid = u.uid GROUP BY u.uid"
        ).fetchall()
        assert all(n == c for _, n, c in per_unit), "a unit row disagrees with its items"
        orphans = con.execute("SELECT COUNT(*) FROM items WHERE uid NOT IN (SELECT uid FROM units)").fetchone()[0]
        assert orphans == 0
        rows = con.execute("SELECT path, id, vector FROM items").fetchall()
        assert len({r[0] for r in rows}) == len(rows), "duplicate rows for one file"
        return {r[0]: (r[1], r[2]) for r in rows}
    finally:
        con.close()


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(tmp_path, run_cli, micro_two_tower):
    src = _images(tmp_path / "imgs", N_IMAGES)
    db = tmp_path / "db"
    args = [
        "index",
        "build",
        "--model",
        str(micro_two_tower),
        "--db",
        str(db),
        "--source",
        str(src),
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--text-model",
        "none",
    ]
    env = {**os.environ, "MMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmstack", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while _count(db / "collection.sqlite") < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    committed = _check_consistent(db / "collection.sqlite")
    assert 40 <= len(committed) < N_IMAGES, "the build finished before it could be killed"

    resumed = run_cli(*args, "--json")
    assert resumed.code == 0, resumed.err
    report = resumed.json()
    assert report["unchanged"] == len(committed)  # committed work is not redone
    assert report["added"] == N_IMAGES - len(committed) and report["rows"] == N_IMAGES
    final = _check_consistent(db / "collection.sqlite")
    assert len(final) == N_IMAGES
    assert all(final[p] == committed[p] for p in committed)

    clean = run_cli(*[a if a != str(db) else str(tmp_path / "clean") for a in args], "--json")
    assert clean.code == 0
    uninterrupted = _check_consistent(tmp_path / "clean" / "collection.sqlite")
    assert {p: v[0] for p, v in uninterrupted.items()} == {p: v[0] for p, v in final.items()}  # same ids
    for p, (_, vec) in uninterrupted.items():  # same vectors (up to batch-composition float noise)
        np.testing.assert_allclose(np.frombuffer(vec, np.float32), np.frombuffer(final[p][1], np.float32), atol=1e-5)
