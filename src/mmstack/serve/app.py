"""The HTTP app: OpenAI-compatible endpoints, search, health, metrics and the web page.

    app = create_app(load_serve_config("serve.yaml"))     # loads every model and collection once
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoint modules (``embeddings``, ``chat``, ``images``, ``search``) each hold one family's service and
its routes; this module wires them up with the error handlers and the middleware (body limit, latency).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmstack.errors import MmstackError
from mmstack.serve import chat, embeddings, images, rag, search
from mmstack.serve.config import ServeConfig
from mmstack.serve.errors import APIError, as_api_error
from mmstack.serve.metrics import CONTENT_TYPE, LatencyMiddleware, ServeMetrics
from mmstack.serve.security import ApiKeyMiddleware, BodyLimitMiddleware
from mmstack.serve.state import ServerState, build_service, load_services, state_of

log = logging.getLogger("mmstack.serve")
STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere and runs no inline script; images may be data: URLs (uploads, hits).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ENDPOINTS = {
    "/v1/embeddings",
    "/v1/chat/completions",
    "/v1/images/generations",
    "/v1/search",
    "/v1/rag",
    "/v1/models",
    "/healthz",
    "/metrics",
}


def create_app(
    config: ServeConfig,
    models: dict[str, Any] | None = None,
    collections: dict[str, Any] | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        config: the server config; its models and collections are loaded unless given.
        models: already loaded models by served name (tests, notebooks); replaces ``config.models``.
        collections: search services by name (``search.SearchService``); replaces ``config.collections``.
    """
    metrics = ServeMetrics()
    if models is None:
        services = load_services(config, metrics)
    else:
        services = {name: build_service(name, m, config, metrics) for name, m in models.items()}
    if collections is None:
        collections = search.open_collections(config, metrics)
    state = ServerState(config, services, collections, metrics, config.security.resolved_key())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="mmstack", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    _add_error_handlers(app)
    for module in (embeddings, chat, images, search, rag):
        app.include_router(module.router)
    _add_info_routes(app, config)
    # Added last = outermost: latency covers refused requests too; the key is checked before a body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.security.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=state.api_key or "")
    app.add_middleware(LatencyMiddleware, metrics=metrics, endpoints=ENDPOINTS)
    return app


def _version() -> str:
    from mmstack import __version__

    return __version__


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MmstackError)
    async def _mmstack_error(_: Request, err: MmstackError) -> JSONResponse:
        return _error_response(as_api_error(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid"))
        return _error_response(APIError(message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(err.detail), status=err.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        log.error("internal error", exc_info=err)  # the details stay in the log
        return _error_response(as_api_error(err))


def _add_info_routes(app: FastAPI, config: ServeConfig) -> None:
    started = int(time.time())

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        state = state_of(request)
        return {
            "status": "ok",
            "models": {n: {"family": s.family, "queued": s.engine.admitted} for n, s in state.services.items()},
            "collections": sorted(state.collections),
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        state = state_of(request)
        data = [
            {
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "mmstack",
                "family": svc.family,
                "capabilities": list(svc.capabilities),
            }
            for name, svc in state.services.items()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/collections")
    async def list_collections(request: Request) -> dict[str, Any]:
        state = state_of(request)
        return {"object": "list", "data": [search.describe(name, c) for name, c in state.collections.items()]}

    if config.web:
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        async def index() -> FileResponse:
            return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)
