"""Trust: calibrated scores, a 90 % radius, "not found" for cut-off landmarks, and "not my kind of image".

A detector's own score (a heatmap peak, a classifier's vote) ranks its points but is not a probability.
A :class:`TrustModel`, fitted after training on cases that trained nothing (the model's validation
cases, :func:`fit_trust`), turns each prediction into what a reviewer can act on:

- **score**: the probability that the point lies within ``tolerance_mm`` (default 3 mm) of the truth;
- **radius_mm**: a radius that holds the truth with 90 % probability (split-conformal);
- **found**: False also for a landmark that the field of view cuts off (the detectors place those on the
  border), with its name kept and no position pretended;
- **verdict**: whether the image is of the kind the model was trained on (:class:`ImageVerdict`); when
  it is not, every landmark is reported not found with a score of at most 0.2, and the reason says why.

How the numbers are made (fixed before any test case was looked at; the history is in docs/trust.md):

- Each point's error scale is ``s = exp(w . f)``, a least-squares fit of ``log(error + 0.5 mm)`` on
  features ``f``: a per-landmark intercept, ``-log`` of the detector's raw score, ``log(1 + d_stage)``
  (how far the last stage moved the first stage's point) and ``log(1 + d_shape)`` (how far the point lies
  from where the other landmarks put it, by a linear shape model fitted on the training truth), and,
  when it ranks the calibration errors better out of sample (:func:`lmk3d.trust.fit.fit_from_records`),
  ``log(1 + distance to the nearest face of the field of view)``. The
  normalised errors ``u = error / s`` of the calibration points give the rest: ``score = F(tol / s)`` with
  ``F`` their empirical distribution function, ``radius_mm = q90 * s`` with ``q90`` the split-conformal
  quantile (the ``ceil(0.9 (n + 1))``-th smallest ``u``). When it calibrates better out of sample, an
  image with a landmark not found takes ``F`` and ``q90`` from such calibration images only, and a
  complete image from complete ones (Mondrian: the two groups err differently).
- Not found: the presence network (:mod:`lmk3d.trust.presence`) gives the landmark a probability below
  ``presence_threshold`` of lying inside, or the point is closer than ``face_mm`` to a face of the field of
  view, or its shape-model position lies beyond a face by more than ``shape_outside_mm``. The thresholds
  are chosen on the calibration cases' cut variants (:mod:`lmk3d.trust.cuts`) to maximise the smaller of
  two shares: cut-off landmarks reported not found, landmarks still inside reported found.
- Image verdict: cheap checks first (modality, voxel spacing, field of view against the training
  images' ranges, with a factor of 2 of slack), then the distance of the image's 16^3 thumbnail (canonical
  orientation, intensities scaled by their 1st and 99th percentiles) to the training images (each with one
  cut variant): a Mahalanobis distance in the principal components of their thumbnails plus the residual
  outside them. The threshold is 1.25 x the largest distance of a calibration image (the calibration cases
  and their cut variants: a cut image is still of the model's kind). The verdict's score is the share of
  calibration images at least as far (1.0 for a typical image, near 0 far outside). A model may also
  carry a second check made after the detector has run, on the anatomy around its points, blind to what a
  crop removed (:mod:`lmk3d.trust.anatomy`); the verdict is then the two checks' together. An image that
  passes but whose verdict score is at most :data:`ATYPICAL_SCORE` (farther than all but 2.5 % of the
  calibration images) is *atypical*: its points are reported, each score capped at :data:`OOD_SCORE_CAP`,
  since the calibration has next to no images like it (:func:`atypical_verdict`).

Everything fitted is plain numbers, saved as ``trust.json`` beside the checkpoint (:func:`save_trust`,
:func:`load_trust`); nothing here is pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.trust.anatomy import AnatomyModel
from lmk3d.trust.cuts import distance_to_faces_mm
from lmk3d.trust.presence import PresenceModel

__all__ = ["TRUST_FILE", "AnatomyModel", "ImageModel", "ImageVerdict", "ShapeModel", "TrustModel", "anatomy_verdict",
           "apply_trust", "atypical_verdict", "check_image", "image_descriptor", "load_trust", "point_features",
           "refused", "save_trust"]

TRUST_FILE = "trust.json"
FORMAT = 1
THUMB = 16
#: the probability the 90 % radius is made for
COVERAGE = 0.9
# The error scale's feature sets (:func:`design_matrix`); a trust.json that names none uses "base".
FEATURE_SETS = ("base", "face")
#: the score an image judged not of the model's kind may keep, at most (an atypical image's cap as well)
OOD_SCORE_CAP = 0.2
#: an image whose verdict score is at most this is atypical (:func:`atypical_verdict`); an image of the model's
#: kind, exchangeable with the calibration images, scores this low on one check with probability at most 0.025
#: (on either of two: at most 0.05)
ATYPICAL_SCORE = 0.025


# --- the shape model: where the other landmarks put each one -----------------------------------------
@dataclass
class ShapeModel:
    """Per landmark ``k``, a ridge regression of its position on the other landmarks' positions.

    Positions are taken relative to the mean of the other landmarks, so the model does not depend on
    where the anatomy sits in the world. ``coef[k]``: ``(3 (N - 1), 3)``, ``bias[k]``: ``(3,)``.
    """

    coef: list[np.ndarray]
    bias: list[np.ndarray]

    @classmethod
    def fit(cls, truths: Sequence[np.ndarray], ridge: float = 1.0) -> ShapeModel | None:
        """Fit on ``(N, 3)`` true positions (cases with every landmark); None with < 10 such cases or N < 2."""
        full = [t for t in truths if np.isfinite(t).all()]
        if not full or len(full) < 10 or full[0].shape[0] < 2:
            return None
        pts = np.stack(full)
        n = pts.shape[1]
        coef, bias = [], []
        for k in range(n):
            x, y = _shape_xy(pts, k)
            xm, ym = x.mean(0), y.mean(0)
            xc, yc = x - xm, y - ym
            w = np.linalg.solve(xc.T @ xc + ridge * np.eye(xc.shape[1]), xc.T @ yc)
            coef.append(w)
            bias.append(ym - xm @ w)
        return cls(coef, bias)

    def expected(self, xyz: np.ndarray) -> np.ndarray:
        """``(N, 3)`` where the other landmarks put each landmark (NaN where one of them is unknown)."""
        out = np.full_like(xyz, np.nan, dtype=np.float64)
        for k in range(xyz.shape[0]):
            others = np.delete(xyz, k, axis=0)
            if not np.isfinite(others).all():
                continue
            x, _ = _shape_xy(xyz[None], k)
            out[k] = x[0] @ self.coef[k] + self.bias[k] + others.mean(0)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"coef": [c.tolist() for c in self.coef], "bias": [b.tolist() for b in self.bias]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ShapeModel:
        return cls([np.asarray(c, dtype=np.float64) for c in doc["coef"]],
                   [np.asarray(b, dtype=np.float64) for b in doc["bias"]])


def _shape_xy(pts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Regression inputs (others minus their mean, flattened) and targets (landmark k minus that mean)."""
    others = np.delete(pts, k, axis=1)
    centre = others.mean(axis=1, keepdims=True)
    return (others - centre).reshape(len(pts), -1), pts[:, k] - centre[:, 0]


