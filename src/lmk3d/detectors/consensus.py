"""``consensus``: the three detectors together, weighted by their calibrated scores or radii.

Each member (``prior_guided``, ``pin``, ``cascade``, trained on the same data and split) predicts, and its
own trust model (:mod:`lmk3d.trust`, fitted on the validation cases) turns its raw score into ``p``, the
probability that its point is within the tolerance, and gives it ``r``, a radius holding the truth with 90 %
probability. Per landmark, the consensus position is the weighted geometric median of the members' points,
refined as the weighted mean of the members within ``inlier_mm`` of it; a member far from the others cannot
drag the answer. The weights (``ConsensusConfig.weighting``) are ``p`` (``"score"``), the precision
``1 / r^2`` (``"radius"``: a member whose calibrated error is small counts more, even when every member is
almost surely within the tolerance), or ``p * lambda[m, l]`` (``"landmark"``: ``lambda`` a fixed precision per
member and landmark, fitted by :func:`fit_landmark_weights` on the members' errors on cases the consensus was not
built from, stored in the configuration as ``landmark_weights``). The members' disagreement (weighted RMS
distance of the inliers to the consensus, ``spread``) lowers the raw score:
``raw = weighted mean_p(inliers) * exp(-(spread / inlier_mm)^2 / 2) * inlier share``. The consensus has its own
trust model, fitted like any detector's by ``lmk3d calibrate``, so its reported score and radius are
calibrated too, with the members' disagreement in them.

It is built, not trained (:func:`build_consensus`, ``lmk3d consensus``): its checkpoint holds the members'
checkpoints and their trust models (without their image checks and presence networks: the consensus
checks the image once, with its own).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.checkpoint import FORMAT, CheckpointError, read_checkpoint, write_checkpoint
from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Prediction, Stage, StageResult, detector_class, mark_outside
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.preprocessing import PreparedImage

__all__ = ["ConsensusConfig", "ConsensusDetector", "answer_errors", "build_consensus", "combine",
           "fit_landmark_weights", "member_weights"]

MEMBERS = ("prior_guided", "pin", "cascade")
WEIGHTINGS = ("score", "radius", "landmark")
MIN_RADIUS_MM = 0.1  # a radius below this (never calibrated so) would give one member all the weight
MIN_RMS_MM = 0.1  # added (squared) to a member's fitted mean squared error: no landmark weight is infinite


@dataclass(frozen=True)
class ConsensusConfig:
    """Attributes:
    members: the member detectors' slugs, in the order they run.
    inlier_mm: a member farther than this from the weighted median is left out of the mean.
    weighting: ``"score"`` (each member's calibrated score ``p``), ``"radius"`` (``1 / r^2``, ``r`` its
        calibrated 90 % radius; a landmark some member found without a radius falls back to ``"score"``) or
        ``"landmark"`` (``p * landmark_weights[m][l]``).
    landmark_weights: per member (in ``members`` order), one fixed weight per landmark (in the model's landmark
        order), fitted by :func:`fit_landmark_weights`; required by ``"landmark"``, kept but unused otherwise.
    """

    members: tuple[str, ...] = MEMBERS
    inlier_mm: float = 4.0
    weighting: str = "score"
    landmark_weights: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        if self.weighting not in WEIGHTINGS:
            raise LandmarkError(f"consensus weighting {self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        if self.landmark_weights is not None:
            lam = tuple(tuple(float(v) for v in row) for row in self.landmark_weights)
            object.__setattr__(self, "landmark_weights", lam)
            if len(lam) != len(self.members) or len({len(row) for row in lam}) != 1:
                raise LandmarkError(f"consensus landmark_weights: one row per member ({len(self.members)}), "
                                    "all of one length, expected")
            if not all(np.isfinite(v) and v > 0 for row in lam for v in row):
                raise LandmarkError("consensus landmark_weights: every weight must be finite and positive")
        elif self.weighting == "landmark":
            raise LandmarkError("consensus weighting 'landmark' needs landmark_weights (fit them with "
                                "lmk3d consensus --weighting landmark)")


def _weighted_median(points: np.ndarray, weights: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Weighted geometric median of ``(M, 3)`` points (Weiszfeld's iteration from the weighted mean)."""
    x = np.average(points, axis=0, weights=weights)
    for _ in range(iterations):
        d = np.maximum(np.linalg.norm(points - x, axis=1), 1e-6)
        w = weights / d
        nxt = (w[:, None] * points).sum(0) / w.sum()
        if np.linalg.norm(nxt - x) < 1e-6:
            return nxt
        x = nxt
    return x


