"""A small stand-in for a shapes-world folder (same layout as ``mmstack world generate``) for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def make_world(root: Path, n: int = 4, size: int = 16) -> Path:
    """Write ``root/images/00000i.png``, ``pairs.jsonl``, ``conversations.json`` and ``preferences.jsonl``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    pairs, convs, prefs = [], [], []
    for i in range(n):
        colour = names[i % len(names)]
        rel = f"images/{i:06d}.png"
        Image.new("RGB", (size, size), COLOURS[colour]).save(root / rel)
        pairs.append({"caption": f"a {colour} square, picture {i}", "id": f"{i:06d}", "image": rel})
        convs.append(
            {
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "How many objects are there?"},
                    {"from": "gpt", "value": "1"},
                ],
                "id": f"{i:06d}",
                "image": rel,
                "kinds": ["colour", "count"],
            }
        )
        wrong = names[(i + 1) % len(names)]
        prefs.append(
            {"chosen": colour, "image": rel, "prompt": "What colour is the square?", "rejected": wrong}
            | {"rejection": "wrong_colour"}
        )
    (root / "pairs.jsonl").write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in pairs))
    (root / "conversations.json").write_text(json.dumps(convs, indent=2, sort_keys=True))
    (root / "preferences.jsonl").write_text("".join(json.dumps(p, sort_keys=True) + "\n" for p in prefs))
    return root


def write_lines(path: Path, records: list) -> Path:
    """Write JSONL; a ``str`` item is written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
