"""Batching over HTTP: queue full -> 429 before image decoding, deadline -> 504, disconnect frees the slot."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from _serve_models import data_url, serve_models  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")


def _live(models: dict, **batching):
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer

    cfg = load_serve_config({"batching": {"max_wait_ms": 0, **batching}, "generation": {"temperature": 0.0}})
    return LiveServer(create_app(cfg, models={k: models[k] for k in ("clip", "vlm")}))


def _slow(fn, seconds: float):
    def wrapped(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapped


def _gated(fn, gate: threading.Event):
    """``fn`` that first waits for ``gate`` (the test decides when the model may finish)."""

    def wrapped(*args, **kwargs):
        gate.wait(30)
        return fn(*args, **kwargs)

    return wrapped


def _wait_for(predicate, timeout_s: float = 5.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def _queued(server, model: str) -> int:
    return httpx.get(server.url + "/healthz").json()["models"][model]["queued"]


def test_queue_full_is_429_with_retry_after_before_any_image_is_decoded(serve_models):  # noqa: F811
    with _live(serve_models, max_queue=1) as server:
        svc = server.server.config.app.state.serve.services["clip"]
        decoded = []
        original = svc.image_pixels
        svc.image_pixels = lambda url, media: decoded.append(url) or original(url, media)
        gate = threading.Event()
        svc.engine.run_batch = _gated(svc.run_batch, gate)
        busy = threading.Thread(
            target=httpx.post,
            args=(server.url + "/v1/embeddings",),
            kwargs={"json": {"model": "clip", "input": "a"}, "timeout": 30},
        )
        busy.start()
        _wait_for(lambda: _queued(server, "clip") == 1)
        bad_image = {"model": "clip", "images": ["data:image/png;base64,bm90IGFuIGltYWdl"]}
        r = httpx.post(server.url + "/v1/embeddings", json=bad_image)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        assert decoded == []  # refused before its image was touched
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.embeddings.create(model="clip", input="b")
        gate.set()
        busy.join()
        r = httpx.post(server.url + "/v1/embeddings", json=bad_image)
        assert r.status_code == 400 and len(decoded) == 1  # admitted now, so decoded (and found bad)
        assert 'mmstack_rejected_total{model="clip",reason="queue_full"} 2.0' in httpx.get(server.url + "/metrics").text


def test_deadline_is_504(serve_models):  # noqa: F811
    with _live(serve_models, timeout_s=0.3) as server:
        svc = server.server.config.app.state.serve.services["clip"]
        gate = threading.Event()
        svc.engine.run_batch = _gated(svc.run_batch, gate)  # the model never finishes before the deadline
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "clip", "input": "a"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.embeddings.create(model="clip", input="b")  # queued behind the stuck batch: 504 too
        assert err.value.status_code == 504
        _wait_for(lambda: _queued(server, "clip") == 0)  # answered at the deadline, slots freed
        gate.set()


def test_disconnect_mid_stream_frees_the_slot_and_stops_generation(serve_models):  # noqa: F811
    with _live(serve_models, max_queue=1) as server:
        svc = server.server.config.app.state.serve.services["vlm"]
        svc.model.decode = _slow(type(svc.model).decode.__get__(svc.model), 0.1)  # 80 steps = 8 s
        try:
            # ignore_eos: the stream runs to max_tokens unless it is stopped
            body = {"model": "vlm", "messages": [{"role": "user", "content": "yes"}], "max_tokens": 80}
            body.update(stream=True, ignore_eos=True)
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
            t_gone = time.monotonic()
            assert sum(line.startswith("data: ") for line in got) >= 3
            _wait_for(lambda: _queued(server, "vlm") == 0, timeout_s=3.0)  # the slot is free again
            small = {"model": "vlm", "messages": [{"role": "user", "content": "yes"}], "max_tokens": 2}
            r2 = httpx.post(server.url + "/v1/chat/completions", json=small, timeout=30)
            assert r2.status_code == 200
            # Answered in time: the abandoned row stopped (or, batched continuously, did not hold it up).
            assert time.monotonic() - t_gone < 4.0
        finally:
            del svc.model.decode


def test_stream_whose_client_left_before_the_first_byte_frees_its_slot(serve_models):  # noqa: F811
    import asyncio
    import contextlib
    import json

    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config

    app = create_app(load_serve_config({}), models={"vlm": serve_models["vlm"]})
    state = app.state.serve
    body = json.dumps({"model": "vlm", "messages": [{"role": "user", "content": "yes"}], "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def main() -> int:
        await state.start()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                raise OSError("the client is gone")  # what the server reports for a closed socket

        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        admitted = state.services["vlm"].engine.admitted
        await state.stop()
        return admitted

    assert asyncio.run(main()) == 0
