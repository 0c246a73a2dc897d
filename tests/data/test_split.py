"""lmk3d.data.split.holdout_split: the app train task's seeded train / held-out split."""

from __future__ import annotations

import pytest

from lmk3d.data.split import holdout_split
from lmk3d.errors import LandmarkFormatError


def test_seeded_disjoint_and_complete() -> None:
    items = [f"c{i}" for i in range(10)]
    train, val = holdout_split(items, 0.2, seed=3)
    assert (train, val) == holdout_split(items, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == items
    assert holdout_split(items, 0.2, seed=4) != (train, val)


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(1, 0.5, 0), (2, 0.01, 1), (2, 0.9, 1), (5, 0.0, 0),
                                                       (5, 0.5, 2)])
def test_small_sets_keep_one_for_training(n: int, fraction: float, n_val: int) -> None:
    train, val = holdout_split(list(range(n)), fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_bad_fractions_are_refused(fraction: float) -> None:
    with pytest.raises(LandmarkFormatError, match=r"\[0, 1\)"):
        holdout_split([1, 2, 3], fraction)