def member_weights(p: np.ndarray, radius_mm: np.ndarray, weighting: str,
                   landmark: np.ndarray | None = None) -> np.ndarray:
    """Each member's weight for one landmark from its calibrated scores ``p``, 90 % radii and (for
    ``"landmark"``) fixed weights ``landmark`` (see ConsensusConfig).

    >>> member_weights(np.array([0.99, 0.98]), np.array([1.0, 2.0]), "radius").tolist()
    [1.0, 0.25]
    >>> member_weights(np.array([0.99, 0.98]), np.array([1.0, np.nan]), "radius").round(3).tolist()
    [0.991, 0.981]
    >>> member_weights(np.array([0.999, 0.499]), np.array([1.0, 2.0]), "landmark", np.array([0.5, 1.0])).tolist()
    [0.5, 0.5]
    """
    if weighting == "radius" and np.isfinite(radius_mm).all():
        return 1.0 / np.maximum(radius_mm, MIN_RADIUS_MM) ** 2
    if weighting == "landmark":
        if landmark is None:
            raise LandmarkError("consensus weighting 'landmark' needs the fitted landmark weights")
        return (p + 1e-3) * landmark
    return p + 1e-3


def fit_landmark_weights(errors_mm: np.ndarray, inlier_mm: float) -> np.ndarray:
    """Fixed member weights per landmark, ``(M, N)``, from the members' errors on fit cases ``(C, M, N)``.

    ``errors_mm[c, m, l]``: member ``m``'s error at landmark ``l`` of case ``c``; ``inf`` where the member did
    not find a landmark the truth has, ``nan`` where the truth has none. Each error is clipped at ``inlier_mm``
    (a member that far is left out of the consensus's mean anyway, and one gross miss should not outweigh
    every good answer); the weight is the precision ``1 / (0.1^2 + mean clipped error^2)``, scaled so that each
    landmark's best member has weight 1.

    >>> e = np.array([[[1.0, 3.0], [2.0, np.inf]], [[1.0, np.nan], [2.0, np.nan]]])  # 2 cases, 2 members, 2 landmarks
    >>> fit_landmark_weights(e, 4.0).round(3).tolist()
    [[1.0, 1.0], [0.252, 0.563]]
    """
    e = np.asarray(errors_mm, dtype=float)
    if e.ndim != 3 or e.shape[0] == 0:
        raise LandmarkError(f"landmark weights: errors of shape (cases, members, landmarks) expected, got {e.shape}")
    known = ~np.isnan(e)
    if not known.any(axis=(0, 1)).all():
        missing = [int(j) for j in np.flatnonzero(~known.any(axis=(0, 1)))]
        raise LandmarkError(f"landmark weights: no fit case has the truth of landmark(s) {missing}")
    clipped = np.where(known, np.minimum(e, inlier_mm), 0.0)
    mse = (clipped ** 2).sum(axis=0) / known.sum(axis=0)
    lam = 1.0 / (MIN_RMS_MM ** 2 + mse)
    return lam / lam.max(axis=0, keepdims=True)


def answer_errors(answers: Sequence[LandmarkSet], truth: LandmarkSet) -> np.ndarray:
    """``(M, N)`` errors of members' answers (in the truth's landmark order) for :func:`fit_landmark_weights`."""
    t = truth.xyz_mm_ras
    known = np.isfinite(t).all(axis=1)
    out = np.full((len(answers), len(truth.names)), np.nan)
    for m, a in enumerate(answers):
        a = a.reorder(truth.names)
        d = np.linalg.norm(a.xyz_mm_ras - t, axis=1)
        out[m] = np.where(known, np.where(a.found, d, np.inf), np.nan)
    return out


