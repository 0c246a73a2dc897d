"""Do the shipped models predict the same before and after a change of the code? (issue 16's proof).

Runs every shipped model (``models/*/``) of two source trees on the same images and compares:

* the reference tree is a git commit (``--ref``, default the last commit before the framework
  refactor), checked out into a temporary worktree with its own ``src/`` and ``models/``;
* the candidate tree is this checkout (its ``src/`` and its ``models/``, i.e. converted checkpoints).

Images: each model's own test split (hippocampus: ``../shared/data/hippocampus``; phantoms:
``runs/phantom-hn``, made with the documented ``lmk3d phantoms`` command when missing) and images
outside the repository's data: the AFIDs MNI template, the spine T2, the abdominal CT and MR, the
MPRAGE DICOM series, and one hippocampus test image written again with an oblique, flipped and
anisotropic affine (``hippo_oblique``) and with its axes stored in reverse order (``hippo_flipped``).

Each tree runs in its own process (``--worker``), importing ``lmk3d`` from that tree only, and the
detectors' own answers are compared: where a tree applies calibration models after the detector
(``lmk3d.trust``), its worker asks for ``predict_all(image, trust=False)``. The table
gives, per model and image set, the largest position difference (mm) among landmarks found by both,
and the number of landmarks whose found flag differs. The run fails (exit 1) unless every difference
is within ``--tol`` (default 1e-3 mm), every score difference within ``--score-tol`` (default 1e-4) and
every flag agrees.

Usage::

    .venv/bin/python benchmarks/compare_predictions.py [--ref COMMIT] [--models GLOB ...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REF_DEFAULT = "15fccc9"
PHANTOMS = ROOT / "runs" / "phantom-hn"


def outside_images(workdir: Path) -> dict[str, Path]:
    """Images that no shipped model was trained, validated or tested on."""
    import nibabel as nib

    hippo = SHARED / "hippocampus"
    split = json.loads((ROOT / "models" / "pin-hippocampus" / "split.json").read_text())
    src = nib.load(str(hippo / "images" / f"{sorted(split['test'])[0]}.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    # Oblique (25 deg about an oblique axis), anisotropic spacing, one axis flipped.
    angle = np.deg2rad(25.0)
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([1.0, -1.2, 0.8])
    oblique[:3, 3] = [10.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(data, oblique), str(workdir / "hippo_oblique.nii.gz"))
    # The same voxels stored with every axis reversed (the affine says so): the same world image.
    flip = src.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1],
                                  [0, 0, -1, data.shape[2] - 1], [0, 0, 0, 1]], dtype=np.float64)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1, ::-1]), flip), str(workdir / "hippo_flipped.nii.gz"))
    return {
        "afids_mni152": SHARED / "afids_mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "spine_t2": SHARED / "spine_t2" / "t2.nii.gz",
        "ct_abdomen": SHARED / "ct_abdomen_examples" / "example_ct.nii.gz",
        "ct_abdomen_sm": SHARED / "ct_abdomen_examples" / "example_ct_sm.nii.gz",
        "mr_abdomen_sm": SHARED / "ct_abdomen_examples" / "example_mr_sm.nii.gz",
        "mprage_dicom": SHARED / "dicom" / "mr_brain_sagittal_mprage",
        "hippo_oblique": workdir / "hippo_oblique.nii.gz",
        "hippo_flipped": workdir / "hippo_flipped.nii.gz",
    }


def jobs(workdir: Path, patterns: Sequence[str] = ("*",)) -> list[dict[str, str]]:
    """Every (model, image set, case, path) to predict, for the models whose folder matches one of ``patterns``."""
    out = []
    extra = outside_images(workdir)
    folders = {p for pattern in patterns for p in (ROOT / "models").glob(pattern) if (p / "checkpoint.pt").is_file()}
    for model in sorted(p.name for p in folders):
        split = json.loads((ROOT / "models" / model / "split.json").read_text())
        if model.endswith("hippocampus"):
            folder = SHARED / "hippocampus" / "images"
        else:
            folder = PHANTOMS / "images"
        for case in sorted(split["test"]):
            path = next(folder.glob(f"{case}.nii*"))
            out.append({"model": model, "set": "test split", "case": case, "path": str(path)})
        for name, path in extra.items():
            out.append({"model": model, "set": "outside", "case": name, "path": str(path)})
    return out


def worker(src: str, models: str, jobs_file: str, out_file: str) -> None:
    """Predict every job with the ``lmk3d`` of ``src`` and the checkpoints under ``models``."""
    sys.path.insert(0, src)
    import inspect

    import torch

    torch.set_num_threads(1)
    from lmk3d.detectors import load_detector
    from lmk3d.io import read_image

    todo = json.loads(Path(jobs_file).read_text())
    loaded: dict[str, object] = {}
    images: dict[str, object] = {}
    result: dict[str, np.ndarray] = {}
    for j in todo:
        if j["model"] not in loaded:
            loaded[j["model"]] = load_detector(str(Path(models) / j["model"]), "cpu")
        if j["path"] not in images:
            images[j["path"]] = read_image(j["path"])
        det: Any = loaded[j["model"]]
        if "trust" in inspect.signature(det.predict_all).parameters:
            # The detector's own answer: calibration models (lmk3d.trust) applied after it are not compared.
            lm = det.predict_all(images[j["path"]], trust=False).landmarks
        else:
            lm = det.predict(images[j["path"]])
        key = f"{j['model']}|{j['case']}"
        result[key + "|xyz"] = np.asarray(lm.xyz_mm_ras, dtype=np.float64)
        result[key + "|found"] = np.asarray(lm.found, dtype=bool)
        result[key + "|score"] = np.asarray(lm.scores, dtype=np.float64)
    np.savez(out_file, **result)  # type: ignore[arg-type]


def run_tree(src: Path, models: Path, jobs_file: Path, out_file: Path) -> dict[str, np.ndarray]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, __file__, "--worker", str(src), str(models), str(jobs_file), str(out_file)],
                   check=True, env=env)
    with np.load(out_file) as z:
        return {k: z[k] for k in z.files}


def compare(todo: list[dict[str, str]], ref: dict[str, np.ndarray], new: dict[str, np.ndarray], tol: float,
            score_tol: float = np.inf) -> tuple[list[list[str]], bool]:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    ok = True
    for j in todo:
        key = f"{j['model']}|{j['case']}"
        a, b = ref[key + "|xyz"], new[key + "|xyz"]
        fa, fb = ref[key + "|found"], new[key + "|found"]
        both = fa & fb & np.isfinite(a).all(1) & np.isfinite(b).all(1)
        diff = float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0
        sdiff = float(np.abs(ref[key + "|score"] - new[key + "|score"])[both].max()) if both.any() else 0.0
        r = rows.setdefault((j["model"], j["set"]), {"cases": 0, "points": 0, "found": 0, "max_mm": 0.0,
                                                     "flags": 0, "max_score": 0.0})
        r["cases"] += 1
        r["points"] += len(fa)
        r["found"] += int(fb.sum())
        r["max_mm"] = max(r["max_mm"], diff)
        r["max_score"] = max(r["max_score"], sdiff)
        r["flags"] += int((fa != fb).sum())
        ok = ok and diff <= tol and sdiff <= score_tol and bool((fa == fb).all())
    table = [[m, s, str(int(r["cases"])), f"{int(r['found'])}/{int(r['points'])}", f"{r['max_mm']:.2e}",
              f"{r['max_score']:.2e}", str(int(r["flags"]))] for (m, s), r in rows.items()]
    return table, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=REF_DEFAULT, help=f"reference commit (default {REF_DEFAULT})")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest allowed position difference in mm")
    ap.add_argument("--score-tol", type=float, default=1e-4, help="largest allowed score difference (default 1e-4)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--models", nargs="+", default=["*"], help="only the models/ folders matching these globs "
                    "(default all; the reference commit must have them too)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if not (PHANTOMS / "landmarks.csv").is_file():
        subprocess.run([str(ROOT / ".venv" / "bin" / "lmk3d"), "phantoms", "--out", str(PHANTOMS), "--n", "60",
                        "--seed", "0", "--profile", "medium"], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        todo = jobs(t, args.models)
        if not todo:  # a pass over nothing proves nothing
            sys.exit(f"no model folder under models/ matches {' '.join(args.models)} (globs of folder names)")
        (t / "jobs.json").write_text(json.dumps(todo))
        subprocess.run(["git", "worktree", "add", "--detach", str(t / "ref"), commit], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            ref = run_tree(t / "ref" / "src", t / "ref" / "models", t / "jobs.json", t / "ref.npz")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(t / "ref")], cwd=ROOT, check=False)
        new = run_tree(ROOT / "src", ROOT / "models", t / "jobs.json", t / "new.npz")
    table, ok = compare(todo, ref, new, args.tol, args.score_tol)
    head = ["model", "images", "cases", "found (after)", "max |dx| mm", "max |d score|", "found flags differing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]
    verdict = (f"{'PASS' if ok else 'FAIL'}: reference {commit} against the working tree, tolerance {args.tol:g} mm "
               f"and {args.score_tol:g} in score, "
               f"{len(todo)} predictions")
    print("\n".join(lines))
    print(verdict)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n\n" + verdict + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
