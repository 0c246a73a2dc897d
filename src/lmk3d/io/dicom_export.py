"""A volume as a DICOM image series, and the voxel grid a DICOM viewer stacks a series on.

The MONAI Label app shows the images of a local studies folder in OHIF, which reads DICOM only
(DICOMweb). :func:`series_from_volume` turns a :class:`~lmk3d.io.image.Volume` (as
:func:`lmk3d.io.read_image` reads it: the image the detectors see) into one single-frame instance per
slice ``k``:

- frame ``k`` holds the voxels ``array[:, :, k]`` with rows = ``j`` and columns = ``i``;
- ``ImagePositionPatient`` is the world position (LPS) of voxel ``(0, 0, k)``; ``ImageOrientationPatient``
  the directions of ``i`` (along a row) and ``j`` (down a column); ``PixelSpacing`` ``[spacing j,
  spacing i]``; ``SliceThickness`` and ``SpacingBetweenSlices`` the spacing of ``k``;
- voxel values are stored as 16-bit integers with ``RescaleSlope`` / ``RescaleIntercept``: an integer
  image that fits int16 or uint16 is stored exactly (slope 1, intercept 0); any other image is
  quantised to 65536 levels over its range (for display only; the detectors read the original file).

So reading the series back (SimpleITK, GDCM, :func:`lmk3d.io.read_image`) gives the same ijk -> world
mapping up to the ``k`` order, which readers choose themselves: they stack slices by position along the
slice normal ``row x column``, lowest first (GDCM's sorter, and Cornerstone's, which OHIF uses). When the
volume's ``k`` runs against that normal (a left-handed voxel grid, ``det(affine) < 0``) the viewer's
slice 0 is the volume's last. :func:`viewer_grid` gives the grid a viewer puts the series on, so a label
map meant for the viewer's own voxel array (OHIF copies a result label map into its volume voxel by
voxel, without reading the file's geometry) can be drawn on that grid.

A series needs orthogonal axes: a volume whose ``i`` and ``j`` directions are not perpendicular, or
whose ``k`` direction is not along their normal (a sheared affine), has no DICOM image plane
description and is refused.

Example::

    volume = read_image("case.nii.gz")
    series = series_from_volume(volume, SeriesIds.derive("case", "size-mtime"))
    write_series("out_dir", series)           # one .dcm per slice, each written atomically
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmk3d import geometry
from lmk3d.errors import GeometryError
from lmk3d.io.atomic import atomic_write_bytes
from lmk3d.io.image import Volume

__all__ = ["CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "ORTHOGONAL_TOL", "DicomSeries", "SeriesIds",
           "series_from_volume", "uid_from", "viewer_grid", "write_series"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: Largest cosine between two voxel axes (or sine between ``k`` and the slice normal) still called orthogonal.
ORTHOGONAL_TOL = 1e-4
#: A volume whose lowest value is at or below this looks like CT in Hounsfield units (air is -1000).
CT_LOWEST_HU = -500.0
_LEVELS = 65535


#: Namespace of the name-based UUIDs behind :func:`uid_from`.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://lmk3d/dicom-export")


def uid_from(*parts: str) -> str:
    """A DICOM UID (``2.25.<int>``) derived from ``parts``: the same parts always give the same UID.

    The integer is a name-based (version 5) UUID of the parts, as ``2.25`` UIDs are UUIDs (PS3.5 B.2).
    pydicom's ``generate_uid(prefix=None, ...)`` would be random whatever its entropy sources.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(parts)).int}"


