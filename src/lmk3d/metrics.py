"""Landmark detection metrics, missing-aware.

For every (case, landmark) present in the truth:

- predicted and found: its radial error (Euclidean distance in world mm) is *scored*;
- not predicted, or predicted as not found: a *missing* failure, counted apart.

A landmark absent from the truth is not scored, whatever the prediction says.

- ``MRE``, ``SD``, ``median``: over the scored errors (SD is the population SD, ``ddof = 0``, as the
  landmark-detection literature reports it).
- ``SDR@r``: successful detection rate within radius ``r`` mm = detections within ``r`` divided by
  *all* truth landmarks (scored + missing), so a missing landmark counts as a failure at every radius.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lmk3d.landmarks import LandmarkSet, all_names

if TYPE_CHECKING:
    from lmk3d.data.samples import Sample
    from lmk3d.detectors import Detector

SDR_RADII_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0, 8.0)
OVERALL = "overall"


def radial_errors(pred: LandmarkSet, truth: LandmarkSet) -> np.ndarray:
    """Radial error in mm per truth landmark, in ``truth.names`` order: ``(N,)``.

    NaN where the truth landmark is absent (not scored) **or** the prediction is missing; use
    :func:`missing_mask` to tell the two apart.
    """
    p = pred.reorder(truth.names)
    ok = truth.found & p.found
    err = np.full(len(truth), np.nan)
    err[ok] = np.linalg.norm(p.xyz_mm_ras[ok] - truth.xyz_mm_ras[ok], axis=1)
    return err


def missing_mask(pred: LandmarkSet, truth: LandmarkSet) -> np.ndarray:
    """``(N,)`` bool, truth order: present in the truth but not found in the prediction."""
    return truth.found & ~pred.reorder(truth.names).found


@dataclass
class Summary:
    """Statistics of one group of errors (one landmark, or all)."""

    n_truth: int
    n_scored: int
    n_missing: int
    mre: float
    sd: float
    median: float
    max: float
    sdr: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, errors: np.ndarray, n_missing: int, radii: Sequence[float] = SDR_RADII_MM) -> Summary:
        e = np.asarray(errors, dtype=np.float64)
        e = e[np.isfinite(e)]
        n_truth = len(e) + n_missing
        stat = (lambda f: float(f(e))) if len(e) else (lambda f: float("nan"))
        sdr = {f"{r:g}": (float(np.count_nonzero(e <= r)) / n_truth if n_truth else float("nan")) for r in radii}
        return cls(n_truth, len(e), int(n_missing), stat(np.mean), stat(np.std), stat(np.median), stat(np.max), sdr)


@dataclass
class Evaluation:
    """Per-case errors and the per-landmark and overall summaries."""

    names: tuple[str, ...]
    cases: tuple[str, ...]
    errors_mm: np.ndarray  # (cases, landmarks), NaN = not scored or missing
    missing: np.ndarray  # (cases, landmarks) bool
    per_landmark: dict[str, Summary]
    overall: Summary
    unmatched_cases: tuple[str, ...] = ()  # truth cases with no prediction at all (every landmark missing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sdr_radii_mm": list(SDR_RADII_MM),
            "overall": asdict(self.overall),
            "per_landmark": {n: asdict(s) for n, s in self.per_landmark.items()},
            "unmatched_cases": list(self.unmatched_cases),
            "per_case_errors_mm": {
                c: {n: (None if not np.isfinite(self.errors_mm[i, j]) else float(self.errors_mm[i, j]))
                    for j, n in enumerate(self.names) if not np.isnan(self.errors_mm[i, j]) or self.missing[i, j]}
                for i, c in enumerate(self.cases)
            },
        }


def evaluate(
    preds: Mapping[str, LandmarkSet], truths: Mapping[str, LandmarkSet], radii: Sequence[float] = SDR_RADII_MM
) -> Evaluation:
    """Score predictions against truths, both ``{case: LandmarkSet}``.

    Cases are the truth's; a truth case without any prediction counts all its landmarks missing.
    Predicted cases absent from the truth are ignored.
    """
    cases = tuple(truths)
    names = all_names(truths.values())
    err = np.full((len(cases), len(names)), np.nan)
    miss = np.zeros((len(cases), len(names)), dtype=bool)
    unmatched = []
    for i, c in enumerate(cases):
        t = truths[c].reorder(names)
        if c not in preds:
            unmatched.append(c)
        p = preds.get(c, LandmarkSet.empty(names))
        err[i] = radial_errors(p, t)
        miss[i] = missing_mask(p, t)
    per = {n: Summary.of(err[:, j], int(miss[:, j].sum()), radii) for j, n in enumerate(names)}
    overall = Summary.of(err.ravel(), int(miss.sum()), radii)
    return Evaluation(names, cases, err, miss, per, overall, tuple(unmatched))


def evaluate_detector(
    detector: Detector, samples: Sequence[Sample], radii: Sequence[float] = SDR_RADII_MM
) -> Evaluation:
    """Score a detector on labelled cases: predict each sample's image, then :func:`evaluate`.

    Args:
        detector: a trained detector.
        samples: the cases; those without landmarks are predicted but not scored.
        radii: the SDR radii (mm).
    """
    truths = {s.case: s.landmarks for s in samples if s.landmarks is not None}
    preds = {s.case: detector.predict(s.load_image()) for s in samples}
    return evaluate(preds, truths, radii)


def format_table(ev: Evaluation) -> str:
    """A plain-text table: one row per landmark and one overall."""
    radii = list(ev.overall.sdr)
    head = ["landmark", "n", "missing", "MRE", "SD", "median"] + [f"SDR@{r}" for r in radii]
    rows = [
        [name, str(s.n_truth), str(s.n_missing), f"{s.mre:.2f}", f"{s.sd:.2f}", f"{s.median:.2f}"]
        + [f"{100 * s.sdr[r]:.1f}%" for r in radii]
        for name, s in [*ev.per_landmark.items(), (OVERALL, ev.overall)]
    ]
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in pairs)

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), line(rows[-1])]
    return "\n".join(out) + "\n(errors in mm; SDR counts missing landmarks as failures)"


def format_markdown(ev: Evaluation) -> str:
    """The same table as Markdown (for docs/)."""
    return summaries_markdown(ev.per_landmark, ev.overall)


def summaries_markdown(per_landmark: Mapping[str, Summary], overall: Summary) -> str:
    """The Markdown table of per-landmark and overall summaries (e.g. read back from a ``metrics.json``)."""
    radii = list(overall.sdr)
    head = ["landmark", "n", "missing", "MRE", "SD", "median"] + [f"SDR@{r}" for r in radii]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in [*per_landmark.items(), (f"**{OVERALL}**", overall)]:
        cells = [name, str(s.n_truth), str(s.n_missing), f"{s.mre:.2f}", f"{s.sd:.2f}", f"{s.median:.2f}"]
        out.append("| " + " | ".join(cells + [f"{100 * s.sdr[r]:.1f}%" for r in radii]) + " |")
    return "\n".join(out)
