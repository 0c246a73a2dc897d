"""``Sample``: one case of a dataset (an image and, when labelled, its true landmarks)."""

from __future__ import annotations

from collections.abc import Callable
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


def readable(samples: list[Sample], warn: Callable[[str], None]) -> list[Sample]:
    """The samples whose image reads in full; each one that does not is left out with a warning.

    A truncated or corrupt file in a training set should cost that case, not the whole run. Reading
    every image once here is what the detectors' preparation does anyway.

    Args:
        samples: the cases to check.
        warn: called with one line per skipped case.
    """
    kept = []
    for s in samples:
        try:
            s.load_image()
        except Exception as e:  # any failure to decode is the file's: skip the case
            warn(f"skipped {s.case}: its image {s.image_path} cannot be read ({type(e).__name__}: {e})")
            continue
        kept.append(s)
    return kept
