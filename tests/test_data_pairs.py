"""Image-text pairs: every layout reads, round-trips through every writer, and bad records fail clearly."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from _data_world import make_world, write_lines
from mmstack.data import webdataset as wds
from mmstack.data.pairs import (
    Pair,
    detect_format,
    read_pairs,
    write_pairs,
    write_pairs_csv,
    write_pairs_folder,
    write_webdataset,
)
from mmstack.data.records import SkipReport
from mmstack.errors import DataError


def summary(pairs: list[Pair]) -> list[tuple]:
    """What must survive a round trip: caption, id, meta and the image bytes."""
    return [(p.caption, p.id, p.meta, p.read_image_bytes()) for p in pairs]


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path / "world", n=5)


def test_reads_the_shapes_world_layout(world):
    pairs = read_pairs(world)
    assert [p.id for p in pairs] == ["000000", "000001", "000002", "000003", "000004"]
    assert pairs[1].caption == "a green square, picture 1"
    assert pairs[1].image == (world / "images" / "000001.png").resolve()
    assert pairs[1].load_image().getpixel((0, 0)) == (30, 180, 60)
    assert read_pairs(world / "pairs.jsonl") == pairs
    assert detect_format(world) == "jsonl"


def test_jsonl_keeps_extra_keys_and_resolves_paths_from_the_file(tmp_path, world):
    (tmp_path / "sub").mkdir()
    record = {"image": "../world/images/000000.png", "caption": "red", "split": "train", "id": 7}
    path = write_lines(tmp_path / "sub" / "p.jsonl", [record])
    (pair,) = read_pairs(path)
    assert pair.meta == {"split": "train"} and pair.id == "7"
    assert pair.image == (world / "images" / "000000.png").resolve()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_file_formats_round_trip(tmp_path, world, suffix):
    pairs = read_pairs(world)
    pairs[0].caption = 'tricky, "quoted"\tcaption'
    out = tmp_path / "elsewhere" / f"pairs{suffix}"
    assert write_pairs(pairs, out) == [out]
    back = read_pairs(out)
    assert [p.image for p in back] == [p.image for p in pairs]
    assert summary(back) == summary(pairs)
    assert detect_format(out) == suffix[1:]
    if suffix != ".jsonl":
        assert out.read_text().splitlines()[0].split("\t" if suffix == ".tsv" else ",")[:3] == [
            "image",
            "caption",
            "id",
        ]


def test_csv_meta_comes_back_as_strings_and_columns_are_configurable(tmp_path, world):
    pairs = read_pairs(world)
    pairs[0].meta = {"score": 0.5, "source": "web"}
    back = read_pairs(write_pairs_csv(pairs, tmp_path / "p.csv"))
    assert back[0].meta == {"score": "0.5", "source": "web"} and back[1].meta == {"score": "", "source": ""}
    custom = tmp_path / "custom.csv"
    custom.write_text(f"file_name,text\n{world}/images/000002.png,a blue square\n")
    (pair,) = read_pairs(custom, image_column="file_name", caption_column="text")
    assert pair.caption == "a blue square" and pair.id is None
    with pytest.raises(DataError, match=r"line 1 of .*custom\.csv: the header has no column 'image'.*image_column"):
        read_pairs(custom)
    with pytest.raises(DataError, match=r"no column 'caption' \(columns: file_name, text\).*caption_column"):
        read_pairs(custom, image_column="file_name")


def test_folder_round_trip(tmp_path, world):
    pairs = read_pairs(world)
    folder = write_pairs_folder(pairs, tmp_path / "folder")
    assert sorted(p.name for p in folder.iterdir())[:2] == ["000000.png", "000000.txt"]
    back = read_pairs(folder)
    assert detect_format(folder) == "folder"
    assert [(p.caption, p.id, p.read_image_bytes()) for p in back] == [
        (p.caption, p.id, p.read_image_bytes()) for p in pairs
    ]


def test_folder_without_caption_file_is_a_bad_record(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    Image.new("RGB", (4, 4)).save(folder / "b.jpg")
    (folder / "b.txt").write_text("  a black square \n")
    with pytest.raises(DataError, match=r"a\.png: no caption file a\.txt"):
        read_pairs(folder)
    report = SkipReport()
    (pair,) = read_pairs(folder, skip_bad=True, report=report)
    assert pair.caption == "a black square" and pair.id == "b" and report.n_skipped == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        read_pairs(tmp_path / "empty")


def test_webdataset_round_trip_with_patterns_and_references(tmp_path, world):
    pairs = read_pairs(world)
    pairs[2].meta = {"rank": 3}
    shards = write_webdataset(pairs, tmp_path / "tars" / "shards-%06d.tar", shard_size=2)
    assert [s.name for s in shards] == ["shards-000000.tar", "shards-000001.tar", "shards-000002.tar"]
    with tarfile.open(shards[0]) as tf:
        assert tf.getnames() == ["000000.png", "000000.txt", "000000.json", "000001.png", "000001.txt", "000001.json"]
    for source in (str(tmp_path / "tars" / "shards-{000000..000002}.tar"), shards, tmp_path / "tars"):
        back = read_pairs(source)
        assert summary(back) == summary(pairs)
    assert wds.is_member_ref(back[0].image) and str(back[0].image).endswith("shards-000000.tar#000000.png")
    assert back[3].load_image().tobytes() == pairs[3].load_image().tobytes()
    # the same pairs give byte-identical shards
    again = write_webdataset(pairs, tmp_path / "again" / "s-{00..09}.tar", shard_size=2)
    assert [a.read_bytes() for a in again] == [s.read_bytes() for s in shards]


def test_tar_to_jsonl_writes_the_images_out(tmp_path, world):
    shards = write_webdataset(read_pairs(world), tmp_path / "one.tar", shard_size=10)
    out = write_pairs(read_pairs(shards[0]), tmp_path / "out" / "pairs.jsonl")[0]
    back = read_pairs(out)
    assert back[0].image == (tmp_path / "out" / "images" / "000000.png").resolve()
    assert summary(back) == summary(read_pairs(world))


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_tar_caption_from_json_and_bad_samples(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(jpg, "JPEG")
    shard = tmp_path / "raw.tar"
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "dir/a.jpg", jpg.getvalue())
        add_member(tf, "dir/a.json", json.dumps({"caption": "a red tile", "id": "A", "lang": "en"}).encode())
        add_member(tf, "dir/b.jpg", jpg.getvalue())
        add_member(tf, "dir/b.json", json.dumps({"width": 4}).encode())
        add_member(tf, "dir/c.txt", b"caption without image")
    report = SkipReport()
    (pair,) = read_pairs(shard, skip_bad=True, report=report)
    assert (pair.caption, pair.id, pair.meta) == ("a red tile", "A", {"lang": "en"})
    assert [loc for loc, _ in report.skipped] == [f"sample 'dir/b' in {shard}", f"sample 'dir/c' in {shard}"]
    assert "missing field 'caption'" in report.skipped[0][1] and "found 0" in report.skipped[1][1]
    with pytest.raises(DataError, match=r"sample 'dir/b' in .*raw\.tar: missing field 'caption'; each sample needs"):
        read_pairs(shard)


def test_truncated_tar_and_missing_shards(tmp_path, world):
    (shard,) = write_webdataset(read_pairs(world), tmp_path / "s.tar", shard_size=10)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"cut\.tar: not a readable tar shard, or truncated"):
        read_pairs(cut)
    report = SkipReport()
    read_pairs(cut, skip_bad=True, report=report)
    assert report.skipped[-1][0] == str(cut)
    # cut exactly after the last member: tarfile alone would read it as complete
    content = shard.read_bytes().rstrip(b"\0")
    cut.write_bytes(shard.read_bytes()[: -(-len(content) // 512) * 512])
    with pytest.raises(DataError, match="no end-of-archive marker"):
        read_pairs(cut)
    with pytest.raises(DataError, match=r"tar shard not found: .*s-002\.tar"):
        read_pairs(str(tmp_path / "s-{000..002}.tar"))
    with pytest.raises(DataError, match="names 2 shard"):
        write_webdataset(read_pairs(world), tmp_path / "x-{0..1}.tar", shard_size=2)


def test_expand_braces():
    assert wds.expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert wds.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert wds.split_key("x/y/0001.seg.png") == ("x/y/0001", "seg.png")
    assert wds.brace_pattern(["d1/s-0998.tar", "d1/s-0999.tar", "d1/s-1000.tar"]) == "d1/s-{0998..1000}.tar"
    assert wds.brace_pattern(["a.tar"]) == "a.tar" and wds.brace_pattern(["a.tar", "b.tar"]) is None


BAD_LINES = [
    ('{"image": "images/000000.png", "caption": "ok"', r"line 1 of .*bad\.jsonl: column 47: malformed JSON"),
    ({"image": "images/000000.png"}, r"line 1 of .*bad\.jsonl: missing field 'caption'; each line needs \{\"image\""),
    ({"image": "images/000000.png", "caption": 5}, r"line 1 of .*: field 'caption' must be a string, got a number"),
    ({"image": "images/nope.png", "caption": "x"}, r"line 1 of .*: field 'image': image file not found: .*nope\.png"),
    ({"image": "images/000000.png", "caption": "  "}, r"line 1 of .*: field 'caption' is empty"),
    ('["image", "caption"]', r"line 1 of .*: expected a JSON object, got a list"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_jsonl_records_name_file_line_and_field(world, line, message):
    path = write_lines(world / "bad.jsonl", [line])
    with pytest.raises(DataError, match=message):
        read_pairs(path)


def test_skip_bad_collects_every_bad_record(world, capsys):
    good = {"image": "images/000001.png", "caption": "fine"}
    path = write_lines(world / "mixed.jsonl", [good, BAD_LINES[0][0], good, BAD_LINES[1][0], "", good])
    report = SkipReport()
    pairs = read_pairs(path, skip_bad=True, report=report)
    assert len(pairs) == 3 and report.n_ok == 3 and report.n_skipped == 2
    assert [loc.split(" of ")[0] for loc, _ in report.skipped] == ["line 2", "line 4"]
    assert "3 records read, 2 skipped" in report.summary()
    assert report.to_dict()["skipped"][1]["reason"].startswith("missing field 'caption'")
    capsys.readouterr()
    assert len(read_pairs(path, skip_bad=True)) == 3  # no report given: a warning goes to stderr
    assert "2 skipped" in capsys.readouterr().err


def test_csv_bad_rows_name_the_line(world):
    path = world / "bad.csv"
    path.write_text("image,caption\nimages/000000.png,fine\nimages/000001.png,\nimages/000002.png,x,extra\n")
    with pytest.raises(DataError, match=r"line 3 of .*bad\.csv: field 'caption' is empty"):
        read_pairs(path)
    report = SkipReport()
    read_pairs(path, skip_bad=True, report=report)
    assert report.skipped[1][0].startswith("line 4") and "3 fields but the header has 2" in report.skipped[1][1]


def test_missing_sources_and_unknown_formats(tmp_path):
    with pytest.raises(DataError, match=r"pairs source not found: .*nowhere\.jsonl"):
        read_pairs(tmp_path / "nowhere.jsonl")
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match=r"unknown pairs format '\.parquet'"):
        read_pairs(tmp_path / "data.parquet")
    with pytest.raises(DataError, match=r"unknown output format '\.json'"):
        write_pairs([], tmp_path / "out.json")
    with pytest.raises(DataError, match="caption must be a non-empty string"):
        Pair(tmp_path / "a.png", "")
