"""Seeded, case-level train/validation/test splits, written as ``split.json`` next to every trained model.

The split is made over the sorted case ids, so it depends only on the set of cases, the fractions and
the seed (not on file order or on the machine). Cases are whole units: every sample of a case lands in
one subset, and the three subsets are disjoint.

Example:
    >>> s = make_split([f"c{i:02d}" for i in range(10)], seed=0)
    >>> len(s.train), len(s.val), len(s.test)
    (7, 1, 2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkFormatError
from lmk3d.io.atomic import atomic_write_text

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)
DEFAULT_SEED = 0
SPLIT_FILE = "split.json"
SUBSETS = ("train", "val", "test")

T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """Case ids per subset, with how they were drawn.

    Attributes:
        train, val, test: case ids (each sorted).
        seed: the permutation seed.
        fractions: requested ``(train, val, test)`` fractions.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int = DEFAULT_SEED
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def subset(self, name: str) -> tuple[str, ...]:
        """Case ids of ``train``, ``val``, ``test`` or ``all``."""
        if name == "all":
            return tuple(sorted(self.train + self.val + self.test))
        if name not in SUBSETS:
            raise LandmarkFormatError(f"unknown subset {name!r}; choose one of {', '.join(SUBSETS)}, all")
        return tuple(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "sorted case ids, permuted with numpy.random.default_rng(seed); "
                      "n_test = round(f_test * n), n_val = round(f_val * n), train = the rest",
            "seed": self.seed,
            "fractions": list(self.fractions),
            "counts": {k: len(getattr(self, k)) for k in SUBSETS},
            **{k: list(getattr(self, k)) for k in SUBSETS},
        }


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))  # half up, not Python's banker's rounding


def make_split(cases: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
               seed: int = DEFAULT_SEED) -> Split:
    """Split case ids into train/val/test.

    With at least three cases, every subset whose fraction is above zero gets at least one case.

    Raises:
        LandmarkFormatError: duplicate case ids, fractions that are negative or do not sum to 1, or too
            few cases to leave one for training.
    """
    ids = sorted(str(c) for c in cases)
    if len(set(ids)) != len(ids):
        dups = sorted({c for c in ids if ids.count(c) > 1})
        raise LandmarkFormatError(f"duplicate case ids in the split: {', '.join(dups[:5])}")
    f = tuple(float(v) for v in fractions)
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
        raise LandmarkFormatError(f"split fractions {list(fractions)} must be three non-negative numbers "
                                  "(train, val, test) summing to 1")
    n = len(ids)
    n_val, n_test = _round(f[1] * n), _round(f[2] * n)
    if n >= 3:
        n_val = max(n_val, 1 if f[1] > 0 else 0)
        n_test = max(n_test, 1 if f[2] > 0 else 0)
    if n - n_val - n_test < 1:
        raise LandmarkFormatError(f"{n} labelled case(s) cannot be split {list(f)} and leave one for training")
    order = np.random.default_rng(int(seed)).permutation(n)
    perm = [ids[i] for i in order]
    test = tuple(sorted(perm[:n_test]))
    val = tuple(sorted(perm[n_test:n_test + n_val]))
    train = tuple(sorted(perm[n_test + n_val:]))
    return Split(train, val, test, int(seed), (f[0], f[1], f[2]))


def apply_split(samples: Sequence[Sample], split: Split) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """``(train, val, test)`` samples, each in split order.

    Raises:
        LandmarkFormatError: a case of the split is not among the samples.
    """
    by_case = {s.case: s for s in samples}
    out = []
    for name in SUBSETS:
        ids = split.subset(name)
        missing = [c for c in ids if c not in by_case]
        if missing:
            raise LandmarkFormatError(f"the split's {name} cases {', '.join(missing[:5])} are not in the data")
        out.append([by_case[c] for c in ids])
    return out[0], out[1], out[2]


