"""``LandmarkSet``: named 3D points in world mm RAS, with a score and a found/missing mask.

A landmark that is *not found* (``found[i] == False``) has no usable position: in a ground truth it
was not annotated (partial annotation is normal and is not scored), in a prediction the detector
could not place it (scored as a failure). Its position may be NaN or a low-confidence best guess.

Example:
    >>> import numpy as np
    >>> s = LandmarkSet.from_dict({"AC": (0.0, 2.9, -4.8), "PC": (0.0, -25.2, -1.9)})
    >>> s.names, s.position("PC").tolist()
    (('AC', 'PC'), [0.0, -25.2, -1.9])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from lmk3d import geometry
from lmk3d.errors import LandmarkFormatError


def _check_names(names: Sequence[str], source: str = "") -> tuple[str, ...]:
    where = f"{source}: " if source else ""
    out = tuple(str(n) for n in names)
    for n in out:
        if not n.strip():
            raise LandmarkFormatError(f"{where}empty landmark name")
    dups = sorted(n for n, c in Counter(out).items() if c > 1)
    if dups:
        raise LandmarkFormatError(f"{where}duplicate landmark names: {', '.join(dups)}")
    return out


@dataclass(frozen=True, eq=False)
class LandmarkSet:
    """Named landmarks of one image.

    Attributes:
        names: ``N`` unique landmark names, in a fixed order.
        xyz_mm_ras: ``(N, 3)`` float64 world positions (RAS mm); NaN where unknown.
        scores: ``(N,)`` float64 confidence in ``[0, 1]`` (1.0 for ground truth).
        found: ``(N,)`` bool; False = not annotated (truth) / not found (prediction).
        radius_mm: ``(N,)`` float64, a radius that holds the truth with 90 % probability (NaN: not known;
            set by a calibrated model, :mod:`lmk3d.trust`).
        tolerance_mm: the distance a calibrated score refers to (the score is then the probability that
            the error is within it); NaN when the scores are not calibrated.
    """

    names: tuple[str, ...]
    xyz_mm_ras: np.ndarray
    scores: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]  # filled in __post_init__
    found: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    radius_mm: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]
    tolerance_mm: float = float("nan")

    def __post_init__(self) -> None:
        names = _check_names(self.names)
        xyz = np.array(self.xyz_mm_ras, dtype=np.float64).reshape(-1, 3) if len(names) else np.zeros((0, 3))
        n = len(names)
        if xyz.shape != (n, 3):
            raise LandmarkFormatError(f"{n} names but positions of shape {xyz.shape}")
        scores = np.ones(n) if self.scores is None else np.array(self.scores, dtype=np.float64).reshape(-1)
        found = np.isfinite(xyz).all(axis=1) if self.found is None else np.array(self.found, dtype=bool).reshape(-1)
        if scores.shape != (n,) or found.shape != (n,):
            raise LandmarkFormatError(f"{n} names but {scores.shape[0]} scores and {found.shape[0]} found flags")
        if np.any(found & ~np.isfinite(xyz).all(axis=1)):
            bad = [names[i] for i in np.flatnonzero(found & ~np.isfinite(xyz).all(axis=1))]
            raise LandmarkFormatError(f"landmarks marked found without a finite position: {', '.join(bad)}")
        radius = np.full(n, np.nan) if self.radius_mm is None else np.array(self.radius_mm, np.float64).reshape(-1)
        if radius.shape != (n,):
            raise LandmarkFormatError(f"{n} names but {radius.shape[0]} radii")
        for a in (xyz, scores, found, radius):
            a.setflags(write=False)
        object.__setattr__(self, "radius_mm", radius)
        object.__setattr__(self, "tolerance_mm", float(self.tolerance_mm))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "xyz_mm_ras", xyz)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "found", found)

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        positions: Mapping[str, Sequence[float] | np.ndarray],
        scores: Mapping[str, float] | None = None,
        found: Mapping[str, bool] | None = None,
    ) -> LandmarkSet:
        """Build from ``{name: (x, y, z) RAS mm}`` (insertion order is kept)."""
        names = list(positions)
        xyz = np.array([np.asarray(positions[n], dtype=np.float64) for n in names]).reshape(-1, 3)
        sc = None if scores is None else [float(scores.get(n, 1.0)) for n in names]
        fd = None if found is None else [bool(found.get(n, True)) for n in names]
        return cls(tuple(names), xyz, sc, fd)  # type: ignore[arg-type]

    @classmethod
    def from_ijk(
        cls,
        names: Sequence[str],
        ijk: np.ndarray,
        affine: np.ndarray,
        scores: np.ndarray | None = None,
        found: np.ndarray | None = None,
    ) -> LandmarkSet:
        """Build from continuous voxel indices ``(N, 3)`` of an image with the given RAS affine."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return cls(tuple(names), geometry.ijk_to_ras(ijk, affine).reshape(-1, 3), scores, found)  # type: ignore[arg-type]

    @classmethod
    def empty(cls, names: Sequence[str]) -> LandmarkSet:
        """All landmarks absent."""
        n = len(names)
        return cls(tuple(names), np.full((n, 3), np.nan), np.zeros(n), np.zeros(n, dtype=bool))

    # access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown landmark {name!r}; this set has {', '.join(self.names)}") from None

    def position(self, name: str) -> np.ndarray:
        return self.xyz_mm_ras[self.index(name)].copy()

    @property
    def xyz_mm_lps(self) -> np.ndarray:
        """``(N, 3)`` positions in LPS mm (for DICOM and Slicer writers)."""
        return geometry.ras_to_lps(self.xyz_mm_ras)

    def to_ijk(self, affine: np.ndarray) -> np.ndarray:
        """``(N, 3)`` continuous voxel indices in an image with this RAS affine."""
        return geometry.ras_to_ijk(self.xyz_mm_ras, affine).reshape(-1, 3)

    def as_dict(self, found_only: bool = True) -> dict[str, np.ndarray]:
        return {n: self.xyz_mm_ras[i].copy() for i, n in enumerate(self.names) if self.found[i] or not found_only}

    # derived sets --------------------------------------------------------------------------
    def reorder(self, names: Iterable[str]) -> LandmarkSet:
        """Same landmarks in another order; names this set lacks come out absent (not found)."""
        names = _check_names(list(names))
        n = len(names)
        xyz, sc, fd, rad = np.full((n, 3), np.nan), np.zeros(n), np.zeros(n, dtype=bool), np.full(n, np.nan)
        for k, name in enumerate(names):
            if name in self.names:
                i = self.names.index(name)
                xyz[k], sc[k], fd[k], rad[k] = self.xyz_mm_ras[i], self.scores[i], self.found[i], self.radius_mm[i]
        return LandmarkSet(names, xyz, sc, fd, rad, self.tolerance_mm)

    def with_found(self, found: np.ndarray) -> LandmarkSet:
        return LandmarkSet(self.names, self.xyz_mm_ras, self.scores, np.asarray(found, dtype=bool), self.radius_mm,
                           self.tolerance_mm)

    @property
    def calibrated(self) -> bool:
        """True when the scores are probabilities of an error within :attr:`tolerance_mm`."""
        return bool(np.isfinite(self.tolerance_mm))

    def transformed(self, matrix: np.ndarray) -> LandmarkSet:
        """Positions moved by a 4x4 world transform (RAS -> RAS)."""
        return LandmarkSet(self.names, geometry.apply_affine(matrix, self.xyz_mm_ras).reshape(-1, 3),
                           self.scores, self.found, self.radius_mm, self.tolerance_mm)

    def allclose(self, other: LandmarkSet, atol_mm: float = 1e-6) -> bool:
        """Same names, found flags and (found) positions within ``atol_mm``."""
        if self.names != other.names or not np.array_equal(self.found, other.found):
            return False
        f = self.found
        return bool(np.allclose(self.xyz_mm_ras[f], other.xyz_mm_ras[f], atol=atol_mm, rtol=0))

    def __repr__(self) -> str:
        return f"LandmarkSet({len(self)} landmarks, {int(self.found.sum())} found: {', '.join(self.names)})"


def all_names(sets: Iterable[LandmarkSet]) -> tuple[str, ...]:
    """Union of landmark names, in order of first appearance."""
    out: dict[str, None] = {}
    for s in sets:
        for n in s.names:
            out.setdefault(n, None)
    return tuple(out)
