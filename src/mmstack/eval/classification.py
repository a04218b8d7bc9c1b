"""Classification metrics and heads on frozen or fine-tuned image features.

- ``classification_report``: per-class precision, recall, F1 and support, accuracy, macro and weighted
  averages, with sklearn's conventions (0 where a ratio is undefined) and its text layout.
- ``LinearProbe``: multinomial logistic regression on standardised frozen features, full-batch L-BFGS
  (deterministic, seconds on CPU).
- ``finetune_classifier``: the image tower plus a linear head trained end to end, the head started from the
  linear probe (LP-FT, Kumar et al. 2022: fine-tuning from a probe distorts pretrained features less).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

AVERAGES = ("macro avg", "weighted avg")


# ------------------------------------------------------------------------------------------ report


def _prf(tp: float, n_pred: float, n_true: float) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def classification_report(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    labels: Sequence[int] | None = None,
    target_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class and averaged precision/recall/F1 as ``sklearn.metrics.classification_report(output_dict=True)``.

    Args:
        y_true, y_pred: class ids.
        labels: the classes to report (default: every id in ``y_true`` or ``y_pred``, sorted).
        target_names: display names of ``labels``.

    Returns:
        ``{name: {"precision", "recall", "f1-score", "support"}, "accuracy": float, "macro avg": {...},
        "weighted avg": {...}}``; when ``labels`` leave out classes that occur, "micro avg" replaces "accuracy".
    """
    y_true, y_pred = [int(y) for y in y_true], [int(y) for y in y_pred]
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    present = sorted(set(y_true) | set(y_pred))
    labels = list(present if labels is None else labels)
    names = [str(n) for n in (target_names if target_names is not None else labels)]
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} target_names for {len(labels)} labels")
    out: dict[str, Any] = {}
    rows = []
    for label, name in zip(labels, names, strict=True):
        tp = sum(t == p == label for t, p in zip(y_true, y_pred, strict=True))
        support = y_true.count(label)
        p, r, f = _prf(tp, y_pred.count(label), support)
        out[name] = {"precision": p, "recall": r, "f1-score": f, "support": support}
        rows.append((p, r, f, support))
    total = sum(r[3] for r in rows)
    if set(present) <= set(labels):
        out["accuracy"] = sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true) if y_true else 0.0
    else:
        tp = sum(t == p and t in labels for t, p in zip(y_true, y_pred, strict=True))
        p, r, f = _prf(tp, sum(p in labels for p in y_pred), total)
        out["micro avg"] = {"precision": p, "recall": r, "f1-score": f, "support": total}
    n = len(rows) or 1
    out["macro avg"] = {k: sum(r[i] for r in rows) / n for i, k in enumerate(("precision", "recall", "f1-score"))}
    out["macro avg"]["support"] = total
    out["weighted avg"] = {
        k: (sum(r[i] * r[3] for r in rows) / total if total else 0.0)
        for i, k in enumerate(("precision", "recall", "f1-score"))
    }
    out["weighted avg"]["support"] = total
    return out


def format_classification_report(report: dict[str, Any], digits: int = 2) -> str:
    """The text table sklearn's ``classification_report`` prints."""
    headers = ["precision", "recall", "f1-score", "support"]
    width = max(len(k) for k in [*report, "weighted avg"])
    head = f"{'':>{width}s} " + "".join(f" {h:>9}" for h in headers)
    lines = [head, ""]

    def row(name: str, d: dict[str, Any]) -> str:
        vals = "".join(f" {d[k]:>9.{digits}f}" for k in headers[:3])
        return f"{name:>{width}s} {vals} {int(d['support']):>9}"

    classes = [k for k in report if k not in (*AVERAGES, "accuracy", "micro avg")]
    lines += [row(k, report[k]) for k in classes]
    lines.append("")
    if "accuracy" in report:
        support = report["macro avg"]["support"]
        blank = f" {'':>9}" * 2
        lines.append(f"{'accuracy':>{width}s} {blank} {report['accuracy']:>9.{digits}f} {int(support):>9}")
    else:
        lines.append(row("micro avg", report["micro avg"]))
    lines += [row(k, report[k]) for k in AVERAGES]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ linear probe


class LinearProbe(nn.Module):
    """Logistic regression on standardised features (statistics from the training set)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, n_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)

    @classmethod
    def fit(
        cls, x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float = 1e-3, max_iter: int = 200
    ) -> LinearProbe:
        """Minimise cross-entropy + ``weight_decay`` * ||W||^2 with full-batch L-BFGS (deterministic)."""
        x, y = x.float(), y.long()
        probe = cls(x.shape[1], n_classes)
        probe.mean.copy_(x.mean(dim=0))
        probe.std.copy_(x.std(dim=0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
        opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(probe(x), y) + weight_decay * probe.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return probe.eval()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x.float()).argmax(dim=1)


# ---------------------------------------------------------------------------------------- fine-tune


class ImageClassifier(nn.Module):
    """A two-tower model's image tower and projection with a linear head on the normalised embedding."""

    def __init__(self, model: Any, probe: LinearProbe) -> None:
        super().__init__()
        self.model = model
        self.probe = probe

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.model.encode_image(pixels, normalize=True))


def finetune_classifier(
    model: Any,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    probe: LinearProbe,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> ImageClassifier:
    """Fine-tune a *copy* of ``model``'s image tower with a head started from ``probe``.

    Args:
        pixels: uint8 ``(N, 3, H, W)`` training images (the processor normalises each batch).
        labels: ``(N,)`` class ids.
    """
    clf = ImageClassifier(copy.deepcopy(model), copy.deepcopy(probe))
    clf.model.text_model.requires_grad_(False)
    clf.model.text_projection.requires_grad_(False)
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    clf.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=gen)
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                x = clf.model.processor.normalize(pixels[idx])
                loss = F.cross_entropy(clf(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return clf.eval()


@torch.no_grad()
def predict_classifier(clf: ImageClassifier, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class ids for uint8 pixels ``(N, 3, H, W)``."""
    out = [
        clf(clf.model.processor.normalize(pixels[i : i + batch_size])).argmax(1)
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
