"""Image-text pairs on disk: read any of five layouts into ``Pair`` records, write them back atomically.

Layouts ``read_pairs`` recognises from the path:

- ``*.jsonl``: one ``{"image": ..., "caption": ..., "id": ...}`` object per line; other keys go to ``meta``;
  image paths are relative to the file's folder.
- ``*.csv`` / ``*.tsv``: a header row with an image and a caption column (names configurable), optional
  ``id``; other columns go to ``meta`` as strings.
- a folder with ``pairs.jsonl`` (the shapes-world layout, ``DIR/pairs.jsonl`` + ``DIR/images/...``).
- a folder of images, each with a same-name ``.txt`` caption (searched recursively; ``id`` is the path
  below the folder without the suffix).
- webdataset tar shards: a ``.tar`` file, a list of them, a brace pattern (``shards-{000..003}.tar``) or a
  folder holding only shards. A sample is one image (.jpg/.png/.webp/...) plus a caption in ``.txt`` or
  in ``.json["caption"]``; other ``.json`` keys go to ``meta``, ``.json["id"]`` (else the key) is the id.

Images inside tars are not copied out: ``Pair.image`` is then a ``shard.tar#member`` reference that
``Pair.load_image`` / ``mmstack.data.images.load_image`` read with one seek (see ``mmstack.data.webdataset``),
so every pair has one ``image`` field whatever its source and no image bytes are held in memory.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmstack.data import webdataset as wds
from mmstack.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, load_image
from mmstack.data.records import (
    BadRecord,
    RecordGuard,
    SkipReport,
    get_id,
    get_str,
    iter_lines,
    parse_json_object,
    relative_to,
    require_file,
    resolve_image,
)
from mmstack.errors import DataError
from mmstack.utils.atomic import atomic_dir, atomic_write_bytes, atomic_write_text

JSONL_HINT = 'each line needs {"image": "<path relative to the file>", "caption": "<text>"}'
FOLDER_HINT = "each image needs a caption in a same-name .txt file"
TAR_HINT = 'each sample needs one image (.jpg/.png/.webp) and a caption (.txt, or .json with "caption")'
TAR_IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)
_RESERVED = ("image", "caption", "id")


@dataclass
class Pair:
    """One image with its caption.

    ``image`` is a file path, or for pairs read from tar shards a ``shard.tar#member`` reference;
    use ``load_image`` / ``read_image_bytes`` rather than opening it directly.
    """

    image: Path
    caption: str
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        if not isinstance(self.caption, str) or not self.caption.strip():
            raise BadRecord(f"caption must be a non-empty string, got {self.caption!r}")

    @property
    def in_tar(self) -> bool:
        return wds.is_member_ref(self.image) and not self.image.is_file()

    def read_image_bytes(self) -> bytes:
        """The encoded image file, from disk or from its tar shard."""
        return wds.read_member(self.image) if self.in_tar else self.image.read_bytes()

    def load_image(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The decoded RGB image (see ``mmstack.data.images.load_image``)."""
        return load_image(self.image, max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------- reading


def detect_format(source: str | Path | Sequence[str | Path]) -> str:
    """``"jsonl"``, ``"csv"``, ``"tsv"``, ``"folder"`` or ``"webdataset"`` for a pairs source."""
    if not isinstance(source, (str, Path)) or ("{" in str(source) and not Path(source).exists()):
        return "webdataset"  # a list of shards or a brace pattern
    path = Path(source)
    if path.is_dir():
        if (path / "pairs.jsonl").is_file():
            return "jsonl"
        has_images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        return "webdataset" if not has_images and any(path.glob("*.tar")) else "folder"
    if not path.exists():
        raise DataError(
            f"pairs source not found: {path}; pass a .jsonl/.csv/.tsv file, a folder (images with .txt "
            "captions, or pairs.jsonl inside) or .tar shards"
        )
    kind = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tar": "webdataset"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown pairs format {path.suffix!r}; use .jsonl, .csv, .tsv, .tar or a folder")
    return kind