# --- per-point features ------------------------------------------------------------------------------
def point_features(final: LandmarkSet, first: LandmarkSet | None, shape: ShapeModel | None,
                   volume: Volume) -> dict[str, np.ndarray]:
    """What the calibration and the not-found rule read about each point (``(N,)`` arrays).

    ``raw``: the detector's score; ``d_stage``: distance (mm) between the first stage's point and the final
    one (0 for a one-stage detector); ``d_shape``: distance to the shape model's position; ``face_mm``: the
    signed distance to the nearest face of the field of view (negative outside); ``shape_face_mm``: the same
    for the shape model's position.
    """
    xyz = final.xyz_mm_ras
    n = len(final)
    d_stage = np.zeros(n)
    if first is not None and first is not final:
        d = np.linalg.norm(first.xyz_mm_ras - xyz, axis=1)
        d_stage = np.where(np.isfinite(d), d, 0.0)
    expected = shape.expected(xyz) if shape is not None else np.full((n, 3), np.nan)
    d_shape = np.linalg.norm(expected - xyz, axis=1)
    face = np.full(n, np.nan)
    shape_face = np.full(n, np.nan)
    ok = np.isfinite(xyz).all(axis=1)
    if ok.any():
        face[ok] = distance_to_faces_mm(volume, xyz[ok]).min(axis=1)
    ok_e = np.isfinite(expected).all(axis=1)
    if ok_e.any():
        shape_face[ok_e] = distance_to_faces_mm(volume, expected[ok_e]).min(axis=1)
    return {"raw": np.asarray(final.scores, dtype=np.float64), "d_stage": d_stage,
            "d_shape": np.where(np.isfinite(d_shape), d_shape, 0.0), "face_mm": face,
            "shape_face_mm": shape_face}


