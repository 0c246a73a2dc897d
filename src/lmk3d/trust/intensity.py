"""Intensities scaled to [0, 1] by their 1st and 99th percentiles, shared by the trust checks.

The image check (:func:`lmk3d.trust.image_descriptor`) and the presence network's input
(:func:`lmk3d.trust.presence.presence_input`) both scale the same image by the same two percentiles.
``np.percentile`` copies and partitions every voxel (0.8 s for a 512 x 512 x 200 CT), so:

* the last image's pair is kept: an array is recognised by identity (a weak reference, so nothing is
  kept alive), and a view or copy of it counts as another image; percentiles depend only on the
  multiset of values, so the pair of a flipped or transposed view is the same numbers;
* for a large image the four order statistics that ``np.percentile`` interpolates between are selected
  from two narrow bands of values (bounds from a sorted sample; one pass over the voxels, a cache-sized
  chunk at a time, counts the voxels below each band and gathers those inside; then one partition of
  each band), and combined by numpy's own interpolation: the same numbers as ``np.percentile``. Where
  a band misses its rank (or the image holds NaN or infinity) the plain ``np.percentile`` answers.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

_last: tuple[Any, Any, Any] | None = None

#: images with fewer voxels go straight to ``np.percentile``
SELECT_MIN_VOXELS = 1 << 20
#: voxels in the sample that bounds the bands
SAMPLE_SIZE = 1 << 16
#: voxels per chunk of the one pass over the image (a megabyte of float32: they stay in the cache)
CHUNK = 1 << 18
QUANTILES = (1.0, 99.0)


def _numpy_interpolation() -> tuple[Any, Any, Any, Any] | None:
    """numpy's own pieces of ``np.percentile`` (method ``linear``), or None where this numpy lacks them."""
    import importlib

    fb: Any = None
    for name in ("numpy.lib.function_base", "numpy.lib._function_base_impl"):  # numpy 1.x, numpy 2
        try:
            fb = importlib.import_module(name)
            break
        except ImportError:
            continue
    try:
        return (fb._QuantileMethods["linear"], fb._get_indexes, fb._get_gamma, fb._lerp)
    except (AttributeError, KeyError, TypeError):  # not found in this numpy: np.percentile answers
        return None


