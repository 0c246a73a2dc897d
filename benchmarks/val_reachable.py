"""Validation error of a model without the cases its first stage fails grossly (the "S" of the model cards).

With few validation cases, one the first stage cannot reach (a pose far outside the training ones, a
field of view that cuts a landmark off) carries the mean and ranks candidate models by noise. S leaves
out the cases whose first-stage answer is a gross failure (mean landmark error over 3 x the median over
the cases, the rule ``PinDetector.reachable`` uses) and averages the final errors of the rest. It also
prints the full mean and median, the cases left out, and S after each stage.

Example::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/val_reachable.py models/pin-phantom-hn runs/phantom-hn
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/val_reachable.py models/pin-phantom-hn runs/phantom-hn --set rule=C
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import torch

from lmk3d.data import model_split
from lmk3d.detectors.base import load_detector


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model folder (with split.json)")
    ap.add_argument("data", help="the dataset it was trained on")
    ap.add_argument("--subset", default="val", choices=["train", "val", "test"])
    ap.add_argument("--stage", default=None, help="the stage whose gross failures are left out "
                    "(default: the first after the starting stage, e.g. pin)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an inference setting of the loaded config, e.g. --set rule=C")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    det = load_detector(args.model, "cpu")
    for item in args.overrides:
        key, value = item.split("=", 1)
        current = getattr(det.config, key)
        det.config = dataclasses.replace(det.config, **{key: type(current)(value)})
    names = det.landmark_names
    cases, per_stage, stage_names = [], [], []
    for s in getattr(model_split(args.model, args.data), args.subset):
        pred = det.predict_all(s.load_image())
        truth = s.landmarks.reorder(names).xyz_mm_ras
        per_stage.append([np.linalg.norm(st.landmarks.reorder(names).xyz_mm_ras - truth, axis=1) for st in pred.stages])
        stage_names = [st.name for st in pred.stages]
        cases.append(s.case)
    errors = np.array(per_stage)  # (cases, stages, landmarks); NaN where a landmark is not annotated
    first = stage_names.index(args.stage) if args.stage else min(1, len(stage_names) - 1)
    case_error = np.nanmean(errors[:, first], axis=1)
    keep = case_error <= 3.0 * np.nanmedian(case_error)
    final = errors[:, -1]
    print(json.dumps({
        "model": args.model, "subset": args.subset, "set": args.overrides, "n": len(cases),
        "left_out": [c for c, k in zip(cases, keep, strict=True) if not k],
        "S": round(float(np.nanmean(final[keep])), 3),
        "full_mean": round(float(np.nanmean(final)), 3), "full_median": round(float(np.nanmedian(final)), 3),
        "stages": stage_names,
        "S_per_stage": [round(float(np.nanmean(errors[keep, k])), 3) for k in range(len(stage_names))],
        "per_case_final": {c: round(float(np.nanmean(e)), 2) for c, e in zip(cases, final, strict=True)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
