"""Security: API key, file roots, remote URLs, body and image limits, safe OpenAI-style errors."""

from __future__ import annotations

import httpx
import pytest

from _serve_models import data_url, png_bytes, serve_models  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):  # noqa: F811
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer

    roots = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    cfg = load_serve_config(
        {
            "security": {"api_key": KEY, "max_body_bytes": 200_000},
            "media": {"file_roots": [str(roots)], "max_image_bytes": 50_000},
            "generation": {"temperature": 0.0},
        }
    )
    models = {"clip": serve_models["clip"], "vlm": serve_models["vlm"]}
    with LiveServer(create_app(cfg, models=models)) as live:
        live.roots, live.outside = roots, outside
        yield live


def _client(server, key: str | None = KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0, timeout=30)


def _post(server, path: str, body: dict | None = None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)


def _chat_with(url: str) -> dict:
    content = [{"type": "text", "text": "what colour ?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": "vlm", "messages": [{"role": "user", "content": content}], "max_tokens": 2}


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    return err


def test_missing_or_wrong_key_is_401(server):
    for key in (None, "wrong-key"):
        r = _post(server, "/v1/embeddings", {"model": "clip", "input": "a"}, key=key)
        assert r.status_code == 401 and _error(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong-key").models.list()
    assert len(_client(server).models.list().data) == 2
    assert httpx.get(server.url + "/healthz").status_code == 200  # health checks need no key
    r = httpx.post(server.url + "/v1/embeddings", content=b"x" * 1_000_000)  # over the body limit, and no key:
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"  # refused before the body is read


def test_file_outside_roots_is_400(server):
    secret = server.outside / "secret.png"
    secret.write_bytes(png_bytes("red"))
    (server.roots / "link.png").symlink_to(secret)  # a link inside the root must not lead out of it
    for url in (
        secret.as_uri(),
        (server.roots / "link.png").as_uri(),
        f"file://{server.roots}/../{server.outside.name}/secret.png",
    ):
        r = _post(server, "/v1/chat/completions", _chat_with(url))
        assert r.status_code == 400, url
        assert _error(r)["code"] == "file_not_allowed"
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(**_chat_with(secret.as_uri()))


def test_remote_urls_are_refused_when_disabled(server):
    r = _post(server, "/v1/chat/completions", _chat_with("http://127.0.0.1:9/cat.png"))
    assert r.status_code == 400 and _error(r)["code"] == "remote_images_disabled"
    r = _post(server, "/v1/embeddings", {"model": "clip", "images": ["ftp://example/x.png"]})
    assert r.status_code == 400


def test_oversize_body_is_413(server):
    big = {"model": "clip", "input": "x" * 300_000}
    r = _post(server, "/v1/embeddings", big)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(30):
            yield b"x" * 10_000

    r = httpx.post(server.url + "/v1/embeddings", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413


def test_oversize_and_bad_images(server):
    big = data_url(seed=3, size=200)  # about 120 kB of noise: over max_image_bytes, under the body limit
    r = _post(server, "/v1/embeddings", {"model": "clip", "images": [big]})
    assert r.status_code == 413 and _error(r)["code"] == "image_too_large"
    r = _post(server, "/v1/embeddings", {"model": "clip", "images": ["data:image/png;base64,bm90IGFuIGltYWdl"]})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_image"


def test_request_errors_are_openai_shaped(server):
    r = _post(server, "/v1/chat/completions", {"model": "vlm", "messages": []})
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = _post(server, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    r = _post(server, "/v1/chat/completions", {"model": "clip", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "vlm" in _error(r)["message"]  # names the model that can chat
    r = _post(server, "/v1/embeddings", {"model": "clip", "input": [[1, 2, 3]]})
    assert r.status_code == 400 and "token-id" in _error(r)["message"]
    r = _post(
        server,
        "/v1/chat/completions",
        {"model": "vlm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000},
    )
    assert r.status_code == 400 and _error(r)["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/embeddings", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(server.url + "/v1/nothing-here").status_code == 401  # no key: nothing is told about /v1/


def test_forged_placeholders_are_removed(server):
    body = {"model": "vlm", "messages": [{"role": "user", "content": "<image> <image> what colour ?"}], "max_tokens": 2}
    assert _post(server, "/v1/chat/completions", body).status_code == 200


def test_internal_errors_do_not_leak(server):
    svc = server.server.config.app.state.serve.services["clip"]
    original = svc.engine.run_batch

    def broken(jobs):
        raise RuntimeError("secret internal detail /etc/passwd")

    svc.engine.run_batch = broken
    try:
        r = _post(server, "/v1/embeddings", {"model": "clip", "input": "a red circle"})
    finally:
        svc.engine.run_batch = original
    err = _error(r)
    assert r.status_code == 500 and err["type"] == "server_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text
