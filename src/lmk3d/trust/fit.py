"""Fitting a :class:`~lmk3d.trust.TrustModel` on a trained detector's calibration cases.

:func:`fit_trust` runs the detector on every calibration case and on cut variants of it (each landmark
in turn left 2-8 mm beyond a crop plane, :func:`lmk3d.trust.cuts.cut_outside`), then fits the error
scale, the normalised-error distribution, the not-found thresholds and the image model as the
:mod:`lmk3d.trust` docstring describes. The calibration cases must be cases that trained nothing (the
model's validation split); the test split is never read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.trust import (
    COVERAGE,
    FEATURE_SETS,
    ImageModel,
    ShapeModel,
    TrustModel,
    cut_rule,
    design_matrix,
    point_features,
    pulled_inside,
)
from lmk3d.trust.anatomy import AnatomyModel
from lmk3d.trust.cuts import cut_outside
from lmk3d.trust.presence import PresenceModel

__all__ = ["Record", "choose_presence", "fit_from_records", "fit_trust", "records_for"]

FACE_GRID = tuple(np.round(np.arange(0.0, 4.01, 0.25), 2))
SHAPE_GRID = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, math.inf)
# Finer near 1: a network that gives cut-off landmarks high probabilities of lying inside needs a threshold there.
PRESENCE_GRID = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2)) + (0.96, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)

#: how much higher the "face" error scale's leave-one-case-out AUROC must be for it to serve (docs/trust.md)
FACE_AUROC_MARGIN = 0.02
#: the fewest calibration points of a group (complete images, images with a landmark not found) that get a
#: distribution of their own; a smaller group takes every point's
MIN_GROUP_POINTS = 20


@dataclass
class Record:
    """One prediction on one (possibly cut) calibration image, with its truth."""

    case: str
    kind: str  # "normal", "cut" or "cross-fit" (a training case answered without itself)
    final: LandmarkSet
    first: LandmarkSet | None
    volume: Volume
    truth: LandmarkSet
    truth_inside: np.ndarray  # (N,) the true landmark lies inside this image's field of view
    presence: np.ndarray | None = None  # (N,) the presence network's probabilities, if it has one
    #: the shape model of this record's features when it is not the trust model's: a cross-fitted training case's
    #: own, fitted without it
    shape: ShapeModel | None = None


def records_for(predict: Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]], samples: Sequence[Sample],
                seed: int = 0, outside_mm: tuple[float, float] = (2.0, 8.0),
                presence: PresenceModel | None = None, names: Sequence[str] | None = None) -> list[Record]:
    """Run ``predict`` (-> final and first-stage landmarks) on each sample and its cut variants.

    ``names``: the model's landmarks (each sample's truth is taken in that order; default: as it is).
    """
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    for s in samples:
        if s.landmarks is None:
            continue
        vol = s.load_image()
        truth = s.landmarks if names is None else s.landmarks.reorder(names)
        variants = [("normal", vol)]
        for t in range(len(truth)):
            if not truth.found[t]:
                continue
            cut = cut_outside(vol, truth.xyz_mm_ras, t, float(rng.uniform(*outside_mm)))
            if cut is not None:
                variants.append(("cut", cut.volume))
        for kind, v in variants:
            final, first = predict(v)
            inside = v.contains_ras(np.nan_to_num(truth.xyz_mm_ras), margin=0.5) & truth.found
            probs = presence.for_answer(v, final) if presence is not None else None
            out.append(Record(s.case, kind, final, first, v, truth, inside, probs))
    return out


def _errors(r: Record) -> np.ndarray:
    t = r.truth.reorder(r.final.names)
    err = np.linalg.norm(r.final.xyz_mm_ras - t.xyz_mm_ras, axis=1)
    return np.where(r.final.found & t.found & r.truth_inside, err, np.nan)


def fit_from_records(records: Sequence[Record], shape: ShapeModel | None, image: ImageModel | None,
                     tolerance_mm: float = 3.0, cross_fitted: Sequence[Record] = ()) -> TrustModel:
    """The error scale, its distribution, the not-found thresholds, from the calibration records.

    ``cross_fitted``: records of training cases answered by the detector fitted without them (``lmk3d calibrate
    --cross-fit``); their points join the error scale, its two choices and its distributions, never the not-found
    thresholds. ``report["cross_fit"]`` then compares the fit with and without them (:func:`_cross_fit_report`).

    The error scale's feature set: ``face`` (the base features and the distance to the nearest face) serves
    when its leave-one-case-out AUROC for errors over the tolerance beats ``base``'s by
    :data:`FACE_AUROC_MARGIN` (:func:`_loco_auroc`); the served weights are then fitted on every point.
    The normalised errors are taken apart for complete images and for images with a landmark not found
    (after the not-found rule) when that lowers the leave-one-case-out Brier score (:func:`_loco_brier`).
    """
    if not records:
        raise LandmarkError("trust: no calibration cases")
    names = tuple(records[0].final.names)
    n = len(names)
    n_val = len(records)
    records = [*records, *cross_fitted]
    feats = [point_features(r.final, r.first, r.shape if r.shape is not None else shape, r.volume) for r in records]
    errors = np.concatenate([_errors(r) for r in records])
    ok = np.isfinite(errors)
    xs = {fs: np.concatenate([design_matrix(f, n, fs) for f in feats]) for fs in FEATURE_SETS}
    if ok.sum() < 2 * xs["base"].shape[1]:
        raise LandmarkError(f"trust: {int(ok.sum())} calibration points are too few to fit "
                            f"{xs['base'].shape[1]} weights")
    cases = np.repeat([r.case for r in records], n)
    face_mm, shape_out, presence_thr, rule = _not_found_thresholds(records[:n_val], feats[:n_val])
    partial = np.repeat([not (r.final.found & ~cut_rule(f["face_mm"], f["shape_face_mm"], r.presence, face_mm,
                                                        shape_out, presence_thr)).all()
                         for r, f in zip(records, feats, strict=True)], n)
    chosen, grouped, loco, brier = _choices(xs, errors, cases, partial, tolerance_mm)
    x = xs[chosen]
    weights = _scale_weights(x[ok], errors[ok])
    scale = np.exp(x @ weights)
    u, q90 = _normalised(errors / scale, ok & ~partial if grouped else ok, ok)
    up, qp = _normalised(errors / scale, ok & partial, ok) if grouped else (None, None)
    trust = TrustModel(names, float(tolerance_mm), weights, u, q90, face_mm, shape_out, shape, image, {},
                       presence_thr, features=chosen, partial_normalised=up, partial_q90=qp)
    trust.report = {"calibration_cases": sorted({r.case for r in records[:n_val]}),
                    "calibration_points": int(ok.sum()), "normal_images": sum(r.kind == "normal" for r in records),
                    "cut_images": sum(r.kind == "cut" for r in records), "not_found_rule": rule,
                    "error_scale": {"features": chosen,
                                    "loco_auroc": {fs: None if math.isnan(a) else a for fs, a in loco.items()},
                                    "rule": f"face when its leave-one-case-out AUROC (errors over {tolerance_mm:g} mm,"
                                            f" all calibration points) is at least {FACE_AUROC_MARGIN} above base's"},
                    "groups": {"calibration": "grouped" if grouped else "pooled",
                               "loco_brier": {g: None if math.isnan(v) else v for g, v in brier.items()},
                               "complete_points": int((ok & ~partial).sum()),
                               "partial_points": int((ok & partial).sum()),
                               "rule": "grouped (images with a landmark not found apart) when its leave-one-case-out"
                                       " Brier score, all calibration points, is lower than pooled's"}}
    if cross_fitted:
        is_val = np.repeat(np.arange(len(records)) < n_val, n)
        trust.report["cross_fit"] = _cross_fit_report(xs, errors, cases, partial, is_val, tolerance_mm,
                                                      (chosen, grouped))
    return trust


def _choices(xs: dict[str, np.ndarray], errors: np.ndarray, cases: np.ndarray, partial: np.ndarray,
             tolerance_mm: float) -> tuple[str, bool, dict[str, float], dict[str, float]]:
    """The error scale's feature set and whether images with a landmark not found are calibrated apart, as
    :func:`fit_from_records` chooses them on these points, with what chose them: each feature set's
    leave-one-case-out AUROC and, for the chosen set, each grouping's leave-one-case-out Brier score."""
    ok = np.isfinite(errors)
    loco = {fs: _loco_auroc(x, errors, cases, tolerance_mm) if ok.sum() >= 2 * x.shape[1] else math.nan
            for fs, x in xs.items()}
    # NaN (no error over the tolerance, or too few points) keeps the base set
    chosen = "face" if loco["face"] - loco["base"] >= FACE_AUROC_MARGIN - 1e-12 else "base"
    brier = {g: _loco_brier(xs[chosen], errors, cases, tolerance_mm, partial if g == "grouped" else None)
             for g in ("pooled", "grouped")}
    return chosen, bool(brier["grouped"] < brier["pooled"] - 1e-12), loco, brier  # NaN keeps one distribution


