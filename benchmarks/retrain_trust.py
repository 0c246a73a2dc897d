"""Does a version trained by the server stay calibrated? Its trust model measured on the test split.

A server-side training (``POST /train/NAME``) fits the new weights' own trust model on the model's
validation cases (``lmk3d.calibrate.calibrate_new_weights``, docs/trust.md). This script runs that path
in process, as the app does, and measures the result the way ``benchmarks/trust_eval.py`` measures the
shipped models:

1. a ``LocalDatastore`` holds the shipped model's **validation** cases (split seed 0: 20 hippocampus
   cases the shipped weights never trained on) with their true landmarks as final labels;
2. a fresh registry serves the shipped model; its validation fraction (``--val-fraction``, default 0.5)
   sets about half of those cases aside as the registry's own validation cases (the calibration cases),
   the rest are the fine-tune's training cases;
3. the app's train task fine-tunes the served weights (``init: current``, ``--max-epochs`` per phase,
   seed 0) and calibrates the new weights; the gate decides as it does in the server;
4. the new version (checkpoint, ``trust.json``, ``presence.pt``) is copied with the shipped model's
   ``split.json`` and ``benchmarks/trust_eval.py`` measures it, and the shipped model beside it, on
   the **test** cases (40, in no datastore here).

Run (1 thread; minutes): ``.venv/bin/python benchmarks/retrain_trust.py --model prior_guided --out
runs/retrain_trust``; prints trust_eval's tables; the numbers go to docs/trust.md.

``--shift invert`` asks what the loop is for: a site whose images differ from the training set. Every
image of the experiment, the datastore's and the test split's, has its contrast inverted
(``p1 + p99 - value``, its own 1st and 99th percentiles: dark becomes bright, as between T1- and
T2-weighted MR), the landmarks unchanged; the shipped model and the new version are both measured on
the inverted test images (written with their landmarks under ``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
APP_DIR = ROOT / "apps" / "landmarks"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="prior_guided", help="detector of the shipped hippocampus model")
    ap.add_argument("--val-fraction", type=float, default=0.5)
    ap.add_argument("--max-epochs", type=int, default=10, help="cap on every training phase (a budget in epochs)")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True, help="working folder (replaced)")
    ap.add_argument("--shift", choices=("none", "invert"), default="none",
                    help="images of another kind: invert = contrast inverted (see above)")
    args = ap.parse_args()

    sys.path.insert(0, str(APP_DIR))
    from lib.configs import LandmarkModelConfig
    from lib.trainers.task import LandmarkTrainTask
    from monailabel.datastore.local import LocalDatastore

    from lmk3d.io import read_table, write_landmarks, write_table
    from lmk3d.registry import Registry

    shipped = ROOT / "models" / f"{args.model}-hippocampus"
    split = json.loads((shipped / "split.json").read_text())
    truth = read_table(DATA / "landmarks.csv")
    if args.out.exists():
        shutil.rmtree(args.out)
    studies = args.out / "studies"
    studies.mkdir(parents=True)
    data = DATA
    if args.shift != "none":  # the test split, shifted, for trust_eval; the datastore's images below
        data = (args.out / f"data-{args.shift}").resolve()
        (data / "images").mkdir(parents=True)
        write_table(data / "landmarks.csv", {c: truth[c] for c in split["test"]}, with_scores=False)
        for case in split["test"]:
            shifted_copy(DATA / "images" / f"{case}.nii.gz", data / "images" / f"{case}.nii.gz", args.shift)
    for case in split["val"]:
        if args.shift == "none":
            shutil.copyfile(DATA / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz")
        else:
            shifted_copy(DATA / "images" / f"{case}.nii.gz", studies / f"{case}.nii.gz", args.shift)
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    labels = args.out / "labels"
    labels.mkdir()
    for case in split["val"]:
        datastore.save_label(case, str(write_landmarks(labels / f"{case}.mrk.json", truth[case])), "final", {})

    registry = Registry(args.out / "workspace")
    registry.ensure(args.model, args.model, shipped=shipped.resolve(), val_fraction=args.val_fraction)
    model = LandmarkModelConfig(detector=args.model).load(registry, ROOT / "models", "hippocampus", "cpu")
    calibration_cases = model.record.validation_cases(split["val"])
    print(f"datastore: the {len(split['val'])} validation cases of {shipped.name}; registry validation "
          f"(calibration) cases: {len(calibration_cases)}: {', '.join(sorted(calibration_cases))}", flush=True)
    t0 = time.monotonic()
    result = LandmarkTrainTask(model, "cpu")({"max_minutes": args.max_minutes, "max_epochs": args.max_epochs,
                                              "seed": 0}, datastore)
    print(f"trained in {time.monotonic() - t0:.0f} s: version {result['version']}, published "
          f"{result['published']} ({result['decision']}); {result['calibration']}", flush=True)

    version = model.record.root / "versions" / result["version"]
    evaluated = args.out / f"{args.model}-retrained-{result['version']}"
    shutil.copytree(version, evaluated)
    shutil.copyfile(shipped / "split.json", evaluated / "split.json")
    baseline = shipped
    if args.shift != "none":  # both measured on the shifted test images
        baseline = args.out / f"{shipped.name}-shipped"
        shutil.copytree(shipped, baseline)
        for folder in (baseline, evaluated):
            doc = json.loads((folder / "split.json").read_text())
            (folder / "split.json").write_text(json.dumps({**doc, "data": str(data)}, indent=2))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trust_eval.py"), str(baseline), str(evaluated),
                          "--out", str(args.out / "trust_eval.json")], check=False)
    return out.returncode


def shifted_copy(src: Path, dst: Path, shift: str) -> None:
    """``src`` written to ``dst`` with ``shift`` applied to its voxels (same grid and affine)."""
    import numpy as np

    from lmk3d.io import read_image, write_image
    from lmk3d.io.image import Volume

    if shift != "invert":
        raise ValueError(f"unknown shift {shift!r}")
    v = read_image(src)
    lo, hi = np.percentile(v.array, [1.0, 99.0])
    write_image(dst, Volume((lo + hi - v.array).astype(np.float32), v.affine))


if __name__ == "__main__":
    sys.exit(main())
