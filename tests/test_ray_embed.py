"""Ray Data embedding on a local Ray instance gives the collection the local build gives, and resumes."""

from __future__ import annotations

import numpy as np
import pytest

from _index_fakes import save_micro_two_tower
from mmstack.index.builder import BuildConfig, build_collection
from mmstack.index.store import SqliteStore

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own deprecated settings


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mmstack.world import generate_world

    root = tmp_path_factory.mktemp("ray-embed")
    world = root / "world"
    generate_world(world, n=20, seed=4, clips=2)
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a red circle above a blue cross " * 30)
    (docs / "b.txt").write_text("two green squares")
    return {"model": save_micro_two_tower(root / "micro"), "sources": [world, docs]}


def rows(db) -> dict[int, dict]:
    """Every item of a collection: its fields and vector, by id."""
    with SqliteStore.open(db) as store:
        ids = [i for space in store.spaces() for batch, _ in store.iter_vectors(space) for i in batch.tolist()]
        meta, vecs = store.items(ids), store.vectors(ids)
    return {i: {**meta[i], "vector": vecs[i]} for i in ids}


def assert_same_collection(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert a.keys() == b.keys()
    for i, row in a.items():
        other = b[i]
        np.testing.assert_allclose(row.pop("vector"), other.pop("vector"), atol=1e-5)
        assert row == other


def test_ray_build_equals_local_build_and_resumes(tmp_path, inputs, local_ray):
    from mmstack.index.ray_embed import RayConfig, build_collection_ray

    cfg = BuildConfig(batch_size=8, text_space="image")  # documents through the two-tower text tower
    local = build_collection(tmp_path / "local", inputs["sources"], inputs["model"], "none", cfg)
    ray_cfg = RayConfig(partitions=3, actors=1)
    first = build_collection_ray(tmp_path / "ray", inputs["sources"], inputs["model"], "none", cfg, ray_cfg=ray_cfg)
    assert first.items_embedded == local.items_embedded == local.rows > 20 + 2 * 4
    assert first.added == local.added and first.skipped == local.skipped == []
    want = rows(tmp_path / "local")
    assert {r["kind"] for r in want.values()} == {"pair", "clip", "text"}
    assert_same_collection(rows(tmp_path / "ray"), want)

    # an interrupted run: some units never committed; the rerun embeds exactly those, nothing else
    with SqliteStore.open(tmp_path / "ray") as store:
        lost = sorted(store.units())[::3]
        n_lost = sum(store.units()[u].n_items for u in lost)
        store.delete_units(lost)
    again = build_collection_ray(tmp_path / "ray", inputs["sources"], inputs["model"], "none", cfg, ray_cfg=ray_cfg)
    assert again.items_embedded == n_lost and again.added == len(lost) and again.unchanged > 0
    assert_same_collection(rows(tmp_path / "ray"), rows(tmp_path / "local"))


def test_cli_ray_flag_builds_and_then_finds_nothing_to_do(tmp_path, inputs, local_ray, run_cli):
    db = tmp_path / "db"
    args = ["index", "build", "--db", db, "--model", inputs["model"], "--source", inputs["sources"][0]]
    args += ["--ray", "--partitions", "2", "--json"]
    built = run_cli(*args)
    assert built.code == 0, built.err
    assert built.json()["rows"] == 20 + 2 * 4 and built.json()["items_embedded"] == 28
    rerun = run_cli(*args)
    assert rerun.code == 0 and rerun.json()["items_embedded"] == 0 and rerun.json()["unchanged"] == 22
