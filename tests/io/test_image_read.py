"""Reading NIfTI voxels block by block (lmk3d.io.image) gives nibabel's values, and refuses broken files.

nibabel is the oracle: ``np.asarray(nib.load(path).dataobj, dtype=np.float32)``, bit for bit, for every
stored type, byte order, scaling and compression; a read that fails names the file. Every test runs with
both gzip decompressors the reader may use: ISA-L's (installed with the project) and zlib's (the fallback).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lmk3d.errors import ImageReadError
from lmk3d.io import image as image_io
from lmk3d.io.image import read_image

AFFINE = np.array([[-0.7, 0.1, 0.0, 90.0], [0.0, 0.8, -0.2, -120.0], [0.1, 0.0, 1.3, -60.0], [0.0, 0.0, 0.0, 1.0]])


def _expected(path: Path) -> np.ndarray:
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    return data[..., 0] if data.ndim == 4 else data


def _write(path: Path, data: np.ndarray, slope: float | None = None, inter: float | None = None) -> Path:
    img = nib.Nifti1Image(data, AFFINE)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 1 kB, so that these small images cross many block boundaries (odd ones included)."""
    monkeypatch.setattr(image_io, "STREAM_BLOCK_BYTES", 1001)


@pytest.fixture(autouse=True, params=["isal", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The reader's gzip decompressor: ISA-L's as installed, or zlib's as where ``isal`` is missing."""
    if request.param == "zlib":
        monkeypatch.setattr(image_io, "_gzip_inflater", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    return str(request.param)


def test_the_installed_reader_inflates_with_isal(inflater: str) -> None:
    module = type(image_io._gzip_inflater()).__module__
    assert module.startswith("isal" if inflater == "isal" else "zlib"), module


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", ["int16", ">i2", "uint8", "int32", "float32", ">f8", "uint16"])
def test_voxels_equal_nibabel(tmp_path: Path, suffix: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    data = (rng.normal(0, 300, size=(13, 11, 7)) + 100).astype(dtype) if np.dtype(dtype).kind != "u" \
        else rng.integers(0, 250, size=(13, 11, 7)).astype(dtype)
    path = _write(tmp_path / f"img{suffix}", data)
    vol = read_image(path)
    assert vol.array.dtype == np.float32 and vol.array.flags.f_contiguous
    np.testing.assert_array_equal(vol.array, _expected(path))
    np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine)


@pytest.mark.parametrize(("slope", "inter"), [(2.5, -1024.0), (1.0, -1024.0), (0.001, 3.0)])
def test_scaled_voxels_equal_nibabel(tmp_path: Path, slope: float, inter: float) -> None:
    data = np.random.default_rng(1).integers(-3000, 3000, size=(9, 8, 6)).astype(np.int16)
    path = _write(tmp_path / "scaled.nii.gz", data, slope, inter)
    np.testing.assert_array_equal(read_image(path).array, _expected(path))


def test_singleton_fourth_axis_and_stored_type(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    path = _write(tmp_path / "four.nii.gz", data)
    np.testing.assert_array_equal(read_image(path).array, data[..., 0].astype(np.float32))
    kept = read_image(path, dtype=None)  # the stored type: nibabel's own read
    assert kept.array.dtype == np.int16
    np.testing.assert_array_equal(kept.array, data[..., 0])


def test_several_gzip_members(tmp_path: Path) -> None:
    data = np.random.default_rng(2).normal(size=(10, 9, 8)).astype(np.float32)
    one = _write(tmp_path / "one.nii.gz", data)
    raw = gzip.decompress(one.read_bytes())
    cut = len(raw) // 3 + 1  # an odd cut: a float is split between the members
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    np.testing.assert_array_equal(read_image(two).array, data)


def test_truncated_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 1000, size=(20, 20, 20)).astype(np.int16)
    good = _write(tmp_path / "good.nii.gz", data)
    blob = good.read_bytes()
    short = tmp_path / "short.nii.gz"
    short.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ImageReadError, match="short.nii.gz"):
        read_image(short)
    no_trailer = tmp_path / "no_trailer.nii.gz"  # every voxel there, the CRC and length missing
    no_trailer.write_bytes(blob[:-8])
    with pytest.raises(ImageReadError, match="no_trailer.nii.gz.*truncated"):
        read_image(no_trailer)
    bad_crc = tmp_path / "bad_crc.nii.gz"
    bad_crc.write_bytes(blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:])
    with pytest.raises(ImageReadError, match="bad_crc.nii.gz"):
        read_image(bad_crc)
    plain = _write(tmp_path / "plain.nii", data)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(plain.read_bytes()[:-10])
    with pytest.raises(ImageReadError, match="cut.nii.*truncated"):
        read_image(cut)


def test_nan_and_infinite_voxels_are_counted(tmp_path: Path) -> None:
    data = np.zeros((12, 10, 9), dtype=np.float32)
    data[1, 2, 3], data[11, 9, 8], data[5, 5, 5] = np.nan, np.inf, -np.inf
    for suffix in (".nii.gz", ".nii"):
        path = _write(tmp_path / f"nan{suffix}", data)
        with pytest.raises(ImageReadError, match=f"nan{suffix}: 3 voxels are NaN or infinite"):
            read_image(path)
