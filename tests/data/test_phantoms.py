"""Head-and-neck phantoms: deterministic, landmarks on the anatomy they name, world coordinates right."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lmk3d import geometry
from lmk3d.cli import main
from lmk3d.data import load_dataset, read_groups
from lmk3d.data.phantoms import LANDMARK_NAMES, PROFILES, make_phantom, read_phantom_meta, sample_case
from lmk3d.io import read_table

SMALL = PROFILES["small"]
SEED = 5


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small cases with every orientation trick, tilts and cut-off landmarks made likely."""
    out = tmp_path_factory.mktemp("phantoms")
    rc = main(["phantoms", "--out", str(out), "--n", "6", "--seed", str(SEED), "--profile", "small"])
    assert rc == 0
    return out


def _hu(volume_array: np.ndarray, ijk: np.ndarray) -> float:
    return float(ndimage.map_coordinates(volume_array.astype(np.float32), np.asarray(ijk)[:, None], order=1)[0])


def test_same_seed_same_case_other_seed_other_case() -> None:
    a = make_phantom(11, 2, SMALL)
    b = make_phantom(11, 2, SMALL)
    c = make_phantom(12, 2, SMALL)
    np.testing.assert_array_equal(a.volume.array, b.volume.array)
    np.testing.assert_array_equal(a.volume.affine, b.volume.affine)
    assert a.landmarks.allclose(b.landmarks, atol_mm=0.0)
    assert a.volume.array.dtype == np.int16
    assert not np.array_equal(a.volume.affine, c.volume.affine)
    assert not np.allclose(a.landmarks.xyz_mm_ras, c.landmarks.xyz_mm_ras)


