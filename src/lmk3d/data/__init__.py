"""Datasets: samples, dataset readers, splits, and the synthetic phantom generator.

The phantom generator (:mod:`lmk3d.data.phantoms`) is not imported here; import it where needed.
"""

from __future__ import annotations

from lmk3d.data.datasets import Dataset, LandmarkGroup, image_geometry, load_dataset, read_groups, write_groups
from lmk3d.data.samples import Sample
from lmk3d.data.split import Split, apply_split, make_split, read_split, write_split

__all__ = ["Dataset", "LandmarkGroup", "Sample", "Split", "apply_split", "image_geometry", "load_dataset",
           "make_split", "read_groups", "read_split", "write_groups", "write_split"]
