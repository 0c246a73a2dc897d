"""Geometry against independent oracles: SimpleITK, nibabel, pydicom headers, and the shared data's ijk."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lmk3d import geometry
from lmk3d.io.image import read_image, write_image
from tests.conftest import DATA, oblique_affine

MPRAGE = DATA / "dicom" / "mr_brain_sagittal_mprage"
AFIDS_IMAGE = DATA / "afids_mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CT_NII = DATA / "ct_abdomen_examples" / "example_ct.nii.gz"
CT_DICOM = DATA / "ct_abdomen_examples" / "example_ct_dicom"


def sitk_ras(img: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """SimpleITK's own index -> physical point (LPS), flipped to RAS."""
    lps = np.array([img.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in ijk])
    return lps * np.array([-1.0, -1.0, 1.0])


def corners_and_random(shape: tuple[int, ...], rng: np.random.Generator, n: int = 20) -> np.ndarray:
    s = np.array(shape[:3], dtype=float) - 1
    corners = np.array([[x, y, z] for x in (0, s[0]) for y in (0, s[1]) for z in (0, s[2])])
    return np.vstack([corners, rng.uniform(-0.5, s + 0.5, size=(n, 3))])


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("path", [MPRAGE, CT_DICOM], ids=["mprage_oblique", "ct_abdomen"])
def test_dicom_series_against_simpleitk(path, rng):
    vol = read_image(path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
    img = reader.Execute()
    assert vol.shape == img.GetSize()
    ijk = corners_and_random(vol.shape, rng)
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk, vol.affine), sitk_ras(img, ijk), atol=1e-4)
    # voxel values are in the same place too
    arr = sitk.GetArrayFromImage(img)
    for i, j, k in [(0, 0, 0), (5, 17, 3), tuple(s - 1 for s in vol.shape)]:
        assert vol.array[i, j, k] == pytest.approx(float(arr[k, j, i]))


def test_mprage_against_dicom_headers(rng):
    """Independent of ITK: each slice's ImagePositionPatient/ImageOrientationPatient (LPS) from pydicom."""
    vol = read_image(MPRAGE)
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(MPRAGE.glob("*.dcm"))]
    iop = np.array(ds[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    assert abs(row_dir @ [1, 0, 0]) < 0.999 and abs(row_dir @ [0, 1, 0]) < 0.999, "series should be oblique"
    normal = np.cross(row_dir, col_dir)
    ds.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))))
    dr, dc = (float(v) for v in ds[0].PixelSpacing)  # row spacing (between rows), column spacing
    assert len(ds) == vol.shape[2]
    for k in (0, len(ds) // 2, len(ds) - 1):
        ipp = np.array(ds[k].ImagePositionPatient, dtype=float)
        for col, row in [(0, 0), (10, 200), (255, 17)]:
            # DICOM: column index -> along the row direction (x), row index -> along the column direction (y)
            lps = ipp + col * dc * row_dir + row * dr * col_dir
            got = geometry.ijk_to_lps(np.array([col, row, k], dtype=float), vol.affine)
            np.testing.assert_allclose(got, lps, atol=1e-3)
    assert geometry.axcodes(vol.affine)[2] in ("R", "L"), "sagittal slices stack along left-right"


@pytest.mark.parametrize("path", [AFIDS_IMAGE, CT_NII], ids=["afids_mni", "ct_abdomen_nifti"])
def test_nifti_against_nibabel_and_simpleitk(path, rng):
    vol = read_image(path)
    ref = nib.load(str(path))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    ijk = corners_and_random(vol.shape, rng)
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk, vol.affine), nib.affines.apply_affine(ref.affine, ijk),
                               atol=1e-6)
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk, vol.affine), sitk_ras(sitk.ReadImage(str(path)), ijk),
                               atol=1e-3)


@pytest.mark.parametrize(
    ("image", "table"),
    [
        (AFIDS_IMAGE, DATA / "afids_mni152" / "landmarks_groundtruth_ras_and_voxel.csv"),
        (CT_NII, DATA / "ct_abdomen_examples" / "example_seg_derived_centroids.csv"),
        (DATA / "spine_t2" / "t2.nii.gz", DATA / "spine_t2" / "landmarks_from_t2_labeled_center_manual.csv"),
    ],
    ids=["afids", "ct_abdomen", "spine_t2"],
)
def test_ras_to_ijk_matches_shared_tables(image, table):
    """The shared data lists each landmark in RAS and in nibabel voxel indices: both directions agree."""
    vol = read_image(image)
    rows = read_csv(table)
    ras = np.array([[float(r["x_ras"]), float(r["y_ras"]), float(r["z_ras"])] for r in rows])
    ijk = np.array([[float(r["i"]), float(r["j"]), float(r["k"])] for r in rows])
    np.testing.assert_allclose(geometry.ras_to_ijk(ras, vol.affine), ijk, atol=0.01)
    inside = np.array([r["inside"] == "True" for r in rows])
    np.testing.assert_array_equal(geometry.inside_volume(ijk, vol.shape), inside)


