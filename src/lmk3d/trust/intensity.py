"""Intensities scaled to [0, 1] by their 1st and 99th percentiles, shared by the trust checks.

The image check (:func:`lmk3d.trust.image_descriptor`) and the presence network's input
(:func:`lmk3d.trust.presence.presence_input`) both scale the same image by the same two percentiles.
On a 512 x 512 x 200 CT the percentiles cost most of either (a partition of every voxel), so the last
image's pair is kept: an array is recognised by identity (a weak reference, so nothing is kept
alive), and a view or copy of it counts as another image. Percentiles depend only on the multiset of
values, so the pair of a flipped or transposed view is the same numbers.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

_last: tuple[Any, float, float] | None = None


def percentiles_1_99(array: np.ndarray) -> tuple[Any, Any]:
    """``np.percentile`` 1 and 99 of ``array`` as float32, computed once per array object."""
    global _last
    if _last is not None and _last[0]() is array:
        return _last[1], _last[2]
    lo, hi = np.percentile(np.asarray(array, dtype=np.float32), [1.0, 99.0])
    _last = (weakref.ref(array), lo, hi)
    return lo, hi


def scaled(a: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """``clip((a - lo) / max(hi - lo, 1e-6), 0, 1)``, in one new array instead of three."""
    out = np.subtract(a, lo)
    np.divide(out, max(float(hi - lo), 1e-6), out=out)
    return np.clip(out, 0.0, 1.0, out=out)
