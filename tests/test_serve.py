"""The server end to end: the unmodified ``openai`` client against a live uvicorn on 127.0.0.1.

Tiny random models are saved with their family's ``save_pretrained`` and loaded back, and every answer
is checked against the same model called directly (embeddings: the vectors; chat: greedy generation).
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from _serve_models import data_url, png_bytes, serve_models  # noqa: F401 (a fixture)

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

KEY = "test-key"


@pytest.fixture(scope="module")
def models(serve_models):  # noqa: F811
    return {k: serve_models[k] for k in ("clip", "vlm", "native")}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config
    from mmstack.serve.runner import LiveServer

    roots = tmp_path_factory.mktemp("allowed")
    cfg = load_serve_config(
        {
            "security": {"api_key": KEY},
            "batching": {"max_batch_size": 8, "max_wait_ms": 30},
            "media": {"file_roots": [str(roots)]},
            "generation": {"temperature": 0.0},
        }
    )
    with LiveServer(create_app(cfg, models=models)) as live:
        live.roots = roots
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _ask(text: str, url: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if url:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def _direct_answer(vlm, text: str, image: Image.Image | None, max_tokens: int) -> str:
    from mmstack.models.bridge_generate import GenerationConfig, generate_text

    turns = [{"from": "human", "value": text + ("\n<image>" if image is not None else "")}]
    images = [image] if image is not None else None
    return generate_text(vlm, [turns], images=images, config=GenerationConfig(max_new_tokens=max_tokens))[0]


def test_models_are_listed(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"clip", "vlm", "native"}
    assert listed["vlm"].owned_by == "mmstack"


def test_text_embeddings_match_the_model(client, models):
    texts = ["a red circle", "a blue square left of a green star"]
    out = client.embeddings.create(model="clip", input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in out.data])
    clip = models["clip"]
    with torch.no_grad():
        enc = clip.processor.text(texts)
        want = clip.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (2, 32) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert out.usage.prompt_tokens == int(enc["attention_mask"].sum())
    floats = client.embeddings.create(model="clip", input="a red circle", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-5)


def test_image_embeddings_via_extension_field(client, models):
    urls = [data_url(seed=1), data_url("blue")]
    out = client.embeddings.create(model="clip", input="a red circle", extra_body={"images": urls})
    assert [d.index for d in out.data] == [0, 1, 2]
    clip = models["clip"]
    imgs = [Image.open(io.BytesIO(png_bytes(seed=1))).convert("RGB"), Image.new("RGB", (40, 40), "blue")]
    with torch.no_grad():
        want = clip.encode_image(clip.processor.images(imgs), normalize=True).numpy()
    np.testing.assert_allclose(np.array([d.embedding for d in out.data[1:]]), want, atol=1e-5)


def test_chat_with_an_image_matches_direct_generation(client, models):
    question = "what colour is the circle ?"
    resp = client.chat.completions.create(
        model="vlm", messages=_ask(question, data_url("red")), max_tokens=6, temperature=0
    )
    want = _direct_answer(models["vlm"], question, Image.new("RGB", (40, 40), "red"), 6)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason in ("stop", "length")
    assert 16 < resp.usage.prompt_tokens < 60  # the 16 visual tokens of a 32 px image, plus the text
    assert 0 < resp.usage.completion_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_equals_plain_chat(client):
    kwargs = {"model": "vlm", "messages": _ask("what colour is the star ?", data_url("green")), "max_tokens": 8}
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really streamed


def test_stream_ends_with_done_marker(server):
    import httpx

    body = {"model": "vlm", "messages": _ask("yes"), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_auth(), timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_multi_turn_system_and_stop(client, models):
    messages = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "what colour is the circle ?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the square ?"},
    ]
    full = client.chat.completions.create(model="vlm", messages=messages, max_tokens=8).choices[0].message.content
    words = full.split()
    assert len(words) >= 3
    cut = client.chat.completions.create(model="vlm", messages=messages, max_tokens=8, stop=[words[2]])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(words[2])].strip()


def test_concurrent_chats_share_batches_and_each_gets_its_own_answer(server, client, models):
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    questions = [("what colour is the circle ?", c) for c in colours[:4]] + [("yes", None), ("one two", None)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        q, colour = questions[i]
        resp = client.chat.completions.create(
            model="vlm", messages=_ask(q, data_url(colour) if colour else None), max_tokens=6
        )
        answers[i] = resp.choices[0].message.content

    before = _batches(server, "vlm", "prefill")  # continuous batching: rows join by prefill passes
    with _hold_first_batch(server, "vlm", len(questions)):
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (q, colour) in enumerate(questions):
        image = Image.new("RGB", (40, 40), colour) if colour else None
        assert answers[i] == _direct_answer(models["vlm"], q, image, 6), questions[i]
    count, total = (a - b for a, b in zip(_batches(server, "vlm", "prefill"), before, strict=True))
    assert total == len(questions) and count < len(questions)  # some requests shared a forward pass


def test_concurrent_embeddings_share_batches(server, client, models):
    texts = [f"a {c} circle" for c in ["red", "blue", "green", "yellow"] * 3]
    out: dict[int, list[float]] = {}

    def embed(i: int) -> None:
        out[i] = client.embeddings.create(model="clip", input=texts[i], encoding_format="float").data[0].embedding

    before = _batches(server, "clip", "text")
    with _hold_first_batch(server, "clip", len(texts)):
        threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    count, total = (a - b for a, b in zip(_batches(server, "clip", "text"), before, strict=True))
    assert total == len(texts) and count < len(texts)
    clip = models["clip"]
    with torch.no_grad():
        enc = clip.processor.text(texts)
        want = clip.encode_text(enc["input_ids"], enc["attention_mask"], normalize=True).numpy()
    np.testing.assert_allclose(np.array([out[i] for i in range(len(texts))]), want, atol=1e-5)


def test_file_urls_inside_roots_are_read(client, server):
    path = server.roots / "red.png"
    path.write_bytes(png_bytes("red"))
    by_file = client.chat.completions.create(model="vlm", messages=_ask("what colour ?", path.as_uri()), max_tokens=4)
    by_data = client.chat.completions.create(model="vlm", messages=_ask("what colour ?", data_url("red")), max_tokens=4)
    assert by_file.choices[0].message.content == by_data.choices[0].message.content


def test_health_and_metrics(server):
    import httpx

    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["models"]["vlm"]["family"] == "bridge"
    text = httpx.get(server.url + "/metrics").text
    for name in ("mmstack_queue_depth", "mmstack_batch_size_bucket", "mmstack_request_seconds_bucket"):
        assert name in text
    assert 'mmstack_request_seconds_count{endpoint="/v1/chat/completions"}' in text


def test_web_page_is_served(server):
    import httpx

    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>mmstack</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # no third-party or inline code
    assert httpx.get(server.url + "/static/app.js").status_code == 200


@contextlib.contextmanager
def _hold_first_batch(server, model: str, n: int):
    """Hold the model's first batch until ``n`` requests are admitted, so that the test does not depend on
    how fast this (shared, busy) machine delivers them within ``max_wait_ms``."""
    engine = server.server.config.app.state.serve.services[model].engine
    # A continuous engine takes its jobs from the queue itself: hold it until all n are queued.
    attr, count = ("run_continuous", "pending") if hasattr(engine, "run_continuous") else ("run_batch", "admitted")
    original = getattr(engine, attr)

    def held(arg):
        deadline = time.monotonic() + 10
        while getattr(engine, count) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        setattr(engine, attr, original)
        return original(arg)

    setattr(engine, attr, held)
    try:
        yield
    finally:
        setattr(engine, attr, original)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _batches(server, model: str, op: str) -> tuple[float, float]:
    """(number of batches, number of items) run so far for ``model``/``op``, from /metrics."""
    import httpx

    text = httpx.get(server.url + "/metrics").text
    labels = f'model="{model}",op="{op}"'

    def value(name: str) -> float:
        m = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("mmstack_batch_size_count"), value("mmstack_batch_size_sum")


def test_sampling_seed_and_ignore_eos(client):
    kwargs = {"model": "vlm", "messages": _ask("what colour is the star ?"), "max_tokens": 5}
    a = client.chat.completions.create(**kwargs, temperature=1.0, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kwargs, temperature=1.0, seed=7).choices[0].message.content
    assert a == b  # a seeded request runs alone, so its seed fixes its answer
    full = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 5 and full.choices[0].finish_reason == "length"


def test_image_generation_matches_the_model(client, models):
    out = client.images.generate(
        model="native",
        prompt="a red circle",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 5, "guidance_scale": 2.0},
    )
    got = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in out.data]
    assert len(got) == 2 and got[0].shape == (32, 32, 3)
    with torch.no_grad():
        want = models["native"].generate(["a red circle"] * 2, "image", guidance=2.0, seed=5, batch_size=2).outputs
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, np.asarray(w))
    unseeded = client.images.generate(model="native", prompt="a blue star", n=1)
    assert unseeded.data[0].b64_json
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="native", prompt="a red circle", size="1024x1024")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="native", prompt="a red circle", response_format="url")