def read_pairs(
    source: str | Path | Sequence[str | Path],
    skip_bad: bool = False,
    report: SkipReport | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[Pair]:
    """Read image-text pairs from any supported layout (see the module docstring), in file order.

    Args:
        source: a file, a folder, a tar shard pattern, or a list of tar shards.
        skip_bad: skip invalid records instead of raising; they are listed in ``report``.
        report: collects ``(location, reason)`` of skipped records and the count of good ones.
        image_column, caption_column: column names for CSV/TSV files.

    Raises:
        DataError: a missing source, or (unless ``skip_bad``) the first bad record, naming file, line or
            sample, the field and the fix.
    """
    guard = RecordGuard(skip_bad, report)
    kind = detect_format(source)
    if kind == "jsonl":
        path = Path(source)
        pairs = _read_jsonl(path / "pairs.jsonl" if path.is_dir() else path, guard)
    elif kind in ("csv", "tsv"):
        pairs = _read_table(Path(source), guard, image_column, caption_column)
    elif kind == "folder":
        pairs = _read_folder(Path(source), guard)
    else:
        pairs = _read_shards(_shards_of(source), guard)
    guard.done(source if isinstance(source, (str, Path)) else f"{len(source)} shards")
    return pairs


def _read_jsonl(path: Path, guard: RecordGuard) -> list[Pair]:
    require_file(path, "pairs file", "check the path")
    pairs = []
    for lineno, line in iter_lines(path):
        try:
            obj = parse_json_object(line, JSONL_HINT)
            pairs.append(_pair_from_record(obj, path.parent, JSONL_HINT))
        except BadRecord as err:
            guard.reject(f"line {lineno} of {path}", err)
            continue
        guard.accept()
    return pairs


def _pair_from_record(obj: dict[str, Any], base: Path, hint: str) -> Pair:
    image_value, caption = get_str(obj, "image", hint), get_str(obj, "caption", hint)
    image = resolve_image(image_value, base)
    meta = {k: v for k, v in obj.items() if k not in _RESERVED}
    return Pair(image, caption, get_id(obj, hint), meta)


def _read_table(path: Path, guard: RecordGuard, image_column: str, caption_column: str) -> list[Pair]:
    require_file(path, "pairs file", "check the path")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    hint = f"each row needs non-empty '{image_column}' and '{caption_column}' columns"
    pairs = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for col, flag in ((image_column, "image_column"), (caption_column, "caption_column")):
            if col not in columns:
                raise DataError(
                    f"line 1 of {path}: the header has no column '{col}' (columns: {', '.join(columns) or 'none'}); "
                    f"add it or pass {flag}= (CLI: --{flag.replace('_', '-')}) naming the right column"
                )
        for row in reader:
            try:
                pairs.append(_pair_from_row(row, len(columns), path.parent, image_column, caption_column, hint))
            except BadRecord as err:
                guard.reject(f"line {reader.line_num} of {path}", err)
                continue
            guard.accept()
    return pairs


def _pair_from_row(row: dict, n_columns: int, base: Path, image_col: str, caption_col: str, hint: str) -> Pair:
    if None in row or None in row.values():
        n_fields = n_columns + len(row.get(None, [])) - sum(v is None for v in row.values())
        raise BadRecord(
            f"row has {n_fields} fields but the header has {n_columns}; quote fields that contain the delimiter"
        )
    image_value, caption = get_str(row, image_col, hint), get_str(row, caption_col, hint)
    image = resolve_image(image_value, base, image_col)
    meta = {k: v for k, v in row.items() if k not in (image_col, caption_col, "id")}
    return Pair(image, caption, row.get("id") or None, meta)


def _read_folder(folder: Path, guard: RecordGuard) -> list[Pair]:
    images = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not images:
        raise DataError(
            f"no images found in {folder}; a pairs folder holds images ({', '.join(IMAGE_SUFFIXES)}) with "
            "same-name .txt captions, a pairs.jsonl, or .tar shards"
        )
    pairs = []
    for image in images:
        text_file = image.with_suffix(".txt")
        try:
            if not text_file.is_file():
                raise BadRecord(f"no caption file {text_file.name}; {FOLDER_HINT}")
            caption = text_file.read_text(encoding="utf-8").strip()
            if not caption:
                raise BadRecord(f"caption file {text_file.name} is empty; {FOLDER_HINT}")
        except (BadRecord, UnicodeDecodeError) as err:
            guard.reject(str(image), err if isinstance(err, BadRecord) else f"{text_file.name} is not UTF-8 text")
            continue
        pairs.append(Pair(image.resolve(), caption, image.relative_to(folder).with_suffix("").as_posix()))
        guard.accept()
    return pairs


def _shards_of(source: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return sorted(Path(source).glob("*.tar"))
    return wds.expand_shards(source)


def _read_shards(shards: list[Path], guard: RecordGuard) -> list[Pair]:
    pairs = []
    for shard in map(Path, map(os.path.abspath, shards)):  # absolute, so member references outlive a chdir
        try:
            for sample in wds.iter_samples(shard):
                location = f"sample '{sample.key}' in {shard}"
                try:
                    pairs.append(_pair_from_sample(sample))
                except BadRecord as err:
                    guard.reject(location, err)
                    continue
                guard.accept()
        except DataError as err:  # an unreadable shard: skip the rest of it when asked to
            if not guard.skip_bad:
                raise
            guard.report.add(str(shard), str(err))
    return pairs


def _pair_from_sample(sample: wds.TarSample) -> Pair:
    if sample.problems:
        raise BadRecord(f"{sample.problems[0]}; {TAR_HINT}")
    images = [ext for ext in sample.members if ext in TAR_IMAGE_EXTS]
    if len(images) != 1:
        found = ", ".join(sample.members) or "nothing"
        raise BadRecord(f"expected one image, found {len(images)} (members: {found}); {TAR_HINT}")
    info: dict[str, Any] = {}
    if "json" in sample.members:
        try:
            info = json.loads(sample.members["json"].read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRecord(f"member {sample.key}.json: malformed JSON ({err}); {TAR_HINT}") from None
        if not isinstance(info, dict):
            raise BadRecord(f"member {sample.key}.json must hold a JSON object; {TAR_HINT}")
    if "txt" in sample.members:
        info["caption"] = sample.members["txt"].read().decode("utf-8", errors="replace").strip()
    caption = get_str(info, "caption", TAR_HINT)
    meta = {k: v for k, v in info.items() if k not in _RESERVED}
    return Pair(sample.members[images[0]].ref, caption, get_id(info, TAR_HINT) or sample.key, meta)


# ---------------------------------------------------------------------------------------------- writing


def output_format(dst: str | Path) -> str:
    """The format ``write_pairs`` uses for ``dst``: jsonl, csv, tsv, webdataset or folder."""
    suffix = Path(str(dst)).suffix.lower()
    kinds = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".tar": "webdataset"}
    if suffix in kinds:
        return kinds[suffix]
    if suffix and not Path(dst).is_dir():
        raise DataError(f"{dst}: unknown output format {suffix!r}; use .jsonl, .csv, .tsv, a .tar pattern or a folder")
    return "folder"


def write_pairs(pairs: Sequence[Pair], dst: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write ``pairs`` in the format named by ``dst``: ``.jsonl``, ``.csv``, ``.tsv``, ``*.tar`` (a single
    shard or a pattern such as ``shards-%06d.tar`` / ``shards-{000..999}.tar``) or a folder (no suffix).

    Returns:
        The files written (the data file, the shards, or the folder).
    """
    kind = output_format(dst)
    if kind == "jsonl":
        return [write_pairs_jsonl(pairs, dst)]
    if kind in ("csv", "tsv"):
        return [write_pairs_csv(pairs, dst)]
    if kind == "webdataset":
        return write_webdataset(pairs, str(dst), shard_size)
    return [write_pairs_folder(pairs, dst)]


def write_pairs_jsonl(pairs: Iterable[Pair], path: str | Path, images_dir: str | Path | None = None) -> Path:
    """Write ``pairs`` as JSON lines (keys sorted) with image paths relative to the file's folder.

    Images already on disk are referenced, not copied; images inside tar shards are written to
    ``images_dir`` (default: ``images/`` beside the file).
    """
    path = Path(path)
    images = _materialise(list(pairs), Path(images_dir) if images_dir else path.parent / "images")
    lines = []
    for pair, image in images:
        record = {**pair.meta, "image": relative_to(image, path.parent), "caption": pair.caption}
        if pair.id is not None:
            record["id"] = pair.id
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True, default=str))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def write_pairs_csv(pairs: Iterable[Pair], path: str | Path, images_dir: str | Path | None = None) -> Path:
    """Write ``pairs`` as CSV (or TSV for a ``.tsv`` path): columns image, caption, id, then meta keys.

    Non-string meta values are written as JSON (they read back as strings). Images as for JSONL.
    """
    path = Path(path)
    images = _materialise(list(pairs), Path(images_dir) if images_dir else path.parent / "images")
    meta_keys = sorted({k for pair, _ in images for k in pair.meta if k not in _RESERVED})
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    writer.writerow(["image", "caption", "id", *meta_keys])
    for pair, image in images:
        meta = [_cell(pair.meta.get(k)) for k in meta_keys]
        writer.writerow([relative_to(image, path.parent), pair.caption, pair.id or "", *meta])
    atomic_write_text(path, buf.getvalue())
    return path


def write_pairs_folder(pairs: Iterable[Pair], out_dir: str | Path) -> Path:
    """Write a folder of images with same-name ``.txt`` captions (``meta`` is not kept in this layout).

    File names come from the ids (made file-system safe) or the index; the folder is replaced atomically.
    """
    pairs = list(pairs)
    names = _file_names(pairs)
    with atomic_dir(out_dir) as tmp:
        for pair, name in zip(pairs, names, strict=True):
            target = tmp / f"{name}{_image_suffix(pair)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(pair.read_image_bytes())
            (tmp / f"{name}.txt").write_text(pair.caption + "\n", encoding="utf-8")
    return Path(out_dir)


def write_webdataset(pairs: Sequence[Pair], out_pattern: str | Path, shard_size: int = 1000) -> list[Path]:
    """Write webdataset tar shards: per pair ``<key>.<ext>`` (image), ``<key>.txt`` (caption) and
    ``<key>.json`` (id and meta). Keys are the running index (``000000``...), so they are unique.

    Args:
        out_pattern: ``out/shards-%06d.tar``, ``out/shards-{000..099}.tar`` or, for one shard, ``out/x.tar``.
        shard_size: samples per shard.

    Returns:
        The shard paths written (byte-identical for identical input).
    """
    pairs = list(pairs)
    width = max(6, len(str(len(pairs) - 1)))
    samples = []
    for i, pair in enumerate(pairs):
        members = {_image_suffix(pair)[1:]: pair.read_image_bytes(), "txt": pair.caption.encode("utf-8")}
        info = {**pair.meta, **({"id": pair.id} if pair.id is not None else {})}
        if info:
            members["json"] = json.dumps(info, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
        samples.append((str(i).zfill(width), members))
    return wds.write_shards(samples, out_pattern, shard_size)


def _materialise(pairs: list[Pair], images_dir: Path) -> list[tuple[Pair, Path]]:
    """Pairs with an on-disk image path; images held in tar shards are written to ``images_dir``."""
    names = _file_names(pairs)
    out = []
    for pair, name in zip(pairs, names, strict=True):
        image = pair.image
        if pair.in_tar:
            image = images_dir / f"{name}{_image_suffix(pair)}"
            atomic_write_bytes(image, pair.read_image_bytes())
        out.append((pair, image))
    return out


def _file_names(pairs: Sequence[Pair]) -> list[str]:
    """File-system safe, unique names: the id when it has one, otherwise the index."""
    names, used = [], set()
    for i, pair in enumerate(pairs):
        name = re.sub(r"[^\w\-/]+", "_", pair.id).strip("/") if pair.id else ""
        if not name or name in used or ".." in name:
            name = f"{i:06d}"
            while name in used:
                name = f"{name}_"
        used.add(name)
        names.append(name)
    return names


def _image_suffix(pair: Pair) -> str:
    name = wds.split_member_ref(pair.image)[1] if pair.in_tar else pair.image.name
    return "." + wds.split_key(name)[1] if pair.in_tar else Path(name).suffix.lower()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
