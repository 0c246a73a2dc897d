"""How stable is the hippocampus ground truth, and do the detectors' errors over 3 mm sit where it is not?

Steps (all read-only on the data and the models; writes only the --out JSON):

1. Reproduce ``landmarks.csv`` from the label maps (nibabel, affine to world RAS) on all cases and report the
   largest distance per landmark (must be < 0.01 mm). The two tip definitions that could be meant are both
   checked: the tips from labels 1 and 2 together, and the anterior tip from label 1 only / posterior tip from
   label 2 only.
2. On the model split's test cases, recompute every landmark after 22 small changes of the segmentation:
   (a) erosion by one voxel (6-connectivity) of the whole mask, labels kept; (b) dilation by one voxel
   (6-connectivity), new voxels labelled from the nearest labelled voxel; (c) 20 random boundary
   perturbations (seeds 0..19): every boundary voxel (inside with an outside 6-neighbour, or outside with
   an inside 6-neighbour) flipped with probability 0.2, added voxels labelled from the nearest labelled
   voxel of the original map. Per case and landmark: the distance from the original truth per change, and
   the truth spread (median and max over the 22 changes).
3. For each model's predictions (``lmk3d predict ... --format json``): error, calibrated score, spread per
   point; errors > 3 mm, how many at points whose max spread > 2 mm, AUROC of (1 - score) and of the spread
   for error > 3 mm, AUROC of (1 - score) for error > 3 mm + max spread.

Nothing here is fitted or tuned.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lmk3d.review import auroc

NAMES = ["HIPPO_ANTERIOR_CENTROID", "HIPPO_POSTERIOR_CENTROID", "HIPPO_ANTERIOR_TIP", "HIPPO_POSTERIOR_TIP"]
SHORT = {"HIPPO_ANTERIOR_CENTROID": "anterior centroid", "HIPPO_POSTERIOR_CENTROID": "posterior centroid",
         "HIPPO_ANTERIOR_TIP": "anterior tip", "HIPPO_POSTERIOR_TIP": "posterior tip"}
ST6 = ndimage.generate_binary_structure(3, 1)  # 6-connectivity
BAND_MM = 0.5


# ---------------------------------------------------------------- landmark definition
def landmarks_from_labels(lab: np.ndarray, affine: np.ndarray, tips: str = "both") -> dict[str, np.ndarray]:
    """The four landmarks (world RAS mm) of a label map (0 background, 1 anterior, 2 posterior).

    tips="both": tips from the voxels of labels 1 and 2 together (the definition used below);
    tips="own": anterior tip from label 1 only, posterior tip from label 2 only (checked as an alternative).
    A landmark that cannot be computed (its label empty) is NaN.
    """
    ijk = np.argwhere(lab > 0)
    w = ijk @ affine[:3, :3].T + affine[:3, 3]
    lv = lab[tuple(ijk.T)]
    nan = np.full(3, np.nan)
    out = {"HIPPO_ANTERIOR_CENTROID": w[lv == 1].mean(0) if np.any(lv == 1) else nan,
           "HIPPO_POSTERIOR_CENTROID": w[lv == 2].mean(0) if np.any(lv == 2) else nan}
    wa = w if tips == "both" else w[lv == 1]
    wp = w if tips == "both" else w[lv == 2]
    out["HIPPO_ANTERIOR_TIP"] = wa[wa[:, 1] >= wa[:, 1].max() - BAND_MM].mean(0) if len(wa) else nan
    out["HIPPO_POSTERIOR_TIP"] = wp[wp[:, 1] <= wp[:, 1].min() + BAND_MM].mean(0) if len(wp) else nan
    return out


def load_labels(data: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    im = nib.load(str(data / "labels" / f"{case}.nii.gz"))
    return np.asarray(im.dataobj).astype(np.int16), im.affine


def read_landmarks_csv(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with open(path) as f:
        for r in csv.DictReader(f):
            out[r["case"]][r["name"]] = np.array([float(r["x_ras"]), float(r["y_ras"]), float(r["z_ras"])])
    return out


# ---------------------------------------------------------------- perturbations
def _fill_labels(new_mask: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Label map on new_mask: original labels where the original had one, else the nearest labelled voxel's."""
    _, idx = ndimage.distance_transform_edt(lab == 0, return_indices=True)
    nearest = lab[tuple(idx)]
    return np.where(new_mask, np.where(lab > 0, lab, nearest), 0).astype(lab.dtype)


