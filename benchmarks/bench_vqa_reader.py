"""Where the bridge VLM's answers are lost: the same small question reader over different visual tokens.

A VLM A/B costs about ten minutes; this diagnostic answers "do these visual tokens hold what the questions
need?" in a few. One reader, a 4-layer 128-wide transformer classifier over [visual tokens; question words]
that predicts the answer string (every (image, question) pair of the world's conversations, one per
sample), is trained for the same steps on:

- **oracle** tokens: one per world cell (3 x 3), one-hot (occupied, shape, colour, size) from the scene's
  ground truth, i.e. a perfect object-centric vision tower;
- **tower** tokens: the frozen demo CLIP's hidden states (layer -2 with and without CLS, as the bridge reads
  them; the last layer), and its post-norm last-layer patch tokens pooled by area into the world's 3 x 3 cells.

Accuracy is reported by question kind on the val world (exact answer match). If the oracle reader is
near-perfect where the tower's is not, either the features lack what the questions need or the reader cannot
get it out of them in its steps: ``cell probe`` tells which, with one linear probe per attribute (shape,
colour, size, occupied) on the tower's 3 x 3 cell tokens, fitted to the ground truth of the training scenes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_bridge import _clip, _worlds

STEPS, QUICK_STEPS = 1500, 30
BATCH = 128


def qa_rows(folder: Path) -> list[tuple[int, list[str], str, str]]:
    """(image index, question words, answer, kind) for every turn of ``conversations.json``."""
    rows = []
    for i, conv in enumerate(json.loads((folder / "conversations.json").read_text())):
        turns = conv["conversations"]
        for j in range(0, len(turns), 2):
            words = re.sub(r"<image>\n?", "", turns[j]["value"]).lower().replace("?", " ?").split()
            rows.append((i, words, turns[j + 1]["value"], conv["kinds"][j // 2]))
    return rows


def oracle_tokens(folder: Path) -> torch.Tensor:
    """(N, 9, 19) ground-truth cell tokens: occupied, shape (8), colour (8), size (2), one-hot."""
    from mmstack.world.vocab import COLOUR_NAMES, SHAPES, SIZES

    scenes = {}
    for line in (folder / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        scenes[scene["id"]] = scene
    convs = json.loads((folder / "conversations.json").read_text())
    out = torch.zeros(len(convs), 9, 1 + len(SHAPES) + len(COLOUR_NAMES) + len(SIZES))
    for i, conv in enumerate(convs):
        for obj in scenes[conv["id"]]["objects"]:
            token = out[i, obj["row"] * 3 + obj["col"]]
            token[0] = 1
            token[1 + SHAPES.index(obj["shape"])] = 1
            token[1 + len(SHAPES) + COLOUR_NAMES.index(obj["colour"])] = 1
            token[1 + len(SHAPES) + len(COLOUR_NAMES) + SIZES.index(obj["size"])] = 1
    return out


@functools.cache
def _two_tower(clip: Path) -> Any:
    """The two-tower checkpoint, loaded once per run."""
    from mmstack import load

    return load(str(clip)).eval()


def _image_batches(model: Any, folder: Path, size: int = 500) -> Iterator[torch.Tensor]:
    """Pixels of the conversations' images, ``size`` at a time, in conversation order."""
    from mmstack.data.images import load_image

    convs = json.loads((folder / "conversations.json").read_text())
    for start in range(0, len(convs), size):
        yield model.processor.images([load_image(folder / c["image"]) for c in convs[start : start + size]])


@functools.cache
@torch.no_grad()
def tower_cells(clip: Path, folder: Path, grid: int = 3) -> torch.Tensor:
    """(N, 1 + grid * grid, D): the tower's CLS and its post-norm last-layer patch tokens pooled by area to a
    ``grid`` x ``grid`` grid (the region term's cell features before the projection); computed once per run."""
    from mmstack.models.regions import box_weights

    model = _two_tower(clip)
    tower = getattr(model.vision_model, "vision_model", model.vision_model)
    edges = torch.linspace(0, 1, grid + 1)
    boxes = torch.tensor([[edges[c], edges[r], edges[c + 1], edges[r + 1]] for r in range(grid) for c in range(grid)])
    parts = []
    for pixels in _image_batches(model, folder):
        out = model.vision_model(pixel_values=pixels)
        patches = tower.post_layernorm(out.last_hidden_state[:, 1:])  # (B, T, D)
        side = int(patches.shape[1] ** 0.5)
        cells = box_weights(boxes, side, side) @ patches  # (B, grid * grid, D)
        parts.append(torch.cat([out.pooler_output[:, None], cells], dim=1))
    return torch.cat(parts)