def combine(members: Sequence[LandmarkSet], inlier_mm: float, weighting: str = "score",
            landmark_weights: np.ndarray | Sequence[Sequence[float]] | None = None
            ) -> tuple[LandmarkSet, np.ndarray]:
    """The consensus of members' calibrated landmarks: ``(landmarks with raw scores, (N,) spread in mm)``.

    ``landmark_weights`` (``(M, N)``, members in the order given) is needed by ``weighting="landmark"`` only.
    """
    names = members[0].names
    n = len(names)
    lam = None if landmark_weights is None else np.asarray(landmark_weights, dtype=float)
    if lam is not None and lam.shape != (len(members), n):
        raise LandmarkError(f"consensus landmark_weights of shape {lam.shape}, expected {(len(members), n)}")
    xyz = np.full((n, 3), np.nan)
    score = np.zeros(n)
    spread = np.full(n, np.nan)
    for k in range(n):
        idx = [j for j, m in enumerate(members) if m.found[k]]
        if not idx:
            continue
        ok = [members[j] for j in idx]
        pts = np.stack([m.xyz_mm_ras[k] for m in ok])
        p = np.array([float(m.scores[k]) for m in ok])
        w = member_weights(p, np.array([float(m.radius_mm[k]) for m in ok]), weighting,
                           None if lam is None else lam[idx, k])
        median = _weighted_median(pts, w)
        inl = np.linalg.norm(pts - median, axis=1) <= inlier_mm
        if not inl.any():
            inl = np.linalg.norm(pts - median, axis=1) <= np.linalg.norm(pts - median, axis=1).min() + 1e-9
        xyz[k] = np.average(pts[inl], axis=0, weights=w[inl])
        spread[k] = float(np.sqrt(np.average(np.sum((pts[inl] - xyz[k]) ** 2, axis=1), weights=w[inl])))
        share = inl.sum() / len(members)
        score[k] = float(np.average(p[inl], weights=w[inl])) * np.exp(-0.5 * (spread[k] / inlier_mm) ** 2) * share
    found = np.isfinite(xyz).all(axis=1)
    return LandmarkSet(names, xyz, np.clip(score, 0.0, 1.0), found), spread


class _Members(Stage):
    """Placeholder stage list entry: the members run through :meth:`ConsensusDetector.predict_all`."""

    name = "combine"

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        raise LandmarkError("consensus runs its members on the image itself: call predict_all")


class ConsensusDetector(Detector):
    """See the module docstring."""

    name = "consensus"
    config_class = ConsensusConfig
    profiles = {"cpu": ConsensusConfig(), "paper": ConsensusConfig(), "tiny": ConsensusConfig()}

    def __init__(self, landmark_names: Sequence[str], config: ConsensusConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile, device)
        self.members: dict[str, Detector] = {}
        self._stage = _Members()

    def stages(self) -> list[Stage]:
        return [self._stage]

    def fit_with(self, trainer: Any, train: Sequence[Sample], val: Sequence[Sample], **options: Any
                 ) -> dict[str, Any]:
        raise LandmarkError("consensus is built from trained members, not trained: train prior_guided, pin and "
                            "cascade, calibrate each (lmk3d calibrate), then lmk3d consensus --members DIR DIR DIR")

    def predict_all(self, image: Volume, prepared: PreparedImage | None = None, trust: bool = True,
                    cap_atypical: bool = True) -> Prediction:
        """Every member's calibrated answer, their consensus, then the consensus's own trust model.

        The members' scores are taken as calibrated, uncapped on an image a member finds atypical (the
        consensus was calibrated on them so); ``cap_atypical`` applies to the consensus's own answer.
        """
        if not self.members:
            raise LandmarkError("consensus has no members (build it with lmk3d consensus)")
        verdict = None
        if trust and self.trust is not None:  # an image not of the model's kind: no member runs
            from lmk3d.trust import check_image, refused

            t = time.perf_counter()
            verdict = check_image(self.trust, image)
            if not verdict.in_distribution:
                out = refused(self.trust, verdict)
                return Prediction(out, [], 0.0, out, verdict, time.perf_counter() - t)
        results = self.member_answers(image)
        answers = [r.landmarks for r in results]
        t = time.perf_counter()
        combined, _ = combine(answers, self.config.inlier_mm, self.config.weighting, self.config.landmark_weights)
        results.append(StageResult("combine", combined, time.perf_counter() - t))
        raw = mark_outside(combined, image)
        if not trust or self.trust is None:
            return Prediction(raw, results, 0.0, raw)
        from lmk3d.trust import apply_trust

        t = time.perf_counter()
        trusted = apply_trust(self.trust, raw, results[0].landmarks, image, verdict, cap_atypical)
        return Prediction(trusted.landmarks, results, 0.0, raw, trusted.verdict, time.perf_counter() - t)

    def member_answers(self, image: Volume) -> list[StageResult]:
        """Each member's answer as the consensus combines it (calibrated, uncapped, in the consensus's landmark
        order), named by the member and timed; :func:`answer_errors` scores them for :func:`fit_landmark_weights`."""
        results = []
        for slug in self.config.members:
            t = time.perf_counter()
            landmarks = self.members[slug].predict_all(image, cap_atypical=False).landmarks
            results.append(StageResult(slug, landmarks.reorder(self.landmark_names), time.perf_counter() - t))
        return results

    def save(self, directory: Any) -> Path:
        payload = {
            "detector": self.name, "profile": self.profile, "config": self.config_dict(),
            "landmark_names": list(self.landmark_names), "stages": {}, "fitted": self.fitted_state(),
            "data_fingerprint": self.data_fingerprint, "training": self.training,
            "members": {slug: _member_payload(det) for slug, det in self.members.items()},
        }
        return write_checkpoint(directory, payload)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], device: str | None = None) -> Detector:
        from lmk3d.trust import TrustModel

        cfg = ConsensusConfig(**payload["config"])
        det = cls(payload["landmark_names"], cfg, payload.get("profile", "custom"), device)
        det.load_fitted_state(dict(payload.get("fitted", {})))
        det.data_fingerprint = payload.get("data_fingerprint")
        det.training = dict(payload.get("training") or {})
        members = payload.get("members")
        if not isinstance(members, dict) or set(members) != set(cfg.members):
            raise CheckpointError(f"consensus: the checkpoint's members {sorted(members or {})} are not "
                                  f"{list(cfg.members)}")
        for slug in cfg.members:
            doc = dict(members[slug])
            trust_doc = doc.pop("trust", None)
            member = detector_class(doc["detector"]).from_checkpoint(doc, device)
            if trust_doc is None:
                raise CheckpointError(f"consensus: member {slug!r} has no trust model (its weights need p)")
            member.trust = TrustModel.from_json(trust_doc)
            det.members[slug] = member
        return det


