"""Server load test: throughput and p50/p99 latency with batching on and off, and behaviour under overload.

A real ``mmstack serve`` process on 127.0.0.1 (demo-sized random models: a 64 px two-tower and a bridge
VLM) is driven by closed-loop clients (each sends its next request when the last one is answered) at 1,
8 and 32 concurrent clients, for embeddings (one text, or one 64 px image, per request) and chat (one
64 px image; 16 or 64 new tokens, greedy; ``chat_mixed``: half the clients ask for 16 tokens, half for
64, and ``p99_short_ms`` is the p99 of the short ones). The same run measures batching on
(``max_batch_size`` 32, ``max_wait_ms`` 5; chat batched continuously: requests join the running
generation at each step), off (``max_batch_size`` 1), and for chat also whole-batch batching
(``continuous: false``: a batch runs to its end before the next starts), to show what continuous batching
changes. One server per config runs the whole time and the configs take turns at each level, so that
they are compared under the same machine load.

Targets: >= 4x throughput at 32 clients with batching; p99 at 32 clients within 2x of (the single-request
latency + the max wait), where the single-request latency is the p50 at 1 client with batching off. Each
level also reports the bound, the mean latency that Little's law forces at the measured throughput
(clients / throughput: no server at that throughput can have a lower mean), the server's CPU time per
request and the mean batch size by operation. ``model_costs`` times the models alone (one torch thread)
per item at batch 1 and 32, which caps what batching can gain. Overload: 2x ``max_queue`` clients hammer
the server; every request is either answered (200) or refused at once (429), none is lost or fails
otherwise, and the server's memory stays bounded.

Every loop is bounded in count and in time, and all traffic goes to the loopback interface.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
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

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


KINDS = ("embeddings", "image_embeddings", "chat_16", "chat_64", "chat_mixed")
# chat_mixed: even-numbered clients ask for 16 tokens, odd ones for 64 (short requests behind long ones).
CHAT_TOKENS = {"chat_16": (16,), "chat_64": (64,), "chat_mixed": (16, 64)}


def _bodies(kind: str, image: str) -> list[dict[str, Any]]:
    """The request bodies of a workload; client ``i`` sends body ``i % len(bodies)``."""
    if kind == "embeddings":
        return [{"model": "clip", "input": "a red circle left of a blue square", "encoding_format": "float"}]
    if kind == "image_embeddings":
        return [{"model": "clip", "images": [image], "encoding_format": "float"}]
    content = [
        {"type": "text", "text": "what colour is the circle ?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    # ignore_eos: every answer is exactly max_tokens long, so runs with and without batching compare.
    messages = [{"role": "user", "content": content}]
    return [{"model": "vlm", "messages": messages, "max_tokens": n, "ignore_eos": True} for n in CHAT_TOKENS[kind]]


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
    """Closed-loop clients for ``seconds`` (or ``max_requests`` in all): throughput and latency percentiles
    (with several bodies, also the p99 of the requests that send the first, shortest one)."""
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/embeddings"
    bodies = [json.dumps(b).encode() for b in _bodies(kind, image)]
    latencies: list[list[float]] = [[] for _ in bodies]
    statuses: dict[int, int] = {}
    conns = [_Connection(port) for _ in range(clients)]
    # Warm-up (connections, model paths), not measured.
    await asyncio.gather(*(c.post(path, bodies[i % len(bodies)]) for i, c in enumerate(conns)))
    t_end = time.perf_counter() + seconds

    async def worker(i: int, conn: _Connection) -> None:
        while time.perf_counter() < t_end and sum(map(len, latencies)) < max_requests:
            t0 = time.perf_counter()
            status, _ = await conn.post(path, bodies[i % len(bodies)])
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies[i % len(bodies)].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    wall = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    every = [x for lat in latencies for x in lat]
    out = {
        "requests": len(every),
        "throughput_rps": round(len(every) / wall, 2),
        "p50_ms": round(1000 * percentile(every, 50), 1),
        "p99_ms": round(1000 * percentile(every, 99), 1),
        "statuses": statuses,
    }
    if len(bodies) > 1 and latencies[0]:
        out["p99_short_ms"] = round(1000 * percentile(latencies[0], 99), 1)
    return out


async def _overload(port: int, clients: int, seconds: float, image: str) -> dict[str, Any]:
    """``clients`` closed-loop chat clients at once; counts answered, refused (429) and anything else."""
    counts = {"ok": 0, "refused_429": 0, "other": 0, "bad_answers": 0}
    body = json.dumps(_bodies("chat_16", image)[0]).encode()
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


def _batch_totals(url: str) -> dict[str, list[float]]:
    """op -> [batches, items, seconds in batches] so far, summed over models, from /metrics."""
    import httpx

    names = ("mmstack_batch_size_count", "mmstack_batch_size_sum", "mmstack_batch_seconds_sum")
    totals: dict[str, list[float]] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for i, name in enumerate(names):
            if line.startswith(name + "{"):
                op = re.search(r'op="([^"]*)"', line).group(1)
                totals.setdefault(op, [0.0, 0.0, 0.0])[i] += float(line.rsplit(" ", 1)[1])
    return totals


def _level(server: _Server, kind: str, clients: int, seconds: float, max_requests: int, image: str) -> dict:
    """One load level, with the server's CPU time and batch sizes over it (warm-up included)."""
    before, cpu0, client0 = _batch_totals(server.url), server.cpu_s(), time.process_time()
    res = asyncio.run(_load(server.port, kind, clients, seconds, max_requests, image))
    after, cpu = _batch_totals(server.url), server.cpu_s() - cpu0
    delta = {op: [a - b for a, b in zip(v, before.get(op, [0.0] * 3), strict=True)] for op, v in after.items()}
    delta = {op: v for op, v in delta.items() if v[0] > 0}
    res["mean_batch_size"] = {op: round(v[1] / v[0], 2) for op, v in delta.items()}
    res["model_busy_s"] = round(sum(v[2] for v in delta.values()), 2)
    n = max(res["requests"] + clients, 1)  # the warm-up requests count too
    res["server_cpu_ms_per_request"] = round(1000 * cpu / n, 2)
    res["client_cpu_ms_per_request"] = round(1000 * (time.process_time() - client0) / n, 2)
    res["littles_law_mean_ms"] = round(1000 * clients / res["throughput_rps"], 1) if res["throughput_rps"] else None
    return res