@torch.no_grad()
def concept_cells(clip: Path, folder: Path, temperature: float = 0.1) -> torch.Tensor:
    """(N, 9, P): each 3 x 3 cell's projected embedding scored against the text embeddings of every object
    phrase of the world ("a small red circle", ..., "an empty cell"), softmax at ``temperature``: the tower's
    zero-shot reading of each cell, a token in the oracle's one-hot-like format."""
    from mmstack.eval.embed import embed_texts
    from mmstack.train.clip_data import EMPTY_REGION
    from mmstack.world.language import article
    from mmstack.world.vocab import COLOUR_NAMES, SHAPES, SIZES

    model = _two_tower(clip)
    words = [f"{size} {colour} {shape}" for size in SIZES for colour in COLOUR_NAMES for shape in SHAPES]
    phrases = embed_texts(model, [f"{article(w)} {w}" for w in words] + [EMPTY_REGION], desc="phrases")  # (P, E)
    cells = tower_cells(clip, folder, 3)[:, 1:]  # (N, 9, D) post-norm cell tokens
    embedded = torch.nn.functional.normalize(model.visual_projection(cells), dim=-1)  # (N, 9, E)
    return (embedded @ phrases.T / temperature).softmax(-1)


@torch.no_grad()
def tower_tokens(clip: Path, folder: Path, layer: int, keep_cls: bool) -> torch.Tensor:
    """(N, T, D) hidden states of the two-tower checkpoint's image tower for the conversations' images."""
    model = _two_tower(clip)
    parts = []
    for pixels in _image_batches(model, folder):
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        parts.append(hidden if keep_cls else hidden[:, 1:])
    return torch.cat(parts)


