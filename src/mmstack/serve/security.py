"""Request guards (ASGI middleware): the optional Bearer API key and the request body size limit."""

from __future__ import annotations

import hmac
import json
from typing import Any

from mmstack.serve.errors import APIError


class ApiKeyMiddleware:
    """ASGI middleware: when the server has a key, every ``/v1/`` request needs ``Authorization: Bearer <key>``
    (401 otherwise, before the body is read). The page, ``/healthz`` and ``/metrics`` stay open.

    A middleware rather than a FastAPI dependency: one check per request in one place, without the dependency
    machinery's per-request cost on the hot endpoints (BENCHMARKS.md, session 23).
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.expected and scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            # compare_digest: the time taken does not reveal how much of the key was right.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.expected):
                err = APIError(
                    "missing or invalid API key; send it as 'Authorization: Bearer <key>'",
                    status=401,
                    type="authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await send_error(send, err)
                return
        await self.app(scope, receive, send)


async def send_error(send: Any, err: APIError, close: bool = False) -> None:
    """Answer with ``err`` as an OpenAI-style JSON error, straight on the ASGI channel."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in (err.headers or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """ASGI middleware answering 413 to bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before anything is read; a chunked body is
    read up to the limit and refused as soon as it passes it, so memory stays bounded either way.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Any) -> None:
        err = APIError(
            f"request body exceeds the limit of {self.max_bytes} bytes (security.max_body_bytes)",
            status=413,
            code="request_too_large",
        )
        await send_error(send, err, close=True)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands out the buffered body once, then the real channel (disconnect notices)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
