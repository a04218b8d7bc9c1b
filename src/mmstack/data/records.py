"""Record-level plumbing shared by the readers: bad-record errors, skip reports, JSON lines, field checks.

Every reader works the same way: it parses one record at a time; a problem with a record raises
``BadRecord`` (a ``DataError``) with the field and the fix; the reader adds the location (file and
line, record index or tar sample) and then either raises it or, with ``skip_bad=True``, files it in a
``SkipReport`` and goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmstack.errors import DataError


class BadRecord(DataError):
    """One record is invalid; the message names the field and the fix, readers prefix the location."""


@dataclass
class SkipReport:
    """What readers skipped with ``skip_bad=True``: ``(location, reason)`` per bad record, and good counts."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_ok: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def add(self, location: str, reason: str) -> None:
        self.skipped.append((location, reason))

    def summary(self, limit: int = 5) -> str:
        """One line per skipped record (at most ``limit``), after a count line."""
        lines = [f"{self.n_ok} records read, {self.n_skipped} skipped"]
        lines += [f"  {loc}: {reason}" for loc, reason in self.skipped[:limit]]
        if self.n_skipped > limit:
            lines.append(f"  ... and {self.n_skipped - limit} more")
        return "\n".join(lines)

    def to_dict(self, limit: int = 20) -> dict[str, Any]:
        """JSON-ready: counts and the first ``limit`` bad records."""
        return {
            "n_ok": self.n_ok,
            "n_skipped": self.n_skipped,
            "skipped": [{"location": loc, "reason": reason} for loc, reason in self.skipped[:limit]],
        }


class RecordGuard:
    """Raise bad records as ``DataError`` or, with ``skip_bad``, collect them in a ``SkipReport``.

    When the caller asked to skip but passed no report, a one-line summary goes to stderr at ``done``
    so skipped records are never silent.
    """

    def __init__(self, skip_bad: bool, report: SkipReport | None) -> None:
        self.skip_bad = skip_bad
        self.owns_report = report is None
        self.report = report if report is not None else SkipReport()

    def reject(self, location: str, err: Exception | str) -> None:
        if not self.skip_bad:
            raise DataError(f"{location}: {err}") from None
        self.report.add(location, str(err))

    def accept(self, n: int = 1) -> None:
        self.report.n_ok += n

    def done(self, source: str | Path) -> None:
        if self.owns_report and self.report.n_skipped:
            from mmstack.utils.progress import console

            console.print(f"[yellow]warning:[/] {source}: {self.report.summary()}", soft_wrap=True, markup=False)


def require_file(path: str | Path, what: str, fix: str, default_name: str | None = None) -> Path:
    """``path`` as a Path, or a ``DataError`` that names it when it is missing or a folder.

    A folder holding ``default_name`` (the shapes-world layout, e.g. ``DIR/conversations.json``) stands
    for that file.
    """
    path = Path(path)
    if default_name and path.is_dir() and (path / default_name).is_file():
        return path / default_name
    if not path.exists():
        raise DataError(f"{what} not found: {path}; {fix}")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, expected a file; {fix}")
    return path


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for the non-blank lines of a UTF-8 text file (numbers start at 1)."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None


def parse_json_object(text: str, hint: str) -> dict[str, Any]:
    """Parse one JSON object; malformed JSON names the column, a non-object names its type."""
    try:
        obj = json.loads(text.rstrip("\r\n"))  # so an error at the end of the line keeps its column
    except json.JSONDecodeError as err:
        raise BadRecord(f"column {err.colno}: malformed JSON ({err.msg}); {hint}") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type_name(obj)}; {hint}")
    return obj


def load_json_file(path: Path) -> Any:
    """Parse a whole JSON file; malformed JSON names the line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"line {err.lineno}, column {err.colno} of {path}: malformed JSON ({err.msg}); fix the file or "
            "re-export it with a JSON writer"
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None


def type_name(value: Any) -> str:
    """JSON-ish name of a value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    names[float] = "a number"
    return "null" if value is None else names.get(type(value), type(value).__name__)


def get_str(obj: dict[str, Any], name: str, hint: str, required: bool = True, label: str | None = None) -> str | None:
    """A non-empty string field, or ``None`` when optional and absent/null; else ``BadRecord``.

    ``label`` is how messages call the field when it is nested (e.g. ``conversations[2].value``).
    """
    value, label = obj.get(name), label or name
    if value is None:
        if required:
            raise BadRecord(f"missing field '{label}'; {hint}")
        return None
    if not isinstance(value, str):
        raise BadRecord(f"field '{label}' must be a string, got {type_name(value)} ({_short(value)}); {hint}")
    if not value.strip():
        raise BadRecord(f"field '{label}' is empty; {hint}")
    return value


def get_id(obj: dict[str, Any], hint: str, required: bool = False) -> str | None:
    """The ``id`` field as a string (numbers are accepted and turned into strings)."""
    value = obj.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return get_str(obj, "id", hint, required=required)


def resolve_image(value: str, base: Path, name: str = "image") -> Path:
    """Absolute path of an image field relative to ``base``; ``BadRecord`` if the file does not exist."""
    path = Path(os.path.abspath(base / value))  # abspath: normalise '..' without following symlinks
    if not path.is_file():
        raise BadRecord(f"field '{name}': image file not found: {path}; image paths are relative to {base}")
    return path


def relative_to(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it lies below it, otherwise absolute (POSIX separators)."""
    path, base = Path(os.path.abspath(path)), Path(os.path.abspath(base))
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