@dataclass(frozen=True)
class SeriesIds:
    """Who the series belongs to: UIDs and the names a viewer lists it by."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    study_description: str = ""
    series_description: str = ""
    series_number: int = 1

    @classmethod
    def derive(cls, name: str, version: str = "") -> SeriesIds:
        """Stable ids for the image ``name``: the UIDs change only with ``name`` or ``version``.

        Args:
            name: the image's id; the patient id and the descriptions.
            version: what changes when the image's content does (e.g. its file's size and mtime).
        """
        return cls(study_uid=uid_from("study", name, version), series_uid=uid_from("series", name, version),
                   frame_of_reference_uid=uid_from("frame", name, version), patient_id=name,
                   study_description=name, series_description=name)

    def sop_uid(self, k: int) -> str:
        """The SOP Instance UID of slice ``k``."""
        return uid_from("instance", self.series_uid, str(k))


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """A volume as DICOM: one header per slice and the stored pixel values.

    Attributes:
        headers: slice ``k``'s data set, every attribute but the pixel data (pydicom ``Dataset``s).
        frames: ``(K, J, I)`` stored values (``uint16`` or ``int16``); frame ``k`` is ``frames[k]``.
        affine: the volume's ijk -> RAS affine the series was made from.
    """

    headers: tuple[object, ...]
    frames: np.ndarray
    affine: np.ndarray

    @property
    def sop_uids(self) -> tuple[str, ...]:
        return tuple(str(h.SOPInstanceUID) for h in self.headers)  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes)

    def frame_bytes(self, k: int) -> bytes:
        """Slice ``k``'s pixel data as stored (little endian, rows then columns)."""
        return np.ascontiguousarray(self.frames[k]).astype(self.frames.dtype.newbyteorder("<"), copy=False).tobytes()

    def dataset(self, k: int) -> object:
        """Slice ``k`` as a complete DICOM file data set (preamble, file meta, pixel data), ready to write.

        With its preamble, writers that keep a data set "as it was" (pydicom's default, which
        dicomweb-client's STOW-RS uses) still write a Part 10 file that readers accept.
        """
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import UID

        header = self.headers[k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = header.SOPClassUID  # type: ignore[attr-defined]
        meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID  # type: ignore[attr-defined]
        meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(header)  # type: ignore[arg-type]
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.PixelData = self.frame_bytes(k)
        return ds


def _unit_axes(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit directions of ``i``, ``j``, ``k`` in LPS and the spacings; GeometryError if not orthogonal."""
    lps = geometry.RAS_TO_LPS[:3, :3] @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    d_i, d_j, d_k = (lps[:, a] / spacing[a] for a in range(3))
    normal = np.cross(d_i, d_j)
    if abs(float(d_i @ d_j)) > ORTHOGONAL_TOL or np.linalg.norm(np.cross(d_k, normal)) > ORTHOGONAL_TOL:
        raise GeometryError("the image's voxel axes are not orthogonal (a sheared affine): a DICOM series cannot "
                            "describe it; resample it to an orthogonal grid first")
    return d_i, d_j, d_k, spacing


def viewer_grid(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The ijk -> RAS affine of the grid a DICOM viewer stacks a series of this volume on.

    Viewers put the frames of a series in order of position along the slice normal ``row x column``
    (see the module docstring); for a series written by :func:`series_from_volume`, or read by
    :func:`lmk3d.io.read_image` from DICOM, rows and columns are ``j`` and ``i``. When ``k`` runs against
    that normal (``det(affine) < 0``) the viewer's slice ``k'`` is the volume's ``K - 1 - k'``.

    Args:
        affine: ``(4, 4)`` ijk -> RAS of the volume.
        shape: its ``(I, J, K)``.

    Returns:
        ``(4, 4)`` ijk -> RAS of the viewer's grid (same shape); ``affine`` itself when no flip is needed.
    """
    affine = geometry.check_affine(affine)
    if np.linalg.det(affine[:3, :3]) > 0:
        return affine
    flip = np.eye(4)
    flip[2, 2] = -1.0
    flip[2, 3] = float(shape[2]) - 1.0
    return affine @ flip


def _ds(value: float) -> str:
    """``value`` as a DICOM decimal string (at most 16 characters)."""
    from pydicom.valuerep import format_number_as_ds

    return str(format_number_as_ds(float(value)))


def _stored_values(array: np.ndarray) -> tuple[np.ndarray, str, str]:
    """``(stored (I, J, K) int16/uint16, slope DS, intercept DS)`` with ``value ~ stored * slope + intercept``."""
    lo, hi = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        if lo >= -32768 and hi <= 32767:
            return array.astype(np.int16), "1", "0"
        if lo >= 0 and hi <= 65535:
            return array.astype(np.uint16), "1", "0"
    intercept = _ds(lo)
    slope = _ds((hi - lo) / _LEVELS) if hi > lo else "1"
    # Quantise with the values as written, so stored * slope + intercept is what a reader computes.
    stored = np.rint((array.astype(np.float64) - float(intercept)) / float(slope))
    return np.clip(stored, 0, _LEVELS).astype(np.uint16), slope, intercept


def series_from_volume(volume: Volume, ids: SeriesIds, modality: str | None = None) -> DicomSeries:
    """``volume`` as a DICOM image series (see the module docstring for the layout).

    Args:
        volume: the image, as :func:`lmk3d.io.read_image` reads it.
        ids: its UIDs and names.
        modality: ``"CT"`` or ``"MR"`` (None: CT when the lowest value is at or below
            :data:`CT_LOWEST_HU`, as Hounsfield units are, else MR).

    Raises:
        GeometryError: the volume's axes are not orthogonal.
        ValueError: a modality other than CT or MR.
    """
    from pydicom.dataset import Dataset
    from pydicom.valuerep import PersonName

    affine = geometry.check_affine(volume.affine)
    d_i, d_j, _, spacing = _unit_axes(affine)
    array = np.asarray(volume.array)
    if modality is None:
        modality = "CT" if float(array.min()) <= CT_LOWEST_HU else "MR"
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality {modality!r}: choose CT or MR")
    stored, slope, intercept = _stored_values(array)
    frames = np.ascontiguousarray(stored.transpose(2, 1, 0))  # (K, J, I): frame k, row j, column i
    values = stored.astype(np.float64) * float(slope) + float(intercept)
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    center, width = (p_lo + p_hi) / 2.0, max(p_hi - p_lo, 1e-3)
    n_i, n_j, n_k = volume.shape
    iop = [_ds(v) for v in (*d_i, *d_j)]
    signed = 1 if frames.dtype == np.int16 else 0
    headers = []
    for k in range(n_k):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        ds.SOPInstanceUID = ids.sop_uid(k)
        ds.StudyInstanceUID = ids.study_uid
        ds.SeriesInstanceUID = ids.series_uid
        ds.FrameOfReferenceUID = ids.frame_of_reference_uid
        ds.Modality = modality
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.Manufacturer = "lmk3d"
        ds.PatientName = PersonName(ids.patient_id)
        ds.PatientID = ids.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = ids.study_description
        ds.SeriesDescription = ids.series_description
        ds.SeriesNumber = ids.series_number
        ds.InstanceNumber = k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in geometry.ijk_to_lps(np.array([0.0, 0.0, k]), affine)]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.SliceThickness = _ds(spacing[2])
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_j
        ds.Columns = n_i
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = signed
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        headers.append(ds)
    return DicomSeries(tuple(headers), frames, affine)


def write_series(folder: str | os.PathLike[str], series: DicomSeries) -> list[Path]:
    """Write each slice of ``series`` as ``<folder>/<k+1:04d>.dcm`` (each file atomically).

    Returns:
        The files, in slice order.
    """
    import io

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(len(series.headers)):
        buffer = io.BytesIO()
        series.dataset(k).save_as(buffer, write_like_original=False)  # type: ignore[attr-defined]
        paths.append(atomic_write_bytes(out / f"{k + 1:04d}.dcm", buffer.getvalue()))
    return paths
