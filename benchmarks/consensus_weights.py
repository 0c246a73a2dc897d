"""A consensus's accuracy with each way of weighting its members, the members run once per image.

For a consensus model folder and a set of cases (default: its validation split, the cases its members and
its own trust model were calibrated on; ``--data DIR``: every case of DIR with landmarks, e.g. the phantoms a
model was calibrated on with ``lmk3d calibrate --calibration-data``; ``--subset test``: its test split), each
member answers each uncut image once, as inside the consensus (its calibrated scores and 90 % radii, not capped),
and :func:`lmk3d.detectors.consensus.combine` combines the answers with every weighting in
:data:`lmk3d.detectors.consensus.WEIGHTINGS`. The consensus's own trust model is not applied (it was fitted on
one weighting's answers), so a point is "found" when the combination and the field of view keep it.

The ``"landmark"`` weighting needs fixed weights per member and landmark: fitted on the members' errors on
``--fit-data DIR`` (its cases with landmarks, the members run once on each), or, with ``--leave-one-out``, for
each case on the other cases measured here; without either, the weights the checkpoint holds (if any).

Prints, per weighting: the mean radial error of the points found (MRE), the median, the points over 3 and 4 mm,
the points not found; then per landmark; and each member alone on the same images.

Run (1 thread): ``.venv/bin/python benchmarks/consensus_weights.py models/consensus-phantom-hn --data
runs/phantom-cal --out runs/consensus_weights.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def landmark_weights_for(case: int, errors: np.ndarray, fitted: np.ndarray | None, inlier_mm: float) -> np.ndarray:
    """The landmark weights that combine case ``case``: ``fitted`` if given, else fitted on every other case's
    members' errors (``errors``: ``(cases, members, landmarks)``, as :func:`fit_landmark_weights` takes them)."""
    from lmk3d.detectors.consensus import fit_landmark_weights

    if fitted is not None:
        return fitted
    return fit_landmark_weights(np.delete(errors, case, axis=0), inlier_mm)


