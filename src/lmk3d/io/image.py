"""Image reading and writing: the one reader the library, the CLI and the MONAI Label app use.

NIfTI goes through nibabel (its sform/qform rules); NRRD, MetaImage and DICOM (a single file or a
folder holding one series) go through SimpleITK, whose LPS geometry is converted to the RAS affine.
The array is in nibabel order ``(I, J, K)``; see :mod:`lmk3d.geometry` for the conventions.

Reading a NIfTI file as float32 (the default) streams its voxels: nibabel reads the header (geometry,
type, offset, scaling) and the data are decompressed a block at a time, each block scaled and cast
into the output as nibabel would (:func:`nibabel.volumeutils.apply_read_scaling`, then the cast) and
checked for NaN or infinity. The whole image is then held once, as float32, instead of as the stored
array, its float32 copy and the check's masks (docs/benchmarks.md, "Where the time goes"). A gzip
stream is inflated by Intel's ISA-L (``isal``, a dependency) where it is installed, else by zlib: the
same bytes (the format fixes them), in about half the time (docs/benchmarks.md, "Inflating with ISA-L").
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Iterator
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


#: bytes of the file read (and decompressed) at a time: their voxels stay in the cache while converted
STREAM_BLOCK_BYTES = 1 << 18


def _gzip_inflater() -> Any:
    """A decompressor of one gzip member: ISA-L's where ``isal`` is installed, else zlib's (same interface).

    Both check the member's CRC and length at its end and raise on a mismatch.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)


def _all_finite(data: np.ndarray) -> bool:
    """Whether every voxel is finite, without a temporary array the size of the image.

    NaN and infinity propagate through a sum; accumulated in float64, a float32 image cannot overflow
    it, and a float64 image whose sum overflows is counted voxel by voxel.
    """
    if np.isfinite(np.sum(data, dtype=np.float64)):
        return True
    return not np.count_nonzero(~np.isfinite(data))


def _as_volume(data: np.ndarray, affine: np.ndarray, path: str, dtype: np.dtype | None,
               checked: bool = False) -> Volume:
    """Check and wrap voxels; ``checked``: the reader already found every voxel finite."""
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
    if not checked and np.issubdtype(data.dtype, np.floating) and not _all_finite(data):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ImageReadError(f"{path}: {n_bad} voxels are NaN or infinite")
    try:
        affine = geometry.check_affine(affine)
    except ValueError as e:
        raise ImageReadError(f"{path}: unusable geometry: {e}") from None
    return Volume(data, affine, path)


def _stored_blocks(path: str, offset: int, n_bytes: int) -> Iterator[bytes]:
    """The ``n_bytes`` bytes from ``offset`` of a NIfTI file's (decompressed) stream, block by block.

    A gzip stream is decompressed (:func:`_gzip_inflater`, member after member), ``STREAM_BLOCK_BYTES`` of
    the file at a time, and followed to the end of the member holding the last voxel, so that its CRC and
    length are checked (the decompressor raises on a mismatch).

    Raises:
        ImageReadError: the file ends before the voxel data (or the gzip member holding them) does.
    """
    gz = path.lower().endswith(".gz")
    with open(path, "rb") as f:
        inflate = _gzip_inflater() if gz else None
        skip, left, data = offset, n_bytes, b""
        while left > 0:
            if inflate is None:
                block = f.read(min(STREAM_BLOCK_BYTES, skip + left))
                if not block:
                    break
            else:
                if inflate.eof:  # the data go on in the next gzip member
                    data, inflate = inflate.unused_data, _gzip_inflater()
                if not data:
                    data = f.read(STREAM_BLOCK_BYTES)
                    if not data:
                        break
                block, data = inflate.decompress(data), b""
            if skip:
                used = min(skip, len(block))
                block, skip = block[used:], skip - used
            if block:
                block = block[:left]
                left -= len(block)
                yield block
        while left == 0 and inflate is not None and not inflate.eof:  # on to the member's CRC and length
            data = f.read(STREAM_BLOCK_BYTES)
            if not data:
                raise ImageReadError(f"{path}: cannot read NIfTI image (the gzip stream ends before its end "
                                     "marker: truncated)")
            inflate.decompress(data)
    if left > 0:
        raise ImageReadError(f"{path}: cannot read NIfTI image (the file ends {left} bytes before its voxel data "
                             "do: truncated)")


def _stream_nifti(path: str, proxy: Any, dtype: np.dtype) -> np.ndarray:
    """The voxels of a NIfTI ``proxy`` as ``dtype``, decompressed and converted a block at a time.

    The same values as ``np.asarray(proxy, dtype=dtype)``: the scale factors are prepared as nibabel
    prepares them and applied with nibabel's function, element by element, then cast.
    """
    from nibabel.volumeutils import apply_read_scaling

    stored = np.dtype(proxy.dtype)
    shape = tuple(int(n) for n in proxy.shape)
    slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
    if np.can_cast(slope, dtype):
        slope = slope.astype(dtype)
    if np.can_cast(inter, dtype):
        inter = inter.astype(dtype)
    n = int(np.prod(shape))
    # An anonymous memory map rather than np.empty: numpy asks for transparent huge pages for large
    # arrays, and where the kernel compacts memory to find them (the default "defrag=madvise") the first
    # touch of the image costs several times more than with plain pages (docs/benchmarks.md). The image
    # is written once, in order, so huge pages would bring little. The array keeps the map alive.
    buffer = mmap.mmap(-1, max(n * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE)  # copy-on-write, as malloc's
    flat = np.frombuffer(buffer, dtype=dtype, count=n)  # NIfTI stores the first axis fastest
    out = flat.reshape(shape, order="F")
    size = stored.itemsize
    pos, carry, n_bad = 0, b"", 0
    for block in _stored_blocks(path, int(proxy.offset), flat.size * size):
        if carry:
            block, carry = carry + block, b""
        cut = len(block) - len(block) % size
        if cut < len(block):
            block, carry = block[:cut], block[cut:]
        values = apply_read_scaling(np.frombuffer(block, dtype=stored), slope, inter)
        part = flat[pos:pos + values.size]
        # nibabel's two casts (to the promoted type, then to ``dtype``), so very large integers round alike
        via = np.promote_types(values.dtype, dtype)
        np.copyto(part, values if via == part.dtype else values.astype(via), casting="unsafe")
        # Integers (unscaled) are finite in any float type; anything else is checked.
        if values.dtype.kind not in "iu" and not np.isfinite(part).all():
            n_bad += int(np.count_nonzero(~np.isfinite(part)))
        pos += values.size
    if n_bad:
        raise ImageReadError(f"{path}: {n_bad} voxels are NaN or infinite")
    return out


def _read_nifti(path: str, dtype: np.dtype | None) -> Volume:
    import nibabel as nib

    try:
        img: Any = nib.load(path)
        proxy = img.dataobj
        if (dtype is not None and np.issubdtype(dtype, np.floating) and nib.is_proxy(proxy)
                and getattr(proxy, "order", "F") == "F" and np.dtype(proxy.dtype).kind in "iuf"):
            return _as_volume(_stream_nifti(path, proxy, dtype), np.asarray(img.affine), path, dtype, checked=True)
        if dtype is not None:
            data = np.asarray(proxy, dtype=dtype)
        else:
            data = np.asanyarray(proxy)
    except ImageReadError:
        raise
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
