"""The demo pipeline: an ordered list of stages, each cached by a hash of its config and inputs.

A stage is a function ``run(ctx, cfg) -> StageResult``; its result (metrics, an HTML section for the
report, the files it wrote) is stored in ``OUT/.cache/<stage>.json`` beside the hash of its config and
of the stages it depends on. A re-run with nothing changed reuses every stage and only rewrites the
report. Stages are registered in ``STAGES`` below; each lives in its own module in this package.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmstack.config import configs_dir, read_yaml
from mmstack.errors import ConfigError
from mmstack.utils.atomic import atomic_write_json
from mmstack.utils.progress import console


@dataclass
class StageResult:
    """What a stage hands to the report and to later stages."""

    metrics: dict[str, Any] = field(default_factory=dict)
    html: str = ""
    outputs: list[str] = field(default_factory=list)  # paths relative to the demo folder
    seconds: float = 0.0
    cached: bool = False


@dataclass
class DemoContext:
    """Shared state of one demo run."""

    out: Path
    config: dict[str, Any]
    results: dict[str, StageResult] = field(default_factory=dict)
    smoke: bool = False

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[DemoContext, dict[str, Any]], StageResult]
    needs: tuple[str, ...] = ()
    # Recipe files the stage reads: (key in its config section, family), see ``recipe_name``. Their contents
    # are part of the cache key, so editing configs/clip-demo.yaml retrains the CLIP.
    recipes: tuple[tuple[str, str], ...] = ()


def _stages() -> list[Stage]:
    from mmstack.demo import (
        align_stage,
        clip_stage,
        index_stage,
        native_stage,
        rag_stage,
        serve_stage,
        vlm_stage,
        world_stage,
    )

    return [
        Stage("world", "The shapes world", world_stage.run),
        Stage("clip", "Two-tower (CLIP) model", clip_stage.run, ("world",), (("config", "clip"),)),
        Stage("index", "Collections: index and search", index_stage.run, needs=("world", "clip")),
        Stage("vlm", "Bridge VLM (LLaVA-style)", vlm_stage.run, ("world", "clip"), (("config", "llava"),)),
        Stage(
            "native",
            "Native model (VQ tokens + one decoder)",
            native_stage.run,
            ("world",),
            (("vq_config", "vq"), ("native_config", "native")),
        ),
        Stage(
            "align",
            "Preference alignment (reward model, DPO)",
            align_stage.run,
            ("world", "vlm"),
            tuple((f"{k}_config", k) for k in ("reward", "dpo", "ppo")),
        ),
        Stage("rag", "Multimodal RAG with citations", rag_stage.run, needs=("clip", "vlm")),
        Stage("serve", "Serving", serve_stage.run, needs=("clip", "index", "vlm", "native", "rag")),
    ]


def recipe_name(ctx: DemoContext, cfg: dict[str, Any], key: str, family: str) -> str:
    """The recipe a stage reads: ``cfg[key]`` when set, else ``<family>-micro.yaml`` (smoke) or
    ``<family>-demo.yaml`` from configs/."""
    return str(cfg.get(key, f"{family}-micro.yaml" if ctx.smoke else f"{family}-demo.yaml"))


def vlm_checkpoint(path: Path, stage: str) -> Path:
    """A bridge checkpoint folder: ``path`` itself, or a llava run folder's final model (``model``, else its
    last stage's); a clear error naming ``stage`` when there is none."""
    from mmstack.train.llava import STAGES

    if (path / "config.json").is_file():
        return path
    for sub in ("model", *(f"stage{s}/model" for s in reversed(STAGES))):
        if (path / sub / "config.json").is_file():
            return path / sub
    raise ConfigError(f"demo stage {stage} needs the VLM at {path}; run the vlm stage first")


def _recipe_digests(stage: Stage, cfg: dict[str, Any], ctx: DemoContext) -> dict[str, str]:
    """A content hash of each recipe file the stage will read (its name when the file is missing)."""
    from mmstack.config import configs_dir

    out = {}
    for key, family in stage.recipes:
        name = recipe_name(ctx, cfg, key, family)
        path = Path(name) if Path(name).is_file() else configs_dir() / name
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else name
    return out


def _stage_key(stage: Stage, cfg: dict[str, Any], ctx: DemoContext, keys: dict[str, str]) -> str:
    payload = {
        "stage": stage.name,
        "config": cfg,
        "recipes": _recipe_digests(stage, cfg, ctx),
        "needs": {n: keys.get(n) for n in stage.needs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(ctx: DemoContext, name: str, key: str) -> StageResult | None:
    path = ctx.path(".cache", f"{name}.json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("key") != key or not all(ctx.path(p).exists() for p in data["result"]["outputs"]):
        return None
    return StageResult(**{**data["result"], "cached": True})


def run_demo(
    out: Path,
    config_path: Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    smoke: bool = False,
) -> dict[str, StageResult]:
    """Run every stage (or ``only`` those and what they need), reusing cached results; write the report."""
    from mmstack.demo.report import write_report

    if config_path is None:
        config_path = configs_dir() / ("demo-smoke.yaml" if smoke else "demo.yaml")
    config = read_yaml(config_path)
    stages = _stages()
    known = {s.name for s in stages}
    for name in list(config) + list(only or []):
        if name not in known:
            raise ConfigError(f"demo config {config_path}: unknown stage {name!r} (stages: {', '.join(known)})")
    wanted = _closure(stages, only) if only else known
    ctx = DemoContext(out=Path(out), config=config, smoke=smoke)
    ctx.out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    total = time.perf_counter()
    for stage in stages:
        if stage.name not in wanted:
            continue
        cfg = config.get(stage.name, {}) or {}
        key = keys[stage.name] = _stage_key(stage, cfg, ctx, keys)
        cached = None if force else _load_cached(ctx, stage.name, key)
        if cached is not None:
            ctx.results[stage.name] = cached
            console.print(f"[green]stage {stage.name}[/]: cached ({cached.seconds:.1f} s when it ran)")
            continue
        console.rule(f"stage {stage.name}: {stage.title}")
        t0 = time.perf_counter()
        result = stage.run(ctx, cfg)
        result.seconds = time.perf_counter() - t0
        ctx.results[stage.name] = result
        atomic_write_json(ctx.path(".cache", f"{stage.name}.json"), {"key": key, "result": _as_dict(result)})
        console.print(f"[green]stage {stage.name}[/]: done in {result.seconds:.1f} s")
    write_report(ctx, [s for s in stages if s.name in ctx.results])
    console.print(f"[bold]demo finished[/] in {time.perf_counter() - total:.1f} s; report: {ctx.path('report.html')}")
    return ctx.results


def _closure(stages: list[Stage], only: list[str]) -> set[str]:
    by_name = {s.name: s for s in stages}
    todo, seen = list(only), set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(by_name[n].needs)
    return seen


def _as_dict(result: StageResult) -> dict[str, Any]:
    return {
        "metrics": result.metrics,
        "html": result.html,
        "outputs": result.outputs,
        "seconds": result.seconds,
    }
