"""lmk3d.io.labels: one reader for every label an annotator sends back (points, label maps, SRs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmk3d import geometry
from lmk3d.errors import GeometryError, ImageReadError, LandmarkFormatError
from lmk3d.io import Volume, read_image, write_image
from lmk3d.io.fcsv import write_fcsv
from lmk3d.io.label_map import write_label_map
from lmk3d.io.labels import (
    GRID_TOLERANCE_VOXELS,
    LABEL_MARGIN_MM,
    ImageGrid,
    check_label_fits,
    label_kind,
    label_value_map,
    read_grid,
    read_label,
)
from lmk3d.io.markups import write_markups
from lmk3d.landmarks import LandmarkSet
from tests.conftest import DATA, oblique_affine

NAMES = ("nasion", "sella", "menton")
AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def _landmarks(names: tuple[str, ...] = NAMES, found: tuple[bool, ...] | None = None) -> LandmarkSet:
    xyz = np.array([[10.0, 12.0, 15.0], [20.0, 8.0, 9.0], [14.0, 22.0, 24.0]])[: len(names)]
    return LandmarkSet(names, xyz, found=np.array(found if found is not None else [True] * len(names)))


def _reference() -> Volume:
    return Volume(np.zeros((32, 32, 24), dtype=np.float32), AFFINE)


@pytest.mark.parametrize(("name", "kind"), [("a.mrk.json", "points"), ("a.FCSV", "points"), ("a.json", "points"),
                                            ("a.nii.gz", "label_map"), ("a.nrrd", "label_map"), ("a.dcm", "sr"),
                                            ("a.txt", ""), ("a", "")])
def test_label_kind_from_the_file_name(name: str, kind: str) -> None:
    assert label_kind(name) == kind


def test_label_value_map_defaults_to_k_plus_one() -> None:
    assert label_value_map(NAMES) == {"nasion": 1, "sella": 2, "menton": 3}
    assert label_value_map(NAMES, {"label_info": [{"name": "sella", "idx": 7}, {"name": "menton", "id": 2}]}) == {
        "sella": 7, "menton": 2}
    assert label_value_map((), {"label_names": {"menton": 4}}) == {"menton": 4}


@pytest.mark.parametrize("params", [{"label_info": {"name": "a"}}, {"label_info": [{"name": "a", "idx": "1"}]},
                                    {"label_info": [{"name": "a", "idx": 1}, {"name": "b", "idx": 1}]},
                                    {"label_names": {"a": 0}}, {"label_names": ["a"]}])
def test_bad_label_value_maps_are_refused(params: dict) -> None:
    with pytest.raises(LandmarkFormatError):
        label_value_map(NAMES, params)


def test_a_label_map_without_names_needs_label_info() -> None:
    with pytest.raises(LandmarkFormatError, match="label_info"):
        label_value_map(())


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv", ".nii.gz", ".nrrd"])
def test_read_label_in_every_format_gives_the_model_order(tmp_path: Path, suffix: str) -> None:
    partial = _landmarks(("menton", "nasion"))  # partial annotation, in another order
    path = tmp_path / f"label{suffix}"
    if suffix == ".mrk.json":
        write_markups(path, partial)
    elif suffix == ".fcsv":
        write_fcsv(path, partial)
    else:  # a label map, with label_info saying which value is which landmark
        write_label_map(path, partial, _reference())
    params = {"label_info": [{"name": "menton", "idx": 1}, {"name": "nasion", "idx": 2}]}
    got = read_label(path, NAMES, params)
    assert got.names == NAMES
    np.testing.assert_array_equal(got.found, [True, False, True])
    np.testing.assert_allclose(got.xyz_mm_ras[[0, 2]], partial.xyz_mm_ras[[1, 0]], atol=1e-3)


def test_read_label_refuses_unknown_names_and_empty_labels(tmp_path: Path) -> None:
    path = tmp_path / "l.mrk.json"
    write_markups(path, _landmarks(("nasion", "pogonion")))
    with pytest.raises(LandmarkFormatError, match="unknown landmark.*pogonion"):
        read_label(path, NAMES, source="the upload")
    write_markups(path, _landmarks(("nasion",), found=(False,)))
    with pytest.raises(LandmarkFormatError, match="no placed landmark"):
        read_label(path, NAMES)


def test_read_label_names_the_source_not_the_temporary_path(tmp_path: Path) -> None:
    path = tmp_path / "tmpab12cd.nii.gz"
    path.write_bytes(b"truncated")
    with pytest.raises(LandmarkFormatError) as e:
        read_label(path, NAMES, source="the uploaded .nii.gz file")
    assert str(e.value).startswith("the uploaded .nii.gz file: ") and str(tmp_path) not in str(e.value)
    with pytest.raises(LandmarkFormatError, match="unknown label type 'x.txt'"):
        read_label(tmp_path / "x.txt", NAMES)


# --- a label against its image's grid --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_grid_gives_the_geometry_read_image_gives(tmp_path: Path, rng: np.random.Generator, suffix: str) -> None:
    affine = oblique_affine(rng)
    path = tmp_path / f"v{suffix}"
    write_image(path, np.zeros((7, 5, 4), np.int16), affine)
    grid, vol = read_grid(path), read_image(path)
    assert grid.shape == vol.shape == (7, 5, 4)
    np.testing.assert_allclose(grid.affine, vol.affine, atol=1e-5)


def test_read_grid_reads_the_header_of_a_truncated_image_and_names_the_source(tmp_path: Path) -> None:
    real = DATA / "hippocampus" / "images" / "hippocampus_004.nii.gz"
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(real.read_bytes()[:3000])  # the voxels are cut off, the header is whole
    assert read_grid(truncated).shape == read_image(real).shape
    garbage = tmp_path / "tmpab12.nii.gz"
    garbage.write_bytes(b"\x1f\x8b" + bytes(range(256)))
    with pytest.raises(ImageReadError) as e:
        read_grid(garbage, source="the uploaded .nii.gz file")
    assert str(e.value).startswith("the uploaded .nii.gz file: ") and str(tmp_path) not in str(e.value)
    with pytest.raises(ImageReadError, match="no such file"):
        read_grid(tmp_path / "missing.nrrd")


def _grid(rng: np.random.Generator) -> ImageGrid:
    return ImageGrid((20, 30, 10), oblique_affine(rng))


def _beyond_edge(grid: ImageGrid, mm: float) -> np.ndarray:
    """A point ``mm`` beyond the field of view's edge along +i (the voxel edge is at i = size - 0.5)."""
    edge = geometry.ijk_to_ras(np.array([grid.shape[0] - 0.5, 12.0, 4.0]), grid.affine)
    axis = grid.affine[:3, 0] / np.linalg.norm(grid.affine[:3, 0])
    return np.asarray(edge + mm * axis)


