"""``mean_shape``: the baseline every detector must beat.

Each landmark goes to its mean position *relative to the image*: in the world (patient, RAS) frame, the
field of view's axis-aligned bounding box has a centre ``c`` and an extent ``e`` (mm, per axis); a
landmark at ``x`` has normalised coordinates ``u = (x - c) / e``. Fitting averages ``u`` per landmark
over the training cases where it is annotated; predicting puts it at ``c + e * mean(u)`` for the new
image. Only image headers are needed, so it fits in seconds on any dataset.

Score: the fraction of training cases whose true landmark lies within ``hit_radius_mm`` of where this
rule puts it on that case (an in-sample detection rate, the same for every image). A landmark outside
the field of view is "not found" (the detector contract's rule, applied by the base class).

Example:
    >>> det = MeanShapeDetector.create(["a"], "tiny")
    >>> det.stages()[0].name
    'mean_position'
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Stage
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.preprocessing import PreparedImage
from lmk3d.training.loop import Trainer
from lmk3d.transforms.intensity import IntensityMap


@dataclass(frozen=True)
class MeanShapeConfig:
    """Attributes:
    hit_radius_mm: radius of the training detection rate reported as the score.
    """

    hit_radius_mm: float = 8.0


def frame_of(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and extent ``((3,), (3,))`` in mm of the RAS bounding box of an image's field of view."""
    lo, hi = geometry.world_bounds_ras(affine, shape)
    return 0.5 * (lo + hi), hi - lo


class MeanPositionStage(Stage):
    """Places every landmark at its fitted mean position in the image's normalised frame.

    Fitted state: ``offsets`` ``(N, 3)`` normalised mean positions (NaN for a landmark never annotated),
    ``scores`` ``(N,)``, ``n_cases`` ``(N,)`` training cases per landmark.
    """

    name = "mean_position"

    def __init__(self, landmark_names: Sequence[str]) -> None:
        self.landmark_names = tuple(landmark_names)
        n = len(self.landmark_names)
        self.offsets = np.full((n, 3), np.nan)
        self.scores = np.zeros(n)
        self.n_cases = np.zeros(n, dtype=int)

    def place(self, shape: Sequence[int], affine: np.ndarray) -> LandmarkSet:
        """The landmarks for an image of this ``shape`` and ``affine`` (no voxels needed)."""
        centre, extent = frame_of(shape, affine)
        xyz = centre + extent * self.offsets
        return LandmarkSet(self.landmark_names, xyz, self.scores.copy(), np.isfinite(xyz).all(axis=1))

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        return self.place(image.source_shape, image.source_affine)

    def fitted(self) -> dict[str, Any]:
        return {"offsets": self.offsets.tolist(), "scores": self.scores.tolist(), "n_cases": self.n_cases.tolist()}

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        n = len(self.landmark_names)
        offsets = np.asarray(fitted.get("offsets", np.full((n, 3), np.nan)), dtype=np.float64).reshape(-1, 3)
        if offsets.shape != (n, 3):
            raise LandmarkError(f"mean_shape checkpoint: offsets of shape {offsets.shape} for {n} landmarks")
        self.offsets = offsets
        self.scores = np.asarray(fitted.get("scores", np.zeros(n)), dtype=np.float64)
        self.n_cases = np.asarray(fitted.get("n_cases", np.zeros(n)), dtype=int)


