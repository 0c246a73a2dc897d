"""Convert model folders' format-1 checkpoints to format 2 (run once for the shipped models).

Each checkpoint is read weights-only, mapped onto the stage layout by its detector's
``upgrade_checkpoint`` and written again by :mod:`lmk3d.checkpoint`. The training-data fingerprint is
computed from the folder's ``split.json`` (its training cases) and the dataset named in
``train_report.json``, when that dataset is on this machine. Folders already in format 2 are left as
they are. ``benchmarks/compare_predictions.py`` then proves the predictions did not change.

Usage::

    .venv/bin/python scripts/convert_checkpoints.py models/*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(model_dir: Path) -> str | None:
    """The fingerprint of the training split, or None when the dataset is not here."""
    from lmk3d.checkpoint import data_fingerprint
    from lmk3d.data import load_dataset

    report = json.loads((model_dir / "train_report.json").read_text())
    split = json.loads((model_dir / "split.json").read_text())
    data = Path(report["data"])
    data = data if data.is_absolute() else ROOT / data
    if not data.exists():
        return None
    ds = load_dataset(data)
    train = set(split["train"])
    return data_fingerprint([(s.case, s.landmarks) for s in ds.labelled() if s.case in train])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders")
    args = ap.parse_args()
    from lmk3d.checkpoint import read_checkpoint
    from lmk3d.detectors import load_detector

    for folder in args.models:
        doc = read_checkpoint(folder)
        if doc.get("format", 1) != 1:
            print(f"{folder}: already format {doc['format']}")
            continue
        det = load_detector(folder, "cpu")
        det.data_fingerprint = fingerprint(folder)
        det.training = {**det.training, "converted_from": {"format": 1, "version": doc.get("version")}}
        det.save(folder)
        print(f"{folder}: converted ({det.name}, {len(det.stages())} stages, data {det.data_fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
