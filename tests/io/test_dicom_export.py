"""lmk3d.io.dicom_export: a volume as a DICOM series, checked against nibabel and SimpleITK as oracles.

The series is written to files and read back by SimpleITK (GDCM sorts the slices itself) through
``lmk3d.io.read_image``; its ijk -> world mapping must be nibabel's affine of the source NIfTI, on the
grid :func:`viewer_grid` predicts (``k`` reversed for a left-handed voxel grid), and its values the
source's (exactly for integer images, within half a quantisation step otherwise).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from lmk3d.errors import GeometryError
from lmk3d.io import Volume, read_image
from lmk3d.io.dicom_export import SeriesIds, series_from_volume, uid_from, viewer_grid, write_series
from tests.conftest import oblique_affine

IDS = SeriesIds.derive("case_1", "v1")


def _nifti(tmp_path: Path, array: np.ndarray, affine: np.ndarray) -> Volume:
    path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return read_image(path, dtype=None)


@pytest.mark.parametrize("flip", [(1, 1, 1), (1, -1, 1), (-1, 1, 1)])
def test_series_reads_back_on_the_viewer_grid(tmp_path: Path, rng: np.random.Generator,
                                              flip: tuple[int, int, int]) -> None:
    affine = oblique_affine(rng, spacing=(0.7, 0.9, 2.5), flip=flip)
    array = rng.integers(-1000, 2000, size=(11, 9, 7)).astype(np.int16)
    volume = _nifti(tmp_path, array, affine)
    write_series(tmp_path / "dicom", series_from_volume(volume, IDS))
    back = read_image(tmp_path / "dicom", dtype=None)  # SimpleITK / GDCM: the oracle
    oracle = nib.load(str(tmp_path / "image.nii.gz"))
    expected = viewer_grid(np.asarray(oracle.affine), array.shape)
    np.testing.assert_allclose(back.affine, expected, atol=1e-4)
    left_handed = np.linalg.det(affine[:3, :3]) < 0
    assert np.allclose(expected, oracle.affine) == (not left_handed)
    np.testing.assert_array_equal(back.array, array[:, :, ::-1] if left_handed else array)  # int16: exact
    # The same world point is the same voxel value on both grids.
    ijk = np.array([3.0, 4.0, 5.0])
    world = oracle.affine @ np.r_[ijk, 1.0]
    ijk_back = np.rint(np.linalg.solve(back.affine, world)[:3]).astype(int)
    assert back.array[tuple(ijk_back)] == array[3, 4, 5]


def test_float_values_are_kept_within_half_a_step(tmp_path: Path, rng: np.random.Generator) -> None:
    array = rng.normal(300.0, 120.0, size=(8, 6, 5)).astype(np.float32)
    series = series_from_volume(Volume(array, np.diag([1.0, 1.0, 2.0, 1.0])), IDS)
    write_series(tmp_path, series)
    back = read_image(tmp_path)
    step = float(series.headers[0].RescaleSlope)
    assert step == pytest.approx((array.max() - array.min()) / 65535, rel=1e-6)
    assert np.abs(back.array - array).max() <= 0.5 * step + 1e-6 * abs(array).max()


def test_headers_name_the_image_and_choose_the_modality(rng: np.random.Generator) -> None:
    ct = series_from_volume(Volume(np.full((4, 3, 2), -1000.0), np.eye(4)), IDS)
    mr = series_from_volume(Volume(np.full((4, 3, 2), 12.0), np.eye(4)), IDS)
    assert ct.headers[0].Modality == "CT" and mr.headers[0].Modality == "MR"
    h = mr.headers[1]
    assert (h.PatientID, h.StudyDescription, h.InstanceNumber, h.Rows, h.Columns) == ("case_1", "case_1", 2, 3, 4)
    assert len(set(mr.sop_uids)) == 2 and mr.frames.shape == (2, 3, 4)
    assert len(mr.frame_bytes(0)) == 3 * 4 * 2
    with pytest.raises(ValueError, match="CT or MR"):
        series_from_volume(Volume(np.zeros((2, 2, 2)), np.eye(4)), IDS, modality="US")


def test_uids_are_stable_valid_and_change_with_the_version() -> None:
    assert uid_from("a", "b") == uid_from("a", "b") != uid_from("a", "c")
    again, other = SeriesIds.derive("case_1", "v1"), SeriesIds.derive("case_1", "v2")
    assert again == IDS and other.series_uid != IDS.series_uid
    for uid in (IDS.study_uid, IDS.series_uid, IDS.sop_uid(3)):
        assert pydicom.uid.UID(uid).is_valid and len(uid) <= 64


def test_a_sheared_affine_is_refused() -> None:
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    with pytest.raises(GeometryError, match="not orthogonal"):
        series_from_volume(Volume(np.zeros((3, 3, 3)), sheared), IDS)


def test_viewer_grid_reverses_k_only_for_a_left_handed_grid() -> None:
    right = np.diag([1.0, 2.0, 3.0, 1.0])
    assert viewer_grid(right, (4, 5, 6)) is right
    left = np.diag([-1.0, 2.0, 3.0, 1.0])
    grid = viewer_grid(left, (4, 5, 6))
    assert np.linalg.det(grid[:3, :3]) > 0
    np.testing.assert_allclose(grid @ [0, 0, 0, 1], left @ [0, 0, 5, 1])  # viewer slice 0 = the last one
