"""Landmark labels as an annotator sends them back: a point list, a sphere label map, or a DICOM SR.

One function, :func:`read_label`, decodes every accepted format, so whoever checks a label before
storing it (the MONAI Label app's datastores) and whoever reads the stored labels (its train task)
cannot disagree about what a label means:

- ``.mrk.json`` (a Slicer point list), ``.fcsv`` (Slicer fiducials) or ``.json`` (a markups document
  or lmk3d landmark JSON): landmark names are the control point labels;
- a sphere label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``...), what stock Slicer's "Submit
  Label" sends: value ``k + 1`` is the model's landmark ``k``, unless the upload's parameters carry
  Slicer's ``label_info`` (``[{"name": ..., "idx": ...}]``) or MONAI Label's ``label_names``
  (``{name: value}``), which then say which value is which landmark;
- a DICOM SR (``.dcm``) as :func:`lmk3d.io.dicom_sr.write_sr` writes it (how a PACS keeps labels).

Partial annotation is fine (a landmark left out is "not annotated"); a landmark name the model does not
know, or a label with no placed landmark at all, is an error.

A label is also checked against the image it annotates, from the image's header alone
(:func:`read_grid`, :func:`check_label_fits`): a point farther than :data:`LABEL_MARGIN_MM` outside
the image's field of view was placed on another image, or in the wrong coordinate system (LPS read as
RAS), and a label map must lie on the image's own voxel grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmk3d import geometry
from lmk3d.errors import GeometryError, ImageReadError, LandmarkFormatError
from lmk3d.io import read_landmarks
from lmk3d.io.dicom_sr import read_sr
from lmk3d.io.image import IMAGE_SUFFIXES, NIFTI_SUFFIXES, image_suffix
from lmk3d.io.label_map import label_values
from lmk3d.landmarks import LandmarkSet

__all__ = ["ACCEPTED", "GRID_TOLERANCE_VOXELS", "LABEL_MARGIN_MM", "LABEL_MAP_SUFFIXES", "POINT_SUFFIXES",
           "SR_SUFFIXES", "ImageGrid", "check_label_fits", "label_kind", "label_value_map", "read_grid", "read_label"]

POINT_SUFFIXES = (".mrk.json", ".fcsv", ".json")
LABEL_MAP_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")
SR_SUFFIXES = (".dcm",)
ACCEPTED = f"a point list ({', '.join(POINT_SUFFIXES)}) or a sphere label map ({', '.join(LABEL_MAP_SUFFIXES)})"
#: How far outside the image's field of view (mm) a labelled point may lie: a landmark on the skin or
#: at the edge of a cropped scan is placed a little outside it; farther means another image or frame.
LABEL_MARGIN_MM = 10.0
#: How far (in voxels of the finer grid) a label map's voxel centres may be from the image's: rounding
#: of the affine when a viewer stores it in single precision, not a shifted or resampled grid.
GRID_TOLERANCE_VOXELS = 0.05


def label_kind(path: str | os.PathLike[str]) -> str:
    """``"points"``, ``"label_map"``, ``"sr"`` or ``""`` (not an accepted label type), from the file name."""
    name = str(path).lower()
    if name.endswith(SR_SUFFIXES):
        return "sr"
    if name.endswith(POINT_SUFFIXES):
        return "points"
    if name.endswith(LABEL_MAP_SUFFIXES):
        return "label_map"
    return ""


def label_value_map(names: Sequence[str], params: Mapping[str, Any] | None = None) -> dict[str, int]:
    """``{name: value}`` for decoding a label map: from the upload's parameters, else value k+1 = name k.

    Raises:
        LandmarkFormatError: ``label_info`` or ``label_names`` that are not a list of
            ``{"name", "idx"}`` / a ``{name: value}`` mapping with positive, distinct values.
    """
    params = params or {}
    entries = params.get("label_info")
    if entries:
        if not isinstance(entries, list):
            raise LandmarkFormatError("label_info must be a list of {\"name\": ..., \"idx\": ...}")
        pairs = []
        for e in entries:
            value = e.get("idx", e.get("id")) if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(value, int):
                raise LandmarkFormatError(f"label_info entry {e!r} is not {{\"name\": str, \"idx\": int}}")
            pairs.append((e["name"], value))
        return _checked(pairs, "label_info")
    by_name = params.get("label_names")
    if by_name:
        if not isinstance(by_name, dict) or not all(isinstance(v, int) for v in by_name.values()):
            raise LandmarkFormatError("label_names must map each landmark name to its label value")
        return _checked([(str(k), int(v)) for k, v in by_name.items()], "label_names")
    if not names:
        raise LandmarkFormatError("a sphere label map needs the landmark names (value k+1 = name k), and no "
                                  "model is served to give them; send label_info with the upload")
    return label_values(list(names))


def _checked(pairs: list[tuple[str, int]], what: str) -> dict[str, int]:
    mapping = dict(pairs)
    values = [v for _, v in pairs]
    if len(mapping) != len(pairs) or len(set(values)) != len(values) or min(values, default=1) < 1:
        raise LandmarkFormatError(f"{what} {pairs!r}: names and values must be distinct and values >= 1")
    return mapping


def read_label(
    path: str | os.PathLike[str],
    names: Sequence[str],
    params: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> LandmarkSet:
    """Read one final label in any accepted format, in ``names`` order (absent landmarks: not found).

    Args:
        path: the label file; its suffix says the format.
        names: the model's landmark names (empty: accept any names, for points and SRs only).
        params: the upload's parameters (``label_info`` / ``label_names`` for a label map).
        source: how to name the label in messages (default: the path).

    Raises:
        LandmarkFormatError: an unknown file type, a malformed file, landmark names or label values
            the model does not know, or no placed landmark at all.
    """
    where = source or str(path)
    kind = label_kind(path)
    try:
        if kind == "points":
            landmarks = read_landmarks(path)
        elif kind == "label_map":
            landmarks = read_landmarks(path, label_value_map(names, params))
        elif kind == "sr":
            landmarks = read_sr(path)
        else:
            raise LandmarkFormatError(f"unknown label type {os.path.basename(str(path))!r}; send {ACCEPTED}")
    except LandmarkFormatError as e:
        raise LandmarkFormatError(f"{where}: {_strip_path(str(e), path)}") from None
    except ValueError as e:  # the image reader's errors (a truncated or non-3D label map) are ValueErrors too
        raise LandmarkFormatError(f"{where}: {_strip_path(str(e), path)}") from None
    if names:
        unknown = [n for i, n in enumerate(landmarks.names) if n not in names and landmarks.found[i]]
        if unknown:
            raise LandmarkFormatError(f"{where}: unknown landmark(s) {', '.join(unknown)}; this model's landmarks "
                                      f"are {', '.join(names)}")
        landmarks = landmarks.reorder(names)
    if not landmarks.found.any():
        raise LandmarkFormatError(f"{where}: no placed landmark; place at least one of "
                                  f"{', '.join(names or landmarks.names) or 'the landmarks'}")
    return landmarks


def _strip_path(message: str, path: str | os.PathLike[str]) -> str:
    # The upload sits in a temporary file whose name means nothing to the client.
    p = str(path)
    if message.startswith(p + ": "):
        message = message[len(p) + 2:]
    return message.replace(p, os.path.basename(p))


@dataclass(frozen=True, eq=False)
class ImageGrid:
    """An image's voxel grid, from its header: what a label must fit.

    Attributes:
        shape: ``(I, J, K)`` voxels.
        affine: ``(4, 4)`` ijk -> world RAS mm.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    def bounds_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned RAS box ``(lo, hi)`` of the field of view (voxel edges), ``(3,)`` each."""
        return geometry.world_bounds_ras(self.affine, self.shape)

    def distance_outside_mm(self, xyz_mm_ras: np.ndarray) -> np.ndarray:
        """``(N,)`` distance (mm) of each point from the field of view, 0 inside.

        Measured to the nearest voxel edge point, so exact for orthogonal voxel axes.
        """
        xyz = np.asarray(xyz_mm_ras, dtype=np.float64).reshape(-1, 3)
        ijk = geometry.ras_to_ijk(xyz, self.affine)
        nearest = np.clip(ijk, -0.5, np.asarray(self.shape, dtype=np.float64) - 0.5)
        return np.asarray(np.linalg.norm(geometry.ijk_to_ras(nearest, self.affine) - xyz, axis=1))

    def describe(self) -> str:
        """``34x50x35 voxels of 1x1x1 mm, origin RAS (1.0, 2.0, 3.0) mm, axes RAS``."""
        spacing = geometry.spacing_from_affine(self.affine)
        origin = ", ".join(f"{v:.2f}" for v in self.affine[:3, 3])
        return (f"{'x'.join(str(s) for s in self.shape)} voxels of {'x'.join(f'{v:.4g}' for v in spacing)} mm, "
                f"origin RAS ({origin}) mm, axes {''.join(geometry.axcodes(self.affine))}")

    def describe_extent(self) -> str:
        """``x -10.0..20.0, y ..., z ... mm (RAS)``: the field of view's box."""
        lo, hi = self.bounds_ras()
        return ", ".join(f"{a} {lo[i]:.1f}..{hi[i]:.1f}" for i, a in enumerate("xyz")) + " mm (RAS)"

    def voxel_offset(self, other: ImageGrid) -> float:
        """Largest distance (in voxels of the finer grid) between the two grids' corner voxel centres.

        ``inf`` when the shapes differ.
        """
        if self.shape != other.shape:
            return float("inf")
        s = np.asarray(self.shape, dtype=np.float64) - 1.0
        corners = np.array([[x, y, z] for x in (0.0, s[0]) for y in (0.0, s[1]) for z in (0.0, s[2])])
        d = np.linalg.norm(geometry.ijk_to_ras(corners, self.affine) - geometry.ijk_to_ras(corners, other.affine),
                           axis=1)
        finest = float(min(geometry.spacing_from_affine(self.affine).min(),
                           geometry.spacing_from_affine(other.affine).min()))
        return float(d.max() / finest)


