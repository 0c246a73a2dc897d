"""Datasets: samples, dataset readers, splits, and the synthetic phantom generator.

The phantom generator (:mod:`lmk3d.data.phantoms`) is not imported here; import it where needed.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from lmk3d.data.datasets import Dataset, LandmarkGroup, image_geometry, load_dataset, read_groups, write_groups
from lmk3d.data.samples import Sample
from lmk3d.data.split import Split, apply_split, make_split, read_split, write_split

__all__ = ["Dataset", "LandmarkGroup", "ModelSplit", "Sample", "Split", "apply_split", "image_geometry",
           "load_dataset", "make_split", "model_split", "read_groups", "read_split", "write_groups", "write_split"]


class ModelSplit(NamedTuple):
    """A dataset cut by a model's ``split.json``: what benchmarks score a shipped model on."""

    dataset: Dataset
    split: Split
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def model_split(model_dir: str | os.PathLike[str], data: str | os.PathLike[str]) -> ModelSplit:
    """Load ``data`` and cut its labelled cases by the ``split.json`` in ``model_dir``."""
    ds = load_dataset(data)
    split = read_split(model_dir)
    train, val, test = apply_split(ds.labelled(), split)
    return ModelSplit(ds, split, list(train), list(val), list(test))