def write_split(path: str | os.PathLike[str], split: Split, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``split.json`` (``extra``: more keys, e.g. the dataset it was drawn from)."""
    doc = {**dict(extra or {}), **split.to_dict()}
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_split(path: str | os.PathLike[str]) -> Split:
    """Read ``split.json`` (a model folder is accepted too).

    Raises:
        LandmarkFormatError: missing file, not JSON, a subset list missing, or a case in two subsets.
    """
    p = Path(path)
    if p.is_dir():
        p = p / SPLIT_FILE
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LandmarkFormatError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in SUBSETS):
        raise LandmarkFormatError(f"{p}: a split needs 'train', 'val' and 'test' lists of case ids")
    parts = {k: tuple(str(c) for c in doc[k]) for k in SUBSETS}
    seen: dict[str, str] = {}
    for k, ids in parts.items():
        for c in ids:
            if c in seen:
                raise LandmarkFormatError(f"{p}: case {c!r} is in both {seen[c]} and {k}")
            seen[c] = k
    fr = doc.get("fractions", DEFAULT_FRACTIONS)
    return Split(parts["train"], parts["val"], parts["test"], int(doc.get("seed", DEFAULT_SEED)),
                 (float(fr[0]), float(fr[1]), float(fr[2])))


FOLD_METHOD = ("the training cases' sorted ids permuted with numpy.random.default_rng([seed, n]); fold k (0-based) "
               "is every n-th of them from position k")


def parse_fold(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: fold ``k`` (0-based) of ``n``.

    Raises:
        LandmarkFormatError: not ``K/N`` with ``N >= 2`` and ``0 <= K < N``.
    """
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise LandmarkFormatError(f"fold {text!r}: give K/N, e.g. 0/4 (fold K, counted from 0, of N)") from None
    if n < 2 or not 0 <= k < n:
        raise LandmarkFormatError(f"fold {text!r}: need N >= 2 and 0 <= K < N")
    return k, n


def fold_out(split: Split, k: int, n: int) -> tuple[Split, tuple[str, ...]]:
    """``split`` with fold ``k`` of ``n`` of its training cases taken out, and those cases (sorted).

    The folds of one split are disjoint and together hold every training case; validation and test cases
    stay where they are, so a model trained on the rest is early-stopped on the same cases and can answer its
    left-out fold as cases it never saw (``lmk3d train --fold``, ``lmk3d calibrate --cross-fit-models``).

    Raises:
        LandmarkFormatError: a bad ``k``/``n``, or fewer training cases than folds.
    """
    if n < 2 or not 0 <= k < n:
        raise LandmarkFormatError(f"fold {k}/{n}: need n >= 2 and 0 <= k < n")
    ids = sorted(split.train)
    if len(ids) < n:
        raise LandmarkFormatError(f"{len(ids)} training case(s) cannot make {n} folds")
    order = np.random.default_rng([split.seed, n]).permutation(len(ids))
    held = {ids[i] for i in order[k::n]}
    keep = tuple(c for c in ids if c not in held)
    return Split(keep, split.val, split.test, split.seed, split.fractions), tuple(sorted(held))


def holdout_split(items: Sequence[T], val_fraction: float, seed: int = DEFAULT_SEED) -> tuple[list[T], list[T]]:
    """A seeded train / held-out split of a few labelled items (e.g. the images an annotator corrected).

    Unlike :func:`make_split` it keeps the items' order-dependent permutation (the MONAI Label app's
    train task has always split this way): ``numpy.random.default_rng(seed).permutation(len(items))``,
    the first ``round(len(items) * val_fraction)`` held out. At least one item is always kept for
    training, at least one is held out when ``val_fraction > 0`` and there are two or more, and none
    with fewer than two.

    Args:
        items: the items to split (samples, case ids...), in a stable order.
        val_fraction: the share to hold out, in ``[0, 1)``.
        seed: the permutation seed.

    Returns:
        ``(train, val)``, each in permutation order.

    Raises:
        LandmarkFormatError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LandmarkFormatError(f"val_fraction {val_fraction!r} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = 0
    if len(items) >= 2 and val_fraction > 0:
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
