"""LLaVA-Instruct conversations: typed records, validation, JSON list and JSONL files.

A record is ``{"id", "image" (omitted for text-only), "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}``. Rules: turns alternate human, gpt, human, gpt ... and end with a gpt answer;
values are non-empty strings; with an image, ``<image>`` appears exactly once, in a human turn; without
one it never appears; the image file exists. Unknown record keys (e.g. the shapes world's ``"kinds"``) are
kept in ``Conversation.meta`` and unknown turn keys in ``Turn.meta``, and are written back unchanged.

Image paths are relative to ``image_root``, which defaults to the folder of the data file (LLaVA's own
files point into a separate image folder: pass it as ``image_root``).
"""

from __future__ import annotations

import json
import os
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
    load_json_file,
    parse_json_object,
    relative_to,
    require_file,
    resolve_image,
    type_name,
)
from mmstack.errors import DataError
from mmstack.utils.atomic import atomic_write_json, atomic_write_text

HUMAN, GPT = "human", "gpt"
IMAGE_TOKEN = "<image>"
HINT = (
    'each record needs {"id": ..., "image": <path, optional>, "conversations": [{"from": "human", '
    '"value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}'
)


@dataclass
class Turn:
    """One message: ``role`` is ``"human"`` or ``"gpt"`` (LLaVA's ``"from"``), ``value`` the text."""

    role: str
    value: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in (HUMAN, GPT):
            raise BadRecord(f"turn role must be 'human' or 'gpt', got {self.role!r}")
        if not isinstance(self.value, str) or not self.value.strip():
            raise BadRecord(f"turn value must be a non-empty string, got {self.value!r}")


@dataclass
class Conversation:
    """One LLaVA-Instruct record; construction validates the turn order and the ``<image>`` placeholder."""

    id: str
    image: Path | None
    turns: list[Turn]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image = Path(self.image) if self.image is not None else None
        check_turns(self.turns, has_image=self.image is not None)


def check_turns(turns: list[Turn], has_image: bool) -> None:
    """Raise ``BadRecord`` unless turns alternate human/gpt (ending with gpt) and ``<image>`` is placed right."""
    if not turns:
        raise BadRecord(f"field 'conversations' has no turns; {HINT}")
    for j, turn in enumerate(turns):
        expected = HUMAN if j % 2 == 0 else GPT
        if turn.role != expected:
            raise BadRecord(
                f"conversations[{j}].from is {turn.role!r}, expected {expected!r}; turns must alternate "
                "human, gpt, human, gpt ... starting with human"
            )
    if len(turns) % 2:
        raise BadRecord(f"conversations[{len(turns) - 1}] is a human turn with no gpt answer after it; add the answer")
    counts = [turn.value.count(IMAGE_TOKEN) for turn in turns]
    for j, (turn, n) in enumerate(zip(turns, counts, strict=True)):
        if n and turn.role == GPT:
            raise BadRecord(f"conversations[{j}].value (a gpt turn) contains {IMAGE_TOKEN}; it belongs in a human turn")
    if has_image and sum(counts) != 1:
        raise BadRecord(
            f"{IMAGE_TOKEN} appears {sum(counts)} times; a record with an 'image' needs it exactly once, "
            "in a human turn (usually the first)"
        )
    if not has_image and sum(counts):
        j = next(j for j, n in enumerate(counts) if n)
        raise BadRecord(
            f"conversations[{j}].value contains {IMAGE_TOKEN} but the record has no 'image'; add the image or "
            "remove the placeholder"
        )


def read_conversations(
    path: str | Path,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    report: SkipReport | None = None,
    check_images: bool = True,
) -> list[Conversation]:
    """Read a ``.json`` list or a ``.jsonl`` file of LLaVA-Instruct records (or ``DIR/conversations.json``).

    Args:
        image_root: folder that image paths are relative to (default: the file's folder).
        skip_bad, report: skip invalid records and list them in ``report`` instead of raising.
        check_images: require every image file to exist.

    Raises:
        DataError: naming the file, the line (JSONL) or record index and id (JSON), the field and the fix.
    """
    path = require_file(path, "conversations file", "check the path", default_name="conversations.json")
    root = Path(image_root) if image_root is not None else path.parent
    guard = RecordGuard(skip_bad, report)
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = load_json_file(path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type_name(records)}; {HINT}")
        items = [(_record_location(i, r, path), r) for i, r in enumerate(records)]
    elif suffix == ".jsonl":
        items = [(f"line {n} of {path}", line) for n, line in iter_lines(path)]
    else:
        raise DataError(f"{path}: conversations must be a .json list or a .jsonl file, got {suffix!r}")
    conversations = []
    for location, item in items:
        try:
            obj = parse_json_object(item, HINT) if isinstance(item, str) else _require_object(item)
            conversations.append(_conversation_from_record(obj, root, check_images))
        except BadRecord as err:
            guard.reject(location, err)
            continue
        guard.accept()
    guard.done(path)
    return conversations


def _record_location(index: int, record: Any, path: Path) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"record {index} (id {rid!r}) of {path}" if isinstance(rid, (str, int)) else f"record {index} of {path}"


def _require_object(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type_name(record)}; {HINT}")
    return record


def _conversation_from_record(obj: dict[str, Any], root: Path, check_images: bool) -> Conversation:
    cid = get_id(obj, HINT, required=True)
    image_value = get_str(obj, "image", HINT, required=False)
    image = None
    if image_value is not None:
        image = resolve_image(image_value, root) if check_images else Path(os.path.abspath(root / image_value))
    raw_turns = obj.get("conversations")
    if raw_turns is None:
        raise BadRecord(f"missing field 'conversations'; {HINT}")
    if not isinstance(raw_turns, list):
        raise BadRecord(f"field 'conversations' must be a list of turns, got {type_name(raw_turns)}; {HINT}")
    turns = [_turn_from_record(t, j) for j, t in enumerate(raw_turns)]
    meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
    return Conversation(cid, image, turns, meta)


def _turn_from_record(obj: Any, j: int) -> Turn:
    if not isinstance(obj, dict):
        raise BadRecord(f'conversations[{j}] must be an object {{"from", "value"}}, got {type_name(obj)}')
    role = get_str(obj, "from", HINT, label=f"conversations[{j}].from")
    if role not in (HUMAN, GPT):
        raise BadRecord(f"conversations[{j}].from is {role!r}; use 'human' or 'gpt'")
    value = get_str(obj, "value", HINT, label=f"conversations[{j}].value")
    return Turn(role, value, {k: v for k, v in obj.items() if k not in ("from", "value")})


def to_record(conv: Conversation, image_root: Path) -> dict[str, Any]:
    """The LLaVA-Instruct dict for ``conv``; the image path is made relative to ``image_root``."""
    record: dict[str, Any] = {**conv.meta, "id": conv.id}
    if conv.image is not None:
        record["image"] = relative_to(conv.image, image_root)
    record["conversations"] = [{**t.meta, "from": t.role, "value": t.value} for t in conv.turns]
    return record


def write_conversations(
    conversations: Iterable[Conversation], path: str | Path, image_root: str | Path | None = None
) -> Path:
    """Write a ``.json`` list (indented) or ``.jsonl`` file atomically, keys sorted for stable output."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records = [to_record(c, root) for c in conversations]
    suffix = path.suffix.lower()
    if suffix == ".json":
        atomic_write_json(path, records)
    elif suffix == ".jsonl":
        lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        atomic_write_text(path, "".join(lines))
    else:
        raise DataError(f"{path}: write conversations to a .json or .jsonl file, got {suffix!r}")
    return path
