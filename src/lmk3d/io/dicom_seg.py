"""Landmarks from a DICOM Segmentation (SEG) of sphere markers: how a correction made in OHIF comes back.

OHIF shows each landmark as a segment (a sphere named after the landmark) and exports the
segmentation as a DICOM SEG ("Export DICOM SEG": a STOW-RS upload). :func:`landmarks_from_seg` puts the
SEG's frames back on the voxel grid of the image they segment, then decodes each segment named after a
landmark with :func:`lmk3d.io.label_map.landmarks_from_label_map` (the sphere label map reader: the
centre of each sphere, a clipped one fitted), so a sphere the user moved moves its landmark.

Geometry comes from the SEG itself: each frame's ``ImagePositionPatient`` (per-frame Plane Position),
the shared or per-frame ``ImageOrientationPatient`` and ``PixelSpacing``; a frame pixel ``(r, c)`` lies
at ``IPP + c * spacing_c * row_direction + r * spacing_r * column_direction`` (LPS mm), which must fall
on a voxel centre of the reference grid (within :data:`GRID_TOLERANCE_VOXELS`) inside the image.
Binary and fractional SEGs are read (a fractional pixel counts when it is at least half the maximum).

Example::

    seg = pydicom.dcmread("correction_seg.dcm")
    image = read_image("series_folder")
    landmarks = landmarks_from_seg(seg, image.shape, image.affine)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmk3d import geometry
from lmk3d.errors import LandmarkFormatError
from lmk3d.io.label_map import landmarks_from_label_map
from lmk3d.landmarks import LandmarkSet

__all__ = ["GRID_TOLERANCE_VOXELS", "SEGMENTATION_STORAGE", "is_segmentation", "landmarks_from_seg",
           "referenced_series_uids", "segment_labels"]

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: How far (voxels) a SEG pixel may be from a voxel centre of the image: rounding in the SEG's decimal
#: strings, not another grid.
GRID_TOLERANCE_VOXELS = 0.05


def is_segmentation(ds: Any) -> bool:
    """Whether the pydicom data set ``ds`` is a DICOM Segmentation."""
    return str(getattr(ds, "SOPClassUID", "")) == SEGMENTATION_STORAGE or str(getattr(ds, "Modality", "")) == "SEG"


def segment_labels(seg: Any) -> dict[int, str]:
    """``{SegmentNumber: SegmentLabel}`` of a SEG."""
    return {int(item.SegmentNumber): str(getattr(item, "SegmentLabel", "") or f"Segment {item.SegmentNumber}")
            for item in getattr(seg, "SegmentSequence", [])}


def referenced_series_uids(seg: Any) -> list[str]:
    """The SeriesInstanceUIDs of the images a SEG segments (Referenced Series Sequence)."""
    return [str(item.SeriesInstanceUID) for item in getattr(seg, "ReferencedSeriesSequence", [])
            if "SeriesInstanceUID" in item]


def _item(seg: Any, frame: int, name: str) -> Any:
    """Functional group ``name`` of ``frame``: per-frame first, then shared; None when absent."""
    per_frame = getattr(seg, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is not None and frame < len(per_frame) and name in per_frame[frame]:
        return per_frame[frame][name][0]
    shared = getattr(seg, "SharedFunctionalGroupsSequence", None)
    if shared and name in shared[0]:
        return shared[0][name][0]
    return None


def _frames(seg: Any, n_frames: int) -> np.ndarray:
    """``(F, R, C)`` booleans: the SEG's frames."""
    try:
        pixels = np.asarray(seg.pixel_array)
    except Exception as e:  # pydicom raises many types for bad or unsupported pixel data
        raise LandmarkFormatError(f"cannot decode the SEG's pixel data ({type(e).__name__}: {e})") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != n_frames:
        raise LandmarkFormatError(f"the SEG has {n_frames} frames but its pixel data holds {pixels.shape[0]}")
    if str(getattr(seg, "SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        top = float(getattr(seg, "MaximumFractionalValue", 0) or pixels.max() or 1)
        return pixels >= 0.5 * top
    return pixels > 0


def landmarks_from_seg(seg: Any, shape: Sequence[int], affine: np.ndarray) -> LandmarkSet:
    """Decode the sphere markers of a SEG, named by their segment labels, on the image grid ``shape``/``affine``.

    Args:
        seg: a pydicom data set of a DICOM Segmentation (pixel data included).
        shape: the segmented image's ``(I, J, K)``.
        affine: its ijk -> RAS affine.

    Returns:
        One landmark per segment (named by ``SegmentLabel``, in segment number order), found where its
        segment has pixels.

    Raises:
        LandmarkFormatError: not a SEG, no segments, more pixels than the segments can cover on the
            image, missing geometry, pixels off the image's grid or outside it, or two segments with the
            same label.
    """
    if not is_segmentation(seg):
        raise LandmarkFormatError(f"not a DICOM Segmentation (SOP class {getattr(seg, 'SOPClassUID', '?')})")
    labels = segment_labels(seg)
    if not labels:
        raise LandmarkFormatError("the SEG has no segments (empty Segment Sequence)")
    repeated = sorted({n for n in labels.values() if list(labels.values()).count(n) > 1})
    if repeated:
        raise LandmarkFormatError(f"the SEG has several segments named {', '.join(repeated)}; each landmark needs one")
    shape3 = tuple(int(s) for s in shape[:3])
    affine = geometry.check_affine(affine)
    n_frames = int(getattr(seg, "NumberOfFrames", 1) or 1)
    n_pixels = n_frames * int(getattr(seg, "Rows", 0) or 0) * int(getattr(seg, "Columns", 0) or 0)
    if n_pixels > len(labels) * int(np.prod(shape3)):  # checked before decoding: a bound on memory
        raise LandmarkFormatError(f"the SEG holds {n_pixels} pixels, more than its {len(labels)} segments can cover "
                                  f"on the image ({'x'.join(map(str, shape3))} voxels each)")
    frames = _frames(seg, n_frames)
    inv = np.linalg.inv(affine)
    out = np.zeros(shape3, dtype=np.uint16)
    for f in range(n_frames):
        mask = frames[f]
        if not mask.any():
            continue
        ident, position = _item(seg, f, "SegmentIdentificationSequence"), _item(seg, f, "PlanePositionSequence")
        orientation, measures = _item(seg, f, "PlaneOrientationSequence"), _item(seg, f, "PixelMeasuresSequence")
        if ident is None or position is None or orientation is None or measures is None:
            raise LandmarkFormatError(f"SEG frame {f + 1} lacks its segment number, position, orientation or pixel "
                                      "spacing (functional groups)")
        segment = int(ident.ReferencedSegmentNumber)
        if segment not in labels:
            raise LandmarkFormatError(f"SEG frame {f + 1} refers to segment {segment}, which the SEG does not describe")
        ipp = np.array([float(v) for v in position.ImagePositionPatient])
        iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
        spacing_r, spacing_c = (float(v) for v in measures.PixelSpacing)
        rc = np.argwhere(mask)  # (n, 2) rows, columns
        lps = ipp + np.outer(rc[:, 1] * spacing_c, iop[:3]) + np.outer(rc[:, 0] * spacing_r, iop[3:])
        ijk = geometry.apply_affine(inv, geometry.lps_to_ras(lps))
        nearest = np.rint(ijk)
        off = float(np.abs(ijk - nearest).max())
        if off > GRID_TOLERANCE_VOXELS:
            raise LandmarkFormatError(f"SEG frame {f + 1} is not on the image's voxel grid (pixels {off:.3f} voxel "
                                      "from the nearest voxel centre): it segments another image or a resampled one")
        idx = nearest.astype(int)
        if np.any(idx < 0) or np.any(idx >= np.array(shape3)):
            raise LandmarkFormatError(f"SEG frame {f + 1} has pixels outside the image (voxel grid {shape3})")
        out[idx[:, 0], idx[:, 1], idx[:, 2]] = segment
    values = {name: number for number, name in sorted(labels.items())}
    return landmarks_from_label_map(out, affine, values, source="the SEG")
