"""``mmstack data``: inspect, convert and clean data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmstack.cli._common import JSON_OPTION, emit, print_kv, print_rows

app = typer.Typer(
    help="Data sets: validate, convert and clean image-text pairs and conversations.", no_args_is_help=True
)


@app.command()
def validate(
    path: str = typer.Argument(..., help="Data file, folder or tar shard pattern (e.g. 'shards-{000..003}.tar')."),
    kind: str = typer.Option(None, "--kind", help="pairs | conversations | preferences (default: guessed)."),
    image_root: Path = typer.Option(None, "--image-root", help="Folder image paths are relative to (conversations)."),
    decode: bool = typer.Option(False, "--decode", help="Also decode every image (finds truncated/corrupt files)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Exit 0 even when bad records are found."),
    show: int = typer.Option(10, "--show", help="How many bad records to list."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Read every record and report counts and the first bad records; exit 2 if any are bad."""
    from mmstack.data.validate import validate_data

    result = validate_data(path, kind=kind, image_root=image_root, decode=decode, show=show)
    emit(result, as_json, render=_render_validation)
    if result["n_bad"] and not skip_bad:
        raise typer.Exit(code=2)


def _render_validation(result: dict[str, Any]) -> None:
    print_kv({k: v for k, v in result.items() if k != "bad"}, title=f"validate {result['path']}")
    if result["bad"]:
        print_rows(result["bad"], title=f"first {len(result['bad'])} bad records")


@app.command()
def convert(
    src: str = typer.Argument(..., help="Pairs source: .jsonl, .csv, .tsv, folder, .tar or shard pattern."),
    dst: str = typer.Argument(..., help="Output: .jsonl, .csv, .tsv, a folder, or shards ('out/s-%06d.tar')."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records (listed) instead of failing."),
    image_column: str = typer.Option("image", "--image-column", help="Image column of a CSV/TSV source."),
    caption_column: str = typer.Option("caption", "--caption-column", help="Caption column of a CSV/TSV source."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Convert image-text pairs between formats (the output format follows DST's suffix)."""
    from mmstack.data.pairs import detect_format, output_format, read_pairs, write_pairs
    from mmstack.data.records import SkipReport
    from mmstack.data.webdataset import brace_pattern

    report = SkipReport()
    dst_format = output_format(dst)  # fail on a bad destination before reading
    pairs = read_pairs(src, skip_bad=skip_bad, report=report, image_column=image_column, caption_column=caption_column)
    written = write_pairs(pairs, dst, shard_size=shard_size)
    result = {
        "src": src,
        "dst": dst,
        "src_format": detect_format(src),
        "dst_format": dst_format,
        "n_pairs": len(pairs),
        "n_skipped": report.n_skipped,
        "skipped": report.to_dict()["skipped"],
        "written": [str(p) for p in written],
        "read_with": brace_pattern(written) if dst_format == "webdataset" else str(written[0]),
    }
    emit(result, as_json)


@app.command()
def clean(
    src: str = typer.Option(..., "--in", help="Pairs source to clean (only read, never changed)."),
    out: Path = typer.Option(..., "--out", help="Folder for kept.jsonl, rejected.jsonl and summary.json."),
    model: str = typer.Option(None, "--model", help="Two-tower checkpoint for the score and duplicate filters."),
    min_score: float = typer.Option(
        None, "--min-score", help="Lowest image-text cosine kept (default 0.2 with a model)."
    ),
    dedup_threshold: float = typer.Option(
        None, "--dedup-threshold", help="Image cosine at which a later image is a near-duplicate (default 0.98)."
    ),
    min_caption_words: int = typer.Option(3, "--min-caption-words", help="Fewest words a caption may have."),
    min_size: int = typer.Option(16, "--min-size", help="Shortest image side in pixels."),
    max_aspect: float = typer.Option(3.0, "--max-aspect", help="Largest long-side / short-side ratio."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images scored per forward pass."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Filter pairs by caption length, image size and aspect, model score and near-duplicates."""
    from mmstack.data.clean import CleanConfig, clean_pairs

    cfg = CleanConfig(min_caption_words, min_size, max_aspect, min_score, dedup_threshold, batch_size)
    two_tower = None
    if model is not None:
        from mmstack.models.two_tower import TwoTowerModel

        two_tower = TwoTowerModel.from_pretrained(model)
    result = clean_pairs(src, out, cfg, two_tower)
    emit(result, as_json)