def _cross_fit_report(xs: dict[str, np.ndarray], errors: np.ndarray, cases: np.ndarray, partial: np.ndarray,
                      is_val: np.ndarray, tolerance_mm: float, pooled_choices: tuple[str, bool],
                      resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How the cross-fitted points change the scores of points the fit did not see.

    Every point (the validation records' and the cross-fitted ones) is scored by a fit that did not see its case:
    without the cross-fitted points (``validation_only``: leave one validation case out for the validation
    points, the fit on every validation point for the cross-fitted ones) and with them (``cross_fitted``: leave
    one case out of the pooled points), each method with its own choices of feature set and grouping. Reported:
    both Brier scores and ECEs, and the 95 % interval of the paired Brier difference (cross-fitted minus
    validation only) over ``resamples`` case-bootstrap resamples.
    """
    from lmk3d.review import ece

    ok = np.isfinite(errors)
    fs_val, grouped_val, *_ = _choices({k: v[is_val] for k, v in xs.items()}, errors[is_val], cases[is_val],
                                       partial[is_val], tolerance_mm)
    folds = np.where(is_val, cases, "<cross-fitted>")  # the cross-fitted points: one fold, scored by the full fit
    alone = _loco_scores(xs[fs_val], errors, folds, tolerance_mm, partial if grouped_val else None, fit_on=is_val)
    fs_all, grouped_all = pooled_choices
    pooled = _loco_scores(xs[fs_all], errors, cases, tolerance_mm, partial if grouped_all else None)
    if alone is None or pooled is None:
        return {"error": "a fold had too few points to fit"}
    within = (errors <= tolerance_mm).astype(float)
    loss = {"validation_only": (alone - within) ** 2, "cross_fitted": (pooled - within) ** 2}
    diff = loss["cross_fitted"] - loss["validation_only"]

    def interval(keep: np.ndarray) -> tuple[float, float]:
        names, idx = np.unique(cases[keep], return_inverse=True)
        per_case_sum = np.bincount(idx, diff[keep], len(names))
        per_case_n = np.bincount(idx, minlength=len(names)).astype(float)
        draws = np.random.default_rng(seed).integers(0, len(names), (resamples, len(names)))
        boot = per_case_sum[draws].sum(axis=1) / per_case_n[draws].sum(axis=1)
        lo, hi = np.quantile(boot, [0.025, 0.975])
        return float(lo), float(hi)

    on_val = ok & is_val
    return {"cross_fitted_cases": int(len(np.unique(cases[~is_val]))), "cross_fitted_points": int((ok & ~is_val).sum()),
            "points_scored": int(ok.sum()), "cases_scored": int(len(np.unique(cases[ok]))),
            "validation_only": {"features": fs_val, "grouped": bool(grouped_val),
                                "brier": float(loss["validation_only"][ok].mean()),
                                "ece": float(ece(alone[ok], within[ok]))},
            "cross_fitted": {"features": fs_all, "grouped": bool(grouped_all),
                             "brier": float(loss["cross_fitted"][ok].mean()),
                             "ece": float(ece(pooled[ok], within[ok]))},
            "brier_difference": float(diff[ok].mean()), "difference_interval_95": list(interval(ok)),
            # the calibration records' points alone: the detector's own answers on cases that trained nothing, the
            # judge when the cross-fitted answers come from other models (fold models, lmk3d calibrate
            # --cross-fit-models)
            "validation_points": {"points": int(on_val.sum()), "cases": int(len(np.unique(cases[on_val]))),
                                  "brier_validation_only": float(loss["validation_only"][on_val].mean()),
                                  "brier_cross_fitted": float(loss["cross_fitted"][on_val].mean()),
                                  "ece_validation_only": float(ece(alone[on_val], within[on_val])),
                                  "ece_cross_fitted": float(ece(pooled[on_val], within[on_val])),
                                  "brier_difference": float(diff[on_val].mean()),
                                  "difference_interval_95": list(interval(on_val))},
            "resamples": resamples, "seed": seed,
            "rule": "every point scored by a fit that did not see its case; the Brier difference's interval comes "
                    "from resampling whole cases"}


def _normalised(u: np.ndarray, group: np.ndarray, every: np.ndarray) -> tuple[np.ndarray, float]:
    """The sorted normalised errors of ``group`` (all of ``every`` when the group has fewer than
    :data:`MIN_GROUP_POINTS`) and their split-conformal 90 % quantile."""
    v = np.sort(u[group if group.sum() >= MIN_GROUP_POINTS else every])
    k = min(len(v), math.ceil(COVERAGE * (len(v) + 1))) - 1
    return v, float(v[k])


def _scale_weights(a: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Least squares of ``log(error + 0.5 mm)`` on the rows of ``a``."""
    y = np.log(errors + 0.5)
    # a little ridge keeps the weights finite when a feature never varies (one-stage detectors: d_stage 0)
    return np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ y)


def _loco_scores(x: np.ndarray, errors: np.ndarray, cases: np.ndarray, tolerance_mm: float,
                 partial: np.ndarray | None = None, fit_on: np.ndarray | None = None) -> np.ndarray | None:
    """Each case's points (its image and its cut variants) scored by a fit on the other cases' points, as
    :func:`fit_from_records` fits and :meth:`TrustModel.probability_within` scores (``partial``: the
    points' calibration groups, else one; ``fit_on``: the points a fit may use, default all). None when a fold
    has too few points."""
    ok = np.isfinite(errors)
    score = np.full(len(errors), np.nan)
    usable = ok if fit_on is None else ok & fit_on
    for case in np.unique(cases[ok]):
        train = usable & (cases != case)
        held = ok & (cases == case)
        if train.sum() < x.shape[1]:
            return None
        w = _scale_weights(x[train], errors[train])
        s = np.exp(x @ w)
        for group in ((None,) if partial is None else (False, True)):
            into = held if group is None else held & (partial == group)
            u, _ = _normalised(errors / s, train if group is None else train & (partial == group), train)
            score[into] = np.searchsorted(u, tolerance_mm / s[into], side="right") / (len(u) + 1.0)
    return score


def _loco_auroc(x: np.ndarray, errors: np.ndarray, cases: np.ndarray, tolerance_mm: float) -> float:
    """AUROC of (1 - score) for errors over the tolerance, scored leave one case out (:func:`_loco_scores`).
    NaN without errors on both sides of the tolerance."""
    from lmk3d.review import auroc

    ok = np.isfinite(errors)
    score = _loco_scores(x, errors, cases, tolerance_mm)
    over = errors[ok] > tolerance_mm
    if score is None or over.all() or not over.any():
        return math.nan
    return auroc(1.0 - score[ok], over)


def _loco_brier(x: np.ndarray, errors: np.ndarray, cases: np.ndarray, tolerance_mm: float,
                partial: np.ndarray | None) -> float:
    """Brier score (mean squared difference from the outcome, within the tolerance or not) of the scores made
    leave one case out (:func:`_loco_scores`). A proper score: unlike the ECE, which bins points by score and
    so cannot see two groups given the same score, it rewards scores that tell the groups apart."""
    ok = np.isfinite(errors)
    score = _loco_scores(x, errors, cases, tolerance_mm, partial)
    return math.nan if score is None else float(np.mean((score[ok] - (errors[ok] <= tolerance_mm)) ** 2))


def _not_found_thresholds(records: Sequence[Record], feats: Sequence[dict[str, np.ndarray]]
                          ) -> tuple[float, float, float, dict[str, Any]]:
    """The thresholds that maximise the smaller of two shares on the calibration cut images: cut-off
    landmarks reported not found, and landmarks still inside reported found (the two targets weigh alike).
    Both count the cut variants only: the uncut images' landmarks, nearly always found, would make the
    second share look better than a cut image's.

    Ties go to the first in grid order: the smallest face distance, then the smallest shape margin, then the
    lowest presence threshold.
    """
    face = np.concatenate([f["face_mm"] for f in feats])
    shape_face = np.concatenate([f["shape_face_mm"] for f in feats])
    has_presence = all(r.presence is not None for r in records)
    presence = np.concatenate([r.presence for r in records]) if has_presence else None  # type: ignore[misc]
    is_cut = np.concatenate([np.full(len(r.truth_inside), r.kind == "cut") for r in records])
    inside = np.concatenate([r.truth_inside for r in records]) & is_cut
    outside = np.concatenate([~r.truth_inside & r.truth.reorder(r.final.names).found for r in records]) & is_cut
    found = np.concatenate([r.final.found for r in records])
    best: tuple[float, float, float, float, float] | None = None
    for fm in FACE_GRID:
        for so in SHAPE_GRID:
            for pt in PRESENCE_GRID if presence is not None else (0.0,):
                cut = cut_rule(face, shape_face, presence, fm, so, pt)
                keep = float(np.mean((found & ~cut)[inside])) if inside.any() else 1.0
                catch = float(np.mean((~found | cut)[outside])) if outside.any() else 1.0
                if best is None or min(catch, keep) > min(best[3], best[4]) + 1e-12:
                    best = (float(fm), float(so), float(pt), catch, keep)
    assert best is not None
    fm, so, pt, catch, keep = best
    raw_catch = float(np.mean(~found[outside])) if outside.any() else float("nan")
    raw_keep = float(np.mean(found[inside])) if inside.any() else float("nan")
    return fm, so, pt, {"face_mm": fm, "shape_outside_mm": so if math.isfinite(so) else None,
                        "presence_threshold": pt, "rule": "maximise min(cut-off not found, inside found)",
                        "calibration_cut_off_not_found": catch, "calibration_inside_found": keep,
                        "detector_alone_cut_off_not_found": raw_catch, "detector_alone_inside_found": raw_keep,
                        "calibration_cut_off_landmarks": int(outside.sum()),
                        "calibration_inside_landmarks": int(inside.sum())}


def choose_presence(records: Sequence[Record], shape: ShapeModel | None,
                    candidates: Sequence[PresenceModel | None]) -> tuple[int, list[dict[str, Any]]]:
    """The candidate presence network (None: none, geometry only) that tells cut-off landmarks best.

    Each candidate's probabilities fill the records' ``presence``; the not-found thresholds are fitted for it
    as :func:`fit_from_records` fits them, and the candidate whose fitted rule reaches the larger smaller
    share (cut-off landmarks not found, landmarks inside found) on these records wins; ties go to the
    earlier candidate. The winner's probabilities are left in the records.

    Returns:
        ``(index of the winner, one dict per candidate with its two shares and thresholds)``.
    """
    feats = [point_features(r.final, r.first, shape, r.volume) for r in records]
    results: list[dict[str, Any]] = []
    probs: list[list[np.ndarray | None]] = []
    best = 0
    for i, cand in enumerate(candidates):
        p = [cand.for_answer(r.volume, r.final) if cand is not None else None for r in records]
        for r, q in zip(records, p, strict=True):
            r.presence = q
        *_, rule = _not_found_thresholds(records, feats)
        results.append({k: rule[k] for k in ("calibration_cut_off_not_found", "calibration_inside_found", "face_mm",
                                             "shape_outside_mm", "presence_threshold")})
        probs.append(p)
        score = min(rule["calibration_cut_off_not_found"], rule["calibration_inside_found"])
        top = min(results[best]["calibration_cut_off_not_found"], results[best]["calibration_inside_found"])
        if score > top + 1e-12:
            best = i
    for r, q in zip(records, probs[best], strict=True):
        r.presence = q
    return best, results


def fit_trust(predict: Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]], train: Sequence[Sample],
              calibration: Sequence[Sample], modality: str | None, tolerance_mm: float = 3.0, seed: int = 0,
              presence: PresenceModel | None = None, log: Callable[[str], None] | None = None,
              names: Sequence[str] | None = None, image_prior: ImageModel | None = None,
              presence_candidates: Sequence[PresenceModel | None] = (),
              presence_deadline: float | None = None, anatomy_check: bool = False,
              anatomy_prior: AnatomyModel | None = None, pull_inside_mm: float = 0.0,
              presence_extra: Sequence[Sample] = (),
              cross_fit: Sequence[tuple[Sample, Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]]]] = ()
              ) -> TrustModel:
    """Fit everything on a trained detector (``predict``) with its training and calibration cases.

    ``train`` gives the shape model (true positions only), the image model's training thumbnails and,
    when ``presence`` is given untrained, the presence network's training; ``calibration`` (cases that
    trained nothing) gives the rest. A presence network whose ``fitted`` flag is set is used as it is.
    ``modality``: the detector's (the image check refuses images of the other one); None where the detector
    fixes none (``mean_shape`` never reads intensities): the one every training image shows
    (:func:`lmk3d.preprocessing.guess_modality`), or none when they disagree.
    ``names``: the model's landmarks, in its order (a case may annotate fewer or list them in another order).
    ``image_prior``: the image model of the weights the detector was fine-tuned from; the new image model
    knows its images as well as ``train``'s (:meth:`ImageModel.merged`).
    ``presence_candidates`` (instead of ``presence``): networks to choose among (None: none), the untrained
    ones trained first like ``presence``; :func:`choose_presence` picks one on the calibration records,
    and ``report["presence_choice"]`` says how each did. ``presence_deadline``: when their training stops
    (:meth:`PresenceModel.fit`). ``anatomy_check``: also fit the image check on the anatomy around the points
    (:class:`lmk3d.trust.anatomy.AnatomyModel`: the training images boxed around their truth, the threshold
    from the calibration records' own points); ``anatomy_prior``: the anatomy check of the weights the detector
    was fine-tuned from, whose images the new check knows too (:meth:`AnatomyModel.merged`).
    ``presence_extra``: more cases for the presence network's training alone (those with every landmark), e.g. a
    site's labelled cases beyond the training set; nothing else is fitted on them.
    ``pull_inside_mm``: points the detector placed at most this far beyond the field of view are judged as
    inside (:func:`lmk3d.trust.pulled_inside`), in the calibration as in every answer after it.
    ``cross_fit``: ``(case, answer)`` pairs, cases of ``train`` each answered by the detector fitted without it
    (:meth:`lmk3d.detectors.base.Detector.leave_one_out`, or the detector itself for a training case it was never
    fitted on, e.g. an early-stopping case of a detector without networks): their uncut images join the error
    scale's calibration points (:func:`fit_from_records`), their features from the shape model fitted without them.
    """
    if presence is not None and presence_candidates:
        raise ValueError("fit_trust: give presence or presence_candidates, not both")
    say = log or (lambda _: None)
    if pull_inside_mm > 0:
        detector_answer = predict

        def predict(volume: Volume) -> tuple[LandmarkSet, LandmarkSet | None]:
            final, first = detector_answer(volume)
            return pulled_inside(final, volume, pull_inside_mm), first
    labelled = [s for s in train if s.landmarks is not None]
    if names is None:
        names = labelled[0].landmarks.names if labelled and labelled[0].landmarks is not None else ()
    truths = [s.landmarks.reorder(names) for s in labelled if s.landmarks is not None]
    shape = ShapeModel.fit([np.where(t.found[:, None], t.xyz_mm_ras, np.nan) for t in truths])
    vols_train = [s.load_image() for s in labelled]
    if modality is None and vols_train:  # a detector that never reads intensities (mean_shape) fixes none
        from lmk3d.preprocessing import guess_modality

        seen = {guess_modality(np.asarray(v.array)) for v in vols_train}
        modality = seen.pop() if len(seen) == 1 else None
        say(f"image check: modality {modality or 'not checked (the training images disagree)'}, from the "
            "training images")
    candidates = list(presence_candidates) or [presence]
    for cand in candidates:
        if cand is not None and not cand.fitted:
            full = [(v, t.xyz_mm_ras) for v, t in zip(vols_train, truths, strict=True) if t.found.all()]
            extra_truths = [(s, s.landmarks.reorder(names)) for s in presence_extra if s.landmarks is not None]
            extra = [(s.load_image(), lm.xyz_mm_ras) for s, lm in extra_truths if lm.found.all()]
            full += extra
            say(f"presence network: training on {len(full)} cases with every landmark"
                + (f" ({len(extra)} of them from the extra presence data)" if presence_extra else ""))

            def answers(volume: Volume) -> np.ndarray:
                final = predict(volume)[0].reorder(names)
                return np.where(final.found[:, None], final.xyz_mm_ras, np.nan)

            cand.fit([v for v, _ in full], [x for _, x in full], log=say, deadline=presence_deadline,
                     answers=answers if cand.config.answer_variants else None)
    say(f"calibration: {len(calibration)} cases and their cut variants")
    records = records_for(predict, calibration, seed, presence=candidates[0] if len(candidates) == 1 else None,
                          names=names)
    choice: list[dict[str, Any]] | None = None
    if len(candidates) > 1:
        chosen, choice = choose_presence(records, shape, candidates)
        presence = candidates[chosen]
        for i, c in enumerate(choice):
            c["chosen"] = i == chosen
    else:
        presence = candidates[0]
    # The image check's reference: the calibration images *and their cut variants* (a cut image is still of
    # the model's kind: its landmarks inside must stay found).
    # Its training thumbnails: every training image and one cut variant of each (a random landmark 2-8 mm out).
    rng = np.random.default_rng(seed + 1)
    cuts = []
    for v, lm in zip(vols_train, truths, strict=True):
        if not lm.found.any():
            continue
        t = int(rng.choice(np.flatnonzero(lm.found)))
        cut = cut_outside(v, lm.xyz_mm_ras, t, float(rng.uniform(2.0, 8.0)))
        if cut is not None:
            cuts.append(cut.volume)
    say(f"image model: {len(vols_train)} training images + {len(cuts)} cut variants"
        + (f" + the {image_prior.n_images} of the weights fine-tuned from" if image_prior is not None else "")
        + f", {len(records)} calibration images (with cut variants)")
    image = ImageModel.fit(vols_train + cuts, [r.volume for r in records], modality, prior=image_prior)
    cross = (_cross_fitted_records(cross_fit, labelled, vols_train, names, presence, pull_inside_mm, say)
             if cross_fit else [])
    trust = fit_from_records(records, shape, image, tolerance_mm, cross_fitted=cross)
    if anatomy_check and anatomy_prior is None and len(vols_train) < 2:
        say("anatomy check: not fitted (it needs 2 training images, or the check of the weights fine-tuned from)")
    elif anatomy_check:
        say(f"anatomy check: {len(vols_train)} training images"
            + (f" + the {anatomy_prior.n_images} of the weights fine-tuned from" if anatomy_prior is not None else "")
            + f", {len(records)} calibration images")
        trust.anatomy = AnatomyModel.fit(list(zip(vols_train, truths, strict=True)),
                                         [(r.volume, r.final) for r in records], prior=anatomy_prior)
    trust.presence = presence
    trust.pull_inside_mm = float(pull_inside_mm)
    trust.report["seed"] = seed
    trust.report["training_cases"] = len(labelled)
    if presence is not None:
        trust.report["presence_training"] = presence.report
    if choice is not None:
        trust.report["presence_choice"] = choice
    return trust