class MeanShapeDetector(Detector):
    """Mean position of each landmark relative to the image's field of view (see the module docstring)."""

    name = "mean_shape"
    config_class = MeanShapeConfig
    profiles = {"cpu": MeanShapeConfig(), "tiny": MeanShapeConfig()}

    def __init__(self, landmark_names: Sequence[str], config: MeanShapeConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile, device)
        self.stage = MeanPositionStage(self.landmark_names)

    def stages(self) -> list[Stage]:
        return [self.stage]

    def prepare(self, image: Volume) -> PreparedImage:
        """Only the header is needed: no intensity statistics, no copy to a device."""
        return PreparedImage(torch.zeros((1, 1, 1, 1, 1)), np.asarray(image.affine, dtype=np.float64), image.shape,
                             "MR", IntensityMap(0.0, 1.0, clip=False), 0.0, np.asarray(image.affine), image.shape)

    def place(self, shape: Sequence[int], affine: np.ndarray) -> LandmarkSet:
        """The landmarks for an image of this ``shape`` and ``affine`` (no voxels needed)."""
        return self.stage.place(shape, affine)

    @classmethod
    def upgrade_checkpoint(cls, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "stages": {MeanPositionStage.name: {"networks": {}, "fitted": payload.get("fitted", {})}},
                "fitted": {}}

    def fit_with(self, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample], **options: Any
                 ) -> dict[str, Any]:
        """Average the normalised positions over ``train`` (headers only); report train/val MRE in mm.

        The fit is deterministic and takes seconds (the trainer's seed and budgets do not matter).

        Raises:
            LandmarkError: no training sample has landmarks.
        """
        from tqdm import tqdm

        from lmk3d.data.datasets import image_geometry

        t0 = time.perf_counter()
        labelled = [s for s in train if s.landmarks is not None]
        if not labelled:
            raise LandmarkError("mean_shape: no labelled training samples")
        progress = trainer.options.progress
        geoms = [image_geometry(s.image_path) for s in tqdm(labelled, desc="mean_shape: reading headers",
                                                           disable=not progress, leave=False)]
        n = len(self.landmark_names)
        acc = np.zeros((n, 3))
        count = np.zeros(n, dtype=int)
        for s, (shape, affine) in zip(labelled, geoms, strict=True):
            assert s.landmarks is not None
            lm = s.landmarks.reorder(self.landmark_names)
            centre, extent = frame_of(shape, affine)
            u = (lm.xyz_mm_ras - centre) / extent
            ok = lm.found
            acc[ok] += u[ok]
            count[ok] += 1
        st = self.stage
        with np.errstate(invalid="ignore", divide="ignore"):
            st.offsets = np.where(count[:, None] > 0, acc / np.maximum(count, 1)[:, None], np.nan)
        st.n_cases = count
        train_err = self._errors(labelled, geoms)
        hits = np.nansum(train_err <= self.config.hit_radius_mm, axis=0)
        st.scores = np.where(count > 0, hits / np.maximum(count, 1), 0.0)
        report: dict[str, Any] = {
            "detector": self.name,
            "n_train": len(labelled),
            "train_mre_mm": _mre(train_err),
            "per_landmark_cases": {nm: int(c) for nm, c in zip(self.landmark_names, count, strict=True)},
        }
        val_lab = [s for s in (val or []) if s.landmarks is not None]
        report["n_val"] = len(val_lab)
        if val_lab:
            report["val_mre_mm"] = _mre(self._errors(val_lab, [image_geometry(s.image_path) for s in val_lab]))
        report["seconds"] = round(time.perf_counter() - t0, 3)
        if progress:
            val_txt = f", val MRE {report['val_mre_mm']:.2f} mm" if val_lab else ""
            print(f"mean_shape: fitted on {len(labelled)} cases: train MRE {report['train_mre_mm']:.2f} mm{val_txt}")
        return report

    def leave_one_out(self, train: Sequence[Sample]) -> list[Detector]:
        """One copy per case of ``train`` whose mean positions leave that case out (exact: the stored mean times
        the count, less the case, over the count less one). The scores (the in-sample detection rate) are kept:
        they are the same for every image, so the error scale's per-landmark intercepts absorb them.

        Raises:
            LandmarkError: the fitted mean is not the mean of ``train``'s landmarks (other cases than it was
                fitted on), or a case is the only one annotating a landmark.
        """
        from lmk3d.data.datasets import image_geometry

        st = self.stage
        us = []
        for s in train:
            if s.landmarks is None:
                raise LandmarkError(f"mean_shape: training case {s.case} has no landmarks to leave out")
            lm = s.landmarks.reorder(self.landmark_names)
            centre, extent = frame_of(*image_geometry(s.image_path))
            us.append(np.where(lm.found[:, None], (lm.xyz_mm_ras - centre) / extent, np.nan))
        u = np.asarray(us).reshape(len(us), len(self.landmark_names), 3)
        count = np.isfinite(u).all(axis=2).sum(axis=0)
        total = np.nansum(u, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count[:, None]
        if not (np.array_equal(count, st.n_cases) and np.allclose(mean, st.offsets, rtol=0.0, atol=1e-12,
                                                                  equal_nan=True)):
            raise LandmarkError("mean_shape: its fitted mean positions are not the mean of these training cases "
                                "(give the cases of its split.json's training split)")
        out: list[Detector] = []
        for i in range(len(u)):
            annotated = np.isfinite(u[i]).all(axis=1)
            if (annotated & (count < 2)).any():
                raise LandmarkError(f"mean_shape: training case {train[i].case} is the only one with a landmark; "
                                    "leaving it out leaves no mean")
            stage = MeanPositionStage(self.landmark_names)
            with np.errstate(invalid="ignore", divide="ignore"):
                stage.offsets = np.where(annotated[:, None], (total - np.nan_to_num(u[i])) / (count - 1)[:, None],
                                         st.offsets)
            stage.scores, stage.n_cases = st.scores.copy(), count - annotated
            other = copy.copy(self)
            other.stage, other.trust = stage, None
            out.append(other)
        return out

    def _errors(self, samples: Sequence[Sample], geoms: Sequence[tuple[tuple[int, int, int], np.ndarray]]
                ) -> np.ndarray:
        """``(cases, N)`` radial errors in mm of this rule on ``samples`` (NaN where not annotated)."""
        out = np.full((len(samples), len(self.landmark_names)), np.nan)
        for i, (s, (shape, affine)) in enumerate(zip(samples, geoms, strict=True)):
            assert s.landmarks is not None
            lm = s.landmarks.reorder(self.landmark_names)
            pred = self.place(shape, affine)
            ok = lm.found & pred.found
            out[i, ok] = np.linalg.norm(pred.xyz_mm_ras[ok] - lm.xyz_mm_ras[ok], axis=1)
        return out


def _mre(errors: np.ndarray) -> float:
    e = errors[np.isfinite(errors)]
    return float(e.mean()) if len(e) else float("nan")