def read_grid(path: str | os.PathLike[str], source: str | None = None) -> ImageGrid:
    """The voxel grid of an image file, from its header only (the voxels are not read).

    NIfTI through nibabel, other types through SimpleITK's header reader, with the affine
    :func:`lmk3d.io.image.read_image` would give.

    Args:
        path: the image file.
        source: how to name it in messages (default: the path).

    Raises:
        ImageReadError: no such file, a header that cannot be read, not a 3D image, or unusable geometry.
    """
    try:
        return _read_grid(str(path))
    except ImageReadError as e:
        if source is None:
            raise
        raise ImageReadError(f"{source}: {_strip_path(str(e), path)}") from None


def _read_grid(p: str) -> ImageGrid:
    if not os.path.isfile(p):
        raise ImageReadError(f"{p}: no such file")
    try:
        if image_suffix(p) in NIFTI_SUFFIXES:
            import nibabel as nib

            img: Any = nib.load(p)
            shape = tuple(int(v) for v in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(p)
            reader.ReadImageInformation()
            shape = tuple(int(v) for v in reader.GetSize())
            if len(shape) != 3:
                raise ImageReadError(f"{p}: expected a 3D image, got {len(shape)}D of size {shape}")
            affine = geometry.affine_from_itk(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
    except ImageReadError:
        raise
    except Exception as e:  # nibabel and SimpleITK raise many types for files that are not images
        raise ImageReadError(f"{p}: cannot read the image header ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else e})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ImageReadError(f"{p}: expected a 3D image, got shape {shape}")
    try:
        affine = geometry.check_affine(affine)
    except GeometryError as e:
        raise ImageReadError(f"{p}: unusable geometry: {e}") from None
    return ImageGrid((shape[0], shape[1], shape[2]), affine)


def check_label_fits(
    landmarks: LandmarkSet,
    image: ImageGrid,
    label_grid: ImageGrid | None = None,
    image_name: str = "the image",
    margin_mm: float = LABEL_MARGIN_MM,
) -> None:
    """Check that a label belongs to ``image``: on its grid (a label map), its points on it.

    Args:
        landmarks: the decoded label.
        image: the grid of the image it annotates (:func:`read_grid`).
        label_grid: the label map's own grid, for a label map (None for points and SRs).
        image_name: how to name the image in messages.
        margin_mm: how far outside the field of view a point may lie.

    Raises:
        GeometryError: a label map on another grid (the message names both grids), or points farther
            than ``margin_mm`` outside the image (the message names each landmark, its distance and
            the image's extent).
    """
    if label_grid is not None:
        offset = image.voxel_offset(label_grid)
        if offset > GRID_TOLERANCE_VOXELS:
            how = ("another shape" if image.shape != label_grid.shape
                   else f"voxel centres up to {offset:.3g} voxels apart; at most {GRID_TOLERANCE_VOXELS:g} accepted")
            raise GeometryError(f"the label map's grid ({label_grid.describe()}) differs from the grid of "
                                f"{image_name} ({image.describe()}): {how}; export the label map on the image's "
                                "own grid (in Slicer, with the image as the reference volume)")
    found = np.flatnonzero(landmarks.found)
    distance = image.distance_outside_mm(landmarks.xyz_mm_ras[found]) if found.size else np.zeros(0)
    outside = [(landmarks.names[k], float(d), landmarks.xyz_mm_ras[k]) for k, d in zip(found, distance, strict=True)
               if d > margin_mm]
    if outside:
        items = "; ".join(f"{name!r} at RAS ({', '.join(f'{v:.1f}' for v in xyz)}) mm lies {d:.1f} mm outside"
                          for name, d, xyz in outside)
        raise GeometryError(f"{len(outside)} landmark(s) outside {image_name}: {items}; the image spans "
                            f"{image.describe_extent()} and a point may lie at most {margin_mm:g} mm outside it "
                            "(was the label made on another image, or in LPS read as RAS?)")
