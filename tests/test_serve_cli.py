"""``mmstack serve``: config and flags, clear errors, and a real server process on the loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from _net import free_port
from _serve_models import save_clip
from mmstack.config import configs_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("cli") / "clip")


def test_check_with_flags(run_cli, clip_dir):
    res = run_cli("serve", "--model", f"clip={clip_dir}", "--check", "--json")
    assert res.code == 0, res.err
    out = res.json()
    assert out["models"] == {"clip": "two_tower"}
    assert out["url"] == "http://127.0.0.1:8000" and out["api_key"] is False


def test_config_paths_are_relative_to_the_file_and_flags_override(run_cli, clip_dir, tmp_path):
    cfg = clip_dir.parent / "serve.yaml"
    cfg.write_text("port: 8123\nmodels:\n  emb: clip\nbatching: {max_wait_ms: 2}\n")
    res = run_cli("serve", "--config", cfg, "--port", "9001", "--host", "127.0.0.2", "--check", "--json")
    assert res.code == 0, res.err
    assert res.json()["url"] == "http://127.0.0.2:9001" and res.json()["models"] == {"emb": "two_tower"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "nothing to serve"),
        (("--model", "clip"), "NAME=PATH"),
        (("--model", "x=/does/not/exist"), "does not exist"),
        (("--model", "x=/tmp", "--set", "batching.max_wiat_ms=1"), "did you mean 'max_wait_ms'"),
    ],
)
def test_bad_invocations_fail_with_one_line(run_cli, args, message):
    res = run_cli("serve", *args, "--check")
    assert res.code == 2 and message in res.err and "Traceback" not in res.err


def test_example_config_is_valid():
    from mmstack.serve.config import load_serve_config

    cfg = load_serve_config(configs_dir() / "serve-example.yaml")
    assert cfg.host == "127.0.0.1" and set(cfg.models) == {"clip", "vlm", "native"}
    assert cfg.batching_for("vlm").max_batch_size == 8 and cfg.batching_for("clip").max_batch_size == 16
    assert cfg.collections["demo"].db.endswith("demo-output/index/db")


def _start_server(args: list[str], env: dict[str, str], tries: int = 3) -> tuple[subprocess.Popen, str]:
    """Start ``mmstack serve`` on a free loopback port and wait for /healthz.

    A port found free can be taken by another process (a parallel test worker, gloo's
    ephemeral sockets) before the server binds it, so a bind clash retries on a new port.
    """
    for attempt in range(tries):
        port = free_port()
        cmd = [sys.executable, "-m", "mmstack", "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
            pytest.fail("the server did not answer /healthz within 60 s")
        err = proc.stderr.read().decode()
        if "address already in use" not in err or attempt == tries - 1:
            pytest.fail(f"the server exited with {proc.returncode}:\n{err}")
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_serve_process_answers_on_loopback(clip_dir):
    env = {**os.environ, "MMSTACK_API_KEY": "k1"}
    proc, url = _start_server(["--model", f"clip={clip_dir}"], env)
    try:
        body = {"model": "clip", "input": "a red circle", "encoding_format": "float"}
        assert httpx.post(url + "/v1/embeddings", json=body).status_code == 401  # the key came from the env
        r = httpx.post(url + "/v1/embeddings", json=body, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
    finally:
        proc.terminate()
        proc.wait(10)
