"""Preference pairs for reward models and DPO: JSONL ``{"image", "prompt", "chosen", "rejected"}``.

``image`` may be omitted for text-only preferences; ``prompt``, ``chosen`` and ``rejected`` are
non-empty strings and ``chosen`` must differ from ``rejected`` (ignoring surrounding whitespace), since
an identical pair teaches nothing. Extra keys (e.g. the shapes world's ``"rejection"`` kind) are kept in
``meta``. Image paths are relative to the file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from mmstack.utils.atomic import atomic_write_text

HINT = 'each line needs {"image": <path, optional>, "prompt": ..., "chosen": ..., "rejected": ...}'
_FIELDS = ("id", "image", "prompt", "chosen", "rejected")


@dataclass
class Preference:
    """A prompt (about ``image``, if any) with a preferred and a dispreferred answer."""

    image: Path | None
    prompt: str
    chosen: str
    rejected: str
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = Path(self.image) if self.image is not None else None
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise BadRecord(f"field '{name}' must be a non-empty string, got {value!r}; {HINT}")
        if self.chosen.strip() == self.rejected.strip():
            raise BadRecord(
                f"'chosen' equals 'rejected' ({self.chosen!r}); a preference pair needs two different answers"
            )


def read_preferences(path: str | Path, skip_bad: bool = False, report: SkipReport | None = None) -> list[Preference]:
    """Read a preferences JSONL file (or ``DIR/preferences.jsonl``).

    Raises:
        DataError: naming the file, the line, the field and the fix (unless ``skip_bad``; then the bad
            lines are listed in ``report``).
    """
    path = require_file(path, "preferences file", "check the path", default_name="preferences.jsonl")
    guard = RecordGuard(skip_bad, report)
    prefs = []
    for lineno, line in iter_lines(path):
        try:
            prefs.append(_preference_from_record(parse_json_object(line, HINT), path.parent))
        except BadRecord as err:
            guard.reject(f"line {lineno} of {path}", err)
            continue
        guard.accept()
    guard.done(path)
    return prefs


def _preference_from_record(obj: dict[str, Any], base: Path) -> Preference:
    image_value = get_str(obj, "image", HINT, required=False)
    image = resolve_image(image_value, base) if image_value is not None else None
    prompt, chosen, rejected = (get_str(obj, name, HINT) for name in ("prompt", "chosen", "rejected"))
    meta = {k: v for k, v in obj.items() if k not in _FIELDS}
    return Preference(image, prompt, chosen, rejected, get_id(obj, HINT), meta)


def write_preferences(prefs: Iterable[Preference], path: str | Path) -> Path:
    """Write preferences as JSONL (keys sorted), image paths relative to the file's folder, atomically."""
    path = Path(path)
    lines = []
    for p in prefs:
        record: dict[str, Any] = {**p.meta, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        if p.image is not None:
            record["image"] = relative_to(p.image, path.parent)
        if p.id is not None:
            record["id"] = p.id
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    atomic_write_text(path, "".join(lines))
    return path
