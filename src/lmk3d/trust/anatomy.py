"""Is the anatomy around the detector's points of the model's kind? An image check that a crop cannot fool.

The thumbnail check (:class:`lmk3d.trust.ImageModel`) stretches the whole image onto 16^3 voxels, so an image
that a crop plane cut (still of the model's kind) moves far from the training thumbnails, and its threshold
must let those through. This check looks instead at a fixed box of the world around the detector's points:

- **descriptor**: a world-aligned (RAS) box of ``box_mm`` on ``size``^3 voxels around the detector's points,
  the intensities scaled by the image's 1st and 99th percentiles
  (:func:`lmk3d.trust.presence.presence_patches`). Voxels outside the field of view, or within one voxel of
  a face (interpolated half from outside), are *missing*;
- **centres**: the detector places a cut-off landmark anywhere, which moves the mean of its points, so the
  box is tried on several centres and the nearest counts: the mean of the found points (:func:`anchor`) and
  each found point minus its landmark's mean offset from the landmarks' mean in the training truth;
- **reference**: the training images, each boxed around its true landmarks' mean; a Gaussian of
  ``n_components`` principal components plus isotropic noise (probabilistic PCA), fitted with the missing
  voxels filled by its own reconstruction (:meth:`AnatomyModel.fit`);
- **distance**: the Mahalanobis distance of the observed voxels under the Gaussian's marginal on them (the
  missing ones integrated out), per observed voxel, square root: about 1 for a training image whatever a
  crop removed (:meth:`AnatomyModel.distance_of`); the smallest over the centres
  (:meth:`AnatomyModel.distance`);
- **threshold**: 1.25 x the farthest calibration image (the calibration cases and their cut variants, boxed
  around the detector's own points), as the thumbnail check's; the score is the share of calibration images
  at least as far;
- **fine-tuned weights**: the check knows the training images of the weights they started from as well as
  their own (:meth:`AnatomyModel.merged`, from the parent's summary: its images are not kept).

Plain numbers, saved in ``trust.json`` under ``"anatomy"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet

__all__ = ["AnatomyModel", "anchor", "anatomy_descriptor"]

#: rounds of filling the missing voxels by the model's reconstruction
EM_ROUNDS = 20


def anchor(landmarks: LandmarkSet, volume: Volume) -> np.ndarray:
    """``(3,)`` RAS mm: the mean of the found points, or the centre of the image when none is found."""
    xyz = np.asarray(landmarks.xyz_mm_ras, dtype=np.float64)
    ok = np.asarray(landmarks.found, dtype=bool) & np.all(np.isfinite(xyz), axis=1)
    if ok.any():
        return xyz[ok].mean(axis=0)
    centre = (np.asarray(volume.shape, dtype=np.float64) - 1.0) / 2.0
    return np.asarray(volume.ijk_to_ras(centre), dtype=np.float64).reshape(3)


def anatomy_descriptor(volume: Volume, centre: np.ndarray, box_mm: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(size**3,)`` scaled intensities and ``(size**3,)`` booleans: the voxel lies inside the field of view,
    more than one voxel from its faces (the interpolation reads outside it there)."""
    from scipy import ndimage

    from lmk3d.trust.presence import presence_patches

    patch = presence_patches(volume, box_mm, size, np.asarray(centre, dtype=np.float64).reshape(1, 3))[0]
    seen = ndimage.binary_erosion(patch[1] > 0.5, border_value=1)  # a face's voxels are half zeros: missing
    return patch[0].reshape(-1).astype(np.float64), seen.reshape(-1)


