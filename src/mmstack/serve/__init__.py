"""mmstack.serve: a batched, OpenAI-compatible HTTP server with search, RAG and a web page.

    mmstack serve --config serve.yaml            # or: --model clip=models/clip --model vlm=models/vlm

    from mmstack.serve import create_app, load_serve_config, LiveServer
    app = create_app(load_serve_config("serve.yaml"))

Endpoints: ``POST /v1/embeddings`` (two-tower; texts, and images in the ``images`` extension field),
``POST /v1/chat/completions`` (bridge VLM; image_url parts, streaming), ``POST /v1/images/generations``
(native model), ``POST /v1/search`` and ``POST /v1/rag`` (collections), ``GET /v1/models``,
``GET /v1/collections``, ``GET /healthz``, ``GET /metrics`` (Prometheus) and the web page at ``/``.

Layout: ``config`` (ServeConfig), ``batching`` (BatchingEngine), ``continuous`` (ContinuousBatchingEngine:
chat requests join a running generation between decode steps) with ``running_batch`` (the shared KV cache
that rows join and leave), one module per endpoint family holding its
service (the adapter from a model family to batch operations) and routes (``embeddings``, ``chat``,
``images``, ``search``, ``rag``), ``media`` (image URLs), ``security`` (API key, body limit), ``metrics``,
``errors`` (OpenAI error objects), ``state`` (what one server holds), ``app`` (wiring), ``runner`` (uvicorn).
The web server libraries come with the ``serve`` extra; importing this package alone needs none of them.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "create_app": "mmstack.serve.app",
    "ServeConfig": "mmstack.serve.config",
    "BatchingConfig": "mmstack.serve.config",
    "load_serve_config": "mmstack.serve.config",
    "BatchingEngine": "mmstack.serve.batching",
    "ContinuousBatchingEngine": "mmstack.serve.continuous",
    "LiveServer": "mmstack.serve.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmstack.serve' has no attribute {name!r}")
