"""Review burden and score calibration: how much of a prediction a reviewer must check.

A reviewer checks the predicted points in **review order**: landmarks *not found* first (they must be
placed by hand anyway), then the found ones lowest score first. For a tolerance ``t`` mm a point is an
**error** when its radial error is over ``t`` or when it was not found although the truth has it;
landmarks absent from the truth are not points at all (as in :mod:`lmk3d.metrics`). Only predicted
cases are reviewed; in those, a truth landmark with no prediction row counts as not found, score 0.

- :func:`review_curve`: the share of points checked against the share of errors caught;
- :func:`review_burden`: the smallest share of points to check to catch at least ``catch`` (e.g. 95 %)
  of the errors. Perfect scores give ``ceil(catch * errors) / points``; scores unrelated to the errors
  give about ``catch``;
- :func:`auroc`: how well a risk (here ``1 - score``, not-found points riskiest) separates errors from
  correct points, ties counting one half;
- :func:`ece`: the expected calibration error of the score read as the probability that the point is
  within ``t`` (the detector contract asks scores to be calibrated probabilities).

**Ties.** Points with the same score (and found flag) cannot be told apart by the reviewer, so the curve
is the *expectation over the orders of each tie*: within a tie of ``g`` points holding ``k`` errors,
each point checked catches ``k / g`` errors. The result does not depend on the input order. The review
*list* (:func:`review_order`, the CSV of ``lmk3d evaluate``) still needs one order: within a tie it is
the caller's ``tiebreak`` order (``lmk3d evaluate`` uses case id, then landmark name).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import Evaluation

__all__ = [
    "DEFAULT_CATCH", "DEFAULT_TOLERANCE_MM", "ReviewCurve", "ReviewPoints", "auroc", "carries_scores", "ece",
    "format_review", "plot_review", "reference_burdens", "reliability", "require_matplotlib", "review_burden",
    "review_csv_text", "review_curve", "review_order", "review_points", "review_report",
]

DEFAULT_TOLERANCE_MM = 3.0
DEFAULT_CATCH = 0.95
N_BINS = 10
_EPS = 1e-9  # slack on expected error counts (sums of fractions k / g)


# --- pure functions --------------------------------------------------------------------------------
def _vectors(scores: Any, is_error: Any, found: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    e = np.asarray(is_error, dtype=bool).reshape(-1)
    f = np.ones(len(s), dtype=bool) if found is None else np.asarray(found, dtype=bool).reshape(-1)
    if not len(s) == len(e) == len(f):
        raise ValueError(f"{len(s)} scores, {len(e)} error flags and {len(f)} found flags: give one of each per point")
    if not np.all(np.isfinite(s[f])):
        raise ValueError("a found point has a non-finite score; scores are numbers in [0, 1]")
    if np.any(~f & ~e):
        raise ValueError("a point not found is always an error (its truth exists); mark it is_error")
    return s, e, f


def review_order(scores: Any, found: Any | None = None, tiebreak: Any | None = None) -> np.ndarray:
    """Point indices in review order: not found first, then ascending score, then ``tiebreak``.

    Args:
        scores: ``(N,)`` scores in ``[0, 1]`` (NaN allowed where not found).
        found: ``(N,)`` bool, default all True.
        tiebreak: ``(N,)`` sortable keys for equal scores (default: the input order).

    Example:
        >>> review_order([0.9, 0.2, 0.5, 0.2], found=[True, True, False, True]).tolist()
        [2, 1, 3, 0]
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    f = np.ones(len(s), dtype=bool) if found is None else np.asarray(found, dtype=bool).reshape(-1)
    key = np.where(np.isfinite(s), s, -1.0)
    tb = np.arange(len(s)) if tiebreak is None else np.asarray(tiebreak)
    return np.lexsort((tb, key, f))


@dataclass(frozen=True)
class ReviewCurve:
    """Expected errors caught after checking the first ``k`` points in review order, ``k = 0..N``.

    Attributes:
        order: ``(N,)`` point indices in review order (ties in input order).
        errors_caught: ``(N + 1,)`` expected number of errors caught after ``k`` checks (ties averaged).
        n_errors: number of errors among the ``N`` points.
    """

    order: np.ndarray
    errors_caught: np.ndarray
    n_errors: int

    @property
    def n_points(self) -> int:
        return len(self.order)

    @property
    def share_checked(self) -> np.ndarray:
        """``(N + 1,)``: ``k / N``."""
        return np.arange(self.n_points + 1) / max(self.n_points, 1)

    @property
    def share_caught(self) -> np.ndarray:
        """``(N + 1,)``: expected share of the errors caught (all 1.0 when there is no error to catch)."""
        if self.n_errors == 0:
            return np.ones(self.n_points + 1)
        return self.errors_caught / self.n_errors