def design_matrix(features: dict[str, np.ndarray], n_landmarks: int, feature_set: str = "base") -> np.ndarray:
    """The error scale's features, one row per point.

    ``base`` (``(N, n_landmarks + 3)``): one-hot landmark intercepts, ``-log raw``, ``log1p d_stage``,
    ``log1p d_shape``. ``face`` adds ``log1p`` of the distance to the nearest face of the field of view
    (0 outside it, and for a point without a position, which is reported not found anyway).
    """
    if feature_set not in FEATURE_SETS:
        raise LandmarkError(f"error-scale features {feature_set!r}: expected one of {', '.join(FEATURE_SETS)}")
    n = len(features["raw"])
    onehot = np.zeros((n, n_landmarks))
    onehot[np.arange(n), np.arange(n) % n_landmarks] = 1.0
    raw = np.clip(features["raw"], 1e-3, 1.0)
    columns = [onehot, -np.log(raw), np.log1p(features["d_stage"]), np.log1p(features["d_shape"])]
    if feature_set == "face":
        columns.append(np.log1p(np.clip(np.nan_to_num(features["face_mm"], nan=0.0), 0.0, None)))
    return np.column_stack(columns)


# --- the image verdict ---------------------------------------------------------------------------------
@dataclass
class ImageVerdict:
    """Whether an image is of the kind the model was trained on.

    Attributes:
        in_distribution: False when a cheap check fails or the image lies too far from the training images.
        score: the share of calibration images at least as far from the training images (1 typical, 0 far).
        reason: in words, for the clients.
        distance: the thumbnail distance (NaN when a cheap check already failed).
        anatomy_distance: the anatomy check's distance (NaN when the model has none or it was not reached);
            in the JSON only when known.
        atypical: of the model's kind, but farther than nearly every calibration image, so every landmark
            score is capped (:func:`atypical_verdict`).
    """

    in_distribution: bool
    score: float
    reason: str
    distance: float = float("nan")
    anatomy_distance: float = float("nan")
    atypical: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"in_distribution": self.in_distribution, "score": round(float(self.score), 4),
                               "atypical": self.atypical, "reason": self.reason,
                               "distance": None if not math.isfinite(self.distance) else round(float(self.distance), 3)}
        if math.isfinite(self.anatomy_distance):
            out["anatomy_distance"] = round(float(self.anatomy_distance), 3)
        return out

    def summary(self) -> str:
        """One line for a record that has no field of its own for the verdict (a DICOM SR's algorithm parameters)."""
        state = ("not of the model's kind, no landmark found" if not self.in_distribution else
                 f"atypical, every score capped at {OOD_SCORE_CAP:g}" if self.atypical else "of the model's kind")
        return f"{state} (score {self.score:.3f}): {self.reason}"


def image_descriptor(volume: Volume) -> np.ndarray:
    """``(THUMB**3,)`` thumbnail of the image in canonical (RAS) axis order, intensities scaled to [0, 1] by
    their 1st and 99th percentiles."""
    from scipy import ndimage

    from lmk3d.preprocessing import canonical_view
    from lmk3d.trust.intensity import percentiles_1_99, scaled_where_read, zoom_reads

    a, _ = canonical_view(np.asarray(volume.array, dtype=np.float32), volume.affine)
    a = np.asarray(a, dtype=np.float32)
    lo, hi = percentiles_1_99(volume.array)  # the same values in any voxel order
    zoom = [THUMB / s for s in a.shape]
    a = scaled_where_read(a, lo, hi, zoom_reads(a.shape, zoom))  # only the voxels the zoom reads are scaled
    t = ndimage.zoom(a, zoom, order=1, grid_mode=True, mode="nearest")
    t = t[:THUMB, :THUMB, :THUMB]
    if t.shape != (THUMB,) * 3:
        t = np.pad(t, [(0, THUMB - s) for s in t.shape], mode="edge")
    return t.reshape(-1).astype(np.float64)


