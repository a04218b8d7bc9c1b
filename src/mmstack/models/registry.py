"""Checkpoint folders describe themselves: ``config.json`` names the model ``family``; ``load_checkpoint``
imports that family's class and calls its ``from_pretrained``.

Register a family by adding one line to ``FAMILIES`` ("family": "module:Class").
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from mmstack.errors import ModelError

FAMILIES: dict[str, str] = {
    "two_tower": "mmstack.models.two_tower:TwoTowerModel",
    "bridge": "mmstack.models.bridge:BridgeModel",
    "reward": "mmstack.models.reward:RewardModel",
    "vq": "mmstack.models.vq:VQModel",
    "native": "mmstack.models.native:NativeModel",
}


def read_family(path: str | Path) -> str:
    """The ``family`` field of a checkpoint folder's ``config.json``."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"checkpoint {path} does not exist or is not a folder: pass a checkpoint folder")
    if not cfg_path.is_file():
        raise ModelError(f"checkpoint {path} has no config.json: is it an mmstack checkpoint folder?")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is damaged, re-save it") from None
    family = cfg.get("family") if isinstance(cfg, dict) else None
    if not family:
        raise ModelError(f"{cfg_path} has no 'family' field; re-save the checkpoint with mmstack")
    return str(family)


def load_checkpoint(path: str | Path, **kwargs: Any) -> Any:
    """Load the model stored in ``path`` with its family's ``from_pretrained``."""
    family = read_family(path)
    if family not in FAMILIES:
        raise ModelError(
            f"checkpoint {path} has unknown family {family!r}; known families: {', '.join(sorted(FAMILIES))}"
        )
    module_name, cls_name = FAMILIES[family].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.from_pretrained(path, **kwargs)
