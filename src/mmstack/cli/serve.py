"""``mmstack serve``: the OpenAI-compatible HTTP server (embeddings, chat, images, search, web page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit
from mmstack.errors import ConfigError


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"--{what} takes NAME=PATH (e.g. --{what} clip=demo-output/models/clip), got {item!r}")
        out[name] = value
    return out


def serve(
    config: Path = typer.Option(None, "--config", help="Server config YAML (see configs/serve-example.yaml)."),
    host: str = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; overrides the config)."),
    port: int = typer.Option(None, "--port", help="Port (default 8000; overrides the config)."),
    model: list[str] = typer.Option(None, "--model", help="Serve a checkpoint: NAME=PATH (repeatable)."),
    collection: list[str] = typer.Option(None, "--collection", help="Serve a collection: NAME=DB (repeatable)."),
    overrides: list[str] = typer.Option(None, "--set", help="Config override, e.g. --set batching.max_wait_ms=2."),
    check: bool = typer.Option(False, "--check", help="Load everything, print what would be served, and exit."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Serve the configured models and collections over HTTP (OpenAI-compatible) with a web page at /."""
    from mmstack.serve.config import load_serve_config, resolve_paths
    from mmstack.utils.progress import console

    extra: dict[str, Any] = {}
    if model:
        extra["models"] = {k: {"path": v} for k, v in _pairs(model, "model").items()}
    if collection:
        extra["collections"] = {k: {"db": v} for k, v in _pairs(collection, "collection").items()}
    cfg = load_serve_config(config, overrides=overrides or None)
    if extra:  # flags name paths relative to the working directory, not to the config file
        flags = resolve_paths(load_serve_config(extra), Path.cwd())
        cfg.models.update(flags.models)
        cfg.collections.update(flags.collections)
    cfg.host = host or cfg.host
    cfg.port = cfg.port if port is None else port
    if not cfg.models and not cfg.collections:
        raise ConfigError("nothing to serve: give --config FILE or --model NAME=PATH (e.g. --model clip=models/clip)")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    from mmstack.serve.app import create_app

    app = create_app(cfg)
    state = app.state.serve
    summary = {
        "url": f"http://{cfg.host}:{cfg.port}",
        "models": {n: s.family for n, s in state.services.items()},
        "collections": sorted(state.collections),
        "api_key": bool(state.api_key),
    }
    if check:
        emit(summary, as_json)
        return
    if not cfg.is_loopback() and not state.api_key:
        console.print(
            f"[bold yellow]warning:[/] serving on {cfg.host} without an API key; set {cfg.security.api_key_env}"
        )
    console.print(f"serving {', '.join(summary['models']) or 'no models'} on {summary['url']} (web page at /)")
    from mmstack.serve.runner import run

    run(app, cfg.host, cfg.port, log_level=cfg.log_level)
