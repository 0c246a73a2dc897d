"""How far a model's trust can be trusted: calibrated scores, radii, not found, image check, on unseen cases.

For each model folder (with ``trust.json`` from ``lmk3d calibrate``) it reads the model's own split
(``split.json``) and reports, on the **test** cases only (never used by training or calibration):

- normal images: AUROC of ``1 - score`` for errors over 3 mm and over 4 mm (a point not found counts as
  an error with score 0), expected calibration error of the score (10 bins; outcome = within the
  tolerance), coverage of the 90 % radius (found points), the review burden (share of points checked
  lowest score first to catch 95 % of the errors over 3 mm), and the same AUROC/burden for the
  detector's raw scores;
- cut variants (each landmark in turn left 2-8 mm beyond a crop plane of the nearest face; seed 777,
  not the calibration's seed): share of cut-off landmarks reported not found, share of the landmarks
  still inside reported found;
- the image check: share of test images (and of their cut variants) flagged, and for images of other
  kinds (the test images with their contrast inverted, whole-head MPRAGE DICOM,
  the MNI template, a spine T2, abdominal CT as NIfTI and DICOM, abdominal MR, 20 random crops of the
  MPRAGE and of the template the size of a typical test image, seed 5): share flagged and the largest
  landmark score given. None of these kinds was used to fit anything (the threshold comes from the
  calibration cases alone). For every set of images also the share judged atypical (of the model's kind, but
  farther than nearly every calibration image: scores capped at 0.2, ``lmk3d.trust.atypical_verdict``).

With ``--held-out DIR`` every case of DIR with landmarks takes the test cases' place (a dataset that neither
trained nor calibrated the model, such as phantoms of a fresh seed; refused otherwise): more cases than a test
split holds, reported beside it, never in a card.

Run (1 thread): ``.venv/bin/python benchmarks/trust_eval.py models/cascade-hippocampus ... --out
runs/trust_eval.json``; prints one table per block (markdown), the numbers go to docs/trust.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OTHER_KINDS = {
    "MPRAGE whole head (DICOM)": DATA / "dicom" / "mr_brain_sagittal_mprage",
    "MNI template (AFIDs)": DATA / "afids_mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "spine T2": DATA / "spine_t2" / "t2.nii.gz",
    "abdominal CT (NIfTI)": DATA / "ct_abdomen_examples" / "example_ct.nii.gz",
    "abdominal CT (DICOM)": DATA / "ct_abdomen_examples" / "example_ct_dicom",
    "abdominal MR (NIfTI)": DATA / "ct_abdomen_examples" / "example_mr_sm.nii.gz",
}
CROP_SOURCES = ("MPRAGE whole head (DICOM)", "MNI template (AFIDs)")
INVERTED = "test images, contrast inverted"


def held_out_cases(model_dir: Path, held_out: Path, data: Path, names: Any = None) -> list[Any]:
    """The cases of ``held_out`` with every landmark in ``names`` (default: any landmarks), refused when it is data
    the model was fitted or calibrated on. A case with a landmark its image does not hold is left out (the cut
    variants need every landmark's truth), with a line on stderr saying how many."""
    from lmk3d.data import load_dataset

    report = json.loads((model_dir / "trust.json").read_text()).get("report", {})
    calibration = report.get("calibration_data")
    fitted = [data] + ([ROOT / calibration if not Path(calibration).is_absolute() else Path(calibration)]
                       if calibration else [])
    if any(held_out.resolve() == f.resolve() for f in fitted):
        raise SystemExit(f"--held-out {held_out}: {model_dir.name} was trained or calibrated on that dataset")
    labelled = [s for s in load_dataset(held_out) if s.landmarks is not None]
    cases = [s for s in labelled if names is None or np.isfinite(s.landmarks.reorder(names).xyz_mm_ras).all()]
    if not cases:
        raise SystemExit(f"--held-out {held_out}: no case with {'every landmark' if names else 'landmarks'}")
    if len(cases) < len(labelled):
        print(f"--held-out {held_out}: {len(labelled) - len(cases)} of {len(labelled)} case(s) left out (a landmark "
              "outside the image)", file=sys.stderr)
    return cases


def evaluate_model(model_dir: Path, cut_seed: int = 777, crops: int = 20,
                   held_out: Path | None = None) -> dict[str, object]:
    import torch

    from lmk3d import review
    from lmk3d.data import load_dataset, read_split
    from lmk3d.detectors import load_detector
    from lmk3d.io.image import Volume, read_image
    from lmk3d.trust.cuts import crop, cut_outside

    torch.set_num_threads(1)
    det = load_detector(model_dir, "cpu")
    if det.trust is None:
        raise SystemExit(f"{model_dir}: no trust.json; run lmk3d calibrate first")
    tol = det.trust.tolerance_mm
    split = read_split(model_dir)
    data = json.loads((model_dir / "split.json").read_text())["data"]
    data_dir = ROOT / data if not Path(data).is_absolute() else Path(data)
    test = (held_out_cases(model_dir, held_out, data_dir, det.landmark_names) if held_out is not None
            else list(load_dataset(data_dir).subset(split.test)))
    rng = np.random.default_rng(cut_seed)
    normal = {"score": [], "raw": [], "err": [], "found": [], "raw_found": [], "radius": []}
    flagged = cut_flagged = cut_images = atypical = cut_atypical = 0
    inverted: dict[str, list[float]] = {"flagged": [], "max_score": [], "found": [], "atypical": []}
    cut_out_nf, cut_in_f, raw_out_nf, raw_in_f = [], [], [], []
    # the test case each point comes from (a cut variant's points: its case), for the case bootstrap
    normal_case: list[np.ndarray] = []
    out_case: list[int] = []
    in_case: list[int] = []
    cut_inside: dict[str, list[np.ndarray]] = {"score": [], "err": [], "found": []}  # their points still inside
    t0 = time.perf_counter()
    for case_index, s in enumerate(test):
        vol = s.load_image()
        assert s.landmarks is not None
        truth = s.landmarks.reorder(det.landmark_names)
        p = det.predict_all(vol)
        flagged += not p.verdict.in_distribution
        atypical += p.verdict.atypical
        lm, raw = p.landmarks, p.raw
        err = np.linalg.norm(raw.xyz_mm_ras - truth.xyz_mm_ras, axis=1)
        normal["score"].append(lm.scores)
        normal["raw"].append(raw.scores)
        normal["err"].append(err)
        normal["found"].append(lm.found)
        normal["raw_found"].append(raw.found)
        normal["radius"].append(lm.radius_mm)
        normal_case.append(np.full(len(truth), case_index))
        # the same image with its contrast inverted (its own 1st and 99th percentiles swapped, as between T1-
        # and T2-weighted MR): another kind of image, never used to fit anything
        lo, hi = np.percentile(vol.array, [1.0, 99.0])
        pi = det.predict_all(Volume((lo + hi - vol.array).astype(np.float32), vol.affine))
        inverted["flagged"].append(float(not pi.verdict.in_distribution))
        inverted["max_score"].append(float(np.max(pi.landmarks.scores)))
        inverted["found"].append(float(pi.landmarks.found.sum()))
        inverted["atypical"].append(float(pi.verdict.atypical))
        for t in range(len(truth)):
            cut = cut_outside(vol, truth.xyz_mm_ras, t, float(rng.uniform(2.0, 8.0)))
            if cut is None:
                continue
            pc = det.predict_all(cut.volume)
            cut_images += 1
            cut_flagged += not pc.verdict.in_distribution
            cut_atypical += pc.verdict.atypical
            inside = cut.volume.contains_ras(truth.xyz_mm_ras, margin=0.5)
            cut_out_nf += list(~pc.landmarks.found[~inside])
            cut_in_f += list(pc.landmarks.found[inside])
            out_case += [case_index] * int(np.sum(~inside))
            in_case += [case_index] * int(np.sum(inside))
            cut_inside["score"].append(pc.landmarks.scores[inside])
            cut_inside["err"].append(np.linalg.norm(pc.raw.xyz_mm_ras - truth.xyz_mm_ras, axis=1)[inside])
            cut_inside["found"].append(pc.landmarks.found[inside])
            raw_out_nf += list(~pc.raw.found[~inside])
            raw_in_f += list(pc.raw.found[inside])
    seconds = time.perf_counter() - t0
    sc, raw_sc, err, fnd, raw_fnd, rad = (np.concatenate(normal[k]) for k in
                                          ("score", "raw", "err", "found", "raw_found", "radius"))
    err_f = np.where(fnd, err, np.inf)
    raw_err = np.where(raw_fnd, err, np.inf)
    out: dict[str, object] = {"model": model_dir.name, "detector": det.name, "tolerance_mm": tol,
                              "test_cases": len(test), "points": int(len(sc)), "cut_seed": cut_seed,
                              **({"held_out": str(held_out)} if held_out is not None else {})}

    def block(score: np.ndarray, e: np.ndarray, f: np.ndarray) -> dict[str, float]:
        s0 = np.where(f, score, 0.0)
        curve = review.review_curve(np.where(f, score, np.nan), e > tol, f)
        return {"errors_over_3mm": int(np.sum(e > 3.0)), "errors_over_4mm": int(np.sum(e > 4.0)),
                "auroc_3mm": review.auroc(1 - s0, e > 3.0), "auroc_4mm": review.auroc(1 - s0, e > 4.0),
                "ece": review.ece(s0, e <= tol), "review_burden": review.review_burden(curve)}

    out["calibrated"] = block(sc, err_f, fnd)
    out["calibrated"]["radius90_coverage"] = float(np.mean(err[fnd] <= rad[fnd])) if fnd.any() else float("nan")
    out["calibrated"]["normal_found"] = float(np.mean(fnd))
    out["calibrated"]["mre_found_mm"] = float(np.mean(err[fnd]))
    out["raw"] = block(raw_sc, raw_err, raw_fnd)
    out["raw"]["mre_mm"] = float(np.mean(err[raw_fnd])) if raw_fnd.any() else float("nan")
    out["raw"]["found"] = float(np.mean(raw_fnd))
    c_sc, c_err, c_fnd = (np.concatenate(cut_inside[k]) for k in ("score", "err", "found"))
    # the calibrated scores of the cut variants' landmarks still inside (a point not found: an error, score 0)
    out["cut_calibrated"] = block(c_sc, np.where(c_fnd, c_err, np.inf), c_fnd)
    out["cut"] = {"cut_off": len(cut_out_nf), "inside": len(cut_in_f),
                  "cut_off_not_found": float(np.mean(cut_out_nf)), "inside_found": float(np.mean(cut_in_f)),
                  "raw_cut_off_not_found": float(np.mean(raw_out_nf)), "raw_inside_found": float(np.mean(raw_in_f))}
    out["intervals"] = intervals(np.concatenate(normal_case), sc, raw_sc, err, fnd, raw_fnd, rad, tol,
                                 (np.asarray(out_case), np.asarray(cut_out_nf, dtype=float)),
                                 (np.asarray(in_case), np.asarray(cut_in_f, dtype=float)))
    out["image_check_test_flagged"] = flagged / len(test)
    out["image_check_cut_flagged"] = cut_flagged / max(cut_images, 1)
    out["image_check_test_atypical"] = atypical / len(test)
    out["image_check_cut_atypical"] = cut_atypical / max(cut_images, 1)
    kinds = {INVERTED: {"flagged": float(np.mean(inverted["flagged"])), "n": len(test),
                        "max_score": float(np.max(inverted["max_score"])),
                        "found": int(np.sum(inverted["found"])), "reason": "",
                        "atypical": float(np.mean(inverted["atypical"]))}}
    crop_rng = np.random.default_rng(5)
    typical = np.median([np.asarray(s.load_image().shape) * s.load_image().spacing_mm for s in test[:10]], axis=0)
    for kind, path in OTHER_KINDS.items():
        if not path.exists():
            continue
        vol = read_image(path)
        p = det.predict_all(vol)
        kinds[kind] = {"flagged": float(not p.verdict.in_distribution), "n": 1,
                       "max_score": float(np.max(p.landmarks.scores)), "found": int(p.landmarks.found.sum()),
                       "reason": p.verdict.reason, "atypical": float(p.verdict.atypical)}
        if kind in CROP_SOURCES and crops > 0:
            size = np.maximum((typical / vol.spacing_mm).astype(int), 8)
            fl, mx, fd, at = [], [], 0, []
            for _ in range(crops):
                lo = [int(crop_rng.integers(0, max(vol.shape[a] - size[a], 1))) for a in range(3)]
                c = crop(vol, lo, [min(lo[a] + size[a], vol.shape[a]) for a in range(3)])
                pc = det.predict_all(c)
                fl.append(not pc.verdict.in_distribution)
                at.append(pc.verdict.atypical)
                mx.append(float(np.max(pc.landmarks.scores)))
                fd += int(pc.landmarks.found.sum())
            kinds[f"{kind}: random crops the size of a test image"] = {"flagged": float(np.mean(fl)), "n": crops,
                                                               "max_score": float(np.max(mx)), "found": fd,
                                                               "reason": "", "atypical": float(np.mean(at))}
    out["other_kinds"] = kinds
    out["seconds"] = round(seconds, 1)
    return out


BOOTSTRAP = 1000  # resamples of whole test cases for the 95 % intervals (seed 0)


def case_bootstrap(groups: np.ndarray, stat: Any, n: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """The 95 % percentile interval of ``stat(index)`` over resamples of whole cases, with replacement.

    A case's points (and its cut variants' points) move together: they share an image, so they are not
    independent. ``stat`` takes the indices of the resampled points; resamples where it is NaN are left out.

    >>> case_bootstrap(np.array([0, 0, 1, 1]), lambda i: float(len(i)), n=50)
    [4.0, 4.0]
    """
    cases = np.unique(groups)
    if not len(cases):
        return [float("nan"), float("nan")]
    members = {c: np.flatnonzero(groups == c) for c in cases}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        index = np.concatenate([members[c] for c in rng.choice(cases, size=len(cases), replace=True)])
        v = stat(index)
        if np.isfinite(v):
            values.append(v)
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def intervals(case: np.ndarray, sc: np.ndarray, raw_sc: np.ndarray, err: np.ndarray, fnd: np.ndarray,
              raw_fnd: np.ndarray, rad: np.ndarray, tol: float, cut_off: tuple[np.ndarray, np.ndarray],
              inside: tuple[np.ndarray, np.ndarray]) -> dict[str, list[float]]:
    """95 % case-bootstrap intervals of the headline figures (normal images and cut variants)."""
    from lmk3d import review

    err_f = np.where(fnd, err, np.inf)
    s0 = np.where(fnd, sc, 0.0)

    def burden(i: np.ndarray) -> float:
        return review.review_burden(review.review_curve(np.where(fnd[i], sc[i], np.nan), err_f[i] > tol, fnd[i]))

    def share(pair: tuple[np.ndarray, np.ndarray]) -> list[float]:
        groups, hit = pair
        return case_bootstrap(groups, lambda i: float(np.mean(hit[i])) if len(i) else float("nan"))

    return {
        "mre_mm": case_bootstrap(case, lambda i: float(np.mean(err[i][raw_fnd[i]])) if raw_fnd[i].any() else np.nan),
        "auroc_3mm": case_bootstrap(case, lambda i: review.auroc(1 - s0[i], err_f[i] > 3.0)),
        "auroc_4mm": case_bootstrap(case, lambda i: review.auroc(1 - s0[i], err_f[i] > 4.0)),
        "ece": case_bootstrap(case, lambda i: review.ece(s0[i], err_f[i] <= tol)),
        "radius90_coverage": case_bootstrap(case, lambda i: float(np.mean(err[i][fnd[i]] <= rad[i][fnd[i]]))
                                            if fnd[i].any() else np.nan),
        "review_burden": case_bootstrap(case, burden),
        "cut_off_not_found": share(cut_off),
        "inside_found": share(inside),
    }


def _span(lo_hi: list[float], fmt: str = ".3f") -> str:
    """An interval as ``lo-hi`` ("-" when unknown, e.g. an AUROC without errors)."""
    lo, hi = lo_hi
    return "-" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{format(lo, fmt)}-{format(hi, fmt)}"


def _f(v: object, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)


def print_tables(results: list[dict[str, object]]) -> None:
    print("\n| model | scores | errors >3 / >4 mm | AUROC >3 mm | AUROC >4 mm | ECE | 90 % radius coverage | "
          "review burden (95 % of >3 mm) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for kind in ("calibrated", "raw"):
            b = r[kind]  # type: ignore[index]
            print(f"| {r['model']} | {kind} | {b['errors_over_3mm']} / {b['errors_over_4mm']} | {_f(b['auroc_3mm'])} | "
                  f"{_f(b['auroc_4mm'])} | {_f(b['ece'])} | {_f(b.get('radius90_coverage'))} | "
                  f"{_f(b['review_burden'], '.1%')} |")
    print("\n| model | cut variants: landmarks still inside | errors >3 / >4 mm (or not found) | AUROC >3 mm | "
          "AUROC >4 mm | ECE | review burden |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "cut_calibrated" not in r:  # a results file written before these were measured
            continue
        b, c = r["cut_calibrated"], r["cut"]
        assert isinstance(b, dict) and isinstance(c, dict)
        print(f"| {r['model']} | {c['inside']} | {b['errors_over_3mm']} / {b['errors_over_4mm']} | "
              f"{_f(b['auroc_3mm'])} | {_f(b['auroc_4mm'])} | {_f(b['ece'])} | {_f(b['review_burden'], '.1%')} |")
    print("\n| model | cut-off landmarks | not found (trust) | not found (detector alone) | still inside | "
          "found (trust) | found (detector alone) | test images flagged (atypical) | cut test images flagged "
          "(atypical) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["cut"]  # type: ignore[index]
        print(f"| {r['model']} | {c['cut_off']} | {_f(c['cut_off_not_found'], '.1%')} | "
              f"{_f(c['raw_cut_off_not_found'], '.1%')} | {c['inside']} | {_f(c['inside_found'], '.1%')} | "
              f"{_f(c['raw_inside_found'], '.1%')} | {_f(r['image_check_test_flagged'], '.1%')} "
              f"({_f(r.get('image_check_test_atypical'), '.1%')}) | {_f(r.get('image_check_cut_flagged'), '.1%')} "
              f"({_f(r.get('image_check_cut_atypical'), '.1%')}) |")
    print(f"\n95 % intervals, resampling whole test cases ({BOOTSTRAP} resamples, seed 0; a cut variant goes with "
          "its case):")
    print("\n| model | MRE mm | AUROC >3 mm | AUROC >4 mm | ECE | 90 % radius coverage | review burden | "
          "cut off: not found | still inside: found |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        iv = r.get("intervals")
        if not isinstance(iv, dict):  # a results file written before these were measured
            continue

        def span(key: str, fmt: str = ".3f", iv: dict[str, list[float]] = iv) -> str:
            return _span(iv[key], fmt)

        print(f"| {r['model']} | {span('mre_mm')} | {span('auroc_3mm')} | {span('auroc_4mm')} | {span('ece')} | "
              f"{span('radius90_coverage', '.1%')} | {span('review_burden', '.1%')} | "
              f"{span('cut_off_not_found', '.1%')} | {span('inside_found', '.1%')} |")
    print("\n| model | image | images | flagged | atypical (scores capped) | landmarks found | largest score |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for kind, k in r["other_kinds"].items():  # type: ignore[attr-defined]
            print(f"| {r['model']} | {kind} | {k['n']} | {_f(k['flagged'], '.0%')} | {_f(k.get('atypical'), '.0%')} | "
                  f"{k['found']} | {_f(k['max_score'], '.2f')} |")


def _presence_members(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The training reports of the serving presence network's members (one unless an ensemble; none: [])."""
    training = report.get("presence_training") or {}
    return list(training.get("ensemble") or ([training] if training else []))


def _presence_kind(report: dict[str, Any]) -> str:
    """What the serving presence network looks at, in words (from its training config)."""
    members = _presence_members(report)
    config = members[0].get("config") or {} if members else {}
    kind = (f"a {config['box_mm']:g} mm patch around each point" if config.get("mode") == "local" else
            f"one {config['box_mm']:g} mm box on the whole image" if config else "none")
    if config.get("answer_variants"):
        kind += (f", half of its training patches centred on the detector's own points on {config['answer_variants']} "
                 "cut variants of each training case")
    if len(members) > 1:
        seeds = ", ".join(str((m.get("config") or {}).get("seed")) for m in members)
        return f"the mean of {len(members)} networks of seeds {seeds}, each {kind}"
    return kind


def _presence_cases(report: dict[str, Any]) -> str:
    """The cases the serving presence network was trained on, in words (with ``--presence-data``, which ones)."""
    n = int((_presence_members(report) or [{}])[0].get("training_cases", report["training_cases"]))
    command = str(report.get("command", ""))
    if "--presence-data " in command and n > int(report["training_cases"]):
        extra = command.split("--presence-data ", 1)[1].split()[0]
        return f"{n} cases with every landmark, from its training cases and `{extra}`"
    return f"{n} training cases"


def card_section(r: dict[str, object], model_dir: Path) -> str:
    """The model card's "Trust" section: how it was fitted (trust.json) and what it gave on the test split."""
    trust = json.loads((model_dir / "trust.json").read_text())
    rep = trust["report"]
    rule = rep["not_found_rule"]
    c, raw, cut = r["calibrated"], r["raw"], r["cut"]  # type: ignore[index]
    kinds = dict(r["other_kinds"])  # type: ignore[call-overload]
    inv = kinds.pop(INVERTED, None)
    flagged = sum(k["flagged"] * k["n"] for k in kinds.values())  # type: ignore[union-attr]
    total = sum(k["n"] for k in kinds.values())  # type: ignore[union-attr]
    whole = [k for k in kinds if "crops" not in k]
    return "\n".join([
        "## Trust (calibrated scores, not found, image check)",
        "",
        f"`trust.json` and `presence.pt` (docs/trust.md), fitted by `{rep.get('command', 'lmk3d calibrate')}` on the "
        f"{len(rep['calibration_cases'])} "
        + (f"cases of `{rep['calibration_data']}` (none trained on)" if rep.get("calibration_data") else
           "validation cases")
        + f" and their cut variants ({rep['calibration_points']} "
        f"calibration points; the presence network, {_presence_kind(rep)}, trained on {_presence_cases(rep)}). "
        f"Tolerance {trust['tolerance_mm']:g} mm; 90 % radius = {trust['q90']:.2f} x the point's error scale"
        + (f" ({trust['partial']['q90']:.2f} x in an image with a landmark not found: such images are calibrated "
           f"apart, leave-one-case-out Brier score {gr['loco_brier']['grouped']:.4f} against "
           f"{gr['loco_brier']['pooled']:.4f} for one distribution)"
           if trust.get("partial") and (gr := rep.get("groups")) else "") + "; "
        f"not found: presence < {rule['presence_threshold']}, closer than {rule['face_mm']} mm to a face"
        + (f", or placed beyond a face by the shape model by > {rule['shape_outside_mm']} mm"
           if rule.get("shape_outside_mm") is not None else "")
        + (f" (a point the detector placed at most {trust['pull_inside_mm']:g} mm beyond the field of view is moved "
           "onto the outer voxels and judged by this rule)" if trust.get("pull_inside_mm") else "")
        + "; image check threshold "
        f"{trust['image']['threshold']:.2f}"
        + (f", then the anatomy around the points (threshold {trust['anatomy']['threshold']:.2f}, docs/trust.md)"
           if trust.get("anatomy") else "") + "; error scale: "
        + (f"the base features and the distance to the nearest face (leave-one-case-out AUROC on the calibration "
           f"points {es['loco_auroc']['face']:.3f} against {es['loco_auroc']['base']:.3f})"
           if trust.get("features") == "face" and (es := rep.get("error_scale")) else "the base features")
        + f". Test split ({r['test_cases']} cases, split seed 0, never used to fit; "
        f"`benchmarks/trust_eval.py`, cut seed {r['cut_seed']}):",
        "",
        "| | AUROC >3 mm | AUROC >4 mm | ECE | 90 % radius coverage | review burden (95 % of >3 mm) |",
        "|---|---|---|---|---|---|",
        f"| calibrated score | {_f(c['auroc_3mm'])} | {_f(c['auroc_4mm'])} | {_f(c['ece'])} | "
        f"{_f(c['radius90_coverage'], '.1%')} | {_f(c['review_burden'], '.1%')} |",
        f"| detector's raw score | {_f(raw['auroc_3mm'])} | {_f(raw['auroc_4mm'])} | {_f(raw['ece'])} | - | "
        f"{_f(raw['review_burden'], '.1%')} |",
        *([f"| calibrated score, cut variants' landmarks still inside (not found counts as an error) | "
           f"{_f(cc['auroc_3mm'])} | {_f(cc['auroc_4mm'])} | {_f(cc['ece'])} | - | {_f(cc['review_burden'], '.1%')} |"]
          if (cc := r.get("cut_calibrated")) is not None else []),  # type: ignore[index]
        "",
        f"Errors over 3 / 4 mm on the test split: {c['errors_over_3mm']} / {c['errors_over_4mm']} of {r['points']} "
        f"points. Cut off by a crop plane 2-8 mm beyond them: {_f(cut['cut_off_not_found'], '.1%')} of "
        f"{cut['cut_off']} reported not found (the detector alone: {_f(cut['raw_cut_off_not_found'], '.1%')}); of the "
        f"{cut['inside']} still inside, {_f(cut['inside_found'], '.1%')} found (alone: "
        f"{_f(cut['raw_inside_found'], '.1%')}). Image check: {_f(r['image_check_test_flagged'], '.1%')} of the test "
        f"images flagged"
        + (f" ({_f(r['image_check_cut_flagged'], '.1%')} of their cut variants)"
           if "image_check_cut_flagged" in r else "")
        + (f", {_f(r['image_check_test_atypical'], '.1%')} atypical (scores capped at 0.2; "
           f"{_f(r['image_check_cut_atypical'], '.1%')} of the cut variants)" if "image_check_test_atypical" in r
           else "")
        + f"; {flagged:.0f} of {total} images of other kinds flagged ({', '.join(whole)}, and random "
        "crops of the MPRAGE and the template the size of a training image; none used to fit)"
        + (f", the largest score any of them kept {max(k['max_score'] for k in kinds.values()):.2f}" if kinds else "")
        + (f"; the test images with their contrast inverted: {_f(inv['flagged'], '.1%')} flagged"
           + (f", {_f(inv['atypical'], '.1%')} atypical" if "atypical" in inv else "")
           + f", the largest score of the others {_f(inv['max_score'], '.2f')}" if inv is not None else "") + ".",
        *(["", _interval_line(iv)] if isinstance(iv := r.get("intervals"), dict) else []),
        ""])


def _interval_line(iv: dict[str, list[float]]) -> str:
    """The card's sentence on how far the test split's figures could move with other cases."""
    def span(key: str, fmt: str = ".3f") -> str:
        return _span(iv[key], fmt)

    return (f"95 % intervals, resampling whole test cases ({BOOTSTRAP} resamples, seed 0): MRE {span('mre_mm')} mm, "
            f"AUROC >3 mm {span('auroc_3mm')}, ECE {span('ece')}, 90 % radius coverage "
            f"{span('radius90_coverage', '.1%')}, review burden {span('review_burden', '.1%')}; cut off, not found "
            f"{span('cut_off_not_found', '.1%')}; still inside, found {span('inside_found', '.1%')}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--cut-seed", type=int, default=777)
    ap.add_argument("--crops", type=int, default=20)
    ap.add_argument("--out", type=Path, help="JSON with every number")
    ap.add_argument("--cards", action="store_true", help="also print each model card's Trust section")
    ap.add_argument("--from-json", type=Path, help="print the tables of an earlier --out file instead of measuring")
    ap.add_argument("--held-out", type=Path, metavar="DIR",
                    help="every case of DIR with landmarks instead of the model's test split (data that neither "
                         "trained nor calibrated it, e.g. fresh phantoms); its figures are not the card's")
    args = ap.parse_args(argv)
    if args.held_out and args.cards:
        ap.error("--cards reports the model's test split; leave out --held-out")
    results = []
    if args.from_json:
        by_name = {r["model"]: r for r in json.loads(args.from_json.read_text())}
        results = [by_name[m.name] for m in args.models]
    for m in args.models if not args.from_json else []:
        r = evaluate_model(m, args.cut_seed, args.crops, args.held_out)
        results.append(r)
        print(f"{m}: done in {r['seconds']} s", file=sys.stderr, flush=True)
    print_tables(results)
    if args.cards:
        for m, r in zip(args.models, results, strict=True):
            print(f"\n<!-- {m} -->\n{card_section(r, m)}")
    if args.out and not args.from_json:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
