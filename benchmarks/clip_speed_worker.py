"""One side of the CLIP training-speed comparison, run in its own process by ``bench_clip``.

    python -m benchmarks.clip_speed_worker ours|open_clip BATCHES.pt STEPS WARMUP THREADS

``BATCHES.pt`` (written by ``bench_clip``) holds uint8 pixels, token ids, masks, normalisation constants,
the architecture and the index list of every step, so both sides train the same architecture on the
same batches. Prints one JSON line: samples/s over the timed steps, parameters, final loss.

open_clip is imported without its package ``__init__`` (which needs torchvision for its data transforms):
a bare ``open_clip`` package object points at the installed source and its model modules are imported
from there. The only torchvision symbol those modules touch at import, ``ops.misc.FrozenBatchNorm2d``
(used to freeze ResNet batch norms), is given a placeholder that is never called for ViT towers.
PyPI's torchvision cannot load beside this CPU build of torch (its compiled ops fail to register).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path

import torch


def load_open_clip():
    """``(CLIP, ClipLoss)`` from the installed open_clip source, without torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip_torch is not installed: pip install --no-deps open_clip_torch==3.3.0")
    import transformers  # noqa: F401  (open_clip.hf_model imports it; it must see the real, absent torchvision)

    if "torchvision" not in sys.modules:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))

        class FrozenBatchNorm2d(torch.nn.Module):  # placeholder: only ResNet towers use it
            def __init__(self, *args, **kwargs):
                raise RuntimeError("FrozenBatchNorm2d is not available in this benchmark")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = pkg
    model = importlib.import_module("open_clip.model")
    loss = importlib.import_module("open_clip.loss")
    return model.CLIP, loss.ClipLoss


def batches(data: dict, steps: int, width: int | None = None):
    """Normalised pixels and tokens of each step (``width`` tokens, default: the longest caption)."""
    mean, std = data["mean"].view(1, 3, 1, 1), data["std"].view(1, 3, 1, 1)
    for idx in data["steps"][:steps]:
        mask = data["attention_mask"][idx]
        ids = data["input_ids"][idx]
        w = width or int(mask.sum(1).max())
        if w > ids.shape[1]:  # pad with the pad id 0 (open_clip's tokenizer pads every text to the context)
            ids, mask = (torch.nn.functional.pad(t, (0, w - t.shape[1])) for t in (ids, mask))
        px = torch.addcmul(-mean / std, data["pixels"][idx].float(), 1.0 / (255.0 * std))
        yield px, ids[:, :w], mask[:, :w]


def run_open_clip(data: dict, steps: int, warmup: int) -> dict:
    CLIP, ClipLoss = load_open_clip()
    a = data["arch"]
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=a["embed_dim"],
        vision_cfg={"image_size": a["image_size"], "patch_size": a["patch_size"], "width": a["vision_width"],
                    "layers": a["vision_layers"], "head_width": a["vision_width"] // a["vision_heads"],
                    "mlp_ratio": a["vision_mlp"] / a["vision_width"]},
        text_cfg={"context_length": a["context_length"], "vocab_size": a["vocab_size"], "width": a["text_width"],
                  "heads": a["text_heads"], "layers": a["text_layers"],
                  "mlp_ratio": a["text_mlp"] / a["text_width"]},
        output_dict=True,
    )  # fmt: skip
    loss_fn = ClipLoss()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.1},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    model.train()

    def step(px, ids, _mask):
        # open_clip_train's train_one_epoch without accumulation: forward, loss, backward, step, clamp
        opt.zero_grad(set_to_none=True)
        out = model(px, ids)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    # open_clip's text tower adds its whole positional table, so texts must fill the context (as its tokenizer pads)
    width = a["context_length"]
    return _time(step, data, steps, warmup, sum(p.numel() for p in model.parameters()), width)


def run_ours(data: dict, steps: int, warmup: int) -> dict:
    """Our shared trainer with ``ClipTask`` on the same batches (its sampler draws the same index lists)."""
    import tempfile

    from mmstack.models.losses import ClipLoss
    from mmstack.models.two_tower import TwoTowerModel
    from mmstack.train.clip_data import PairTensors
    from mmstack.train.clip_task import ClipTask
    from mmstack.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    model = TwoTowerModel.from_pretrained(data["checkpoint"])
    task = ClipTask(model, ClipLoss(cache_labels=True), text_buckets=data["text_buckets"])
    n = len(data["pixels"])
    ds = PairTensors(data["pixels"], data["input_ids"], data["attention_mask"], torch.arange(n + 1),
                     data["mean"].tolist(), data["std"].tolist())  # fmt: skip
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=warmup + steps, batch_size=data["batch_size"],
                      log_every=warmup + steps, seed=data["seed"])  # fmt: skip
    marks: dict[int, tuple[float, float]] = {}

    def mark(step: int, metrics: dict) -> None:
        if step in (warmup, warmup + steps):
            marks[step] = (time.perf_counter(), time.process_time())
        marks["loss"] = metrics["loss"]

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, ds, cfg, tmp, on_step_end=mark, resume=False)
        assert all(torch.equal(trainer.sampler.indices(i), data["steps"][i]) for i in range(3)), "other batches"
        trainer.fit()
    (t0, c0), (t1, c1) = marks[warmup], marks[warmup + steps]
    b = data["batch_size"]
    return {"samples_per_s": b * steps / (t1 - t0), "samples_per_cpu_s": b * steps / (c1 - c0), "wall_s": t1 - t0,
            "cpu_s": c1 - c0, "parameters": model.num_parameters(), "final_loss": marks["loss"]}  # fmt: skip


def _time(step, data: dict, steps: int, warmup: int, parameters: int, width: int | None = None) -> dict:
    loss = None
    t0 = c0 = 0.0
    n = 0
    for i, (px, ids, mask) in enumerate(batches(data, warmup + steps, width)):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        loss = step(px, ids, mask)
        n += len(px) if i >= warmup else 0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"samples_per_s": n / wall, "samples_per_cpu_s": n / cpu, "wall_s": wall, "cpu_s": cpu,
            "parameters": parameters, "final_loss": float(loss)}  # fmt: skip


def main(argv: list[str]) -> None:
    side, path, steps, warmup, threads = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    torch.set_num_threads(threads)  # OMP_WAIT_POLICY is set by bench_clip before torch loads here
    data = torch.load(path, weights_only=False)
    result = (run_ours if side == "ours" else run_open_clip)(data, steps, warmup)
    print(json.dumps({"side": side, "threads": threads, **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
