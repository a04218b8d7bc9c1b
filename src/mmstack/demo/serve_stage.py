"""Demo stage ``serve``: write ``serve.yaml`` for every demo model and collection, try it in-process, and
print the command that serves it. The stage opens no port: its sample requests go through the ASGI app.

Config (``serve:`` in the demo YAML; defaults in brackets): ``models`` [clip: models/clip, vlm: models/vlm,
vlm-rag: models/vlm-rag, native: models/native] and ``collections`` [demo: index/db], folders inside the
demo folder (entries whose folder does not exist are left out and listed); ``port`` [8000];
``temperature`` [0.0].
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from typing import Any

from mmstack.demo.pipeline import DemoContext, StageResult
from mmstack.utils.atomic import atomic_write_text
from mmstack.utils.progress import console

MODELS = {"clip": "models/clip", "vlm": "models/vlm", "vlm-rag": "models/vlm-rag", "native": "models/native"}
COLLECTIONS = {"demo": "index/db"}


def run(ctx: DemoContext, cfg: dict[str, Any]) -> StageResult:
    """Write ``serve.yaml``, answer a few sample requests with it in-process, print the serve command."""
    import yaml

    found = {k: _checkpoint(ctx, v) for k, v in (cfg.get("models") or MODELS).items()}
    models = {k: v for k, v in found.items() if v is not None}
    collections = {k: v for k, v in (cfg.get("collections") or COLLECTIONS).items() if ctx.path(v).exists()}
    wanted = {**(cfg.get("models") or MODELS), **(cfg.get("collections") or COLLECTIONS)}
    missing = sorted(set(wanted) - set(models) - set(collections))
    serve_cfg = {
        "host": "127.0.0.1",
        "port": int(cfg.get("port", 8000)),
        "models": models,  # relative to serve.yaml's folder, so the demo folder can move
        "collections": {
            k: {"db": v, **({"model": "clip"} if "clip" in models else {})} for k, v in collections.items()
        },
        "generation": {"temperature": float(cfg.get("temperature", 0.0))},
        "media": {"file_roots": ["world"]},  # lets the web page and API read the demo images by file:// URL
    }
    header = "# Written by `mmstack demo`: serve with `mmstack serve --config serve.yaml` (paths are relative to it).\n"
    atomic_write_text(ctx.path("serve.yaml"), header + yaml.safe_dump(serve_cfg, sort_keys=False))
    samples = _samples(ctx) if models or collections else []
    command = f"mmstack serve --config {ctx.path('serve.yaml')}"
    console.print(f"[bold]serve the demo:[/] {command}")
    metrics = {"models": sorted(models), "collections": sorted(collections), "left_out": missing}
    metrics.update({f"{s['endpoint']}_ms": s["ms"] for s in samples})
    return StageResult(metrics=metrics, html=_html(command, samples, missing), outputs=["serve.yaml"])


def _checkpoint(ctx: DemoContext, rel: str) -> str | None:
    """``rel`` when it is a checkpoint folder, else a staged run's final model (``rel/model``), else the
    newest servable checkpoint below it (e.g. ``models/vlm/stage1/model`` of an unfinished run), else None."""
    from mmstack.errors import ModelError
    from mmstack.models.registry import read_family
    from mmstack.serve.state import SERVICES

    folder = ctx.path(rel)
    candidates = [folder / "config.json", *sorted(folder.glob("**/config.json"))] if folder.is_dir() else []
    found = []
    for cfg_file in candidates:
        try:
            if cfg_file.is_file() and read_family(cfg_file.parent) in SERVICES:
                found.append(cfg_file.parent)
        except ModelError:  # config.json of something else (a run's state, a tokenizer)
            continue
    if not found:
        return None
    preferred = [p for p in (folder, folder / "model") if p in found]
    best = preferred[0] if preferred else max(found, key=lambda p: (p / "config.json").stat().st_mtime)
    return str(best.relative_to(ctx.out))


def _samples(ctx: DemoContext) -> list[dict[str, Any]]:
    """One request per endpoint the demo serves, through the real app without a socket."""
    from fastapi.testclient import TestClient

    from mmstack.serve.app import create_app
    from mmstack.serve.config import load_serve_config

    app = create_app(load_serve_config(ctx.path("serve.yaml")))
    state = app.state.serve
    image, caption = _demo_image(ctx)
    requests: list[tuple[str, str, dict[str, Any]]] = []
    for name, svc in state.services.items():
        if "embeddings" in svc.capabilities:
            requests.append(("embeddings", "/v1/embeddings", {"model": name, "input": caption, "images": [image]}))
        if "chat" in svc.capabilities:
            content = [{"type": "text", "text": "What colour is the largest object?"}, _image_part(image)]
            body = {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 16}
            requests.append(("chat", "/v1/chat/completions", body))
        if "images" in svc.capabilities:
            requests.append(("images", "/v1/images/generations", {"model": name, "prompt": caption, "n": 1}))
    chat = [n for n, s in state.services.items() if "chat" in s.capabilities]
    for name in state.collections:
        requests.append(("search", "/v1/search", {"collection": name, "query": caption, "top_k": 3}))
        if chat:  # the RAG-tuned VLM when the demo has one (the last chat model listed)
            body = {"collection": name, "question": f"Which item shows {caption}?", "model": chat[-1]}
            requests.append(("rag", "/v1/rag", {**body, "max_tokens": 24}))
    out = []
    with TestClient(app) as client:
        for endpoint, path, body in requests:
            t0 = time.perf_counter()
            r = client.post(path, json=body)
            out.append(
                {
                    "endpoint": endpoint,
                    "path": path,
                    "status": r.status_code,
                    "ms": round(1000 * (time.perf_counter() - t0), 1),
                    "summary": _summary(endpoint, r.json()),
                }
            )
    return out


def _demo_image(ctx: DemoContext) -> tuple[str, str]:
    """A val-world image as a data URL, and its caption (or a stand-in when the world is missing)."""
    pairs = ctx.path("world", "val", "pairs.jsonl")
    if pairs.is_file():
        first = json.loads(pairs.read_text().splitlines()[0])
        data = (pairs.parent / first["image"]).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode(), first["caption"]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "a red square"


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def _summary(endpoint: str, body: dict[str, Any]) -> str:
    if "error" in body:
        return f"error: {body['error']['message']}"
    if endpoint == "embeddings":
        return f"{len(body['data'])} vectors of dimension {len(body['data'][0]['embedding'])}"
    if endpoint == "chat":
        return f"answer: {body['choices'][0]['message']['content']!r}"
    if endpoint == "images":
        return f"{len(body['data'])} image(s), {len(body['data'][0]['b64_json'])} base64 characters"
    if endpoint == "rag":
        return f"answer: {body['answer']!r}, citing {body['cited']}" if not body.get("message") else body["message"]
    hits = body.get("hits", [])
    return "; ".join(f"{h.get('caption') or h.get('path') or h['id']} ({h['score']:.3f})" for h in hits[:3])


def _html(command: str, samples: list[dict[str, Any]], missing: list[str]) -> str:
    rows = "".join(
        f"<tr><td><code>POST {html.escape(s['path'])}</code></td><td>{s['status']}</td><td>{s['ms']} ms</td>"
        f"<td>{html.escape(s['summary'])}</td></tr>"
        for s in samples
    )
    left_out = f"<p>Not served (their stage did not run): {html.escape(', '.join(missing))}.</p>" if missing else ""
    return (
        "<p>An OpenAI-compatible server with batching, search and a web page. Start it with "
        f"<code>{html.escape(command)}</code>, open <code>http://127.0.0.1:8000/</code>, or point the official "
        "<code>openai</code> client at <code>http://127.0.0.1:8000/v1</code>.</p>"
        f"{left_out}<table class='metrics'><tr><th>request</th><th>status</th><th>time</th><th>result</th></tr>"
        f"{rows}</table><p class='meta'>Sample requests answered in-process (no port opened).</p>"
    )
