"""lmk3d.data.split: the app train task's seeded train / held-out split, and folds of a split's training cases."""

from __future__ import annotations

import pytest

from lmk3d.data.split import fold_out, holdout_split, make_split, parse_fold
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


def test_folds_of_the_training_cases_are_disjoint_complete_and_seeded() -> None:
    split = make_split([f"c{i:03d}" for i in range(50)], seed=3)
    folds = [fold_out(split, k, 4) for k in range(4)]
    held = [set(h) for _, h in folds]
    assert len(split.train) == 35 and sorted(len(h) for h in held) == [8, 9, 9, 9]
    assert set().union(*held) == set(split.train) and sum(len(h) for h in held) == len(split.train)
    for (rest, h) in folds:
        assert rest.val == split.val and rest.test == split.test and rest.seed == split.seed
        assert set(rest.train) == set(split.train) - set(h) and not set(rest.train) & set(h)
    assert fold_out(split, 2, 4) == folds[2]  # the same fold every time
    other = make_split([f"c{i:03d}" for i in range(50)], seed=4)
    assert set(fold_out(other, 0, 4)[1]) != held[0]  # another split seed, other folds


@pytest.mark.parametrize("text", ["4/4", "-1/4", "0/1", "a/4", "1", "1/2/3"])
def test_bad_folds_are_refused(text: str) -> None:
    with pytest.raises(LandmarkFormatError, match="fold"):
        parse_fold(text)


def test_a_fold_needs_as_many_training_cases_as_folds() -> None:
    with pytest.raises(LandmarkFormatError, match="cannot make 5 folds"):
        fold_out(make_split(["a", "b", "c", "d", "e"], seed=0), 0, 5)
    assert parse_fold("3/5") == (3, 5)
