"""Incremental indexing: add, change, delete, rename; bad files; model checks (fake embedders)."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from _index_fakes import ColourEmbedder, HashTextEmbedder, colour_image, photo_folder
from mmstack.errors import CollectionError
from mmstack.index.builder import BuildConfig, Embedders, build_index
from mmstack.index.collection import Collection
from mmstack.index.sources import chunk_text
from mmstack.index.store import SqliteStore


def _build(db, *sources, image=None, text=None, **cfg):
    emb = Embedders(image or ColourEmbedder(), text or HashTextEmbedder())
    return build_index(db, list(sources), emb, BuildConfig(batch_size=3, workers=2, **cfg))


def _rows(db) -> dict[str, tuple]:
    con = sqlite3.connect(db / "collection.sqlite")
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT path || '#' || seq, id, vector FROM items")}
    finally:
        con.close()


def test_first_build_indexes_every_kind(tmp_path):
    src = photo_folder(tmp_path / "photos")
    report = _build(tmp_path / "db", src)
    assert report.added == 8 and report.skipped == [] and report.rows == 8
    with SqliteStore.open(tmp_path / "db") as store:
        stats = store.stats()
        assert stats["by_kind"] == {"image": 5, "pair": 1, "text": 2}
        assert stats["by_space"] == {"image": 6, "text": 2}
        pair = next(m for m in store.items(store.filter_ids(_kind("pair"))).values())
        assert pair["caption"] == "a tomato beside a leaf"  # caption read from the same-name .txt
        assert set(store.spaces()) == {"image", "text"}


def _kind(kind):
    from mmstack.index.store import Filters

    return Filters(kind=kind)


def test_unchanged_rerun_reads_nothing_and_embeds_nothing(tmp_path):
    src = photo_folder(tmp_path / "photos")
    _build(tmp_path / "db", src)
    before = _rows(tmp_path / "db")
    image = ColourEmbedder()
    report = _build(tmp_path / "db", src, image=image)
    assert (report.unchanged, report.added, report.changed, report.items_embedded) == (8, 0, 0, 0)
    assert image.calls == 0
    assert _rows(tmp_path / "db") == before


def test_change_delete_rename_and_touch(tmp_path):
    src = photo_folder(tmp_path / "photos")
    db = tmp_path / "db"
    _build(db, src)
    before = _rows(db)
    colour_image(src / "red.png", ["green"])  # changed content
    (src / "blue.png").rename(src / "sub" / "azure.png")  # renamed
    (src / "green.png").unlink()  # deleted
    st = os.stat(src / "recipe.txt")
    os.utime(src / "recipe.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    colour_image(src / "new_yellow.png", ["yellow"])  # added
    report = _build(db, src)
    assert (report.changed, report.renamed, report.deleted, report.touched, report.added) == (1, 1, 1, 1, 1)
    assert report.items_embedded == 2  # only the changed and the new image
    after = _rows(db)
    assert f"{src}/green.png#0" not in after
    assert after[f"{src}/sub/azure.png#0"] == before[f"{src}/blue.png#0"]  # same id and vector, new path
    assert after[f"{src}/red.png#0"][0] == before[f"{src}/red.png#0"][0]  # same id ...
    assert after[f"{src}/red.png#0"][1] != before[f"{src}/red.png#0"][1]  # ... new vector
    assert len(after) == len(before)
    with Collection.open(db, embedders={"image": ColourEmbedder(), "text": HashTextEmbedder()}) as col:
        top = col.search("green", top_k=1, mode="dense", filters=_kind("image"))
        assert top[0].path == f"{src}/red.png"  # the re-embedded image is found as green now
        assert [h.path for h in col.search("azure", mode="text")] == [f"{src}/sub/azure.png"]  # new name in BM25
        assert [h.path for h in col.search("green", mode="text")] == [f"{src}/sub/red_green.png"]  # deleted: gone


def test_deleting_a_source_folder_content_removes_rows_only_of_that_source(tmp_path):
    a = photo_folder(tmp_path / "a")
    b = tmp_path / "b"
    colour_image(b / "x.png", ["red"])
    db = tmp_path / "db"
    _build(db, a, b)
    (b / "x.png").unlink()
    report = _build(db, b)  # only b scanned: a's rows stay
    assert report.deleted == 1
    with SqliteStore.open(db) as store:
        assert store.count() == 8


def test_bad_files_are_listed_and_skipped(tmp_path, run_cli):
    src = photo_folder(tmp_path / "photos")
    (src / "truncated.png").write_bytes((src / "red.png").read_bytes()[:60])
    (src / "empty.jpg").write_bytes(b"")
    (src / "fake.webp").write_bytes(b"this is not an image")
    report = _build(tmp_path / "db", src)
    assert report.rows == 8
    assert sorted(os.path.basename(s["path"]) for s in report.skipped) == ["empty.jpg", "fake.webp", "truncated.png"]
    assert all(s["error"] for s in report.skipped)
    assert report.to_dict()["errors"] == 3
    with SqliteStore.open(tmp_path / "db") as store:
        assert len(store.errors()) == 3
    listed = run_cli("index", "errors", "--db", tmp_path / "db", "--json")
    assert listed.code == 0 and len(listed.json()["errors"]) == 3
    (src / "truncated.png").unlink()
    assert len(_build(tmp_path / "db", src).skipped) == 2  # the error list follows the files


def test_other_model_dimension_fails_clearly(tmp_path):
    src = photo_folder(tmp_path / "photos")
    _build(tmp_path / "db", src)
    with pytest.raises(CollectionError, match=r"dimension 8.*dimension 12"):
        _build(tmp_path / "db", src, image=ColourEmbedder(dim=12, model_id="fake-colour-v2"))
    with pytest.raises(CollectionError, match="not fake-colour-v9"):
        _build(tmp_path / "db", src, image=ColourEmbedder(model_id="fake-colour-v9"))
    with pytest.raises(CollectionError, match="dimension 12"):
        Collection.open(tmp_path / "db", embedders={"image": ColourEmbedder(dim=12, model_id="other")})


def test_search_uses_the_index_kind_the_build_chose(tmp_path):
    from mmstack.index.ann import AnnConfig

    src = photo_folder(tmp_path / "photos")
    emb = Embedders(ColourEmbedder(), HashTextEmbedder())
    build_index(tmp_path / "db", [src], emb, BuildConfig(workers=0), AnnConfig(kind="hnsw", m=8, ef_construction=16))
    assert (tmp_path / "db" / "ann-image.faiss").is_file()
    with Collection.open(tmp_path / "db") as col:
        assert col.stats()["index"] == {"image": "hnsw", "text": "hnsw"}
    with Collection.open(tmp_path / "db", ann=AnnConfig(kind="exact")) as col:
        assert col.stats()["index"] == {"image": "exact", "text": "exact"}


def test_missing_collection_is_a_clear_error(tmp_path):
    with pytest.raises(CollectionError, match="no collection"):
        Collection.open(tmp_path / "nope")


def test_chunking_keeps_paragraphs_and_windows_long_ones():
    text = "one two three\n\nfour five\n\n" + " ".join(f"w{i}" for i in range(25))
    chunks = chunk_text(text, words=10, overlap=2)
    assert chunks[0] == "one two three four five"
    long = [c.split() for c in chunks[1:]]
    assert all(len(c) <= 10 for c in long)
    assert long[0][:2] == ["w0", "w1"] and long[1][:2] == long[0][-2:]  # windows overlap by 2 words
    assert long[-1][-1] == "w24"


def test_clips_frames_and_pooled(tmp_path):
    import json

    world = tmp_path / "world"
    frames = [
        colour_image(world / "clips" / "000000" / f"frame_{t:02d}.png", [c]).relative_to(world).as_posix()
        for t, c in enumerate(["red", "red", "blue", "blue", "blue"])
    ]
    (world / "clips.jsonl").write_text(
        json.dumps({"id": "000000", "frames": frames, "caption": "red then blue"}) + "\n"
    )
    _build(tmp_path / "db1", world, clip_frames=3)
    with SqliteStore.open(tmp_path / "db1") as store:
        items = sorted(store.items(store.filter_ids(_kind("clip"))).values(), key=lambda m: m["seq"])
    assert [m["meta"]["frame"] for m in items] == [0, 2, 4]
    assert items[1]["path"].endswith("frame_02.png") and items[0]["caption"] == "red then blue"
    _build(tmp_path / "db2", world, clip_mode="pooled", clip_frames=0)
    with SqliteStore.open(tmp_path / "db2") as store:
        (vec,) = store.vectors(store.filter_ids(_kind("clip"))).values()
    emb = ColourEmbedder()
    red, blue = emb.embed_texts(["red", "blue"])
    assert vec @ blue > vec @ red > 0.3  # 3 blue frames of 5 outweigh 2 red ones
    assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-5)