def test_distance_outside_is_measured_in_mm_on_an_oblique_grid(rng: np.random.Generator) -> None:
    grid = _grid(rng)
    inside = geometry.ijk_to_ras(np.array([3.0, 4.0, 5.0]), grid.affine)
    np.testing.assert_allclose(grid.distance_outside_mm(np.stack([inside, _beyond_edge(grid, 7.5)])), [0.0, 7.5],
                               atol=1e-9)


def test_points_far_outside_the_image_are_refused_with_their_distance(rng: np.random.Generator) -> None:
    grid = _grid(rng)
    inside = geometry.ijk_to_ras(np.array([3.0, 4.0, 5.0]), grid.affine)
    near = _beyond_edge(grid, LABEL_MARGIN_MM - 0.5)
    far = _beyond_edge(grid, LABEL_MARGIN_MM + 14.0)
    check_label_fits(LandmarkSet(NAMES, np.stack([inside, near, inside])), grid)  # within the margin: fine
    # not placed: not checked
    check_label_fits(LandmarkSet(NAMES, np.stack([inside, far, inside]), found=np.array([True, False, True])), grid)
    with pytest.raises(GeometryError) as e:
        check_label_fits(LandmarkSet(NAMES, np.stack([inside, far, near])), grid, image_name="image 'case_1'")
    message = str(e.value)
    lo, hi = grid.bounds_ras()
    assert "1 landmark(s) outside image 'case_1'" in message and "'sella'" in message
    assert f"{LABEL_MARGIN_MM + 14.0:.1f} mm outside" in message and "'menton'" not in message
    assert f"x {lo[0]:.1f}..{hi[0]:.1f}" in message and f"at most {LABEL_MARGIN_MM:g} mm" in message


def test_a_label_map_must_lie_on_the_image_grid(rng: np.random.Generator) -> None:
    grid = _grid(rng)
    points = LandmarkSet(NAMES, geometry.ijk_to_ras(np.array([[3.0, 4.0, 5.0]] * 3), grid.affine))
    rounded = ImageGrid(grid.shape, grid.affine.astype(np.float32).astype(np.float64))  # a viewer's float32 affine
    check_label_fits(points, grid, rounded)
    shifted = grid.affine.copy()
    shifted[:3, 3] += grid.affine[:3, 0] * (2 * GRID_TOLERANCE_VOXELS)
    other_shape = ImageGrid((20, 30, 11), grid.affine)
    for label_grid, why in ((ImageGrid(grid.shape, shifted), "voxels apart"), (other_shape, "another shape")):
        with pytest.raises(GeometryError) as e:
            check_label_fits(points, grid, label_grid, image_name="image 'case_1'")
        message = str(e.value)
        assert why in message and label_grid.describe() in message and grid.describe() in message
        assert "differs from the grid of image 'case_1'" in message