def review_curve(scores: Any, is_error: Any, found: Any | None = None) -> ReviewCurve:
    """The review curve of points checked not found first, then lowest score first.

    Args:
        scores: ``(N,)`` scores in ``[0, 1]``, higher = more confident (NaN allowed where not found).
        is_error: ``(N,)`` bool, the point is wrong (over the tolerance, or not found).
        found: ``(N,)`` bool, default all True; a not-found point must be an error.

    Example (the two errors have the two lowest scores; a tie of one error and one correct point
    catches half an error per check):
        >>> c = review_curve([0.9, 0.2, 0.8, 0.5, 0.95], [False, True, False, True, False])
        >>> c.errors_caught.tolist(), c.share_caught[2]
        ([0.0, 1.0, 2.0, 2.0, 2.0, 2.0], 1.0)
        >>> review_curve([0.5, 0.5, 0.9], [True, False, False]).errors_caught.tolist()
        [0.0, 0.5, 1.0, 1.0]
    """
    s, e, f = _vectors(scores, is_error, found)
    order = review_order(s, f)
    n = len(order)
    caught = np.zeros(n + 1)
    if n:
        so, fo, eo = np.where(f, s, -1.0)[order], f[order], e[order]
        new = np.ones(n, dtype=bool)
        new[1:] = (so[1:] != so[:-1]) | (fo[1:] != fo[:-1])
        gid = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        size = np.bincount(gid).astype(np.float64)
        errs = np.bincount(gid, weights=eo.astype(np.float64))
        before = np.concatenate([[0.0], np.cumsum(errs)[:-1]])
        k = np.arange(1, n + 1)
        caught[1:] = before[gid] + errs[gid] * (k - starts[gid]) / size[gid]
    return ReviewCurve(order, caught, int(e.sum()))


def review_burden(curve: ReviewCurve, catch: float = DEFAULT_CATCH) -> float:
    """Smallest share of points to check (in review order) to catch at least ``catch`` of the errors.

    The count of checks is an integer ``k`` (the share is ``k / N``); with no error it is 0.

    Example (errors at review ranks 1 and 2 of 5: two checks catch both):
        >>> c = review_curve([0.9, 0.2, 0.8, 0.5, 0.95], [False, True, False, True, False])
        >>> review_burden(c, 0.95), review_burden(c, 0.5)
        (0.4, 0.2)
    """
    if not 0.0 < catch <= 1.0:
        raise ValueError(f"catch {catch}: give the share of errors to catch, in (0, 1]")
    if curve.n_errors == 0:
        return 0.0
    k = int(np.argmax(curve.errors_caught >= catch * curve.n_errors - _EPS))
    return k / curve.n_points


def reference_burdens(n_points: int, n_errors: int, catch: float = DEFAULT_CATCH) -> tuple[float, float]:
    """The burdens of a perfect ranking (errors first) and of a random order, for comparison.

    Example:
        >>> reference_burdens(100, 10, 0.95)
        (0.1, 0.95)
    """
    if n_errors == 0 or n_points == 0:
        return 0.0, 0.0
    need = catch * n_errors
    return math.ceil(need - _EPS) / n_points, math.ceil(catch * n_points - _EPS) / n_points


