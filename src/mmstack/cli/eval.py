"""``mmstack eval``: retrieval, zero-shot and linear-probe evaluation of two-tower checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows, stdout

app = typer.Typer(help="Evaluate models: retrieval, zero-shot classification, linear probe.", no_args_is_help=True)

MODEL_OPTION = typer.Option(..., "--model", help="Checkpoint folder (mmstack or HF CLIP/SigLIP) or HF hub id.")
BATCH_OPTION = typer.Option(256, "--batch-size", help="Items embedded per forward pass.")
DEVICE_OPTION = typer.Option("auto", "--device", help="cpu, cuda, or auto (cuda when available).")


def _load(model: str, device: str):
    import torch

    from mmstack.models.two_tower import TwoTowerModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TwoTowerModel.from_pretrained(model).to(device).eval()


@app.command()
def retrieval(
    model: str = MODEL_OPTION,
    data: Path = typer.Option(..., "--data", help="Pairs to search (a shapes-world folder groups scenes)."),
    all_captions: bool = typer.Option(False, "--all-captions", help="Query with every caption of every scene."),
    batch_size: int = BATCH_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Recall@1/5/10 and mean/median rank, text->image and image->text."""
    from mmstack.eval.retrieval import evaluate_retrieval

    result = {"model": model, "data": str(data)}
    result.update(evaluate_retrieval(_load(model, device), data, batch_size, all_captions))
    emit(result, as_json, render=_render_retrieval)


def _render_retrieval(result: dict[str, Any]) -> None:
    print_kv({k: result[k] for k in ("model", "data", "n_images", "n_texts", "n_scenes", "grouping")})
    rows = []
    for level, prefix in (("scene", ""), ("pair", "pair_")):
        for direction in ("t2i", "i2t"):
            key = f"{prefix}{direction}"
            row = {"level": level, "direction": direction.replace("2", "->")}
            row.update({c: result[f"{key}_{c}"] for c in ("r1", "r5", "r10", "mean_rank", "median_rank")})
            rows.append(row)
    print_rows(rows, title="retrieval")


@app.command()
def zeroshot(
    model: str = MODEL_OPTION,
    data: Path = typer.Option(..., "--data", help="A shapes-world folder (single-object scenes are classified)."),
    attribute: str = typer.Option("shape", "--attribute", help="shape | colour | size"),
    batch_size: int = BATCH_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Zero-shot classification of a world attribute with prompt-template ensembling."""
    from mmstack.eval.zeroshot import evaluate_zeroshot

    result = {"model": model, "data": str(data)}
    result.update(evaluate_zeroshot(_load(model, device), data, attribute, batch_size=batch_size))
    emit(result, as_json, render=_render_report)


def _render_report(result: dict[str, Any]) -> None:
    from mmstack.eval.classification import format_classification_report

    print_kv({k: v for k, v in result.items() if not isinstance(v, dict)})
    for key in ("report", "probe", "finetune"):
        part = result.get(key)
        if part is None:
            continue
        report = part if key == "report" else part["report"]
        title = "zero-shot" if key == "report" else key
        stdout.print(f"\n[bold]{title}[/bold]\n{format_classification_report(report)}", highlight=False)


@app.command()
def probe(
    model: str = MODEL_OPTION,
    train: Path = typer.Option(..., "--train", help="Shapes-world folder to fit the classifier on."),
    test: Path = typer.Option(..., "--test", help="Shapes-world folder to report on."),
    attribute: str = typer.Option("shape", "--attribute", help="shape | colour | size | count"),
    finetune: bool = typer.Option(False, "--finetune", help="Also fine-tune the image tower with the head."),
    epochs: int = typer.Option(3, "--epochs", help="Fine-tuning epochs."),
    lr: float = typer.Option(1e-4, "--lr", help="Fine-tuning learning rate."),
    batch_size: int = BATCH_OPTION,
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Linear probe (and optional fine-tuning) on frozen image features, reported per class."""
    from mmstack.eval.probe import evaluate_probe

    m = _load(model, device)
    result = {"model": model, "train": str(train), "test": str(test)}
    result.update(evaluate_probe(m, train, test, attribute, finetune, epochs, lr, batch_size))
    emit(result, as_json, render=_render_report)


from mmstack.cli.eval_vqa import vqa as _vqa  # noqa: E402  (the bridge VLM's VQA accuracy)

app.command("vqa")(_vqa)

from mmstack.cli.eval_rag import eval_rag as _eval_rag  # noqa: E402  (the world RAG benchmark)

app.command("rag")(_eval_rag)

from mmstack.cli.eval_align import register as _register_align  # noqa: E402  (eval reward, hallucination)

_register_align(app)

from mmstack.cli.eval_native import OVERRIDES as _NATIVE_OVERRIDES  # noqa: E402
from mmstack.cli.eval_native import eval_native as _eval_native  # noqa: E402  (the native model)

app.command("native", context_settings=_NATIVE_OVERRIDES)(_eval_native)