def _member_payload(det: Detector) -> dict[str, Any]:
    """A member's checkpoint payload plus its trust model without image check or presence network."""
    if det.trust is None:
        raise LandmarkError(f"member {det.name!r} has no trust model: run lmk3d calibrate on it first")
    trust = det.trust.to_json()
    trust["image"] = None
    return {
        "detector": det.name, "profile": det.profile, "config": det.config_dict(), "format": FORMAT,
        "landmark_names": list(det.landmark_names), "stages": {s.name: s.state() for s in det.stages()},
        "fitted": det.fitted_state(), "data_fingerprint": det.data_fingerprint, "training": det.training,
        "trust": trust,
    }


def build_consensus(member_dirs: Sequence[str | Path], device: str = "cpu") -> ConsensusDetector:
    """A consensus of trained, calibrated member model folders (same landmarks; one per member detector)."""
    from lmk3d.detectors import load_detector

    dets = [load_detector(d, device) for d in member_dirs]
    slugs = [d.name for d in dets]
    if sorted(slugs) != sorted(set(slugs)) or not dets:
        raise LandmarkError(f"consensus: give one model folder per detector, got detectors {slugs}")
    names = dets[0].landmark_names
    for d, path in zip(dets, member_dirs, strict=True):
        if d.landmark_names != names:
            raise LandmarkError(f"consensus: {path} has landmarks {', '.join(d.landmark_names)}, not "
                                f"{', '.join(names)}")
        if d.trust is None:
            raise LandmarkError(f"consensus: {path} has no trust.json; run lmk3d calibrate --model {path} first")
        d.trust.image = None  # the consensus checks the image once, with its own trust model
        d.trust.presence = None
    fingerprints = {d.data_fingerprint for d in dets}
    if len(fingerprints) > 1:
        raise LandmarkError("consensus: the members were trained on different data (data fingerprints differ)")
    det = ConsensusDetector(names, ConsensusConfig(members=tuple(slugs)), "cpu", device)
    det.members = dict(zip(slugs, dets, strict=True))
    det.data_fingerprint = dets[0].data_fingerprint
    det.modality_fitted = dets[0].modality_fitted
    det.training = {"members": {d.name: str(p) for d, p in zip(dets, member_dirs, strict=True)}}
    return det


def read_members(directory: str | Path) -> list[str]:
    """The member slugs of a consensus checkpoint (for model cards)."""
    return list(read_checkpoint(directory)["config"]["members"])