def _measure(root: Path, configs: dict[str, dict[str, Any]], seconds: float, max_requests: int, image: str) -> dict:
    """Every workload and level on one server per batching config, the configs taking turns at each level
    so that they meet the same machine load (the machine is shared)."""
    out: dict[str, Any] = {name: {} for name in configs}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(_Server(root, cfg)) for name, cfg in configs.items()}
        for kind in KINDS:
            for c in LEVELS:
                for name, server in servers.items():
                    if name == "batching_whole_chat" and not kind.startswith("chat"):
                        continue
                    out[name].setdefault(kind, {})[c] = _level(server, kind, c, seconds, max_requests, image)
    return out


def _model_costs(root: Path) -> dict[str, Any]:
    """Milliseconds per item of the models alone (one torch thread) at batch 1 and 32: what batching can
    save at most, apart from the per-request HTTP work."""
    import torch

    import mmstack
    from benchmarks.timing import median_seconds
    from mmstack.data.images import decode_data_url

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clip, vlm = mmstack.load(root / "clip"), mmstack.load(root / "vlm")
        url = _image_url()
        prep = median_seconds(lambda: clip.processor.images_uint8([decode_data_url(url)]), repeats=20)
        out: dict[str, float] = {"image_decode_preprocess_ms": 1000 * prep}
        with torch.inference_mode():
            for b in (1, 32):
                out.update(_embed_costs(clip, decode_data_url(url), b))
                out.update(_chat_costs(vlm, decode_data_url(url), b))
    finally:
        torch.set_num_threads(threads)
    return {k: round(v, 3) for k, v in out.items()}


def _embed_costs(clip: Any, img: Any, b: int) -> dict[str, float]:
    from benchmarks.timing import median_seconds

    enc = clip.processor.text(["a red circle left of a blue square"] * b)
    pixels = clip.processor.images([img] * b)
    t_text = median_seconds(lambda: clip.encode_text(enc["input_ids"], enc["attention_mask"]), 5)
    t_image = median_seconds(lambda: clip.encode_image(pixels), 5)
    return {f"text_ms_per_item_b{b}": 1000 * t_text / b, f"image_ms_per_item_b{b}": 1000 * t_image / b}