@dataclass
class AnatomyModel:
    """Probabilistic PCA of the training boxes (see the module docstring)."""

    box_mm: float
    size: int
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    variances: np.ndarray  # (K,) of the components, noise included
    noise: float  # variance per voxel outside the components
    threshold: float
    reference: np.ndarray  # calibration distances, sorted
    n_images: int
    offsets: np.ndarray  # (N, 3) mm: each landmark's mean offset from the landmarks' mean (training truth)

    @classmethod
    def fit(cls, train: Sequence[tuple[Volume, LandmarkSet]], calibration: Sequence[tuple[Volume, LandmarkSet]],
            box_mm: float = 40.0, size: int = 16, n_components: int = 10,
            prior: AnatomyModel | None = None) -> AnatomyModel:
        """Fit on ``train`` (image, true landmarks); the threshold from ``calibration`` (image, the detector's points).

        Every landmark set is in the same order (the model's). A training box is centred on the mean of the
        true landmarks. ``prior``: the check of the weights these were fine-tuned from; the new one then knows
        the prior's training images as well (:meth:`merged`; its box is the prior's).
        """
        if prior is not None:
            box_mm, size = prior.box_mm, prior.size
        need = 1 if prior is not None else 2
        if len(train) < need:
            raise ValueError(f"the anatomy check needs at least {need} training image(s), got {len(train)}")
        centres = [anchor(t, v) for v, t in train]
        rel = [np.where(np.asarray(t.found)[:, None], t.xyz_mm_ras - c, np.nan) for (_, t), c in zip(train, centres,
                                                                                                      strict=True)]
        with np.errstate(invalid="ignore"):
            offsets = np.nanmean(np.stack(rel), axis=0) if rel else np.zeros((0, 3))
        pairs = [anatomy_descriptor(v, c, box_mm, size) for (v, _), c in zip(train, centres, strict=True)]
        x = np.stack([p[0] for p in pairs])
        seen = np.stack([p[1] for p in pairs])
        if prior is None:
            model = cls._from_boxes(x, seen, box_mm, size, n_components, offsets)
        else:
            model = prior.merged(x, seen, offsets, n_components)
        ref = np.sort([model.distance(v, lm) for v, lm in calibration])
        ref = ref[np.isfinite(ref)]
        model.reference = ref
        model.threshold = 1.25 * float(ref.max()) if len(ref) else float("inf")
        return model

    @classmethod
    def _from_boxes(cls, x: np.ndarray, seen: np.ndarray, box_mm: float, size: int,
                    n_components: int, offsets: np.ndarray) -> AnatomyModel:
        """PPCA of ``(n, D)`` boxes whose ``~seen`` voxels are missing; threshold and reference still to be set."""
        n, d = x.shape
        counts = seen.sum(0)
        col_mean = np.where(counts > 0, (x * seen).sum(0) / np.maximum(counts, 1), 0.0)
        filled = np.where(seen, x, col_mean[None, :])
        k = min(n_components, n - 1)
        for _ in range(EM_ROUNDS):
            mean = filled.mean(0)
            _, s, vt = np.linalg.svd(filled - mean, full_matrices=False)
            comps = vt[:k]
            recon = mean + ((filled - mean) @ comps.T) @ comps
            filled = np.where(seen, x, recon)
        mean = filled.mean(0)
        _, s, vt = np.linalg.svd(filled - mean, full_matrices=False)
        comps = vt[:k]
        resid = filled - mean - ((filled - mean) @ comps.T) @ comps
        observed = max(int(seen.sum()), 1)
        noise = float(np.sum((resid * seen) ** 2)) / observed + 1e-9
        var = np.maximum((s[:k] ** 2) / max(n - 1, 1), noise)
        return cls(box_mm, size, mean, comps, var, noise, float("inf"), np.zeros(0), n, np.asarray(offsets, float))

    def merged(self, x: np.ndarray, seen: np.ndarray, offsets: np.ndarray, n_components: int = 10) -> AnatomyModel:
        """This model's training images and the new ``(n, D)`` boxes ``x`` (``~seen`` missing), as one model.

        As :meth:`lmk3d.trust.ImageModel.merged`: the images behind this model are known by their summary
        only, so their scatter is rebuilt from it (one row ``sqrt((n - 1) variance) x component`` per component),
        stacked with the new boxes about their own mean and one row for the difference of the two means; the
        components come from the stack. The new boxes' missing voxels are filled by the merged model's own
        reconstruction, as in :meth:`fit` (starting from this model's mean). The noise is the old noise over
        the old images' voxels and the stack's energy outside the kept components over the new observed ones.
        Where this model kept every direction of its images, and the new boxes miss nothing, the result is the
        model fitted on all images at once. Offsets: the mean of both, weighted by their counts. Threshold and
        reference are left to the caller.
        """
        n_old, n_new = self.n_images, len(x)
        n = n_old + n_new
        old_rows = np.sqrt(max(n_old - 1, 0) * np.maximum(self.variances, 0.0))[:, None] * self.components
        filled = np.where(seen, x, self.mean[None, :])
        k = min(n_components, n - 1)
        for _ in range(EM_ROUNDS + 1):
            mean_new = filled.mean(0)
            mean = (n_old * self.mean + n_new * mean_new) / n
            stack = np.concatenate([old_rows, filled - mean_new,
                                    (np.sqrt(n_old * n_new / n) * (self.mean - mean_new))[None, :]])
            _, s, vt = np.linalg.svd(stack, full_matrices=False)
            comps = vt[:k]
            recon = mean + ((filled - mean) @ comps.T) @ comps
            filled = np.where(seen, x, recon)
        k = min(k, len(s))
        left = float(np.sum(s[k:] ** 2))
        d = self.mean.size
        noise = (self.noise * n_old * d + left) / (n_old * d + max(int(seen.sum()), 1)) + 1e-9
        var = np.maximum((s[:k] ** 2) / max(n - 1, 1), noise)
        with np.errstate(invalid="ignore"):
            both = np.nansum(np.stack([n_old * self.offsets, n_new * np.asarray(offsets, dtype=np.float64)]), axis=0)
            counts = n_old * np.isfinite(self.offsets) + n_new * np.isfinite(offsets)
            merged_offsets = np.where(counts > 0, both / np.maximum(counts, 1), np.nan)
        return AnatomyModel(self.box_mm, self.size, mean, comps[:k], var, noise, float("inf"), np.zeros(0), n,
                            merged_offsets)

    def distance_of(self, values: np.ndarray, seen: np.ndarray) -> float:
        """``sqrt(r' C_oo^-1 r / |o|)`` over the observed voxels ``o`` (``C = V' (L - noise) V + noise I``).

        By the Woodbury identity, with ``V_o`` the components' observed columns and ``A = diag(1 / (L - noise))``:
        ``C_oo^-1 = (I - V_o' (A noise + V_o V_o')^-1 V_o) / noise``. NaN when no voxel is observed.
        """
        o = np.asarray(seen, dtype=bool)
        m = int(o.sum())
        if m == 0:
            return float("nan")
        r = values[o] - self.mean[o]
        vo = self.components[:, o]  # (K, m)
        extra = np.maximum(self.variances - self.noise, 1e-12)
        inner = np.diag(self.noise / extra) + vo @ vo.T
        b = vo @ r
        d2 = (float(r @ r) - float(b @ np.linalg.solve(inner, b))) / self.noise
        return math.sqrt(max(d2, 0.0) / m)

    def centres(self, landmarks: LandmarkSet, volume: Volume) -> list[np.ndarray]:
        """The box centres to try: :func:`anchor`, then each found point minus its landmark's offset."""
        out = [anchor(landmarks, volume)]
        xyz = np.asarray(landmarks.xyz_mm_ras, dtype=np.float64)
        for k in range(min(len(xyz), len(self.offsets))):
            if landmarks.found[k] and np.all(np.isfinite(xyz[k])) and np.all(np.isfinite(self.offsets[k])):
                out.append(xyz[k] - self.offsets[k])
        return out

    def distance(self, volume: Volume, landmarks: LandmarkSet) -> float:
        """The smallest :meth:`distance_of` over :meth:`centres` (NaN when no box sees the image)."""
        ds = [self.distance_of(*anatomy_descriptor(volume, c, self.box_mm, self.size))
              for c in self.centres(landmarks, volume)]
        ds = [d for d in ds if math.isfinite(d)]
        return min(ds) if ds else float("nan")

    def score(self, d: float) -> float:
        """The share of calibration images at least as far as ``d`` (the thumbnail check's convention)."""
        n = len(self.reference)
        if not n:
            return 1.0
        s = (1.0 + float(np.sum(self.reference >= d))) / (n + 1.0)
        return min(s, 1.0 / (n + 1.0)) if d > self.threshold else s

    def to_json(self) -> dict[str, Any]:
        return {"box_mm": self.box_mm, "size": self.size, "mean": self.mean.tolist(),
                "components": self.components.tolist(), "variances": self.variances.tolist(), "noise": self.noise,
                "threshold": self.threshold, "reference": self.reference.tolist(), "n_images": self.n_images,
                "offsets": self.offsets.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AnatomyModel:
        mean = np.asarray(d["mean"], dtype=np.float64)
        size = int(d["size"])
        if mean.shape != (size ** 3,):
            raise ValueError(f"anatomy check: a mean of {mean.size} voxels for a box of {size}^3")
        return cls(float(d["box_mm"]), size, mean, np.asarray(d["components"], dtype=np.float64).reshape(-1, mean.size),
                   np.asarray(d["variances"], dtype=np.float64), float(d["noise"]), float(d["threshold"]),
                   np.asarray(d["reference"], dtype=np.float64), int(d["n_images"]),
                   np.asarray(d["offsets"], dtype=np.float64).reshape(-1, 3))