def erode(lab: np.ndarray) -> np.ndarray:
    m = ndimage.binary_erosion(lab > 0, structure=ST6, iterations=1)
    return np.where(m, lab, 0).astype(lab.dtype)


def dilate(lab: np.ndarray) -> np.ndarray:
    m = ndimage.binary_dilation(lab > 0, structure=ST6, iterations=1)
    return _fill_labels(m, lab)


def boundary_flip(lab: np.ndarray, seed: int, p: float) -> np.ndarray:
    m = lab > 0
    inner = m & ~ndimage.binary_erosion(m, structure=ST6, iterations=1)
    outer = ndimage.binary_dilation(m, structure=ST6, iterations=1) & ~m
    u = np.random.default_rng(seed).random(lab.shape)
    flip = (inner | outer) & (u < p)
    return _fill_labels(m ^ flip, lab)


def changes(lab: np.ndarray, n_seeds: int, p: float):
    yield "erode", erode(lab)
    yield "dilate", dilate(lab)
    for s in range(n_seeds):
        yield f"flip{s}", boundary_flip(lab, s, p)


# ---------------------------------------------------------------- statistics
def boot_ci(risk, positive, cases, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the AUROC over case-level bootstrap resamples (resamples without both classes skipped)."""
    risk, positive, cases = np.asarray(risk, float), np.asarray(positive, bool), np.asarray(cases)
    uc = np.unique(cases)
    rows = {c: np.flatnonzero(cases == c) for c in uc}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        take = np.concatenate([rows[c] for c in rng.choice(uc, size=len(uc), replace=True)])
        a = auroc(risk[take], positive[take])
        if np.isfinite(a):
            vals.append(a)
    if not vals:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def f(x, fmt=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/hippocampus")
    ap.add_argument("--split", default="models/cascade-hippocampus/split.json")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--preds", required=True,
                    help="folder holding pred_<model>/ folders (lmk3d predict --model models/<model>-hippocampus "
                    "--data ../shared/data/hippocampus --subset test --format json --out PREDS/pred_<model>)")
    ap.add_argument("--models", nargs="+", default=["prior_guided", "cascade", "pin", "mean_shape", "consensus"])
    ap.add_argument("--seeds", type=int, default=20, help="random boundary perturbations, seeds 0..N-1")
    ap.add_argument("--p", type=float, default=0.2, help="flip probability of a boundary voxel")
    ap.add_argument("--tol", type=float, default=3.0, help="error threshold in mm")
    ap.add_argument("--unstable", type=float, default=2.0, help="max-spread threshold in mm for 'unstable truth'")
    ap.add_argument("--boot", type=int, default=2000, help="case bootstrap resamples for AUROC intervals")
    ap.add_argument("--out", required=True, help="JSON with every number")
    a = ap.parse_args()
    t_start = time.perf_counter()
    data = Path(a.data)
    res: dict = {"args": vars(a)}

    # 1. reproduce landmarks.csv ------------------------------------------------
    truth = read_landmarks_csv(data / "landmarks.csv")
    all_cases = sorted(truth)
    worst = {k: {n: 0.0 for n in NAMES} for k in ("both", "own")}
    for c in all_cases:
        lab, aff = load_labels(data, c)
        for k in ("both", "own"):
            rec = landmarks_from_labels(lab, aff, tips=k)
            for n in NAMES:
                worst[k][n] = max(worst[k][n], float(np.linalg.norm(rec[n] - truth[c][n])))
    res["reproduce"] = {"cases": len(all_cases), "max_distance_mm": worst}
    print(f"## 1. Reproducing landmarks.csv ({len(all_cases)} cases)\n")
    print("| landmark | max distance, tips from labels 1+2 (mm) | max distance, tips from own label (mm) |")
    print("|---|---|---|")
    for n in NAMES:
        print(f"| {n} | {worst['both'][n]:.4f} | {worst['own'][n]:.4f} |")
    ok = all(v < 0.01 for v in worst["both"].values())
    print(f"\nlabels 1+2 definition reproduces to < 0.01 mm on all cases: {ok}\n")

    # 2. stability on the test cases --------------------------------------------
    split = json.load(open(a.split))
    cases = sorted(split[a.subset])
    ch_names = ["erode", "dilate"] + [f"flip{s}" for s in range(a.seeds)]
    dist = {n: np.full((len(cases), len(ch_names)), np.nan) for n in NAMES}  # mm from the original truth
    own_differs = 0  # changes where the 'own label' tip definition gives another tip than 'labels 1+2'
    n_changed_vox = []
    for i, c in enumerate(cases):
        lab, aff = load_labels(data, c)
        orig = landmarks_from_labels(lab, aff)
        for n in NAMES:
            assert np.linalg.norm(orig[n] - truth[c][n]) < 0.01
        for j, (cn, lab2) in enumerate(changes(lab, a.seeds, a.p)):
            assert cn == ch_names[j]
            n_changed_vox.append(((lab2 > 0) != (lab > 0)).sum() / max(1, (lab > 0).sum()))
            rec = landmarks_from_labels(lab2, aff)
            rec_own = landmarks_from_labels(lab2, aff, tips="own")
            own_differs += sum(not np.allclose(rec[t], rec_own[t], atol=1e-6)
                               for t in ("HIPPO_ANTERIOR_TIP", "HIPPO_POSTERIOR_TIP"))
            for n in NAMES:
                dist[n][i, j] = np.linalg.norm(rec[n] - orig[n])
    n_nan = {n: int(np.isnan(dist[n]).sum()) for n in NAMES}
    spread_med = {n: np.nanmedian(dist[n], axis=1) for n in NAMES}
    spread_max = {n: np.nanmax(dist[n], axis=1) for n in NAMES}
    ncv = np.array(n_changed_vox).reshape(len(cases), len(ch_names))
    res["stability"] = {
        "cases": cases, "changes": ch_names, "landmarks_not_computable": n_nan,
        "tip_definitions_differ_after_change": own_differs,
        "changed_voxels_share_of_mask": {"erode": float(np.median(ncv[:, 0])), "dilate": float(np.median(ncv[:, 1])),
                                         "flip": float(np.median(ncv[:, 2:]))},
        "distance_mm": {n: {c: dict(zip(ch_names, map(float, dist[n][i]), strict=True)) for i, c in enumerate(cases)}
                        for n in NAMES},
        "spread": {n: {c: {"median": float(spread_med[n][i]), "max": float(spread_max[n][i])}
                       for i, c in enumerate(cases)} for n in NAMES},
    }
    print(f"## 2. Truth stability ({a.subset} split of {a.split}: {len(cases)} cases, {len(ch_names)} changes)\n")
    print(f"Changed voxels as a share of the mask (median over cases): erosion {np.median(ncv[:, 0]):.1%}, "
          f"dilation {np.median(ncv[:, 1]):.1%}, random flip {np.median(ncv[:, 2:]):.1%}. "
          f"Landmarks not computable after a change: {sum(n_nan.values())}. "
          f"Changes where the own-label tip definition would give another tip: {own_differs}.\n")
    print("Distance from the original truth per kind of change, mm (median over cases; for the random flips the "
          "median over cases of each case's median and of each case's max over the 20 seeds):\n")
    print("| landmark | erosion | dilation | flips: median | flips: max | erosion: max over cases | "
          "dilation: max over cases |")
    print("|---|---|---|---|---|---|---|")
    per_change = {}
    for n in NAMES:
        d = dist[n]
        row = {"erode_median": float(np.nanmedian(d[:, 0])), "dilate_median": float(np.nanmedian(d[:, 1])),
               "flip_median_of_case_median": float(np.nanmedian(np.nanmedian(d[:, 2:], axis=1))),
               "flip_median_of_case_max": float(np.nanmedian(np.nanmax(d[:, 2:], axis=1))),
               "erode_max": float(np.nanmax(d[:, 0])), "dilate_max": float(np.nanmax(d[:, 1]))}
        per_change[n] = row
        print(f"| {SHORT[n]} | {row['erode_median']:.2f} | {row['dilate_median']:.2f} | "
              f"{row['flip_median_of_case_median']:.2f} | {row['flip_median_of_case_max']:.2f} | "
              f"{row['erode_max']:.2f} | {row['dilate_max']:.2f} |")
    res["stability"]["per_change_summary"] = per_change
    print("\nTruth spread per landmark (over the 22 changes; then over the cases):\n")
    print("| landmark | median of spread median (mm) | 90th pct of spread median | median of max spread | "
          "90th pct of max spread | largest max spread | max spread > 1 mm | > 2 mm | > 3 mm |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {}
    for n in NAMES:
        sm, sx = spread_med[n], spread_max[n]
        row = {"median_spread_median": float(np.median(sm)), "p90_spread_median": float(np.percentile(sm, 90)),
               "median_spread_max": float(np.median(sx)), "p90_spread_max": float(np.percentile(sx, 90)),
               "largest_spread_max": float(sx.max()),
               "share_max_gt1": float(np.mean(sx > 1)), "share_max_gt2": float(np.mean(sx > 2)),
               "share_max_gt3": float(np.mean(sx > 3))}
        table[n] = row
        print(f"| {SHORT[n]} | {row['median_spread_median']:.2f} | {row['p90_spread_median']:.2f} | "
              f"{row['median_spread_max']:.2f} | {row['p90_spread_max']:.2f} | {row['largest_spread_max']:.2f} | "
              f"{row['share_max_gt1']:.0%} | {row['share_max_gt2']:.0%} | {row['share_max_gt3']:.0%} |")
    res["stability"]["table"] = table

    # 3. the detectors' errors --------------------------------------------------
    print(f"\n## 3. Errors over {a.tol:g} mm against the truth spread\n")
    per_model = {}
    per_landmark_counts = {}
    cidx = {c: i for i, c in enumerate(cases)}
    for m in a.models:
        pdir = Path(a.preds) / f"pred_{m}"
        # truth.csv written by predict must be the same truth
        tr = read_landmarks_csv(pdir / "truth.csv")
        assert sorted(tr) == cases, f"{m}: truth.csv cases differ from the split's"
        for c in cases:
            for n in NAMES:
                assert np.linalg.norm(tr[c][n] - truth[c][n]) < 0.01
        csv_score = {}
        with open(pdir / "predictions.csv") as fh:
            for r in csv.DictReader(fh):
                csv_score[(r["case"], r["name"])] = float(r["score"])
        rows = []
        for c in cases:
            js = json.load(open(pdir / f"{c}.json"))
            got = {lm["name"]: lm for lm in js["landmarks"]}
            for n in NAMES:
                lm = got[n]
                found = bool(lm["found"])
                p = np.asarray(lm["ras"], float)
                e = float(np.linalg.norm(p - truth[c][n])) if found else float("inf")
                s = float(lm["score"]) if found else 0.0  # as benchmarks/trust_eval.py: not found = score 0
                assert abs(float(lm["score"]) - csv_score[(c, n)]) < 1e-3 or not found
                i = cidx[c]
                rows.append({"case": c, "name": n, "found": found, "error_mm": e, "score": s,
                             "spread_median": float(spread_med[n][i]), "spread_max": float(spread_max[n][i])})
        err = np.array([r["error_mm"] for r in rows])
        sc = np.array([r["score"] for r in rows])
        smed = np.array([r["spread_median"] for r in rows])
        smax = np.array([r["spread_max"] for r in rows])
        cs = np.array([r["case"] for r in rows])
        big = err > a.tol
        beyond = err > a.tol + smax
        unstable = smax > a.unstable
        out = {"n_points": len(rows), "not_found": int(sum(not r["found"] for r in rows)),
               "mre_mm": float(np.mean(err[np.isfinite(err)])),
               "errors_gt_tol": int(big.sum()), "errors_gt_tol_at_unstable": int((big & unstable).sum()),
               "points_unstable": int(unstable.sum()),
               "auroc_score": auroc(1 - sc, big), "auroc_score_ci": boot_ci(1 - sc, big, cs, a.boot),
               "auroc_spread_max": auroc(smax, big), "auroc_spread_max_ci": boot_ci(smax, big, cs, a.boot),
               "auroc_spread_median": auroc(smed, big),
               "errors_beyond_spread": int(beyond.sum()),
               "auroc_score_beyond": auroc(1 - sc, beyond),
               "auroc_score_beyond_ci": boot_ci(1 - sc, beyond, cs, a.boot),
               "rows": rows}
        per_model[m] = out
        per_landmark_counts[m] = {n: int(sum(r["error_mm"] > a.tol for r in rows if r["name"] == n)) for n in NAMES}
    res["models"] = per_model
    res["errors_per_landmark"] = per_landmark_counts

    documented = {"prior_guided": 0.761, "cascade": 0.643, "pin": 0.565, "mean_shape": 0.544, "consensus": 0.605}
    print(f"Points per model: {len(cases) * 4}; 'unstable' = max spread > {a.unstable:g} mm "
          f"({per_model[a.models[0]]['points_unstable']} of {len(cases) * 4} points). "
          f"AUROC 95 % intervals: case bootstrap, {a.boot} resamples, seed 0.\n")
    print(f"| model | MRE mm | errors > {a.tol:g} mm | of them at unstable truth | AUROC (1 - score), > {a.tol:g} mm "
          f"[docs/trust.md] | AUROC max spread (oracle) | AUROC median spread (oracle) | "
          f"errors > {a.tol:g} mm + max spread | AUROC (1 - score) for those |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.models:
        o = per_model[m]
        doc = documented.get(m)
        lo, hi = o["auroc_score_ci"]
        lo2, hi2 = o["auroc_spread_max_ci"]
        lo3, hi3 = o["auroc_score_beyond_ci"]
        print(f"| {m} | {o['mre_mm']:.3f} | {o['errors_gt_tol']} | {o['errors_gt_tol_at_unstable']} | "
              f"{f(o['auroc_score'])} ({f(lo, '.2f')}-{f(hi, '.2f')}) [{f(doc)}] | "
              f"{f(o['auroc_spread_max'])} ({f(lo2, '.2f')}-{f(hi2, '.2f')}) | {f(o['auroc_spread_median'])} | "
              f"{o['errors_beyond_spread']} | {f(o['auroc_score_beyond'])} ({f(lo3, '.2f')}-{f(hi3, '.2f')}) |")
    mism = [m for m in a.models if m in documented and abs(per_model[m]["auroc_score"] - documented[m]) > 0.0005]
    res["auroc_matches_docs"] = {m: (m not in mism) for m in a.models if m in documented}
    print(f"\nAUROC of (1 - score) equal to docs/trust.md (to 3 decimals): "
          f"{'all' if not mism else 'NOT for ' + ', '.join(mism)}\n")

    print(f"Errors > {a.tol:g} mm per landmark:\n")
    print("| model | " + " | ".join(SHORT[n] for n in NAMES) + " |")
    print("|---|" + "---|" * len(NAMES))
    for m in a.models:
        print(f"| {m} | " + " | ".join(str(per_landmark_counts[m][n]) for n in NAMES) + " |")
    print(f"| (points with max spread > {a.unstable:g} mm) | "
          + " | ".join(str(int((spread_max[n] > a.unstable).sum())) for n in NAMES) + " |")

    # is the spread more than "this point is a tip"? (added after the first run looked at the tables above:
    # every unstable point is a tip, so the spread's AUROC could be the landmark type alone)
    tips = ("HIPPO_ANTERIOR_TIP", "HIPPO_POSTERIOR_TIP")
    print(f"\nLandmark type against the spread: AUROC of the indicator 'is a tip' (ties one half), and everything "
          f"again on the {len(cases) * 2} tip points only:\n")
    print(f"| model | AUROC 'is a tip' | errors > {a.tol:g} mm on tips | of them at unstable truth "
          f"(tip points unstable: {sum(int((spread_max[n] > a.unstable).sum()) for n in tips)} of {len(cases) * 2}) | "
          f"AUROC max spread, tips only | AUROC median spread, tips only | AUROC (1 - score), tips only |")
    print("|---|---|---|---|---|---|---|")
    within = {}
    for m in a.models:
        rows = per_model[m]["rows"]
        err = np.array([r["error_mm"] for r in rows])
        big = err > a.tol
        is_tip = np.array([r["name"] in tips for r in rows])
        sc = np.array([r["score"] for r in rows])
        smax = np.array([r["spread_max"] for r in rows])
        smed = np.array([r["spread_median"] for r in rows])
        t = is_tip
        w = {"auroc_is_tip": auroc(is_tip.astype(float), big), "tip_errors": int(big[t].sum()),
             "tip_errors_at_unstable": int((big[t] & (smax[t] > a.unstable)).sum()),
             "auroc_spread_max_tips": auroc(smax[t], big[t]), "auroc_spread_median_tips": auroc(smed[t], big[t]),
             "auroc_score_tips": auroc(1 - sc[t], big[t])}
        within[m] = w
        print(f"| {m} | {f(w['auroc_is_tip'])} | {w['tip_errors']} | {w['tip_errors_at_unstable']} | "
              f"{f(w['auroc_spread_max_tips'])} | {f(w['auroc_spread_median_tips'])} | {f(w['auroc_score_tips'])} |")
    res["within_tips"] = within

    res["seconds"] = time.perf_counter() - t_start
    print(f"\nrun time {res['seconds']:.1f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
