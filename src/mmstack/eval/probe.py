"""Linear probe and fine-tuning runners: shapes-world attributes predicted from image features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmstack.errors import DataError


def evaluate_probe(
    model: Any,
    train: str | Path,
    test: str | Path,
    attribute: str = "shape",
    finetune: bool = False,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a linear probe (and optionally fine-tune) on ``train``, report on ``test`` per class.

    Labels are a world attribute (see ``mmstack.eval.data.attribute_labels``): shape, colour or size of
    single-object scenes, or the object count of every scene.
    """
    from mmstack.eval.classification import LinearProbe, classification_report, finetune_classifier, predict_classifier
    from mmstack.eval.data import attribute_labels, read_eval_pairs
    from mmstack.eval.embed import embed_images, load_pixels

    sets = {}
    for name, folder in (("train", train), ("test", test)):
        pairs = read_eval_pairs(folder)
        index, labels, classes = attribute_labels(pairs, attribute)
        pixels = load_pixels(model, [pairs.images[i] for i in index], desc=f"load {name} images")
        sets[name] = (pixels, torch.tensor(labels), classes)
    (x_train, y_train, classes), (x_test, y_test, _) = sets["train"], sets["test"]
    if len(set(y_train.tolist())) < 2:
        raise DataError(f"{train} has fewer than two {attribute} classes; a probe needs at least two")
    f_train = embed_images(model, x_train, batch_size=batch_size)
    f_test = embed_images(model, x_test, batch_size=batch_size)
    torch.manual_seed(seed)
    probe = LinearProbe.fit(f_train, y_train, len(classes))
    ids = list(range(len(classes)))

    def result(pred: torch.Tensor) -> dict[str, Any]:
        report = classification_report(y_test.tolist(), pred.tolist(), labels=ids, target_names=classes)
        return {"accuracy": report["accuracy"], "report": report}

    out: dict[str, Any] = {"attribute": attribute, "n_train": len(y_train), "n_test": len(y_test)}
    out["probe"] = result(probe.predict(f_test))
    if finetune:
        clf = finetune_classifier(model, x_train, y_train, probe, epochs=epochs, lr=lr, seed=seed)
        out["finetune"] = {**result(predict_classifier(clf, x_test)), "epochs": epochs, "lr": lr}
    return out