@dataclass
class ImageModel:
    """The training images' ranges and thumbnail statistics (see the module docstring)."""

    modality: str | None
    spacing_range: tuple[list[float], list[float]]
    extent_range: tuple[list[float], list[float]]
    mean: np.ndarray
    components: np.ndarray  # (K, D)
    variances: np.ndarray  # (K,)
    residual_scale: float
    threshold: float
    reference: np.ndarray  # calibration distances, sorted
    n_images: int | None = None  # training thumbnails behind the model (None: a trust.json that predates it)

    @classmethod
    def fit(cls, train: Sequence[Volume], calibration: Sequence[Volume], modality: str | None,
            n_components: int = 10, prior: ImageModel | None = None) -> ImageModel:
        """Fit on the ``train`` images; the threshold from the ``calibration`` images' distances.

        ``prior``: the image model of the weights these were fine-tuned from. The new model then knows the
        prior's training images as well as ``train`` (:meth:`merged`): weights that started from the prior's
        still work on the images it was trained on.
        """
        descs = np.stack([image_descriptor(v) for v in train])
        spac = np.stack([np.sort(v.spacing_mm) for v in train])
        ext = np.stack([np.sort(np.asarray(v.shape) * v.spacing_mm) for v in train])
        ranges = ((spac.min(0), spac.max(0)), (ext.min(0), ext.max(0)))
        if prior is None:
            model = cls._from_descriptors(descs, ranges, modality, n_components)
        else:
            model = prior.merged(descs, ranges, modality, n_components)
        ref = np.sort([model.distance(image_descriptor(v)) for v in calibration])
        model.reference = ref
        model.threshold = 1.25 * float(ref.max()) if len(ref) else float("inf")
        return model

    @classmethod
    def _from_descriptors(cls, descs: np.ndarray, ranges: tuple[tuple[np.ndarray, np.ndarray], ...],
                          modality: str | None, n_components: int) -> ImageModel:
        """Principal components of ``(n, D)`` thumbnails; threshold and reference still to be set."""
        mean = descs.mean(0)
        _, s, vt = np.linalg.svd(descs - mean, full_matrices=False)
        k = min(n_components, len(descs) - 1)
        comps = vt[:k]
        var = (s[:k] ** 2) / max(len(descs) - 1, 1)
        resid = descs - mean - ((descs - mean) @ comps.T) @ comps
        residual_scale = float(np.mean(np.sum(resid ** 2, axis=1))) + 1e-9
        (slo, shi), (elo, ehi) = ranges
        return cls(modality, (slo.tolist(), shi.tolist()), (elo.tolist(), ehi.tolist()), mean, comps, var,
                   residual_scale, float("inf"), np.zeros(0), len(descs))

    def merged(self, descs: np.ndarray, ranges: tuple[tuple[np.ndarray, np.ndarray], ...],
               modality: str | None, n_components: int = 10) -> ImageModel:
        """This model's training images and the ``(n, D)`` thumbnails ``descs`` together, as one model.

        The images behind this model are known only by their summary: count ``n_images``, mean, principal
        components with their variances, and the mean squared residual outside them. Their scatter is
        rebuilt from it (one row ``sqrt((n - 1) variance) x component`` per component, as in an incremental
        PCA), stacked with the new thumbnails about their own mean and one row for the difference of the
        two means, and the components are taken from the stack. The residual of the merged model is the old
        residual (its directions are unknown, so it is counted whole) plus what the stack leaves outside the
        new components, over all images. Where this model kept every direction of its images (fewer images
        than components), the result is the model fitted on all images at once. The ranges of spacing and
        field of view are the union. Threshold and reference are left to the caller (calibration images).
        """
        if not self.n_images:
            raise ValueError("the image model does not say how many images it was fitted on (n_images)")
        n_old = self.n_images
        n_new = len(descs)
        n = n_old + n_new
        mean_new = descs.mean(0)
        mean = (n_old * self.mean + n_new * mean_new) / n
        rows = [np.sqrt(max(n_old - 1, 0) * np.maximum(self.variances, 0.0))[:, None] * self.components,
                descs - mean_new, (np.sqrt(n_old * n_new / n) * (self.mean - mean_new))[None, :]]
        stack = np.concatenate(rows, axis=0)
        _, s, vt = np.linalg.svd(stack, full_matrices=False)
        k = min(n_components, n - 1, len(s))
        comps = vt[:k]
        var = (s[:k] ** 2) / max(n - 1, 1)
        left = float(np.sum(s[k:] ** 2))  # the stack's energy outside the kept components
        old_resid = max(self.residual_scale - 1e-9, 0.0) * n_old
        residual_scale = (old_resid + left) / n + 1e-9
        (slo, shi), (elo, ehi) = ranges
        spacing = (np.minimum(self.spacing_range[0], slo).tolist(), np.maximum(self.spacing_range[1], shi).tolist())
        extent = (np.minimum(self.extent_range[0], elo).tolist(), np.maximum(self.extent_range[1], ehi).tolist())
        return ImageModel(modality, spacing, extent, mean, comps, var, residual_scale, float("inf"), np.zeros(0), n)

    def distance(self, desc: np.ndarray) -> float:
        """Root mean of the squared Mahalanobis coordinates and the scaled residual (about 1 for a training image)."""
        c = desc - self.mean
        z = self.components @ c
        resid = c - self.components.T @ z
        maha = float(np.sum(z ** 2 / np.maximum(self.variances, 1e-12)))
        return math.sqrt((maha + float(resid @ resid) / self.residual_scale) / (len(self.variances) + 1))

    def verdict(self, volume: Volume) -> ImageVerdict:
        from lmk3d.preprocessing import guess_modality

        if self.modality is not None:
            seen = guess_modality(np.asarray(volume.array))
            if seen != self.modality:
                return ImageVerdict(False, 0.0, f"the image looks like {seen}; the model was trained on "
                                    f"{self.modality}")
        spacing = np.sort(volume.spacing_mm)
        lo, hi = np.asarray(self.spacing_range[0]), np.asarray(self.spacing_range[1])
        if np.any(spacing < lo / 2) or np.any(spacing > hi * 2):
            return ImageVerdict(False, 0.0, f"voxel spacing {_mm3(spacing)} mm is outside the training range "
                                f"{_mm3(lo)} to {_mm3(hi)} mm (x2 slack)")
        extent = np.sort(np.asarray(volume.shape) * volume.spacing_mm)
        lo, hi = np.asarray(self.extent_range[0]), np.asarray(self.extent_range[1])
        if np.any(extent < lo / 2) or np.any(extent > hi * 2):
            return ImageVerdict(False, 0.0, f"field of view {_mm3(extent)} mm is outside the training range "
                                f"{_mm3(lo)} to {_mm3(hi)} mm (x2 slack)")
        d = self.distance(image_descriptor(volume))
        n = len(self.reference)
        score = (1.0 + float(np.sum(self.reference >= d))) / (n + 1.0) if n else 1.0
        if d > self.threshold:
            return ImageVerdict(False, min(score, 1.0 / (n + 1.0)) if n else 0.0,
                                f"the image is unlike the training images (distance {d:.1f}; the threshold is "
                                f"{self.threshold:.1f}, 1.25 x the farthest calibration case)", d)
        return ImageVerdict(True, score, f"like the training images (distance {d:.1f} <= {self.threshold:.1f})", d)

    def to_json(self) -> dict[str, Any]:
        return {"modality": self.modality, "spacing_range": list(self.spacing_range),
                "extent_range": list(self.extent_range), "mean": self.mean.tolist(),
                "components": self.components.tolist(), "variances": self.variances.tolist(),
                "residual_scale": self.residual_scale, "threshold": self.threshold,
                "reference": self.reference.tolist(), "n_images": self.n_images}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageModel:
        return cls(d["modality"], (list(d["spacing_range"][0]), list(d["spacing_range"][1])),
                   (list(d["extent_range"][0]), list(d["extent_range"][1])), np.asarray(d["mean"]),
                   np.asarray(d["components"]).reshape(-1, len(d["mean"])), np.asarray(d["variances"]),
                   float(d["residual_scale"]), float(d["threshold"]), np.asarray(d["reference"]),
                   d.get("n_images"))