def measure(model_dir: Path, data: Path | None = None, subset: str = "val", fit_data: Path | None = None,
            leave_one_out: bool = False) -> dict[str, object]:
    import torch

    from lmk3d.data import load_dataset, read_split
    from lmk3d.detectors import load_detector
    from lmk3d.detectors.base import mark_outside
    from lmk3d.detectors.consensus import WEIGHTINGS, ConsensusDetector, answer_errors, combine, fit_landmark_weights
    from lmk3d.io.image import Volume

    torch.set_num_threads(1)
    det = load_detector(model_dir, "cpu")
    if not isinstance(det, ConsensusDetector):
        raise SystemExit(f"{model_dir}: a {det.name} model, not a consensus")
    if data is not None:
        cases = [s for s in load_dataset(data) if s.landmarks is not None]
        where = str(data)
    else:
        split = read_split(model_dir)
        own = json.loads((model_dir / "split.json").read_text())["data"]
        ds = load_dataset(ROOT / own if not Path(own).is_absolute() else own)
        cases = list(ds.subset(split.val if subset == "val" else split.test))
        where = f"{own}, {subset} split"
    names = det.landmark_names
    member_err: dict[str, list[np.ndarray]] = {m: [] for m in det.config.members}
    t0 = time.perf_counter()

    runs = []
    for s in cases:
        vol = s.load_image()
        answers = [r.landmarks for r in det.member_answers(vol)]
        truth = s.landmarks.reorder(names)  # type: ignore[union-attr]
        errors = answer_errors(answers, truth)  # inf where a member did not find a landmark the truth has
        # the field of view is all mark_outside needs: keep the geometry, not the voxels
        runs.append((Volume(np.broadcast_to(np.float32(0), vol.shape), vol.affine), answers, truth, errors))
        known = np.isfinite(truth.xyz_mm_ras).all(axis=1)
        for slug, e in zip(det.config.members, errors, strict=True):
            member_err[slug].append(np.where(np.isinf(e), np.nan, e)[known])
    lam_fit = None
    fitted_on = None
    if fit_data is not None:
        fit_cases = [s for s in load_dataset(fit_data) if s.landmarks is not None]
        fit_errors = [answer_errors([r.landmarks for r in det.member_answers(s.load_image())],
                                    s.landmarks.reorder(names))  # type: ignore[union-attr]
                      for s in fit_cases]
        lam_fit = fit_landmark_weights(np.stack(fit_errors), det.config.inlier_mm)
        fitted_on = f"{fit_data} ({len(fit_cases)} cases)"
    elif leave_one_out:
        fitted_on = "the other cases measured here (leave one case out)"
    elif det.config.landmark_weights is not None:
        lam_fit = np.asarray(det.config.landmark_weights)
        fitted_on = "the checkpoint's weights"
    weightings = [w for w in WEIGHTINGS if w != "landmark" or fitted_on is not None]
    err: dict[str, list[np.ndarray]] = {w: [] for w in weightings}
    all_errors = np.stack([r[3] for r in runs])
    for i, (frame, answers, truth, _) in enumerate(runs):
        known = np.isfinite(truth.xyz_mm_ras).all(axis=1)
        for w in weightings:
            lam = landmark_weights_for(i, all_errors, lam_fit, det.config.inlier_mm) if w == "landmark" else None
            out = mark_outside(combine(answers, det.config.inlier_mm, w, lam)[0], frame)
            e = np.linalg.norm(out.xyz_mm_ras - truth.xyz_mm_ras, axis=1)
            err[w].append(np.where(out.found, e, np.nan)[known])
    per_landmark_index = np.concatenate([np.flatnonzero(np.isfinite(s.landmarks.reorder(names).xyz_mm_ras)  # type: ignore[union-attr]
                                                        .all(axis=1)) for s in cases])

    def summary(e: np.ndarray) -> dict[str, object]:
        f = np.isfinite(e)
        return {"mre_mm": float(np.mean(e[f])) if f.any() else float("nan"),
                "median_mm": float(np.median(e[f])) if f.any() else float("nan"),
                "over_3mm": int(np.sum(e[f] > 3.0)), "over_4mm": int(np.sum(e[f] > 4.0)),
                "not_found": int(np.sum(~f)), "points": int(len(e)),
                "per_landmark_mre_mm": {n: float(np.nanmean(e[per_landmark_index == k]))
                                        if np.isfinite(e[per_landmark_index == k]).any() else float("nan")
                                        for k, n in enumerate(names)}}

    return {"model": model_dir.name, "cases": len(cases), "data": where, "inlier_mm": det.config.inlier_mm,
            "served_weighting": det.config.weighting, "landmark_weights_from": fitted_on,
            "landmark_weights": None if lam_fit is None else np.asarray(lam_fit).round(4).tolist(),
            "weightings": {w: summary(np.concatenate(err[w])) for w in weightings},
            "members": {m: summary(np.concatenate(v)) for m, v in member_err.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def print_table(r: dict[str, object]) -> None:
    print(f"\n{r['model']}: {r['cases']} cases ({r['data']}), uncut images; served weighting: {r['served_weighting']}")
    if r["landmark_weights_from"]:
        print(f"landmark weights from {r['landmark_weights_from']}: {r['landmark_weights']}")
    rows = [(f"consensus, weights = {w}", v) for w, v in r["weightings"].items()]  # type: ignore[attr-defined]
    rows += [(f"{m} alone", v) for m, v in r["members"].items()]  # type: ignore[attr-defined]
    names = list(rows[0][1]["per_landmark_mre_mm"])
    print("| answer | MRE mm | median mm | >3 / >4 mm | not found | " + " | ".join(names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for label, v in rows:
        per = " | ".join(f"{v['per_landmark_mre_mm'][n]:.3f}" for n in names)
        print(f"| {label} | {v['mre_mm']:.3f} | {v['median_mm']:.3f} | {v['over_3mm']} / {v['over_4mm']} | "
              f"{v['not_found']} of {v['points']} | {per} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, help="every case of DIR with landmarks instead of a split of the model's data")
    ap.add_argument("--subset", choices=("val", "test"), default="val")
    fit = ap.add_mutually_exclusive_group()
    fit.add_argument("--fit-data", type=Path, help="fit the landmark weights on every case of DIR with landmarks")
    fit.add_argument("--leave-one-out", action="store_true",
                     help="fit the landmark weights for each case on the other cases measured")
    ap.add_argument("--out", type=Path, help="JSON with every number")
    args = ap.parse_args(argv)
    results = [measure(m, args.data, args.subset, args.fit_data, args.leave_one_out) for m in args.models]
    for r in results:
        print_table(r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
