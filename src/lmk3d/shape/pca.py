"""The point-distribution model: PCA of landmark configurations (Cootes' shape space, PIN's ``b``).

A configuration of ``N`` landmarks is the vector ``X = (x1, y1, z1, ..., xN, yN, zN)`` of length
``3N`` (in whatever frame the caller chose, e.g. a detector's working grid). PCA of training
configurations gives

    X = mean + W b,        b = W^T (X - mean),

with ``W`` the ``(3N, n_b)`` matrix of orthonormal eigenvectors and ``variances`` their eigenvalues
``lambda``. The modes kept are the fewest that explain ``variance_kept`` of the total variance, capped
by the rank the training set can support (``cases - 1``).

Missing landmarks are never zero-filled: the model is fitted on the complete cases, and a partial
configuration is projected by a least-squares fit of the observed coordinates only
(:meth:`ShapeModel.project`), with a whisper of the shape prior so that a case observing fewer
coordinates than there are modes still has one answer (the most probable one).

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> shapes = rng.normal(size=(20, 4, 3))
    >>> model = ShapeModel.fit(shapes)
    >>> b = model.to_params(shapes)
    >>> bool(np.allclose(model.from_params(b), shapes, atol=0.5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkError

#: Weight of the shape prior in :meth:`ShapeModel.project`, relative to one observed coordinate with
#: unit variance: small enough that a determined fit is a plain least-squares fit.
PRIOR_WEIGHT = 1e-6


@dataclass(frozen=True, eq=False)
class ShapeModel:
    """A linear shape model ``X = mean + W b``.

    Attributes:
        mean: ``(N, 3)`` mean configuration.
        components: ``W``, ``(3N, n_b)`` with orthonormal columns (the modes, by decreasing variance).
        variances: ``lambda``, ``(n_b,)`` variance of each mode in the training set.
        explained: fraction of the training set's total variance the kept modes explain.
        n_cases: number of (complete) configurations the model was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    explained: float = 1.0
    n_cases: int = 0

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1, 3)
        w = np.asarray(self.components, dtype=np.float64)
        var = np.asarray(self.variances, dtype=np.float64).reshape(-1)
        if w.ndim != 2 or w.shape[0] != mean.size or w.shape[1] != var.size or var.size == 0:
            raise LandmarkError(f"shape model: mean of {mean.shape[0]} landmarks needs components of shape "
                                f"({mean.size}, n_b) and n_b >= 1 variances; got components {w.shape} and "
                                f"{var.size} variances")
        if not np.allclose(w.T @ w, np.eye(w.shape[1]), atol=1e-6):
            raise LandmarkError("shape model: components must have orthonormal columns")
        for a in (mean, w, var):
            a.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "components", w)
        object.__setattr__(self, "variances", var)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, shapes: np.ndarray, variance_kept: float = 0.995, max_modes: int | None = None) -> ShapeModel:
        """PCA of the complete configurations among ``shapes``.

        Args:
            shapes: ``(M, N, 3)``; a case with any non-finite coordinate (a missing landmark) is left
                out of the fit (project it afterwards with :meth:`project`).
            variance_kept: keep the fewest modes explaining at least this fraction of the variance.
            max_modes: optional further cap on the number of modes.

        Raises:
            LandmarkError: fewer than two complete cases, no variation at all, or a bad argument.
        """
        x = np.asarray(shapes, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != 3 or x.shape[1] == 0:
            raise LandmarkError(f"shapes must have shape (cases, landmarks, 3), got {x.shape}")
        if not 0.0 < variance_kept <= 1.0:
            raise LandmarkError(f"variance_kept must be in (0, 1], got {variance_kept}")
        complete = np.isfinite(x).all(axis=(1, 2))
        m = int(complete.sum())
        if m < 2:
            raise LandmarkError(f"a shape model needs at least 2 cases with every landmark annotated; got {m} "
                                f"of {x.shape[0]} cases complete")
        flat = x[complete].reshape(m, -1)
        mean = flat.mean(axis=0)
        # SVD of the centred data: eigenvectors of the covariance without forming it (3N may exceed M).
        _, sing, vt = np.linalg.svd(flat - mean, full_matrices=False)
        lam = sing**2 / (m - 1)
        total = float(lam.sum())
        if total <= 0.0:
            raise LandmarkError(f"the {m} complete training shapes are identical; PCA needs some variation")
        rank = int(np.count_nonzero(lam > total * 1e-12))
        cap = min(rank, m - 1, flat.shape[1], max_modes if max_modes is not None else flat.shape[1])
        cum = np.cumsum(lam) / total
        n_b = min(int(np.searchsorted(cum, variance_kept - 1e-12) + 1), cap)
        n_b = max(n_b, 1)
        return cls(mean.reshape(-1, 3), vt[:n_b].T, lam[:n_b], float(cum[n_b - 1]), m)

    @classmethod
    def coordinates(cls, shapes: np.ndarray) -> ShapeModel:
        """The unrotated model: ``W = I``, one mode per coordinate (PIN's single-landmark variant).

        Args:
            shapes: ``(M, N, 3)``; mean and variance of each coordinate use the cases that have it.
        """
        x = np.asarray(shapes, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != 3:
            raise LandmarkError(f"shapes must have shape (cases, landmarks, 3), got {x.shape}")
        flat = x.reshape(x.shape[0], -1)
        counts = np.isfinite(flat).sum(axis=0)
        if counts.size == 0 or counts.min() < 2:
            raise LandmarkError("a coordinate shape model needs every landmark annotated in at least 2 cases")
        mean = np.nanmean(flat, axis=0)
        var = np.nanvar(flat, axis=0, ddof=1)
        if np.any(var <= 0.0):
            raise LandmarkError("a coordinate shape model needs some variation in every coordinate")
        return cls(mean.reshape(-1, 3), np.eye(flat.shape[1]), var, 1.0, int(counts.min()))

    # --- mapping ------------------------------------------------------------------------------------
    @property
    def n_modes(self) -> int:
        return int(self.variances.size)

    @property
    def n_landmarks(self) -> int:
        return int(self.mean.shape[0])

    @property
    def std(self) -> np.ndarray:
        """``sqrt(lambda)``, ``(n_b,)``."""
        return np.sqrt(self.variances)

    def from_params(self, b: np.ndarray) -> np.ndarray:
        """``b`` ``(..., n_b)`` -> configurations ``(..., N, 3)``."""
        b = np.asarray(b, dtype=np.float64)
        self._check_params(b)
        x = self.mean.reshape(-1) + b @ self.components.T
        return x.reshape(*b.shape[:-1], self.n_landmarks, 3)

    def to_params(self, shapes: np.ndarray) -> np.ndarray:
        """Complete configurations ``(..., N, 3)`` -> ``b = W^T (X - mean)``, ``(..., n_b)``."""
        x = self._check_shapes(shapes)
        if not np.isfinite(x).all():
            raise LandmarkError("to_params needs complete configurations; use project() when landmarks are missing")
        return (x.reshape(*x.shape[:-2], -1) - self.mean.reshape(-1)) @ self.components

    def project(self, shapes: np.ndarray, observed: np.ndarray | None = None) -> np.ndarray:
        """``b`` that best fits the observed landmarks of possibly partial configurations.

        Solves ``min_b sum_observed (mean + W b - X)^2 + PRIOR_WEIGHT * sum_i b_i^2 / lambda_i``
        per configuration: for a complete configuration this is ``W^T (X - mean)``; with missing
        landmarks only the observed coordinates count (never a zero-filled guess).

        Args:
            shapes: ``(..., N, 3)``; missing landmarks may hold NaN.
            observed: ``(..., N)`` bool; default: the landmarks with finite coordinates.

        Returns:
            ``(..., n_b)``; a configuration with nothing observed gets ``b = 0`` (the mean).
        """
        x = self._check_shapes(shapes)
        lead = x.shape[:-2]
        obs = np.isfinite(x).all(axis=-1) if observed is None else np.asarray(observed, dtype=bool)
        if obs.shape != x.shape[:-1]:
            raise LandmarkError(f"observed must have shape {x.shape[:-1]}, got {obs.shape}")
        obs = obs & np.isfinite(x).all(axis=-1)
        flat = x.reshape(-1, self.n_landmarks * 3)
        mask = np.repeat(obs.reshape(-1, self.n_landmarks), 3, axis=1)
        resid = np.where(mask, flat - self.mean.reshape(-1), 0.0)
        w = self.components
        prior = np.diag(PRIOR_WEIGHT / self.variances * float(np.mean(self.variances)))
        out = np.empty((flat.shape[0], self.n_modes))
        for r in range(flat.shape[0]):
            if mask[r].all():
                out[r] = resid[r] @ w
                continue
            wm = w[mask[r]]
            out[r] = np.linalg.solve(wm.T @ wm + prior, wm.T @ resid[r][mask[r]])
        return out.reshape(*lead, self.n_modes)

    # --- storage ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON-able) for a checkpoint."""
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "variances": self.variances.tolist(), "explained": self.explained, "n_cases": self.n_cases}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ShapeModel:
        return cls(np.asarray(state["mean"]), np.asarray(state["components"]), np.asarray(state["variances"]),
                   float(state["explained"]), int(state["n_cases"]))

    # --- checks -------------------------------------------------------------------------------------
    def _check_params(self, b: np.ndarray) -> None:
        if b.shape[-1:] != (self.n_modes,):
            raise LandmarkError(f"shape parameters must end in ({self.n_modes},), got {b.shape}")

    def _check_shapes(self, shapes: np.ndarray) -> np.ndarray:
        x = np.asarray(shapes, dtype=np.float64)
        if x.shape[-2:] != (self.n_landmarks, 3):
            raise LandmarkError(f"configurations must end in ({self.n_landmarks}, 3), got {x.shape}")
        return x