def _cross_fitted_records(pairs: Sequence[tuple[Sample, Callable[[Volume], tuple[LandmarkSet, LandmarkSet | None]]]],
                          train: Sequence[Sample], volumes: Sequence[Volume], names: Sequence[str],
                          presence: PresenceModel | None, pull_inside_mm: float, say: Callable[[str], None]
                          ) -> list[Record]:
    """The uncut images of ``pairs``' training cases, each answered by its answer (the detector fitted without it),
    with the shape model of ``train``'s truth fitted without it (:func:`fit_trust`'s ``cross_fit``). ``train``: the
    labelled training cases, ``volumes`` their images, already read."""
    truths = {s.case: s.landmarks.reorder(names) for s in train if s.landmarks is not None}
    images = {s.case: v for s, v in zip(train, volumes, strict=True)}
    unknown = sorted({s.case for s, _ in pairs} - set(truths))
    if unknown or len({s.case for s, _ in pairs}) != len(pairs):
        raise ValueError(f"fit_trust: cross-fitted cases must be distinct labelled training cases ({unknown})")
    points = {c: np.where(t.found[:, None], t.xyz_mm_ras, np.nan) for c, t in truths.items()}
    say(f"cross-fitted calibration points: {len(pairs)} training cases, each answered without itself")
    out: list[Record] = []
    for s, answer in pairs:
        truth = truths[s.case]
        vol = images[s.case]
        final, first = answer(vol)
        if pull_inside_mm > 0:
            final = pulled_inside(final, vol, pull_inside_mm)
        inside = vol.contains_ras(np.nan_to_num(truth.xyz_mm_ras), margin=0.5) & truth.found
        probs = presence.for_answer(vol, final) if presence is not None else None
        own = ShapeModel.fit([x for c, x in points.items() if c != s.case])
        out.append(Record(s.case, "cross-fit", final, first, vol, truth, inside, probs, shape=own))
    return out
