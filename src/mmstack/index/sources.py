"""Sources: turn the paths given to ``mmstack index build --source`` into *units* with fingerprints.

A unit is what incremental indexing tracks: one image file, one image-text pair, one text document or
one world clip. Its fingerprint is (size, mtime) of its files, which is cheap to read for every unit on
every run, and a content hash (blake2b of its bytes plus its non-file content such as a caption),
computed only when the cheap fingerprint changed. A unit becomes one or more *items* (rows with a vector)
when it is loaded: a document becomes chunks, a clip becomes sampled frames (or one pooled vector).

Recognised sources:

- a folder with ``pairs.jsonl`` (the shapes-world layout): its pairs, and its clips when ``clips.jsonl``
  is there; a folder with only ``clips.jsonl``: its clips;
- a pairs file (``.jsonl``, ``.csv``, ``.tsv``) or webdataset ``.tar`` shards (``mmstack.data.pairs``);
- any other folder, walked recursively: images (jpg, png, webp, gif, bmp, tiff), where an image with a
  same-name ``.txt`` is a pair with that caption, and text documents (``.txt``, ``.md``);
- a single image or text file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmstack.data.images import IMAGE_SUFFIXES
from mmstack.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
PAIRS_SUFFIXES = (".jsonl", ".csv", ".tsv", ".tar")
KINDS = ("image", "pair", "text", "clip")


@dataclass
class Unit:
    """One tracked thing on disk (see the module docstring).

    Args:
        uid: stable key: the file's absolute path, or ``pairs_file#id`` / ``clips_dir#id``.
        kind: ``image``, ``pair``, ``text`` or ``clip``.
        source: the source path it came from (absolute), for filters and stats.
        path: the file shown in hits (the image, the document, a clip's first frame).
        parts: files whose bytes make the content hash (tar members as ``shard.tar#member``).
        extra: non-file content that belongs in the hash (a caption, a clip record).
        meta: caption, tags and other metadata stored with the items.
    """

    uid: str
    kind: str
    source: str
    path: str
    parts: tuple[str, ...]
    extra: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    size: int = -1
    mtime_ns: int = -1
    hash: str | None = None

    def stat(self) -> None:
        """Fill ``size`` (sum) and ``mtime_ns`` (max) from the parts; a missing part raises DataError."""
        size, mtime = len(self.extra.encode()), 0
        for part in self.parts:
            try:
                st = os.stat(_file_of(part))
            except OSError as err:
                raise DataError(f"{part}: cannot read ({err.strerror})") from None
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
        self.size, self.mtime_ns = size, mtime

    def content_hash(self) -> str:
        """blake2b over the parts' bytes and ``extra``; cached on the unit."""
        if self.hash is None:
            h = hashlib.blake2b(digest_size=16)
            for part in self.parts:
                h.update(read_part(part))
                h.update(b"\0")
            h.update(self.extra.encode())
            self.hash = h.hexdigest()
        return self.hash


def _file_of(part: str) -> str:
    """The file on disk that holds ``part`` (a tar shard for member references)."""
    from mmstack.data.webdataset import is_member_ref

    if not os.path.exists(part) and is_member_ref(Path(part)):
        return part.split("#", 1)[0]
    return part


def read_part(part: str) -> bytes:
    """Bytes of a file or of a ``shard.tar#member`` reference."""
    if os.path.isfile(part):
        with open(part, "rb") as f:
            return f.read()
    from mmstack.data.webdataset import read_member

    try:
        return read_member(Path(part))
    except Exception as err:
        raise DataError(f"{part}: cannot read ({err})") from None


# ------------------------------------------------------------------------------------------- scanning


def scan_source(path: str | Path, skip: Path | None = None) -> Iterator[Unit]:
    """Units of one source path, in a deterministic order (see the module docstring).

    Args:
        path: a folder or a file.
        skip: a folder never to walk into (the collection itself, when it lives inside a source).
    """
    root = Path(path).resolve()
    source = str(root)
    if not root.exists():
        raise DataError(f"--source {path}: not found; pass a folder of images/documents, a pairs file or a world")
    if root.is_dir() and ((root / "pairs.jsonl").is_file() or (root / "clips.jsonl").is_file()):
        if (root / "pairs.jsonl").is_file():
            yield from _pair_units(root / "pairs.jsonl", source)
        if (root / "clips.jsonl").is_file():
            yield from clip_units(root, source)
    elif root.is_file() and root.suffix.lower() in PAIRS_SUFFIXES:
        yield from _pair_units(root, source)
    elif root.is_file():
        unit = _file_unit(root, source, captions={})
        if unit is None:
            raise DataError(
                f"--source {path}: unsupported file type {root.suffix!r}; expected an image "
                f"({', '.join(IMAGE_SUFFIXES)}), a text document (.txt, .md) or a pairs file (.jsonl, .csv, .tsv, .tar)"
            )
        yield unit
    else:
        yield from _walk(root, source, skip)


def _walk(root: Path, source: str, skip: Path | None) -> Iterator[Unit]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip))
        names = sorted(f for f in filenames if not f.startswith("."))
        stems = {Path(f).stem for f in names if Path(f).suffix.lower() in IMAGE_SUFFIXES}
        captions = {Path(f).stem: here / f for f in names if f.endswith(".txt") and Path(f).stem in stems}
        for name in names:
            p = here / name
            if p.suffix.lower() == ".txt" and p.stem in captions:
                continue  # a caption beside its image, not a document
            unit = _file_unit(p, source, captions)
            if unit is not None:
                yield unit


