"""Server load test: throughput and p50/p99 latency with batching on and off, and behaviour under overload.

A real ``mmstack serve`` process on 127.0.0.1 (demo-sized random models: a 64 px two-tower and a bridge
VLM) is driven by closed-loop clients (each sends its next request when the last one is answered) at 1,
8 and 32 concurrent clients, for embeddings (one text, or one 64 px image, per request) and chat (one
64 px image; 16 or 64 new tokens, greedy). The same run measures batching on (``max_batch_size`` 32, ``max_wait_ms`` 5) and off
(``max_batch_size`` 1). Targets: >= 4x throughput at 32 clients with batching; p99 at 32 clients within
2x of (the single-client latency + the max wait). Overload: 2x ``max_queue`` clients hammer the server;
every request is either answered (200) or refused at once (429), none is lost or fails otherwise, and the
server's memory stays bounded.

Every loop is bounded in count and in time, and all traffic goes to the loopback interface.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.timing import percentile

MAX_WAIT_MS = 5.0
LEVELS = (1, 8, 32)


def _save_models(root: Path) -> None:
    """Random demo-sized checkpoints, saved with each family's own ``save_pretrained``."""
    import torch

    from mmstack.models.bridge import BridgeConfig, BridgeModel
    from mmstack.models.two_tower import TwoTowerConfig, TwoTowerModel, default_processor
    from mmstack.processing import train_caption_tokenizer
    from mmstack.processing.bridge_processor import BridgeProcessor, train_chat_tokenizer

    words = ["a red blue green yellow circle square star triangle left right of above below what colour is the ?"]
    torch.manual_seed(0)
    cfg = TwoTowerConfig.from_preset("shapes-tiny")
    tok = train_caption_tokenizer(words, max_length=32)
    TwoTowerModel.from_config(cfg, default_processor(cfg, tok)).save_pretrained(root / "clip")
    chat_tok = train_chat_tokenizer(words, max_length=256)
    layer = {"intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    vision = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "hidden_size": 128, **layer}
    text = {"model_type": "llama", "vocab_size": len(chat_tok), "hidden_size": 128, "num_key_value_heads": 4}
    text.update(layer, max_position_embeddings=256, pad_token_id=chat_tok.pad_token_id)
    text.update(eos_token_id=chat_tok.eos_token_id, bos_token_id=chat_tok.bos_token_id)
    ids = {
        k: chat_tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<image>"), ("video_token_id", "<video>"))
    }
    vlm = BridgeModel(BridgeConfig(vision=vision, text=text, **ids)).eval()
    image = {"size": [64, 64], "resize_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}
    vlm.processor = BridgeProcessor.for_model(vlm, chat_tok, image=image)
    vlm.save_pretrained(root / "vlm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """``mmstack serve`` in a subprocess on 127.0.0.1 with the given batching section."""

    def __init__(self, root: Path, batching: dict[str, Any]) -> None:
        import yaml

        self.port = _free_port()
        self.config = root / f"serve-{self.port}.yaml"
        cfg = {"models": {"clip": "clip", "vlm": "vlm"}, "batching": batching, "generation": {"temperature": 0.0}}
        # One torch thread: the load generator needs the other core of the 2-core machine.
        self.config.write_text(yaml.safe_dump({**cfg, "log_level": "warning", "threads": 1}))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        import httpx

        cmd = [sys.executable, "-m", "mmstack", "serve", "--config", str(self.config), "--port", str(self.port)]
        env = {**os.environ, "MMSTACK_NO_PROGRESS": "1", "MMSTACK_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start within 120 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _image_url() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 40, 40), fill="red")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


KINDS = ("embeddings", "image_embeddings", "chat_16", "chat_64")
CHAT_TOKENS = {"chat_16": 16, "chat_64": 64}


def _bodies(kind: str, image: str) -> dict[str, Any]:
    if kind == "embeddings":
        return {"model": "clip", "input": "a red circle left of a blue square", "encoding_format": "float"}
    if kind == "image_embeddings":
        return {"model": "clip", "images": [image], "encoding_format": "float"}
    content = [
        {"type": "text", "text": "what colour is the circle ?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    # ignore_eos: every answer is exactly max_tokens long, so runs with and without batching compare.
    messages = [{"role": "user", "content": content}]
    return {"model": "vlm", "messages": messages, "max_tokens": CHAT_TOKENS[kind], "ignore_eos": True}


class _Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    The load generator shares the 2 cores with the server; a full client library costs about as much CPU
    per request as the server itself, which would cap what can be measured. This one only writes a POST
    and reads a ``Content-Length`` response (all the server sends for these endpoints).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        for attempt in range(2):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writer.write(request)
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionResetError):
                # The server closes keep-alive connections idle for 5 s; a fresh one is tried once.
                self.close()
                self.writer = None
                if attempt:
                    raise
        status = int(raw.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", raw).group(1))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _load(port: int, kind: str, clients: int, seconds: float, max_requests: int, image: str) -> dict[str, Any]:
    """Closed-loop clients for ``seconds`` (or ``max_requests`` in all): throughput and latency percentiles."""
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/embeddings"
    body = json.dumps(_bodies(kind, image)).encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    conns = [_Connection(port) for _ in range(clients)]
    await asyncio.gather(*(c.post(path, body) for c in conns))  # warm-up (connections, model paths), not measured
    t_end = time.perf_counter() + seconds

    async def worker(conn: _Connection) -> None:
        while time.perf_counter() < t_end and len(latencies) < max_requests:
            t0 = time.perf_counter()
            status, _ = await conn.post(path, body)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return {
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "statuses": statuses,
    }


async def _overload(port: int, clients: int, seconds: float, image: str) -> dict[str, Any]:
    """``clients`` closed-loop chat clients at once; counts answered, refused (429) and anything else."""
    counts = {"ok": 0, "refused_429": 0, "other": 0, "bad_answers": 0}
    body = json.dumps(_bodies("chat_16", image)).encode()
    t_end = time.perf_counter() + seconds

    async def worker() -> None:
        conn = _Connection(port)
        while time.perf_counter() < t_end:
            try:
                status, data = await conn.post("/v1/chat/completions", body)
            except (OSError, asyncio.IncompleteReadError):
                counts["other"] += 1
                conn = _Connection(port)
                continue
            if status == 200:
                counts["ok"] += 1
                counts["bad_answers"] += json.loads(data)["usage"]["completion_tokens"] != 16
            elif status == 429:
                counts["refused_429"] += 1
                await asyncio.sleep(0.05)  # a polite client backs off; the server must not depend on it
            else:
                counts["other"] += 1
        conn.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return counts


def _batch_totals(url: str) -> tuple[float, float, float]:
    """(batches, items, seconds in batches) so far, summed over models and ops, from /metrics."""
    import httpx

    totals = [0.0, 0.0, 0.0]
    for line in httpx.get(url + "/metrics").text.splitlines():
        for i, name in enumerate(("mmstack_batch_size_count", "mmstack_batch_size_sum", "mmstack_batch_seconds_sum")):
            if line.startswith(name + "{"):
                totals[i] += float(line.rsplit(" ", 1)[1])
    return totals[0], totals[1], totals[2]


def _measure(root: Path, batching: dict[str, Any], seconds: float, max_requests: int, image: str) -> dict:
    out: dict[str, Any] = {}
    with _Server(root, batching) as server:
        for kind in KINDS:
            out[kind] = {}
            for c in LEVELS:
                before = _batch_totals(server.url)
                res = asyncio.run(_load(server.port, kind, c, seconds, max_requests, image))
                n_batches, n_items, busy = (a - b for a, b in zip(_batch_totals(server.url), before, strict=True))
                res["mean_batch_size"] = round(n_items / max(n_batches, 1), 2)  # server side, warm-up included
                res["model_busy_s"] = round(busy, 2)
                out[kind][c] = res
    return out


def run(quick: bool) -> dict:
    seconds, max_requests = (2.0, 400) if quick else (8.0, 4000)
    image = _image_url()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _save_models(root)
        on = {"max_batch_size": 32, "max_wait_ms": MAX_WAIT_MS, "max_queue": 256}
        off = {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 256}
        results = {"batching_on": _measure(root, on, seconds, max_requests, image)}
        results["batching_off"] = _measure(root, off, seconds, max_requests, image)
        queue = 32
        with _Server(root, {**on, "max_queue": queue}) as server:
            rss_before = server.rss_mb()
            counts = asyncio.run(_overload(server.port, 2 * queue, 2 * seconds, image))
            rss_mid = server.rss_mb()
            counts2 = asyncio.run(_overload(server.port, 2 * queue, 2 * seconds, image))
            rss_after = server.rss_mb()
    summary = {}
    for kind in KINDS:
        on_k, off_k = results["batching_on"][kind], results["batching_off"][kind]
        single = on_k[1]["p50_ms"]
        summary[kind] = {
            "speedup_at_32": round(on_k[32]["throughput_rps"] / off_k[32]["throughput_rps"], 2),
            "p99_at_32_ms": on_k[32]["p99_ms"],
            "p99_bound_ms": round(2 * (single + MAX_WAIT_MS), 1),
            "speedup_target_met": on_k[32]["throughput_rps"] >= 4 * off_k[32]["throughput_rps"],
            "p99_target_met": on_k[32]["p99_ms"] <= 2 * (single + MAX_WAIT_MS),
        }
    overload = {
        "max_queue": queue,
        "clients": 2 * queue,
        "rounds": [counts, counts2],
        "rss_mb": [round(rss_before, 1), round(rss_mid, 1), round(rss_after, 1)],
        "no_accepted_request_lost": all(c["other"] == 0 and c["bad_answers"] == 0 for c in (counts, counts2)),
    }
    return {"levels": list(LEVELS), "max_wait_ms": MAX_WAIT_MS, **results, "summary": summary, "overload": overload}
