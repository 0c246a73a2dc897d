"""Intensity normalisation by modality (CT: a HU window; MR: percentiles).

The normalisation is fitted once per image (on a subsample, so large CT stays cheap) and then
applied to every grid sampled from it: the coarse volume and the fine patches see the same mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CT_WINDOW_HU: tuple[float, float] = (-1000.0, 2000.0)
MR_PERCENTILES: tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class IntensityMap:
    """Linear map of ``[lo, hi]`` onto ``[0, 1]``; ``clip`` for CT (HU are absolute), not for MR."""

    lo: float
    hi: float
    clip: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` mapped, with the arithmetic of MONAI's ``ScaleIntensityRange(lo, hi, 0, 1, clip)`` step for
        step (the shipped models were trained on its output; importing MONAI takes seconds).
        ``lo == hi`` only shifts."""
        x = torch.as_tensor(x)
        if self.hi - self.lo == 0.0:
            return x - self.lo + 0.0
        out = (x - self.lo) / (self.hi - self.lo) * (1.0 - 0.0) + 0.0
        return out.clamp(0.0, 1.0) if self.clip else out


def fit_intensity(array: np.ndarray, modality: str) -> IntensityMap:
    """Choose the intensity map for one image.

    Args:
        array: the image voxels (any shape).
        modality: ``"CT"`` (fixed HU window) or ``"MR"`` (0.5th-99.5th percentile of a subsample).
    """
    if modality == "CT":
        return IntensityMap(*CT_WINDOW_HU, clip=True)
    if modality == "MR":
        step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
        sub = np.asarray(array)[::step, ::step, ::step] if array.ndim == 3 else np.asarray(array).ravel()
        lo, hi = (float(v) for v in np.percentile(sub, MR_PERCENTILES))
        if hi <= lo:
            hi = lo + 1.0
        return IntensityMap(lo, hi, clip=False)
    raise ValueError(f"unknown modality {modality!r}; choose CT or MR")
