"""What one running server holds: its config, the served models, the collections, the RAG services,
the metrics and the API key in force.

A *service* adapts one model family (or a collection) to the server: ``embeddings.EmbeddingService``,
``chat.ChatService``, ``images.ImageService``, ``search.SearchService``, ``rag.RagService``. Each names its
``capabilities`` (the endpoints it answers), owns one ``BatchingEngine`` and gives it ``run_batch(jobs)``;
a service with ``supports_continuous`` gets a ``ContinuousBatchingEngine`` running its ``run_continuous(feed)``
instead (unless ``batching.continuous`` is false).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mmstack.errors import ModelError
from mmstack.serve.batching import BatchingEngine
from mmstack.serve.config import ServeConfig
from mmstack.serve.errors import APIError, not_found
from mmstack.serve.metrics import ServeMetrics

#: model family -> the service class that serves it ("module:Class").
SERVICES: dict[str, str] = {
    "two_tower": "mmstack.serve.embeddings:EmbeddingService",
    "bridge": "mmstack.serve.chat:ChatService",
    "native": "mmstack.serve.images:ImageService",
}


@dataclass
class ServerState:
    """The state behind one app; routes reach it as ``request.app.state.serve``."""

    config: ServeConfig
    services: dict[str, Any] = field(default_factory=dict)
    collections: dict[str, Any] = field(default_factory=dict)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    api_key: str = ""
    rag: dict[tuple[str, str], Any] = field(default_factory=dict)  # (collection, chat model) -> RagService

    def service(self, name: str | None, capability: str) -> Any:
        """The served model ``name`` (or the only one able to, when ``name`` is empty) for ``capability``."""
        able = [n for n, s in self.services.items() if capability in s.capabilities]
        if not name:
            if len(able) == 1:
                return self.services[able[0]]
            raise APIError(
                f"name the model; models that serve {capability}: {', '.join(able) or 'none'}", param="model"
            )
        svc = self.services.get(name)
        if svc is None:
            raise not_found("model", name, list(self.services))
        if capability not in svc.capabilities:
            raise APIError(
                f"model {name!r} ({svc.family}) does not serve {capability}; models that do: {', '.join(able) or 'none'}",
                param="model",
                code="model_not_supported",
            )
        return svc

    def collection(self, name: str) -> Any:
        coll = self.collections.get(name)
        if coll is None:
            raise not_found("collection", name, list(self.collections))
        return coll

    async def start(self) -> None:
        for svc in [*self.services.values(), *self.collections.values()]:
            await svc.engine.start()

    async def stop(self) -> None:
        for svc in [*self.services.values(), *self.collections.values(), *self.rag.values()]:
            await svc.engine.stop()


def state_of(request: Request) -> ServerState:
    """The server state of the app serving ``request``."""
    return request.app.state.serve


def build_service(name: str, model: Any, config: ServeConfig, metrics: ServeMetrics) -> Any:
    """Wrap a loaded model in its family's service and give it a batching engine."""
    family = getattr(model, "family", None) or _family_of(model)
    if family not in SERVICES:
        raise ModelError(
            f"model {name!r} is of family {family!r}, which the server cannot serve ({', '.join(SERVICES)})"
        )
    module, cls_name = SERVICES[family].split(":")
    svc = getattr(importlib.import_module(module), cls_name)(name, model, config)
    batching = config.batching_for(name)
    if batching.continuous and getattr(svc, "supports_continuous", False):
        from mmstack.serve.continuous import ContinuousBatchingEngine

        svc.engine = ContinuousBatchingEngine(name, svc.run_continuous, batching, metrics)
    else:
        svc.engine = BatchingEngine(name, svc.run_batch, batching, metrics)
    return svc


def _family_of(model: Any) -> str:
    mod = importlib.import_module(type(model).__module__)
    return str(getattr(mod, "FAMILY", ""))


def load_services(config: ServeConfig, metrics: ServeMetrics) -> dict[str, Any]:
    """Load every configured checkpoint once (``mmstack.load``) and build its service."""
    import mmstack

    return {
        name: build_service(name, mmstack.load(entry.path), config, metrics) for name, entry in config.models.items()
    }