def _select(flat: np.ndarray, quantiles: tuple[float, ...]) -> tuple[Any, ...] | None:
    """``np.percentile(flat, quantiles)`` by band selection, or None where it cannot be done exactly."""
    parts = _numpy_interpolation()
    if parts is None:
        return None
    method, get_indexes, get_gamma, lerp = parts
    n = flat.size
    q = np.asanyarray(np.true_divide(np.asanyarray(quantiles), 100))  # as np.percentile forms them
    virtual = np.asanyarray(method["get_virtual_index"](n, q))
    prev, nxt = get_indexes(flat[:0], virtual, n)
    ranks = np.concatenate([prev, nxt])
    if np.any(ranks < 0) or np.any(ranks >= n):
        return None
    step = max(n // SAMPLE_SIZE, 1)
    sample = np.sort(flat[::step])
    m = sample.size
    margin = int(8 * np.sqrt(m)) + 64
    wanted_ranks = sorted(set(ranks.tolist()))
    bounds = {}  # rank -> its band of values, from the sample
    for r in wanted_ranks:
        pos = int(r / n * m)
        bounds[r] = (sample[max(pos - margin, 0)], sample[min(pos + margin, m - 1)])
    pairs = sorted(set(bounds.values()))
    below = [0] * len(pairs)
    count = [0] * len(pairs)
    pieces: list[list[np.ndarray]] = [[] for _ in pairs]
    # One pass over the voxels, a cache-sized chunk at a time: the finiteness check, then for each band the
    # count of voxels below it and the voxels inside it (only counted where the band is one value, such as
    # the air of a CT: every voxel in it is that value).
    for start in range(0, n, CHUNK):
        chunk = flat[start:start + CHUNK]
        if not (np.isfinite(chunk.min()) and np.isfinite(chunk.max())):  # NaN or infinity: np.percentile answers
            return None
        for i, (lo_b, hi_b) in enumerate(pairs):
            inside = chunk >= lo_b
            below[i] += chunk.size - int(np.count_nonzero(inside))
            inside &= chunk <= hi_b
            if lo_b == hi_b:
                count[i] += int(np.count_nonzero(inside))
            else:
                pieces[i].append(chunk[inside])
    bands = {pair: (below[i], count[i] if pair[0] == pair[1] else np.concatenate(pieces[i]))
             for i, pair in enumerate(pairs)}
    value: dict[int, Any] = {}
    for r in wanted_ranks:
        if r in value:
            continue
        lower, band = bands[bounds[r]]
        size = band if isinstance(band, int) else band.size
        wanted = [k for k in wanted_ranks if lower <= k < lower + size and k not in value]
        if r not in wanted:
            return None
        if isinstance(band, int):  # a band of one value: every rank in it is that value
            for k in wanted:
                value[k] = bounds[r][0]
            continue
        band.partition([k - lower for k in wanted])
        for k in wanted:
            value[k] = band[k - lower]
    previous = np.array([value[int(k)] for k in prev], dtype=flat.dtype)
    following = np.array([value[int(k)] for k in nxt], dtype=flat.dtype)
    gamma = get_gamma(virtual, prev, method)
    return tuple(lerp(previous, following, gamma))


def percentiles_1_99(array: np.ndarray) -> tuple[Any, Any]:
    """``np.percentile`` 1 and 99 of ``array`` as float32, computed once per array object."""
    global _last
    if _last is not None and _last[0]() is array:
        return _last[1], _last[2]
    a = np.asarray(array, dtype=np.float32)
    pair = _select(a.ravel(order="K"), QUANTILES) if a.size >= SELECT_MIN_VOXELS else None
    lo, hi = pair if pair is not None else np.percentile(a, list(QUANTILES))
    _last = (weakref.ref(array), lo, hi)
    return lo, hi


def scaled(a: np.ndarray, lo: Any, hi: Any) -> np.ndarray:
    """``clip((a - lo) / max(hi - lo, 1e-6), 0, 1)``, in one new array instead of three."""
    out = np.subtract(a, lo)
    np.divide(out, max(float(hi - lo), 1e-6), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def scaled_where_read(a: np.ndarray, lo: Any, hi: Any, index: tuple[np.ndarray, ...]) -> np.ndarray:
    """:func:`scaled` at the voxels ``a[index]`` (integer index arrays), zero at every other voxel.

    An order-1 interpolation reads only the voxels next to its sample points. Each voxel is scaled on
    its own, so scaling just those (``index`` must hold every voxel it reads) gives the interpolation the
    same values as :func:`scaled` of the whole image: 52 million voxels of a 512 x 512 x 200 CT are not
    all scaled for a 16^3 thumbnail. The zeros are the kernel's untouched pages; only those the index
    reaches are written.
    """
    out = np.zeros(a.shape, dtype=np.float32)
    out[index] = scaled(np.asarray(a[index], dtype=np.float32), lo, hi)
    return out


def zoom_reads(shape: tuple[int, ...], factors: list[float]) -> tuple[np.ndarray, ...]:
    """An ``np.ix_`` index of every voxel that ``ndimage.zoom(order=1, grid_mode=True)`` reads, and a margin.

    scipy's output size is ``round(n * factor)``, and output index ``o`` reads about input position
    ``(o + 0.5) n / size - 0.5``; its two neighbours, one more each side, clipped to the axis.
    """
    axes = []
    for n, f in zip(shape, factors, strict=True):
        size = max(int(round(n * f)), 1)
        pos = (np.arange(size) + 0.5) * (n / size) - 0.5
        base = np.floor(pos).astype(np.int64)
        axes.append(np.unique(np.clip(np.concatenate([base - 1, base, base + 1, base + 2]), 0, n - 1)))
    return np.ix_(*axes)


def points_read(shape: tuple[int, ...], coords: np.ndarray) -> tuple[np.ndarray, ...]:
    """Index arrays of every voxel that ``ndimage.map_coordinates(order=1)`` reads at ``coords`` (``(3, P)``).

    Each point reads the corners of the voxel cell around it (``floor`` and ``floor + 1`` on each axis),
    those inside the image.
    """
    base = np.floor(coords).astype(np.int64)
    corners = []
    for offsets in np.ndindex(2, 2, 2):
        corners.append(base + np.asarray(offsets, dtype=np.int64)[:, None])
    allc = np.concatenate(corners, axis=1)
    ok = np.all((allc >= 0) & (allc < np.asarray(shape)[:, None]), axis=0)
    return tuple(allc[:, ok])