def _mm3(v: np.ndarray) -> str:
    return "x".join(f"{x:.3g}" for x in v)


def pulled_inside(final: LandmarkSet, volume: Volume, margin_mm: float) -> LandmarkSet:
    """``final`` with each point placed outside the field of view by at most ``margin_mm`` moved back inside.

    A detector's point beyond a face is not found by the contract (:func:`lmk3d.detectors.base.mark_outside`),
    though the landmark may lie just inside: a detector can overshoot a face the crop put near it. Such a point
    (its distance to the field of view, in world mm, at most ``margin_mm``) is moved to the nearest point of the
    outer voxel centres (its continuous voxel index clipped to ``[0, n - 1]`` per axis) and marked found, so the
    not-found rule (:func:`cut_rule`) judges it as any other point. Points farther out, points without a position,
    and points inside are as they were; ``margin_mm`` <= 0 changes nothing.
    """
    if not margin_mm > 0:
        return final
    xyz = np.asarray(final.xyz_mm_ras, dtype=np.float64)
    known = np.isfinite(xyz).all(axis=1)
    outside = np.zeros(len(final), dtype=bool)
    if known.any():
        outside[known] = ~volume.contains_ras(xyz[known])
    if not outside.any():
        return final
    idx = np.flatnonzero(outside)
    faces = distance_to_faces_mm(volume, xyz[idx]).reshape(-1, 3, 2).min(axis=2)  # per axis, negative beyond
    beyond = np.sqrt(np.sum(np.minimum(faces, 0.0) ** 2, axis=1))
    idx = idx[beyond <= margin_mm]
    if not len(idx):
        return final
    ijk = np.clip(volume.ras_to_ijk(xyz[idx]), 0.0, np.asarray(volume.shape, dtype=np.float64) - 1.0)
    moved, found = xyz.copy(), np.asarray(final.found, dtype=bool).copy()
    moved[idx] = volume.ijk_to_ras(ijk)
    found[idx] = True
    return LandmarkSet(final.names, moved, final.scores, found, final.radius_mm, final.tolerance_mm)