def _file_unit(p: Path, source: str, captions: dict[str, Path]) -> Unit | None:
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        cap = captions.get(p.stem)
        if cap is None:
            return Unit(str(p), "image", source, str(p), (str(p),))
        return Unit(str(p), "pair", source, str(p), (str(p), str(cap)), meta={"caption_file": str(cap)})
    if suffix in TEXT_SUFFIXES:
        return Unit(str(p), "text", source, str(p), (str(p),))
    return None


def _pair_units(pairs_file: Path, source: str) -> Iterator[Unit]:
    from mmstack.data.pairs import read_pairs
    from mmstack.data.records import SkipReport

    report = SkipReport()
    pairs = read_pairs(pairs_file, skip_bad=True, report=report)
    for loc, reason in report.skipped:
        yield Unit(f"{pairs_file}#bad:{loc}", "pair", source, str(pairs_file), (), meta={"error": f"{loc}: {reason}"})
    for i, pair in enumerate(pairs):
        pid = pair.id if pair.id is not None else str(i)
        meta = {k: v for k, v in pair.meta.items() if _jsonable(v)}
        meta["caption"] = pair.caption
        meta["id"] = pid
        extra = json.dumps({"caption": pair.caption, "meta": meta}, sort_keys=True, ensure_ascii=False)
        yield Unit(f"{pairs_file}#{pid}", "pair", source, str(pair.image), (str(pair.image),), extra, meta)


def clip_units(world: Path, source: str) -> Iterator[Unit]:
    """One unit per record of ``world/clips.jsonl`` ({"id", "frames", "caption", ...})."""
    path = world / "clips.jsonl"
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            cid, frames = str(rec["id"]), [str(world / f) for f in rec["frames"]]
            if not frames:
                raise ValueError("no frames")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            yield Unit(f"{path}#line{lineno}", "clip", source, str(path), (), meta={"error": f"{path}:{lineno}: {err}"})
            continue
        meta = {"caption": str(rec.get("caption", "")), "id": cid, "n_frames": len(frames)}
        for key in ("motions", "tags"):
            if key in rec:
                meta[key] = rec[key]
        extra = json.dumps(meta, sort_keys=True, ensure_ascii=False)
        yield Unit(f"{path}#{cid}", "clip", source, frames[0], tuple(frames), extra, meta)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- chunking


def chunk_text(text: str, words: int = 120, overlap: int = 20) -> list[str]:
    """Split a document into chunks of at most ``words`` words.

    Paragraphs are packed whole while they fit, so a chunk rarely cuts a thought in two; a paragraph longer
    than ``words`` is cut into windows that overlap by ``overlap`` words. 120 words stays under MiniLM's
    256-token limit.
    """
    step = max(1, words - overlap)
    chunks: list[list[str]] = []
    current: list[str] = []
    for para in (p.split() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para:
            continue
        pieces = [para] if len(para) <= words else [para[s : s + words] for s in range(0, len(para) - overlap, step)]
        for piece in pieces:
            if current and len(current) + len(piece) > words:
                chunks.append(current)
                current = []
            current = current + piece
    if current:
        chunks.append(current)
    return [" ".join(c) for c in chunks]