class QuestionReader(nn.Module):
    """A transformer over projected visual tokens and question words; answers from the last slot.

    ``order``: ``bidirectional`` (every position sees every other), ``image first`` (causal, the visual tokens
    before the question, as a LLaVA-style decoder reads ``<image>\nquestion``) or ``question first`` (causal,
    the question before the visual tokens, so they can attend to it).
    """

    ORDERS = ("bidirectional", "image first", "question first")

    def __init__(
        self,
        token_dim: int,
        n_tokens: int,
        vocab: int,
        max_words: int,
        n_answers: int,
        width: int = 128,
        order: str = "bidirectional",
    ):
        super().__init__()
        if order not in self.ORDERS:
            raise ValueError(f"reader order must be one of {self.ORDERS}, got {order!r}")
        self.order = order
        self.project = nn.Sequential(nn.Linear(token_dim, width), nn.GELU(), nn.Linear(width, width))
        self.words = nn.Embedding(vocab + 2, width)  # 0 = padding, vocab + 1 = the answer slot
        self.position = nn.Parameter(torch.randn(n_tokens + max_words + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(width, n_answers)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        slot = self.words.weight[-1].expand(len(words), 1, -1)
        parts = [self.project(tokens), self.words(words)]
        if self.order == "question first":
            parts.reverse()
        x = torch.cat([*parts, slot], dim=1) + self.position  # (B, T + L + 1, W)
        mask = None
        if self.order != "bidirectional":
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.encoder(x, mask=mask, is_causal=mask is not None)[:, -1])  # (B, n_answers)


def cell_labels(folder: Path) -> torch.Tensor:
    """(N, 9, 3) shape / colour / size index of each cell's object (-1 for an empty cell), in conversation order."""
    oracle = oracle_tokens(folder)  # (N, 9, 19) one-hot: occupied, shape (8), colour (8), size (2)
    labels = torch.stack([oracle[..., 1:9].argmax(-1), oracle[..., 9:17].argmax(-1), oracle[..., 17:].argmax(-1)], -1)
    return labels.masked_fill(oracle[..., :1] == 0, -1)


def _fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> nn.Linear:
    """A logistic-regression probe ``x`` (N, D) -> ``y`` (N,), fitted with L-BFGS and a small L2 penalty."""
    probe = nn.Linear(x.shape[-1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def probe(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor) -> dict[str, float]:
    """Val accuracy of one logistic-regression probe per cell attribute on (N, 9, D) standardised cell tokens."""
    mean, std = train.mean((0, 1)), train.std((0, 1)).clamp_min(1e-3)
    xt, xv = ((x - mean) / std for x in (train, val))
    out = {}
    for k, (name, classes) in enumerate((("shape", 8), ("colour", 8), ("size", 2), ("occupied", 2))):
        yt, yv = (y[..., 0 if name == "occupied" else k] for y in (train_y, val_y))
        if name == "occupied":
            yt, yv = (yt >= 0).long(), (yv >= 0).long()
        mt, mv = yt >= 0, yv >= 0
        fitted = _fit_probe(xt[mt], yt[mt], classes)
        with torch.no_grad():
            out[name] = round((fitted(xv[mv]).argmax(-1) == yv[mv]).float().mean().item(), 3)
    return out


def read(
    train: torch.Tensor,
    val: torch.Tensor,
    rows: dict[str, list],
    steps: int,
    seed: int = 0,
    order: str = "bidirectional",
) -> dict[str, Any]:
    """Train a ``QuestionReader`` on ``train`` tokens for ``steps`` and report val accuracy by kind."""
    torch.manual_seed(seed)
    every = rows["train"] + rows["val"]
    vocab = {w: k + 1 for k, w in enumerate(sorted({w for r in every for w in r[1]}))}
    answers = {a: k for k, a in enumerate(sorted({r[2] for r in every}))}
    width = max(len(r[1]) for r in every)

    def tensors(split_rows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        words = torch.zeros(len(split_rows), width, dtype=torch.long)
        for k, r in enumerate(split_rows):
            words[k, : len(r[1])] = torch.tensor([vocab[w] for w in r[1]])
        return torch.tensor([r[0] for r in split_rows]), words, torch.tensor([answers[r[2]] for r in split_rows])

    mean, std = train.mean((0, 1)), train.std((0, 1)).clamp_min(1e-3)
    train, val = (train - mean) / std, (val - mean) / std
    (img, words, target), (vimg, vwords, vtarget) = tensors(rows["train"]), tensors(rows["val"])
    model = QuestionReader(train.shape[-1], train.shape[1], len(vocab), width, len(answers), order=order)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    t0 = time.perf_counter()
    for _ in range(steps):
        b = torch.randint(0, len(target), (BATCH,))
        loss = F.cross_entropy(model(train[img[b]], words[b]), target[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [model(val[vimg[i : i + 1000]], vwords[i : i + 1000]).argmax(-1) for i in range(0, len(vtarget), 1000)]
        )
    hits: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rows["val"], (pred == vtarget).tolist(), strict=True):
        hits[r[3]].append(ok)
    by_kind = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    total = sum(sum(v) for v in hits.values()) / len(rows["val"])
    return {"accuracy": round(total, 3), "by_kind": by_kind, "final_loss": round(loss.item(), 3),
            "train_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def run(quick: bool = False) -> dict[str, Any]:
    """``MMSTACK_READER_CLIP=PATH`` reads another two-tower checkpoint's tower instead of the bench's demo CLIP;
    ``MMSTACK_READER_SOURCES`` (comma-separated names) runs only those token sources; ``MMSTACK_READER_ORDERS``
    (comma-separated ``QuestionReader.ORDERS``) reads each source in those orders (default: bidirectional);
    ``MMSTACK_READER_STEPS`` trains each reader for that many steps instead of 1,500."""
    dirs = _worlds(quick)
    clip = Path(os.environ["MMSTACK_READER_CLIP"]) if os.environ.get("MMSTACK_READER_CLIP") else None
    clip = clip or _clip(quick, dirs["train"])[0]
    steps = QUICK_STEPS if quick else int(os.environ.get("MMSTACK_READER_STEPS", STEPS))
    rows = {split: qa_rows(dirs[split]) for split in ("train", "val")}
    sources = {
        "oracle cells": lambda d: oracle_tokens(d),
        "tower layer -2 (bridge)": lambda d: tower_tokens(clip, d, -2, keep_cls=False),
        "tower layer -1": lambda d: tower_tokens(clip, d, -1, keep_cls=False),
        "tower layer -1 + CLS": lambda d: tower_tokens(clip, d, -1, keep_cls=True),
        "tower layer -2 + CLS (bridge)": lambda d: tower_tokens(clip, d, -2, keep_cls=True),
        "tower cells 3x3 + CLS": lambda d: tower_cells(clip, d, 3),
        "tower cell concepts 3x3": lambda d: concept_cells(clip, d),
    }
    wanted = [k for k in os.environ.get("MMSTACK_READER_SOURCES", "").split(",") if k]  # e.g. "cell probe,oracle cells"
    if wanted:
        sources = {k: sources[k] for k in wanted if k in sources}
    out: dict[str, Any] = {"steps": steps, "batch": BATCH, "n_train_questions": len(rows["train"]), "clip": str(clip)}
    if not wanted or "cell probe" in wanted:
        cells = {split: tower_cells(clip, dirs[split], 3)[:, 1:] for split in ("train", "val")}  # CLS dropped
        out["cell probe"] = probe(cells["train"], cell_labels(dirs["train"]), cells["val"], cell_labels(dirs["val"]))
    orders = [o for o in os.environ.get("MMSTACK_READER_ORDERS", "bidirectional").split(",") if o]
    for name, tokens in sources.items():
        train, val = tokens(dirs["train"]), tokens(dirs["val"])
        for order in orders:
            key = name if order == "bidirectional" else f"{name}, {order}"
            out[key] = read(train, val, rows, steps, order=order)
    return out
