"""Reproduce the mean-shape baseline of docs/benchmarks.md (hippocampus test split and phantom test set).

Runs the same commands a user would (``lmk3d phantoms``, ``lmk3d train``, ``lmk3d predict``,
``lmk3d evaluate``), in-process, and prints the commands and Markdown tables.

    .venv/bin/python benchmarks/mean_shape_baseline.py                  # models in runs/benchmarks/
    .venv/bin/python benchmarks/mean_shape_baseline.py --models-dir models   # refresh the shipped models

The phantom set (60 cases, seed 0, ``medium`` profile, about 220 MB) is written to ``runs/phantom-hn``
unless it is already there; ``runs/`` is git-ignored.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = Path("../shared/data/hippocampus")
PHANTOMS = Path("runs/phantom-hn")
PHANTOM_ARGS = ["--n", "60", "--seed", "0", "--profile", "medium"]


def run(argv: list[str]) -> None:
    from lmk3d.cli import main

    print("$ lmk3d " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = main(argv)
    if rc != 0:
        sys.exit(f"command failed with status {rc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="runs/benchmarks", help="where the two models go")
    parser.add_argument("--work", default="runs/benchmarks", help="where predictions and evaluations go")
    args = parser.parse_args()

    import os

    os.chdir(ROOT)  # every path in the commands is relative to the repository root
    from lmk3d.io import read_collection
    from lmk3d.metrics import evaluate, format_markdown

    if not (PHANTOMS / "phantoms.json").is_file():
        run(["phantoms", "--out", str(PHANTOMS), *PHANTOM_ARGS])
    tables = []
    for name, data in (("hippocampus", HIPPOCAMPUS), ("phantom-hn", PHANTOMS)):
        model = Path(args.models_dir) / f"mean_shape-{name}"
        pred = Path(args.work) / f"mean_shape-{name}-test"
        t0 = time.perf_counter()
        run(["train", "--detector", "mean_shape", "--profile", "cpu", "--data", str(data), "--out", str(model),
             "--split-seed", "0", "--seed", "0", "--no-progress"])
        seconds = time.perf_counter() - t0
        run(["predict", "--model", str(model), "--data", str(data), "--subset", "test", "--out", str(pred)])
        run(["evaluate", "--pred", str(pred / "predictions.csv"), "--truth", str(pred / "truth.csv"),
             "--out", str(pred / "eval"), "--title", f"mean_shape, {name} test split"])
        ev = evaluate(read_collection(pred / "predictions.csv"), read_collection(pred / "truth.csv"))
        tables.append((name, len(ev.cases), seconds, format_markdown(ev)))
    for name, n, seconds, table in tables:
        print(f"\n### {name}: {n} test cases (train + test evaluation {seconds:.1f} s)\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
