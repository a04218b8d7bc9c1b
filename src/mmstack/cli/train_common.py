"""What every ``mmstack train`` command shares: the ``--max-steps`` option and rank-0-only output."""

from __future__ import annotations

import os
from typing import Any

import typer

from mmstack.cli._common import emit

MAX_STEPS_OPTION = typer.Option(None, "--max-steps", help="Override train.max_steps (every stage's, for llava).")


def emit_main(result: dict[str, Any], as_json: bool) -> None:
    """``emit`` on rank 0 only: under torchrun every rank runs the command, one prints the result."""
    if int(os.environ.get("RANK", 0)) == 0:
        emit(result, as_json)