def cut_rule(face_mm: np.ndarray, shape_face_mm: np.ndarray, presence: np.ndarray | None, face_threshold: float,
             shape_outside_mm: float, presence_threshold: float) -> np.ndarray:
    """The not-found rule on its inputs (``(N,)`` arrays; NaN or None where a feature is unknown)."""
    near = np.isfinite(face_mm) & (face_mm < face_threshold)
    beyond = np.isfinite(shape_face_mm) & (shape_face_mm < -shape_outside_mm)
    absent = np.zeros_like(near) if presence is None else presence < presence_threshold
    return near | beyond | absent


# --- the fitted trust model -------------------------------------------------------------------------------
@dataclass
class TrustModel:
    """Everything :func:`apply_trust` needs, fitted by :func:`lmk3d.trust.fit.fit_trust`."""

    landmark_names: tuple[str, ...]
    tolerance_mm: float
    weights: np.ndarray  # (n_landmarks + 3,), one more with the face feature set
    normalised: np.ndarray  # sorted calibration u = error / s (of the complete images when partial_* is set)
    q90: float
    face_mm: float
    shape_outside_mm: float
    shape: ShapeModel | None
    image: ImageModel | None
    report: dict[str, Any]
    presence_threshold: float = 0.0
    presence: PresenceModel | None = None
    features: str = "base"  # the error scale's feature set (:data:`FEATURE_SETS`)
    # Mondrian calibration: the normalised errors and 90 % quantile of the images with a landmark not found
    # (None: one distribution for every image)
    partial_normalised: np.ndarray | None = None
    partial_q90: float | None = None
    anatomy: AnatomyModel | None = None  # the image check on the anatomy around the points, if fitted
    pull_inside_mm: float = 0.0  # points at most this far beyond the field of view are judged inside (pulled_inside)

    def scale(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return np.exp(design_matrix(features, len(self.landmark_names), self.features) @ self.weights)

    def probability_within(self, scale: np.ndarray, tolerance_mm: float | None = None,
                           partial: bool = False) -> np.ndarray:
        """``F(tol / s)``: the share of calibration points whose normalised error is at most ``tol / s``.

        ``partial``: the points belong to an image with a landmark not found (their own distribution, when
        the model has one).
        """
        tol = self.tolerance_mm if tolerance_mm is None else tolerance_mm
        u = self.partial_normalised if partial and self.partial_normalised is not None else self.normalised
        n = len(u)
        return np.searchsorted(u, tol / scale, side="right") / (n + 1.0) if n else np.full(len(scale), 0.5)

    def quantile(self, partial: bool = False) -> float:
        """The 90 % radius in units of the error scale (for an image with a landmark not found: its own)."""
        return self.partial_q90 if partial and self.partial_q90 is not None else self.q90

    def cut_off(self, features: dict[str, np.ndarray], presence: np.ndarray | None) -> np.ndarray:
        """Points the field of view cuts off: the presence network says so, the point is on the border,
        or the other landmarks place it beyond a face."""
        return cut_rule(features["face_mm"], features["shape_face_mm"], presence, self.face_mm,
                        self.shape_outside_mm, self.presence_threshold)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "landmark_names": list(self.landmark_names), "tolerance_mm": self.tolerance_mm,
                "coverage": COVERAGE, "weights": self.weights.tolist(), "normalised": self.normalised.tolist(),
                "q90": self.q90, "face_mm": self.face_mm, "shape_outside_mm": self.shape_outside_mm,
                "presence_threshold": self.presence_threshold, "features": self.features,
                "partial": None if self.partial_normalised is None else
                {"normalised": self.partial_normalised.tolist(), "q90": self.partial_q90},
                "shape": None if self.shape is None else self.shape.to_json(),
                "image": None if self.image is None else self.image.to_json(),
                **({} if self.anatomy is None else {"anatomy": self.anatomy.to_json()}),
                **({"pull_inside_mm": self.pull_inside_mm} if self.pull_inside_mm > 0 else {}), "report": self.report}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrustModel:
        if d.get("format") != FORMAT:
            raise LandmarkError(f"trust.json format {d.get('format')!r} is not {FORMAT}")
        features = _feature_set(d.get("features", "base"))
        width = len(d["landmark_names"]) + 3 + (features == "face")
        if len(d["weights"]) != width:
            raise LandmarkError(f"trust.json: {len(d['weights'])} error-scale weights; {features} features on "
                                f"{len(d['landmark_names'])} landmarks need {width}")
        return cls(tuple(d["landmark_names"]), float(d["tolerance_mm"]), np.asarray(d["weights"], dtype=np.float64),
                   np.asarray(d["normalised"], dtype=np.float64), float(d["q90"]), float(d["face_mm"]),
                   float(d["shape_outside_mm"]), None if d.get("shape") is None else ShapeModel.from_json(d["shape"]),
                   None if d.get("image") is None else ImageModel.from_json(d["image"]), dict(d.get("report") or {}),
                   float(d.get("presence_threshold", 0.0)), features=features,
                   partial_normalised=None if not d.get("partial") else
                   np.asarray(d["partial"]["normalised"], dtype=np.float64),
                   partial_q90=None if not d.get("partial") else float(d["partial"]["q90"]),
                   anatomy=_anatomy(d.get("anatomy")), pull_inside_mm=_margin(d.get("pull_inside_mm", 0.0)))


