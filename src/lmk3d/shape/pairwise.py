"""A pairwise Gaussian prior on landmark offsets, to choose among candidate peaks.

A heatmap network that sees mirror-symmetric anatomy (left and right mandible angles) or repeated
structures (neighbouring vertebrae) often lights a landmark's channel on its twin as well, and the
channel's global maximum may then sit on the wrong one. The right answer is usually among the top
few local maxima: this prior picks, among the candidates of all landmarks at once, the combination
that is both bright and laid out as in the training configurations.

Model: for each landmark pair ``(i, j)``, the offset ``x_j - x_i`` (world mm) is Gaussian with the mean
and covariance of the training cases that have both, plus ``noise_mm^2 I`` for the candidates' own
localisation error (about a heatmap voxel). A combination ``c`` (one candidate per landmark) scores

    sum_i log h_i(c_i)  -  1 / (2 (N' - 1)) * sum_{i<j} Mahalanobis^2(c_j - c_i; mu_ij, S_ij)

over the ``N'`` landmarks taking part (each landmark is in ``N' - 1`` pairs: the division keeps the
shape term the size of one landmark's own). The best combination is found exhaustively when there
are at most ``max_combinations`` of them, else by iterated conditional modes from the brightest
candidates (the paper's decode is that starting point).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkError


@dataclass(frozen=True)
class PairwisePrior:
    """Offset means ``(N, N, 3)`` and inverse covariances ``(N, N, 3, 3)``; NaN where a pair was never seen."""

    mean: np.ndarray
    precision: np.ndarray
    max_combinations: int = 20000

    @classmethod
    def fit(cls, shapes: np.ndarray, noise_mm: float, min_cases: int = 3) -> PairwisePrior:
        """Fit on training configurations.

        Args:
            shapes: ``(M, N, 3)`` world mm, NaN rows where a landmark is missing.
            noise_mm: standard deviation added to every offset axis (candidate localisation error), > 0.
            min_cases: a pair seen together in fewer cases gets no term.
        """
        x = np.asarray(shapes, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != 3:
            raise LandmarkError(f"pairwise prior: shapes must be (cases, landmarks, 3), got {x.shape}")
        if not noise_mm > 0:
            raise LandmarkError(f"pairwise prior: noise_mm must be positive, got {noise_mm}")
        n = x.shape[1]
        mean = np.full((n, n, 3), np.nan)
        precision = np.full((n, n, 3, 3), np.nan)
        ok = np.isfinite(x).all(axis=2)
        for i, j in itertools.permutations(range(n), 2):
            both = ok[:, i] & ok[:, j]
            if both.sum() < min_cases:
                continue
            d = x[both, j] - x[both, i]
            cov = np.cov(d, rowvar=False) + noise_mm**2 * np.eye(3)
            mean[i, j] = d.mean(axis=0)
            precision[i, j] = np.linalg.inv(cov)
        return cls(mean, precision)

    @property
    def n_landmarks(self) -> int:
        return int(self.mean.shape[0])

    def pair_costs(self, cand: np.ndarray) -> np.ndarray:
        """``(N, N, K, K)`` half squared Mahalanobis distances of candidate pairs (0 where no term)."""
        d = cand[None, :, None, :, :] - cand[:, None, :, None, :]  # (i, j, ki, kj, 3): x_j - x_i
        r = d - np.nan_to_num(self.mean)[:, :, None, None, :]
        cost = 0.5 * np.einsum("ijabx,ijxy,ijaby->ijab", r, np.nan_to_num(self.precision), r)
        known = np.isfinite(self.mean).all(axis=2)
        return np.where(known[:, :, None, None], np.nan_to_num(cost, nan=np.inf), 0.0)

    def select(self, cand: np.ndarray, values: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """The chosen candidate per landmark, ``(N,)`` indices into ``K``.

        Args:
            cand: ``(N, K, 3)`` candidate positions, world mm (NaN for padding).
            values: ``(N, K)`` heatmap values (``-inf`` for padding); column 0 the brightest.
            active: ``(N,)`` landmarks taking part (default all); the others keep candidate 0 and
                neither pull nor are pulled.
        """
        cand = np.asarray(cand, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        n, k = values.shape
        if cand.shape != (n, k, 3) or n != self.n_landmarks:
            raise LandmarkError(f"pairwise prior: {self.n_landmarks} landmarks, got candidates {cand.shape}, "
                                f"values {values.shape}")
        choice = np.zeros(n, dtype=np.int64)
        act = np.flatnonzero(np.ones(n, bool) if active is None else np.asarray(active, bool))
        if act.size < 2:
            return choice
        unary = np.log(np.clip(values[act], 1e-6, None))
        unary[~np.isfinite(values[act]) | ~np.isfinite(cand[act]).all(axis=2)] = -np.inf
        full = self.pair_costs(np.nan_to_num(cand))
        pair = (full + full.transpose(1, 0, 3, 2))[np.ix_(act, act)] / 2.0  # symmetric: both directions averaged
        pair = pair / (act.size - 1)
        if k ** act.size <= self.max_combinations:
            combos = np.array(list(itertools.product(range(k), repeat=act.size)))
            score = unary[np.arange(act.size), combos].sum(axis=1)
            for a, b in itertools.combinations(range(act.size), 2):
                score -= pair[a, b][combos[:, a], combos[:, b]]
            best = combos[int(np.argmax(score))]
        else:
            best = np.zeros(act.size, dtype=np.int64)
            for _ in range(20):
                before = best.copy()
                for a in range(act.size):
                    others = np.delete(np.arange(act.size), a)
                    s = unary[a] - sum(pair[a, b][:, best[b]] for b in others)
                    best[a] = int(np.argmax(s))
                if np.array_equal(best, before):
                    break
        choice[act] = best
        return choice

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist(),
                "max_combinations": self.max_combinations}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PairwisePrior:
        return cls(np.asarray(state["mean"], dtype=np.float64), np.asarray(state["precision"], dtype=np.float64),
                   int(state.get("max_combinations", 20000)))