def test_ct_dicom_matches_its_nifti_conversion():
    """The CT DICOM series and the segmentation NIfTI made from it cover the same voxel grid.

    The NIfTI stores rows flipped, so the voxel-to-voxel map is a signed permutation with an integer
    shift; through world coordinates, the segmentation's liver lands on soft-tissue HU in the DICOM.
    """
    vol = read_image(CT_DICOM)
    seg = nib.load(str(DATA / "ct_abdomen_examples" / "example_seg_dicom.nii.gz"))
    m = np.linalg.inv(seg.affine) @ vol.affine
    np.testing.assert_allclose(np.abs(m[:3, :3]), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-3)
    labels = np.asarray(seg.dataobj)
    liver = np.argwhere(labels == 5)  # TotalSegmentator: 5 = liver
    ijk = np.round(geometry.ras_to_ijk(nib.affines.apply_affine(seg.affine, liver), vol.affine)).astype(int)
    hu = vol.array[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    assert 20 < np.median(hu) < 120, f"liver median {np.median(hu):.0f} HU: the grids do not line up"


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_oblique_roundtrip(tmp_path, suffix, seed):
    rng = np.random.default_rng(seed)
    flip = tuple(int(v) for v in rng.choice([-1, 1], size=3))
    affine = oblique_affine(rng, spacing=(0.6, 1.1, 3.0), flip=flip)
    data = rng.normal(size=(7, 9, 5)).astype(np.float32)
    path = write_image(tmp_path / f"vol{suffix}", data, affine)
    vol = read_image(path)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(vol.array, data)
    ijk = corners_and_random(data.shape, rng)
    np.testing.assert_allclose(geometry.ijk_to_ras(ijk, vol.affine), sitk_ras(sitk.ReadImage(str(path)), ijk),
                               atol=1e-4)
    if suffix == ".nii.gz":
        np.testing.assert_allclose(nib.load(str(path)).affine, affine, atol=1e-5)
    # world -> voxel -> world and LPS <-> RAS round trips
    world = rng.uniform(-150, 150, size=(50, 3))
    np.testing.assert_allclose(geometry.ijk_to_ras(geometry.ras_to_ijk(world, affine), affine), world, atol=1e-9)
    np.testing.assert_allclose(geometry.lps_to_ijk(geometry.ijk_to_lps(ijk, affine), affine), ijk, atol=1e-9)
    np.testing.assert_allclose(geometry.lps_to_ras(geometry.ras_to_lps(world)), world)


def test_itk_geometry_roundtrip(rng):
    for _ in range(5):
        affine = oblique_affine(rng, flip=(-1, 1, -1))
        origin, spacing, direction = geometry.itk_geometry_from_affine(affine)
        np.testing.assert_allclose(geometry.affine_from_itk(origin, spacing, direction), affine, atol=1e-9)
        np.testing.assert_allclose(spacing, [0.7, 0.9, 2.5], atol=1e-9)


def test_single_point_shape_and_bad_input():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    assert geometry.ijk_to_ras([1, 1, 1], affine).shape == (3,)
    assert geometry.ras_to_ijk(np.zeros((4, 3)), affine).shape == (4, 3)
    with pytest.raises(ValueError, match="shape"):
        geometry.ijk_to_ras(np.zeros((2, 2)), affine)
    with pytest.raises(ValueError, match="singular"):
        geometry.ras_to_ijk([0, 0, 0], np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="4x4"):
        geometry.check_affine(np.eye(3))


def test_inside_volume_edges():
    shape = (10, 10, 10)
    assert geometry.inside_volume([-0.5, 0, 9.5], shape)
    assert not geometry.inside_volume([-0.51, 0, 0], shape)
    assert not geometry.inside_volume([0, 5, 5], shape, margin=-0.5)  # a negative margin shrinks the box
    assert geometry.inside_volume([1, 5, 5], shape, margin=-0.5)
    assert not geometry.inside_volume([np.nan, 0, 0], shape)