def _margin(value: Any) -> float:
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = math.nan
    if not (math.isfinite(margin) and margin >= 0):
        raise LandmarkError(f"trust.json: pull_inside_mm {value!r}: expected a distance in mm, 0 or more")
    return margin


def _anatomy(doc: Any) -> AnatomyModel | None:
    if doc is None:
        return None
    try:
        return AnatomyModel.from_json(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise LandmarkError(f"trust.json: the anatomy check cannot be read ({e})") from None


def anatomy_verdict(trust: TrustModel, verdict: ImageVerdict, final: LandmarkSet, volume: Volume) -> ImageVerdict:
    """``verdict`` joined with the anatomy check on the detector's points ``final`` (unchanged without one).

    Over the check's threshold the image is not of the model's kind, and the reason names the check;
    otherwise the score is the smaller of the two checks'.
    """
    a = trust.anatomy
    if a is None or not verdict.in_distribution:
        return verdict
    d = a.distance(volume, final)
    if not math.isfinite(d):
        return verdict
    if d > a.threshold:
        return ImageVerdict(False, a.score(d), f"the anatomy around the points is unlike the training images "
                            f"(distance {d:.1f}; the threshold is {a.threshold:.1f}, 1.25 x the farthest "
                            f"calibration case)", verdict.distance, d)
    return ImageVerdict(True, min(verdict.score, a.score(d)), f"{verdict.reason}; the anatomy around the points "
                        f"too (distance {d:.1f} <= {a.threshold:.1f})", verdict.distance, d)


def atypical_verdict(verdict: ImageVerdict) -> ImageVerdict:
    """``verdict``, marked atypical when it passed with a score of at most :data:`ATYPICAL_SCORE`.

    The calibrated scores hold for images like the calibration images; one farther from the training images
    than all but 2.5 % of them is where the calibration has next to no support, so its landmark scores are
    capped at :data:`OOD_SCORE_CAP` (:func:`apply_trust`) and the reason says so. With fewer than 39
    calibration images no score is that low and no image is atypical.
    """
    if not verdict.in_distribution or verdict.score > ATYPICAL_SCORE:
        return verdict
    return replace(verdict, atypical=True, reason=f"{verdict.reason}; but farther from the training images than "
                   f"all but at most {ATYPICAL_SCORE:.1%} of the calibration images (score {verdict.score:.3f}): every "
                   f"landmark score is capped at {OOD_SCORE_CAP:g}, check each point")


def _feature_set(name: Any) -> str:
    if name not in FEATURE_SETS:
        raise LandmarkError(f"trust.json: error-scale features {name!r}: expected one of {', '.join(FEATURE_SETS)}")
    return str(name)


@dataclass
class Trusted:
    """:func:`apply_trust`'s answer: the landmarks to report (calibrated scores, radii) and the image verdict."""

    landmarks: LandmarkSet
    verdict: ImageVerdict
    raw: LandmarkSet
    cut_off: np.ndarray
    presence: np.ndarray | None


def check_image(trust: TrustModel, volume: Volume) -> ImageVerdict:
    """The image verdict alone (a detector asks first, and skips its stages for an image not of its kind)."""
    return trust.image.verdict(volume) if trust.image is not None else ImageVerdict(True, 1.0, "not checked")


def refused(trust: TrustModel, verdict: ImageVerdict) -> LandmarkSet:
    """What an image not of the model's kind gets: every landmark named, none found, score 0."""
    n = len(trust.landmark_names)
    return LandmarkSet(trust.landmark_names, np.full((n, 3), np.nan), np.zeros(n), np.zeros(n, dtype=bool),
                       np.full(n, np.nan), trust.tolerance_mm)


def apply_trust(trust: TrustModel, final: LandmarkSet, first: LandmarkSet | None, volume: Volume,
                verdict: ImageVerdict | None = None, cap_atypical: bool = True) -> Trusted:
    """Calibrated scores, radii, cut-off landmarks and the image verdict for one prediction.

    A landmark not found (by the detector, as cut off, or because the image is not of the model's kind)
    keeps its name, loses its position, and gets score 0 and no radius. ``verdict``: the image verdict
    if already made (:func:`check_image`). On an atypical image (:func:`atypical_verdict`) every score is
    capped at :data:`OOD_SCORE_CAP` unless ``cap_atypical`` is False (a consensus weighs its members by
    the scores they were calibrated with, and caps its own answer).
    """
    if tuple(final.names) != trust.landmark_names:
        raise LandmarkError(f"trust model is for {', '.join(trust.landmark_names)}; the prediction has "
                            f"{', '.join(final.names)}")
    final = pulled_inside(final, volume, trust.pull_inside_mm)
    verdict = atypical_verdict(anatomy_verdict(trust, verdict if verdict is not None else check_image(trust, volume),
                                               final, volume))
    feats = point_features(final, first, trust.shape, volume)
    presence = None
    if trust.presence is not None and verdict.in_distribution:
        presence = trust.presence.for_answer(volume, final)
    s = trust.scale(feats)
    cut = trust.cut_off(feats, presence) & final.found
    found = final.found & ~cut
    partial = not found.all()  # the image's calibration group
    if not verdict.in_distribution:
        found = np.zeros(len(final), dtype=bool)
    p = np.where(found, trust.probability_within(s, partial=partial), 0.0)
    if verdict.atypical and cap_atypical:
        p = np.minimum(p, OOD_SCORE_CAP)
    radius = np.where(found, trust.quantile(partial) * s, np.nan)
    xyz = np.where(found[:, None], final.xyz_mm_ras, np.nan)
    out = LandmarkSet(final.names, xyz, np.clip(p, 0.0, 1.0), found, radius, trust.tolerance_mm)
    return Trusted(out, verdict, final, cut, presence)


def trust_path(directory: str | os.PathLike[str]) -> Path:
    p = Path(directory)
    return (p.parent if p.suffix == ".pt" else p) / TRUST_FILE


def save_trust(directory: str | os.PathLike[str], trust: TrustModel) -> Path:
    """Write ``trust.json`` (and ``presence.pt`` when the model has a presence network), atomically."""
    from lmk3d.io.atomic import atomic_write_text

    path = trust_path(directory)
    if trust.presence is not None:
        trust.presence.save(path.parent)
    return atomic_write_text(path, dumps_readable(trust.to_json()))


def dumps_readable(doc: dict[str, Any]) -> str:
    """JSON with one top-level key per line: the fitted arrays compact, the report indented for reading."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, indent=2 if k == 'report' else None)}" for k, v in doc.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_trust(directory: str | os.PathLike[str]) -> TrustModel | None:
    """The ``trust.json`` (and ``presence.pt``) beside a checkpoint, or None when the model has none."""
    path = trust_path(directory)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LandmarkError(f"{path}: cannot read the trust model ({e})") from None
    trust = TrustModel.from_json(doc)
    trust.presence = PresenceModel.load(path.parent)
    if trust.presence is not None and trust.presence.landmark_names != trust.landmark_names:
        raise LandmarkError(f"{path.parent}: presence.pt and trust.json name different landmarks")
    return trust
