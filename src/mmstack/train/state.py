"""The resumable training state: ``OUT/train_state/`` holds model, optimiser, scheduler, RNG states and step.

The folder is written with ``atomic_dir``, so a crash during a save leaves the previous state intact.
Everything is stored as tensors and plain Python values so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmstack.errors import ModelError
from mmstack.utils.atomic import atomic_dir

STATE_DIR = "train_state"
STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (dropout, augmentation) as loadable plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``run_dir/train_state/`` atomically."""
    with atomic_dir(Path(run_dir) / STATE_DIR) as tmp:
        torch.save(state, tmp / STATE_FILE)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The saved state of ``run_dir``, or None when there is none."""
    path = Path(run_dir) / STATE_DIR / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(
            f"{path} cannot be read ({type(err).__name__}: {err}); delete {path.parent} to start over"
        ) from None
