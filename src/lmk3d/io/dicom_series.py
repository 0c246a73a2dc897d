"""Geometry checks for DICOM image series: a volume must be a regular grid of slices.

A DICOM series is a stack of 2D slices, each with its own position (``ImagePositionPatient``) and
orientation (``ImageOrientationPatient``). Readers (SimpleITK/GDCM) put the slices on one grid with
one spacing and one orthogonal direction matrix, even when the slices are tilted (gantry tilt),
unevenly spaced (missing slices) or of different orientations; they only warn. Landmark positions
read on such a grid are wrong by up to several millimetres, so lmk3d refuses these series instead
of resampling them silently. :func:`lmk3d.io.read_image` (the CLI) and the MONAI Label app's DICOMweb
datastore (the server) apply the same :func:`check_series_geometry`, so both refuse the same series
with the same message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkError

#: Tolerances of the geometry check: positions written as DS text carry ~1e-4 mm of rounding.
SPACING_TOL_MM = 0.01
SPACING_TOL_REL = 1e-3
ORIENTATION_TOL = 1e-4

__all__ = ["ORIENTATION_TOL", "SPACING_TOL_MM", "SPACING_TOL_REL", "check_series_files", "check_series_geometry"]


def check_series_geometry(datasets: Sequence[Any]) -> None:
    """Refuse a series that is not a regular grid of parallel, evenly spaced, untilted slices.

    Args:
        datasets: the series' instances (pydicom ``Dataset``s, pixel data not needed), in any order.
            Instances without ``ImagePositionPatient`` and ``ImageOrientationPatient`` are ignored;
            with fewer than two slices left there is nothing to check (a multi-frame object: the
            reader decides).

    Raises:
        LandmarkError: slices of different orientations, two slices at one position, gantry tilt
            (consecutive positions not along the slice normal), or uneven spacing; the message gives
            the numbers and says what is accepted.
    """
    images = [d for d in datasets if "ImagePositionPatient" in d and "ImageOrientationPatient" in d]
    if len(images) < 2:
        return
    iops = np.array([[float(v) for v in d.ImageOrientationPatient] for d in images])  # (S, 6)
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise LandmarkError("its slices have different Image Orientation (Patient) values; a volume needs "
                            "parallel slices (split the series, or reconstruct it as one volume)")
    normal = np.cross(iops[0, :3], iops[0, 3:])  # (3,)
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in images])  # (S, 3)
    pos = pos[np.argsort(pos @ normal)]
    steps = np.diff(pos, axis=0)  # (S - 1, 3)
    along = steps @ normal  # (S - 1,)
    if along.min() <= SPACING_TOL_MM:
        raise LandmarkError(f"two of its slices lie at the same position (step {along.min():.4f} mm along the "
                            "slice normal); it may hold several volumes")
    across = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    if across.max() > SPACING_TOL_MM:
        angle = float(np.degrees(np.arctan2(across.max(), np.median(along))))
        raise LandmarkError(f"its slices are sheared (gantry tilt of about {angle:.2f} degrees: slice positions "
                            f"move {across.max():.3f} mm across the slice normal per slice); tilted series are "
                            "refused rather than read as an orthogonal grid; resample it to an untilted volume first")
    median = float(np.median(along))
    worst = float(np.abs(along - median).max())
    if worst > max(SPACING_TOL_MM, SPACING_TOL_REL * median):
        raise LandmarkError(f"its slices are not evenly spaced (spacing {along.min():.4f} to {along.max():.4f} mm "
                            f"along the slice normal, median {median:.4f} mm); uneven series are refused rather "
                            "than read with one spacing; resample it to even spacing first")


def check_series_files(files: Sequence[str | os.PathLike[str]]) -> None:
    """:func:`check_series_geometry` on DICOM files (headers only; pixel data is not read).

    Raises:
        LandmarkError: as :func:`check_series_geometry`, or a file pydicom cannot parse.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True,
                                           specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]))
        except (InvalidDicomError, OSError, ValueError) as e:
            raise LandmarkError(f"{os.path.basename(str(f))}: cannot read the DICOM header ({e})") from None
    check_series_geometry(headers)
