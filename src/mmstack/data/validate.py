"""Check a data set end to end: read every record (collecting the bad ones) and optionally decode every image."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmstack.data.conversations import read_conversations
from mmstack.data.images import load_image
from mmstack.data.pairs import detect_format, read_pairs
from mmstack.data.preferences import read_preferences
from mmstack.data.records import SkipReport
from mmstack.errors import ConfigError, ImageError

KINDS = ("pairs", "conversations", "preferences")


def guess_kind(path: str | Path) -> str:
    """``pairs``, ``conversations`` or ``preferences``: ``.json`` files are conversations; a ``.jsonl``
    file's first record decides (``"conversations"`` or ``"chosen"`` keys); everything else is pairs."""
    path = Path(str(path))
    if path.suffix.lower() == ".json":
        return "conversations"
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            keys = json.loads(first).keys()
        except (json.JSONDecodeError, AttributeError):
            return "pairs"  # the pairs reader will report the malformed line
        if "conversations" in keys:
            return "conversations"
        if "chosen" in keys:
            return "preferences"
    return "pairs"


def validate_data(
    source: str | Path,
    kind: str | None = None,
    image_root: str | Path | None = None,
    decode: bool = False,
    show: int = 10,
) -> dict[str, Any]:
    """Read ``source`` as ``kind`` (guessed when ``None``) with bad records collected, not raised.

    Args:
        decode: also fully decode every image (finds truncated or corrupt files; slower).
        show: how many bad records to list in the result.

    Returns:
        ``{"path", "kind", "format", "n_ok", "n_bad", "bad": [{"location", "reason"}, ...], "ok"}``.
        A missing file or folder still raises ``DataError``.
    """
    kind = kind or guess_kind(source)
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    report = SkipReport()
    if kind == "pairs":
        fmt = detect_format(source)
        records = read_pairs(source, skip_bad=True, report=report)
    elif kind == "conversations":
        fmt = "jsonl" if str(source).lower().endswith(".jsonl") else "json"
        records = read_conversations(source, image_root=image_root, skip_bad=True, report=report)
    else:
        fmt = "jsonl"
        records = read_preferences(source, skip_bad=True, report=report)
    if decode:
        _decode_all((getattr(r, "image", None) for r in records), report)
    summary = report.to_dict(limit=show)
    return {
        "path": str(source),
        "kind": kind,
        "format": fmt,
        "n_ok": summary["n_ok"],
        "n_bad": summary["n_skipped"],
        "bad": summary["skipped"],
        "ok": summary["n_skipped"] == 0,
    }


def _decode_all(images: Iterable[Path | None], report: SkipReport) -> None:
    from mmstack.utils.progress import make_progress

    images = [p for p in images if p is not None]
    with make_progress() as progress:
        for image in progress.track(images, description="decoding images"):
            try:
                load_image(image)
            except ImageError as err:
                report.add(str(image), str(err))
                report.n_ok -= 1
