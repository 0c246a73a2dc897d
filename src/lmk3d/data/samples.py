"""``Sample``: one case of a dataset (an image and, when labelled, its true landmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmk3d.io.image import Volume, read_image
from lmk3d.landmarks import LandmarkSet


@dataclass(frozen=True)
class Sample:
    """One case.

    Attributes:
        case: case identifier (the image file name without its suffix).
        image_path: the image file (or DICOM folder).
        landmarks: true landmarks in world RAS mm (partial annotation allowed), or None if unlabelled.
    """

    case: str
    image_path: Path
    landmarks: LandmarkSet | None = None

    def load_image(self, dtype: type | np.dtype | None = np.float32) -> Volume:
        return read_image(self.image_path, dtype=dtype)
