"""The pairwise offset prior that lets stage-1 decoders choose among candidate peaks."""

from __future__ import annotations

import numpy as np
import pytest

from lmk3d.errors import LandmarkError
from lmk3d.shape.pairwise import PairwisePrior

# A chin in the middle, two mirror-image twins 45 mm to either side, one landmark 60 mm below.
TEMPLATE = np.array([[0.0, 60.0, 0.0], [45.0, 0.0, 0.0], [-45.0, 0.0, 0.0], [0.0, 0.0, -60.0]])


def _training(rng: np.random.Generator, m: int = 40) -> np.ndarray:
    """Configurations moved anywhere in the field of view (+-40 mm) with 2 mm of shape noise."""
    return TEMPLATE[None] + rng.uniform(-40, 40, size=(m, 1, 3)) + rng.normal(0, 2.0, size=(m, 4, 3))


def _candidates(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landmark 1's channel is brighter on its twin (landmark 2's place) than on itself."""
    cand = np.full((4, 3, 3), np.nan)
    val = np.full((4, 3), -np.inf)
    for i in range(4):
        cand[i, 0], val[i, 0] = truth[i], 0.8
    cand[1, 0], val[1, 0] = truth[2] + 1.0, 0.7  # the twin's peak, brightest
    cand[1, 1], val[1, 1] = truth[1] - 1.0, 0.6  # the right one, second
    cand[3, 1], val[3, 1] = truth[3] + [0.0, 0.0, 25.0], 0.5  # a weaker neighbour-vertebra peak
    return cand, val


def test_fit_means_and_precision_by_hand() -> None:
    shapes = np.array([[[0.0, 0, 0], [1.0, 0, 0]], [[0.0, 0, 0], [3.0, 0, 0]], [[1.0, 1, 1], [3.0, 1, 1]]])
    prior = PairwisePrior.fit(shapes, noise_mm=1.0, min_cases=3)
    # offsets x1 - x0: (1, 0, 0), (3, 0, 0), (2, 0, 0): mean (2, 0, 0), x variance 1 (+1 noise)
    np.testing.assert_allclose(prior.mean[0, 1], [2.0, 0.0, 0.0])
    np.testing.assert_allclose(prior.mean[1, 0], [-2.0, 0.0, 0.0])
    np.testing.assert_allclose(prior.precision[0, 1], np.diag([0.5, 1.0, 1.0]))
    assert np.isnan(prior.mean[0, 0]).all()
    # a half squared Mahalanobis distance: offset (4, 0, 0) is 2 from the mean, 0.5 * 2^2 * 0.5 = 1
    cand = np.array([[[0.0, 0, 0]], [[4.0, 0, 0]]])
    assert prior.pair_costs(cand)[0, 1, 0, 0] == pytest.approx(1.0)
    with pytest.raises(LandmarkError, match="noise_mm"):
        PairwisePrior.fit(shapes, noise_mm=0.0)


@pytest.mark.parametrize("max_combinations", [20000, 1])  # exhaustive, then iterated conditional modes
def test_select_resolves_a_twin_and_keeps_consistent_peaks(max_combinations: int) -> None:
    rng = np.random.default_rng(0)
    fitted = PairwisePrior.fit(_training(rng), noise_mm=4.0)
    prior = PairwisePrior(fitted.mean, fitted.precision, max_combinations)
    truth = TEMPLATE + [7.0, -12.0, 20.0]  # an unseen position of the whole configuration
    cand, val = _candidates(truth)
    choice = prior.select(cand, val)
    assert choice.tolist() == [0, 1, 0, 0]  # the twin's brighter peak is refused, the rest kept
    # Where the brightest candidates already form a plausible configuration, nothing changes.
    cand[1, 0], cand[1, 1] = truth[1] - 1.0, truth[2] + 1.0
    assert prior.select(cand, val).tolist() == [0, 0, 0, 0]


def test_inactive_landmarks_keep_their_peak_and_do_not_pull() -> None:
    rng = np.random.default_rng(1)
    prior = PairwisePrior.fit(_training(rng), noise_mm=4.0)
    truth = TEMPLATE.copy()
    cand, val = _candidates(truth)
    # Landmark 3's brightest peak is nonsense, but it is not taking part: it keeps candidate 0 and the
    # others are chosen as if it were absent.
    cand[3, 0] = truth[3] + 200.0
    assert prior.select(cand, val, active=np.array([True, True, True, False])).tolist() == [0, 1, 0, 0]
    # Fewer than two landmarks taking part: every landmark keeps its brightest peak.
    assert prior.select(cand, val, active=np.array([False, True, False, False])).tolist() == [0, 0, 0, 0]
    with pytest.raises(LandmarkError, match="4 landmarks"):
        prior.select(cand[:3], val[:3])


def test_state_round_trip() -> None:
    prior = PairwisePrior.fit(_training(np.random.default_rng(2)), noise_mm=3.0)
    again = PairwisePrior.from_state(prior.state())
    np.testing.assert_array_equal(again.mean, prior.mean)
    np.testing.assert_array_equal(again.precision, prior.precision)
