"""Image reading and writing: the one reader the library, the CLI and the MONAI Label app use.

NIfTI goes through nibabel (its sform/qform rules); NRRD, MetaImage and DICOM (a single file or a
folder holding one series) go through SimpleITK, whose LPS geometry is converted to the RAS affine.
The array is in nibabel order ``(I, J, K)``; see :mod:`lmk3d.geometry` for the conventions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d import geometry
from lmk3d.errors import ImageReadError, LandmarkError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scalar image.

    Attributes:
        array: ``(I, J, K)`` voxel values (float32 unless read with ``dtype=None``).
        affine: ``(4, 4)`` ijk -> world RAS mm.
        path: where it was read from, if anywhere.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing_mm(self) -> np.ndarray:
        return geometry.spacing_from_affine(self.affine)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return geometry.axcodes(self.affine)

    def ijk_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        return geometry.ijk_to_ras(ijk, self.affine)

    def ras_to_ijk(self, xyz_mm_ras: np.ndarray) -> np.ndarray:
        return geometry.ras_to_ijk(xyz_mm_ras, self.affine)

    def contains_ras(self, xyz_mm_ras: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """Whether world points fall inside the field of view (``margin`` in voxels, see geometry)."""
        return geometry.inside_volume(self.ras_to_ijk(xyz_mm_ras), self.shape, margin)


def image_suffix(path: str | os.PathLike[str]) -> str:
    """The image type suffix of ``path`` ('.nii.gz', '.nrrd', ...), '' for a folder or unknown."""
    name = str(path).lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return ""


def case_id(path: str | os.PathLike[str]) -> str:
    """File name without its image suffix: ``images/case_004.nii.gz`` -> ``case_004``."""
    p = Path(path)
    suf = image_suffix(p)
    return p.name[: -len(suf)] if suf else p.name


def _as_volume(data: np.ndarray, affine: np.ndarray, path: str, dtype: np.dtype | None) -> Volume:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {data.ndim}D with shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise ImageReadError(f"{path}: expected a 3D image, got shape {tuple(data.shape)} (a single slice is 2D)")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ImageReadError(f"{path}: voxel type {data.dtype} is not a real scalar")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if np.issubdtype(data.dtype, np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        if n_bad:
            raise ImageReadError(f"{path}: {n_bad} voxels are NaN or infinite")
    try:
        affine = geometry.check_affine(affine)
    except ValueError as e:
        raise ImageReadError(f"{path}: unusable geometry: {e}") from None
    return Volume(data, affine, path)


def _read_nifti(path: str, dtype: np.dtype | None) -> Volume:
    import nibabel as nib

    try:
        img: Any = nib.load(path)
        if dtype is not None:
            data = np.asarray(img.dataobj, dtype=dtype)
        else:
            data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise ImageReadError(f"{path}: cannot read NIfTI image ({type(e).__name__}: {e})") from None
    return _as_volume(data, np.asarray(img.affine), path, dtype)


def _sitk_to_volume(img: object, path: str, dtype: np.dtype | None) -> Volume:
    import SimpleITK as sitk

    assert isinstance(img, sitk.Image)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: {img.GetNumberOfComponentsPerPixel()}-component (vector/RGB) image; "
                             "a scalar image is needed")
    if img.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {img.GetDimension()}D of size {img.GetSize()}")
    arr = sitk.GetArrayViewFromImage(img).transpose(2, 1, 0)
    arr = np.array(arr, dtype=dtype) if dtype is not None else np.array(arr)
    affine = geometry.affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return _as_volume(arr, affine, path, dtype)


def _read_dicom_folder(path: str, series_uid: str | None, dtype: np.dtype | None) -> Volume:
    import SimpleITK as sitk

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(path))
    if not ids:
        raise ImageReadError(f"{path}: folder holds no DICOM image series")
    if series_uid is None:
        if len(ids) > 1:
            raise ImageReadError(f"{path}: folder holds {len(ids)} DICOM series ({', '.join(ids)}); name one")
        series_uid = ids[0]
    elif series_uid not in ids:
        raise ImageReadError(f"{path}: no DICOM series {series_uid}; found {', '.join(ids)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, series_uid)
    if len(files) < 2:
        raise ImageReadError(f"{path}: DICOM series {series_uid} has {len(files)} slice(s); a 3D series is needed")
    from lmk3d.io.dicom_series import check_series_files

    try:  # the check the app's DICOMweb datastore applies: the CLI and the server refuse the same series
        check_series_files(files)
    except LandmarkError as e:
        raise ImageReadError(f"{path}: DICOM series {series_uid}: {e}") from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise ImageReadError(f"{path}: cannot read DICOM series ({str(e).strip().splitlines()[-1]})") from None
    return _sitk_to_volume(img, path, dtype)


def read_image(
    path: str | os.PathLike[str], dtype: np.dtype | type | None = np.float32, series_uid: str | None = None
) -> Volume:
    """Read a 3D scalar image.

    Args:
        path: a NIfTI/NRRD/MetaImage/DICOM file, or a folder holding one DICOM series.
        dtype: voxel type of ``Volume.array`` (None keeps the stored type, e.g. int16 for CT).
        series_uid: which series to read from a DICOM folder that holds several.

    Raises:
        ImageReadError: the file is missing, unreadable or truncated, not 3D, not scalar, has NaN
            or infinite voxels, or has a singular geometry; a DICOM series whose slices are tilted,
            unevenly spaced or not parallel (:func:`lmk3d.io.dicom_series.check_series_geometry`).
            The message names the file.
    """
    p = str(path)
    dt = None if dtype is None else np.dtype(dtype)
    if not os.path.exists(p):
        raise ImageReadError(f"{p}: no such file or folder")
    if os.path.isdir(p):
        return _read_dicom_folder(p, series_uid, dt)
    suffix = image_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(p, dt)
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(p)
    except RuntimeError as e:
        known = ", ".join(IMAGE_SUFFIXES)
        raise ImageReadError(f"{p}: cannot read image (known types: {known}, or a DICOM folder): "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    return _sitk_to_volume(img, p, dt)


def write_image(
    path: str | os.PathLike[str], volume: Volume | np.ndarray, affine: np.ndarray | None = None, compress: bool = True
) -> Path:
    """Write a volume as NIfTI (``.nii``/``.nii.gz``) or through SimpleITK (``.nrrd``, ``.mha``...).

    The file is written to a temporary name in the same folder and renamed, so a reader never sees
    half a file.

    Args:
        path: the file; its suffix says the format.
        volume: a :class:`Volume`, or an ``(I, J, K)`` array with ``affine``.
        affine: ``(4, 4)`` ijk -> RAS, for a bare array.
        compress: compress NRRD / MetaImage data (some readers, e.g. OHIF's, need it raw); NIfTI
            follows its suffix (``.nii.gz`` compressed, ``.nii`` not).
    """
    if isinstance(volume, Volume):
        array, aff = volume.array, volume.affine
    else:
        if affine is None:
            raise ValueError("write_image needs an affine with a bare array")
        array, aff = np.asarray(volume), affine
    aff = geometry.check_affine(aff)
    out = Path(path)
    suffix = image_suffix(out)
    if not suffix or suffix == ".dcm":
        raise ImageReadError(f"{out}: cannot write this type; use one of .nii.gz, .nii, .nrrd, .mha")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name[: -len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            nifti = nib.Nifti1Image(array, aff)
            nifti.set_qform(aff, code=1)
            nifti.set_sform(aff, code=1)
            nib.save(nifti, str(tmp))
        else:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
            origin, spacing, direction = geometry.itk_geometry_from_affine(aff)
            img.SetOrigin(origin)
            img.SetSpacing(spacing)
            img.SetDirection(direction)
            sitk.WriteImage(img, str(tmp), useCompression=bool(compress))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