def auroc(risk: Any, positive: Any) -> float:
    """Area under the ROC curve of ``risk`` for ``positive``: P(risk of a positive > risk of a negative).

    Ties count one half (average ranks, the Mann-Whitney U statistic). NaN without positives or negatives.

    Args:
        risk: ``(N,)`` finite numbers, higher = more likely positive.
        positive: ``(N,)`` bool.

    Example (3 of the 4 positive-negative pairs are ordered right):
        >>> auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
        0.75
    """
    from scipy.stats import rankdata

    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    if len(r) != len(pos):
        raise ValueError(f"{len(r)} risks and {len(pos)} labels: give one of each per point")
    if not np.all(np.isfinite(r)):
        raise ValueError("risks must be finite numbers")
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(r)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def reliability(prob: Any, outcome: Any, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Equal-width bins of the predicted probability: ``[k/n, (k+1)/n)``, the last one closed.

    Returns one dict per non-empty bin: ``lo``, ``hi``, ``n``, ``mean_score``, ``observed`` (the share of
    outcomes that are true).

    Example:
        >>> reliability([0.95, 0.95, 0.15], [True, False, False], n_bins=10)[1]
        {'lo': 0.9, 'hi': 1.0, 'n': 2, 'mean_score': 0.95, 'observed': 0.5}
    """
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    o = np.asarray(outcome, dtype=bool).reshape(-1)
    if len(p) != len(o):
        raise ValueError(f"{len(p)} probabilities and {len(o)} outcomes: give one of each per point")
    if n_bins < 1:
        raise ValueError(f"n_bins {n_bins}: give at least one bin")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for k in range(n_bins):
        m = b == k
        if m.any():
            out.append({"lo": round(k / n_bins, 12), "hi": round((k + 1) / n_bins, 12), "n": int(m.sum()),
                        "mean_score": float(p[m].mean()), "observed": float(o[m].mean())})
    return out


def ece(prob: Any, outcome: Any, n_bins: int = N_BINS) -> float:
    """Expected calibration error: ``sum_b n_b / N * |mean probability_b - observed rate_b|``.

    Bins as in :func:`reliability` (10 equal-width bins by default). NaN for no point.

    Example (bin 0.9-1.0: 0.95 predicted, 1/2 observed; bin 0.1-0.2: 0.15 predicted, 0 observed):
        >>> round(ece([0.95, 0.95, 0.15, 0.15], [True, False, False, False]), 12)
        0.3
    """
    bins = reliability(prob, outcome, n_bins)
    n = sum(b["n"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["n"] / n * abs(b["mean_score"] - b["observed"]) for b in bins))


# --- an evaluation's points ------------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewPoints:
    """Every truth landmark of an evaluation: ``(N,)`` arrays, in case then landmark order.

    ``errors_mm`` is NaN where the landmark was not found (or has no prediction row, score 0).
    """

    cases: np.ndarray
    names: np.ndarray
    scores: np.ndarray
    found: np.ndarray
    errors_mm: np.ndarray

    def is_error(self, tolerance_mm: float) -> np.ndarray:
        """``(N,)`` bool: over the tolerance, or not found."""
        with np.errstate(invalid="ignore"):
            return ~self.found | (self.errors_mm > tolerance_mm)


def carries_scores(preds: Mapping[str, LandmarkSet]) -> bool:
    """Whether predictions carry scores: every reader gives 1.0 where a file has none, so a set whose
    scores are all 1.0 carries no ranking."""
    return any(bool(np.any(s.scores != 1.0)) for s in preds.values())


def review_points(ev: Evaluation, preds: Mapping[str, LandmarkSet]) -> ReviewPoints:
    """The points of an :class:`~lmk3d.metrics.Evaluation`, with the predicted scores.

    Only predicted cases are reviewed: a truth case without any prediction is not part of the review
    (the evaluation still counts it missing). In a predicted case, a truth landmark without a
    prediction row is a not-found point with score 0.
    """
    cases, names, scores, found, errors = [], [], [], [], []
    for i, case in enumerate(ev.cases):
        if case not in preds:
            continue
        p = preds[case].reorder(ev.names)
        for j, name in enumerate(ev.names):
            e = ev.errors_mm[i, j]
            if not (np.isfinite(e) or ev.missing[i, j]):
                continue  # absent from the truth: not a point
            cases.append(case)
            names.append(name)
            ok = bool(np.isfinite(e))
            found.append(ok)
            errors.append(float(e) if ok else math.nan)
            scores.append(float(p.scores[j]) if np.isfinite(p.scores[j]) else 0.0)
    return ReviewPoints(np.array(cases, dtype=str), np.array(names, dtype=str), np.array(scores, dtype=np.float64),
                        np.array(found, dtype=bool), np.array(errors, dtype=np.float64))


def _listing_order(pts: ReviewPoints) -> np.ndarray:
    # Review order; a tie is listed by case id, then landmark name (lexsort takes the primary key last).
    return np.lexsort((pts.names, pts.cases, np.where(pts.found, pts.scores, -1.0), pts.found))


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def review_report(pts: ReviewPoints, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                  catch: float = DEFAULT_CATCH) -> dict[str, Any]:
    """The review numbers of an evaluation, JSON-ready (NaN written as null)."""
    err = pts.is_error(tolerance_mm)
    curve = review_curve(pts.scores, err, pts.found)
    burden = review_burden(curve, catch)
    perfect, random = reference_burdens(curve.n_points, curve.n_errors, catch)
    risk = np.where(pts.found, 1.0 - pts.scores, 2.0)  # not found: riskier than any found point
    radii = sorted({float(tolerance_mm), 4.0})
    within = pts.found & ~err
    return {
        "tolerance_mm": float(tolerance_mm),
        "catch": float(catch),
        "order": "not found first, then lowest score first; ties averaged over their orders",
        "n_points": curve.n_points,
        "n_not_found": int((~pts.found).sum()),
        "n_errors": curve.n_errors,
        "burden": burden,
        "n_checked": round(burden * curve.n_points),
        "burden_perfect": perfect,
        "burden_random": random,
        "auroc": {f"{r:g}": _num(auroc(risk, pts.is_error(r))) for r in radii},
        "ece": _num(ece(pts.scores, within)),
        "ece_bins": N_BINS,
        "reliability": reliability(pts.scores, within),
    }


def format_review(rep: dict[str, Any]) -> str:
    """A few plain-text lines for the terminal."""
    n, t = rep["n_points"], f"{rep['tolerance_mm']:g} mm"

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    aucs = ", ".join(f"error > {r} mm {num(v)}" for r, v in rep["auroc"].items())
    return "\n".join([
        f"review burden (not found first, then lowest score first; error = over {t} or not found):",
        f"  points {n} ({rep['n_not_found']} not found), errors {rep['n_errors']}"
        f" ({pct(rep['n_errors'] / n if n else None)})",
        f"  check {pct(rep['burden'])} of the points ({rep['n_checked']} of {n}) to catch "
        f"{100 * rep['catch']:g}% of the errors (perfect scores: {pct(rep['burden_perfect'])}, random order: "
        f"{pct(rep['burden_random'])})",
        f"  AUROC of 1 - score: {aucs}",
        f"  ECE of the score as P(error <= {t}), {rep['ece_bins']} bins: {num(rep['ece'])}",
    ])


def review_csv_text(pts: ReviewPoints, tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> str:
    """The review list and curve as CSV: one row per point in review order.

    Columns: ``rank`` (1 = checked first), ``case``, ``name``, ``found``, ``score``, ``error_mm`` (empty when
    not found), ``is_error``, ``share_checked``, ``share_caught`` (expected, ties averaged).
    """
    err = pts.is_error(tolerance_mm)
    curve = review_curve(pts.scores, err, pts.found)
    caught = curve.share_caught
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "case", "name", "found", "score", "error_mm", "is_error", "share_checked", "share_caught"])
    n = len(pts.scores)
    for k, i in enumerate(_listing_order(pts), start=1):
        e = pts.errors_mm[i]
        w.writerow([k, pts.cases[i], pts.names[i], int(pts.found[i]), f"{pts.scores[i]:.4f}",
                    f"{e:.3f}" if np.isfinite(e) else "", int(err[i]), f"{k / n:.6f}", f"{caught[k]:.6f}"])
    return buf.getvalue()


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib is missing (only the review plot needs it)."""
    from lmk3d.errors import LandmarkError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LandmarkError("--plot needs matplotlib (pip install matplotlib); without --plot, evaluate "
                            "still writes the review numbers and review_curve.csv") from None


def plot_review(path: str | os.PathLike[str], pts: ReviewPoints, rep: dict[str, Any]) -> Path:
    """Two panels: the review curve (with perfect and random orders) and the reliability diagram."""
    from lmk3d.io.atomic import atomic_write_bytes

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = rep["tolerance_mm"]
    curve = review_curve(pts.scores, pts.is_error(t), pts.found)
    x = 100 * curve.share_checked
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.0, 4.2))
    a.plot(x, 100 * curve.share_caught, label="scores (not found first)")
    if curve.n_errors:
        k = np.arange(curve.n_points + 1)
        a.plot(x, 100 * np.minimum(k, curve.n_errors) / curve.n_errors, ls="--", lw=0.8, label="perfect scores")
    a.plot([0, 100], [0, 100], ls=":", color="grey", lw=0.8, label="random order")
    a.axhline(100 * rep["catch"], color="grey", lw=0.5)
    a.plot([100 * rep["burden"]], [100 * rep["catch"]], "o", color="C3",
           label=f"{100 * rep['burden']:.1f}% checked")
    a.set_xlabel("points checked (%)")
    a.set_ylabel(f"errors caught (%), error > {t:g} mm or not found")
    a.set_title(f"Review burden ({curve.n_errors} errors in {curve.n_points} points)")
    a.set_xlim(0, 100)
    a.set_ylim(0, 101)
    a.grid(alpha=0.3)
    a.legend(fontsize=7, loc="lower right")
    bins = rep["reliability"]
    b.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    if bins:
        centres = [(c["lo"] + c["hi"]) / 2 for c in bins]
        observed = [c["observed"] for c in bins]
        b.bar(centres, observed, width=0.9 / rep["ece_bins"], alpha=0.5, label="observed per bin")
        b.plot([c["mean_score"] for c in bins], observed, "o-", ms=3, label="observed at the mean score")
        for c, cx in zip(bins, centres, strict=True):
            b.annotate(str(c["n"]), (cx, c["observed"]), fontsize=6, ha="center", va="bottom")
    ece_txt = "n/a" if rep["ece"] is None else f"{rep['ece']:.3f}"
    b.set_xlabel("score")
    b.set_ylabel(f"share within {t:g} mm")
    b.set_title(f"Calibration (ECE {ece_txt})")
    b.set_xlim(0, 1)
    b.set_ylim(0, 1.05)
    b.grid(alpha=0.3)
    b.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, buf.getvalue())

