"""Run benchmarks: ``python -m benchmarks [NAME ...] [--quick]``.

Each ``benchmarks/bench_<name>.py`` has ``run(quick: bool) -> dict``; results are printed as JSON and
written to ``bench-output/<name>.json`` together with the machine and the date, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": dt.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    names = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(names)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check that the benchmarks run")
    ap.add_argument("--out", default="bench-output", help="folder for the JSON results")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; choose from {names}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names or names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        result = module.run(quick=args.quick)
        record = {
            "benchmark": name,
            "command": f"python -m benchmarks {name}" + (" --quick" if args.quick else ""),
            "machine": machine(),
            "wall_s": round(time.perf_counter() - t0, 2),
            "result": result,
        }
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