def test_generated_folder_is_reproducible(phantom_dir: Path, tmp_path: Path) -> None:
    assert main(["phantoms", "--out", str(tmp_path), "--n", "2", "--seed", str(SEED), "--profile", "small"]) == 0
    first = read_table(phantom_dir / "landmarks.csv")
    again = read_table(tmp_path / "landmarks.csv")
    for case in again:
        assert first[case].allclose(again[case], atol_mm=0.0)
        a = nib.load(phantom_dir / "images" / f"{case}.nii.gz")
        b = nib.load(tmp_path / "images" / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


@pytest.mark.parametrize("index", range(4))
def test_each_landmark_lies_on_the_anatomy_it_names(index: int) -> None:
    ph = make_phantom(SEED + 100, index, dataclasses.replace(SMALL, cut_prob=0.0))
    world = ph.anatomy.landmarks_world()
    arr = ph.volume.array
    spacing = ph.volume.spacing_mm
    # Analytically: on the surface of the mandible / the occipital bone, inside the dens.
    for name in ("chin", "mand_l", "mand_r"):
        assert abs(ph.anatomy.sdf("mandible", world[name][None])[0]) < 0.05, name
    assert abs(ph.anatomy.sdf("skull", world["occ_bone"][None])[0]) < 0.05
    assert -2.0 < ph.anatomy.sdf("c2", world["odont_p"][None])[0] < -1.0
    # In the image: bone HU at the dens tip, a bone/soft-tissue edge at the chin and the occipital bone.
    odont = ph.volume.ras_to_ijk(world["odont_p"])
    assert _hu(arr, odont) > 250.0
    for name in ("chin", "occ_bone"):
        ijk = ph.volume.ras_to_ijk(world[name])
        offsets = np.array([[di, dj, dk] for di in (-1, 0, 1) for dj in (-1, 0, 1) for dk in (-1, 0, 1)])
        values = [_hu(arr, ijk + o) for o in offsets]
        assert max(values) > 600.0 and min(values) < 250.0, (name, min(values), max(values))
    # chin and occ_bone on the mid-sagittal plane (x = 0 of the patient frame) within a voxel;
    # mand_l on the patient's left (RAS x < 0), mand_r on the right.
    to_patient = np.linalg.inv(ph.params.patient_to_world)
    for name in ("chin", "occ_bone"):
        assert abs(geometry.apply_affine(to_patient, world[name])[0]) < spacing.min()
    assert geometry.apply_affine(to_patient, world["mand_l"])[0] < -30.0
    assert geometry.apply_affine(to_patient, world["mand_r"])[0] > 30.0


def test_mandible_angles_are_mirror_twins() -> None:
    ph = make_phantom(SEED, 0, SMALL)
    to_patient = np.linalg.inv(ph.params.patient_to_world)
    left = geometry.apply_affine(to_patient, ph.anatomy.landmarks_world()["mand_l"])
    right = geometry.apply_affine(to_patient, ph.anatomy.landmarks_world()["mand_r"])
    np.testing.assert_allclose(left * [-1, 1, 1], right, atol=1e-6)


def test_folder_layout_and_group_file(phantom_dir: Path) -> None:
    assert sorted(p.name for p in phantom_dir.iterdir()) == ["groups.json", "images", "landmarks.csv",
                                                             "phantoms.json"]
    header = (phantom_dir / "landmarks.csv").read_text().splitlines()[0]
    assert header == "case,name,x_ras,y_ras,z_ras"
    doc = json.loads((phantom_dir / "groups.json").read_text())
    assert doc["groups"] == [{"name": "mid_sagittal", "landmarks": ["chin", "occ_bone"], "axis": "LR"}]
    assert doc["independent"] == ["mand_l", "mand_r", "odont_p"]
    (group,) = read_groups(phantom_dir / "groups.json")
    assert group.landmarks == ("chin", "occ_bone") and group.axis == "LR"
    ds = load_dataset(phantom_dir)
    assert ds.form == "phantom" and ds.names == LANDMARK_NAMES and ds.groups == (group,)


def test_world_coordinates_match_the_image_through_nibabel(phantom_dir: Path) -> None:
    """The table's RAS points, mapped through nibabel's own affine, land on the anatomy in the voxels."""
    ds = load_dataset(phantom_dir)
    codes = set()
    for s in ds:
        img = nib.load(s.image_path)
        codes.add("".join(nib.aff2axcodes(img.affine)))
        arr = np.asarray(img.dataobj)
        assert arr.dtype == np.int16
        assert s.landmarks is not None
        np.testing.assert_allclose(s.load_image().affine, img.affine)
        if s.landmarks.found[s.landmarks.index("odont_p")]:
            ijk = np.linalg.inv(img.affine) @ np.r_[s.landmarks.position("odont_p"), 1.0]
            assert _hu(arr, ijk[:3]) > 250.0, s.case
    assert len(codes) >= 3, codes  # several axis orders and flips among six cases


def test_cut_off_landmark_is_missing(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, cut_prob=1.0)
    from lmk3d.data.phantoms import generate

    generate(tmp_path, 3, seed=2, config=cfg, progress=None)
    meta = read_phantom_meta(tmp_path)
    table = read_table(tmp_path / "landmarks.csv")
    cut_cases = [c for c, p in meta.items() if p.cut is not None]
    assert cut_cases
    for case in cut_cases:
        cut = meta[case].cut
        assert cut not in table[case].names
        assert set(table[case].names) == set(LANDMARK_NAMES) - {cut}
        ph = make_phantom(2, meta[case].index, cfg)
        assert not ph.volume.contains_ras(ph.anatomy.landmarks_world()[cut][None])[0]


def test_clinical_profile_spacings_sizes_and_pose() -> None:
    cfg = PROFILES["clinical"]
    cases = [sample_case(0, i, cfg) for i in range(40)]  # parameters only: no rendering
    for c in cases:
        spacing = geometry.spacing_from_affine(c.affine)
        slice_axis = int(np.argmax(np.abs(c.affine[2, :3]) / spacing))
        inplane = np.delete(spacing, slice_axis)
        assert np.all((inplane >= 0.5 - 1e-9) & (inplane <= 1.2 + 1e-9))
        assert 1.0 - 1e-9 <= spacing[slice_axis] <= 3.0 + 1e-9
        assert max(c.size) <= 512 and c.size[slice_axis] <= 300
        assert 10.0 <= c.noise_hu <= 40.0
        rot = c.patient_to_world[:3, :3]
        pitch = np.degrees(np.arctan2(rot[2, 1], rot[1, 1]))
        assert abs(pitch) <= 16.0
    assert len({c.size[2] for c in cases}) > 5
    assert any(c.artefact is not None for c in cases) and any(c.tilt_deg != 0 for c in cases)


def test_cli_size_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "set"
    rc = main(["phantoms", "--out", str(out), "--n", "1", "--seed", "0", "--profile", "small",
               "--size", "48,40,32", "--preview"])
    assert rc == 0
    assert nib.load(out / "images" / "hn_0000.nii.gz").shape == (48, 40, 32)
    assert (out / "preview.png").stat().st_size > 10_000
    assert main(["phantoms", "--out", str(out), "--n", "1", "--size", "4,4"]) == 2