def _chat_costs(vlm: Any, img: Any, b: int) -> dict[str, float]:
    """Prefill per row and one decode step of ``b`` rows (64 px image prompts), as the server runs them."""
    from benchmarks.timing import median_seconds
    from mmstack.serve.running_batch import RunningBatch

    turns = [{"from": "human", "value": "what colour is the circle ?\n<image>"}]
    inputs = vlm.processor.prompts([turns] * b, images=[img] * b, padding_side="left")
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    batch = RunningBatch(vlm)
    t_prefill = median_seconds(lambda: batch.prefill(*args), 3)
    batch.add(batch.prefill(*args))
    tokens = batch.logits.argmax(-1)
    t_step = median_seconds(lambda: batch.step(tokens), 5)  # the cache grows by a column per step, as it does
    return {f"chat_prefill_ms_per_row_b{b}": 1000 * t_prefill / b, f"chat_decode_step_ms_b{b}": 1000 * t_step}


def run(quick: bool) -> dict:
    seconds, max_requests = (2.0, 400) if quick else (8.0, 4000)
    image = _image_url()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _save_models(root)
        costs = _model_costs(root)
        on = {"max_batch_size": 32, "max_wait_ms": MAX_WAIT_MS, "max_queue": 256}
        off = {"max_batch_size": 1, "max_wait_ms": 0, "max_queue": 256}
        whole = {**on, "continuous": False}
        configs = {"batching_on": on, "batching_off": off, "batching_whole_chat": whole}
        results = _measure(root, configs, seconds, max_requests, image)
        queue = 32
        with _Server(root, {**on, "max_queue": queue}) as server:
            rss_before = server.rss_mb()
            counts = asyncio.run(_overload(server.port, 2 * queue, 2 * seconds, image))
            rss_mid = server.rss_mb()
            counts2 = asyncio.run(_overload(server.port, 2 * queue, 2 * seconds, image))
            rss_after = server.rss_mb()
    summary = {kind: _summary(results, kind) for kind in KINDS}
    overload = {
        "max_queue": queue,
        "clients": 2 * queue,
        "rounds": [counts, counts2],
        "rss_mb": [round(rss_before, 1), round(rss_mid, 1), round(rss_after, 1)],
        "no_accepted_request_lost": all(c["other"] == 0 and c["bad_answers"] == 0 for c in (counts, counts2)),
    }
    return {
        "levels": list(LEVELS),
        "max_wait_ms": MAX_WAIT_MS,
        "model_costs": costs,
        **results,
        "summary": summary,
        "overload": overload,
    }


def _summary(results: dict, kind: str) -> dict[str, Any]:
    """Targets at 32 clients; the bound is also written beside every p99 of the batched runs."""
    on_k, off_k = results["batching_on"][kind], results["batching_off"][kind]
    single = off_k[1]["p50_ms"]  # one request alone, no batching wait
    bound = round(2 * (single + MAX_WAIT_MS), 1)
    for config in ("batching_on", "batching_whole_chat"):
        for level in results.get(config, {}).get(kind, {}).values():
            level["p99_bound_ms"] = bound
    out = {
        "single_request_ms": single,
        "speedup_at_32": round(on_k[32]["throughput_rps"] / off_k[32]["throughput_rps"], 2),
        "p99_at_32_ms": on_k[32]["p99_ms"],
        "p99_bound_ms": bound,
        "littles_law_mean_at_32_ms": on_k[32]["littles_law_mean_ms"],
        "speedup_target_met": on_k[32]["throughput_rps"] >= 4 * off_k[32]["throughput_rps"],
        "p99_target_met": on_k[32]["p99_ms"] <= bound,
    }
    if "p99_short_ms" in on_k[32]:
        out["p99_short_at_32_ms"] = on_k[32]["p99_short_ms"]
    if kind in results.get("batching_whole_chat", {}):
        whole = results["batching_whole_chat"][kind][32]
        out["whole_batch_p99_at_32_ms"] = whole["p99_ms"]
        out["whole_batch_speedup_at_32"] = round(whole["throughput_rps"] / off_k[32]["throughput_rps"], 2)
        if "p99_short_ms" in whole:
            out["whole_batch_p99_short_at_32_ms"] = whole["p99_short_ms"]
    return out
