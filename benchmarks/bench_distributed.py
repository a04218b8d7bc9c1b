"""Beyond one process: 2-process DDP training against 1 process, and Ray Data embedding against the local build.

Training: ``mmstack train clip`` with ``configs/clip-demo.yaml`` (shapes-tiny, global batch 256) on a 64 px
shapes world, run as the real commands: one process with 1 thread, one process with 2 threads, and
``torchrun --nproc_per_node 2`` (each rank 1 thread, gloo all-reduce). Samples/s is the trainer's own (the
loop only, global batch). Scaling efficiency = 2-process samples/s / (2 x 1-process 1-thread samples/s).
The limit on this machine: 2 cores in all, so 2 processes share them with nothing to spare (the gloo
all-reduce, the gathers and Python compete with the compute), and the 2-thread single process is the fair
"same hardware" baseline. On real multi-GPU nodes each rank has its own device. The final losses differ a
little: clip-demo draws one of each scene's captions per step from each rank's own RNG (the exact-parity
checks are in tests/test_distributed.py).

Embedding: ``build_collection`` (local, 2 decode threads) against ``build_collection_ray`` (a local Ray
instance with 2 CPUs: decode tasks + 1 model actor with 1 thread, 4 partitions) on the same images and
model; items/s over the embedding phase, Ray's start-up reported apart; the vectors are checked equal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _train(cmd_prefix: list[str], data: Path, out: Path, steps: int, threads: int, cache: Path) -> dict:
    args = ["-m", "mmstack", "train", "clip", "--config", "configs/clip-demo.yaml", "--data", str(data)]
    args += ["--out", str(out), "--max-steps", str(steps), "--json", f"--data.cache_dir={cache}"]
    args += ["--train.log_every", str(steps), f"--train.threads={threads}"]
    env = {**os.environ, "MMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([*cmd_prefix, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("{"))
    return json.loads(line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_training(tmp: Path, quick: bool) -> dict:
    from mmstack.world import generate_world

    steps = 15 if quick else 60
    data = tmp / "world"
    generate_world(data, n=1024, seed=0)
    cache = tmp / "cache"
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _train(py, data, tmp / "warm", 2, 1, cache)  # fills the pixel cache so no run pays for decoding
    one = _train(py, data, tmp / "one", steps, 1, cache)
    one2 = _train(py, data, tmp / "one2", steps, 2, cache)
    two = _train([*torchrun, "--master_port", str(_free_port())], data, tmp / "two", steps, 1, cache)
    return {
        "model": "clip-demo (shapes-tiny), global batch 256",
        "steps": steps,
        "samples_per_s_1proc_1thread": one["samples_per_s"],
        "samples_per_s_1proc_2threads": one2["samples_per_s"],
        "samples_per_s_2proc_ddp": two["samples_per_s"],
        "scaling_efficiency_vs_1thread": round(two["samples_per_s"] / (2 * one["samples_per_s"]), 3),
        "speedup_vs_1proc_2threads": round(two["samples_per_s"] / one2["samples_per_s"], 3),
        "final_loss_1proc": round(one["final_loss"], 4),
        "final_loss_2proc": round(two["final_loss"], 4),
    }


def bench_embedding(tmp: Path, quick: bool) -> dict:
    import numpy as np
    import ray
    import torch

    from benchmarks.bench_index_build import _model
    from mmstack.index.builder import BuildConfig, build_collection
    from mmstack.index.ray_embed import RayConfig, build_collection_ray
    from mmstack.index.store import SqliteStore
    from mmstack.world import generate_world

    n = 256 if quick else 2000
    data = tmp / "emb-world"
    generate_world(data, n=n, seed=1)
    model = _model(tmp / "tiny")
    torch.set_num_threads(1)
    cfg = BuildConfig(batch_size=64, workers=2)
    local = build_collection(tmp / "local.db", [data], str(model), "none", cfg)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start_s = time.perf_counter() - t0
    try:
        ray_cfg = RayConfig(partitions=4, actors=1)
        remote = build_collection_ray(tmp / "ray.db", [data], str(model), "none", cfg, ray_cfg=ray_cfg)
    finally:
        ray.shutdown()
    vecs = []
    for db in ("local.db", "ray.db"):
        with SqliteStore.open(tmp / db) as store:
            vecs.append(np.concatenate([v for _, v in store.iter_vectors("image")]))
    return {
        "images": n,
        "model": "shapes-tiny two-tower (random weights)",
        "local_items_per_s": round(local.items_embedded / local.embed_seconds, 1),
        "ray_items_per_s": round(remote.items_embedded / remote.embed_seconds, 1),
        "local_build_s": round(local.seconds, 2),
        "ray_build_s": round(remote.seconds, 2),
        "ray_start_s": round(start_s, 2),
        "max_abs_vector_diff": float(np.abs(vecs[0] - vecs[1]).max()),
    }


def run(quick: bool) -> dict:
    """Quick: 15 training steps and 256 images (about 2 minutes here). Full: 60 steps and 2,000 images."""
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        return {
            "training": bench_training(Path(tmp), quick),
            "embedding": bench_embedding(Path(tmp), quick),
            "limits": "2 cores shared by both processes (1 thread each); Ray on the same 2 cores",
        }
