"""Landmark files: every format round-trips; the shared files load; malformed input fails clearly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lmk3d.errors import ImageReadError, LandmarkFormatError
from lmk3d.io import read_collection, read_image, read_landmarks, write_image, write_landmarks
from lmk3d.io.label_map import landmarks_from_label_map, sphere_label_map
from lmk3d.io.markups import markups_dict, validate_markups
from lmk3d.io.table import read_json_table, read_table, write_json_table, write_table
from lmk3d.landmarks import LandmarkSet
from tests.conftest import DATA, SCHEMA, oblique_affine

AFIDS = DATA / "afids_mni152"


def example_set() -> LandmarkSet:
    return LandmarkSet(
        ("chin", "mand_l", "mand_r", "odont_p"),
        np.array([[1.25, -80.5, -40.0], [45.0, -30.125, -50.0], [-44.0, -31.0, -49.5], [np.nan] * 3]),
        np.array([0.93, 0.5, 0.125, 0.0]),
        np.array([True, True, False, False]),
    )


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv", ".json", ".csv"])
def test_roundtrip_point_formats(tmp_path, suffix):
    s = example_set()
    path = write_landmarks(tmp_path / f"case{suffix}", s)
    back = read_landmarks(path)
    assert back.names == s.names
    np.testing.assert_array_equal(back.found, s.found)
    np.testing.assert_allclose(back.xyz_mm_ras[:3], s.xyz_mm_ras[:3], atol=1e-4)
    np.testing.assert_allclose(back.scores, s.scores, atol=1e-3)


def test_markups_written_lps_valid_against_slicer_schema(tmp_path):
    s = example_set()
    path = write_landmarks(tmp_path / "case.mrk.json", s)
    doc = json.loads(path.read_text())
    validate_markups(doc, SCHEMA)
    m = doc["markups"][0]
    assert m["type"] == "Fiducial" and m["coordinateSystem"] == "LPS"
    cps = m["controlPoints"]
    assert [c["label"] for c in cps] == list(s.names)
    np.testing.assert_allclose(cps[0]["position"], [-1.25, 80.5, -40.0])
    assert cps[0]["positionStatus"] == "defined" and cps[2]["positionStatus"] == "undefined"
    assert "score=0.930" in cps[0]["description"]


def test_markups_ras_file_reads_as_ras(tmp_path):
    doc = markups_dict(example_set(), coordinate_system="RAS")
    validate_markups(doc, SCHEMA)
    (tmp_path / "ras.mrk.json").write_text(json.dumps(doc))
    np.testing.assert_allclose(read_landmarks(tmp_path / "ras.mrk.json").xyz_mm_ras[0], [1.25, -80.5, -40.0])


def test_afids_fcsv_loads_with_32_names():
    gt = read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv")
    assert len(gt) == 32 and gt.found.all()
    assert gt.names[:2] == ("AC", "PC")
    ref = {r.split(",")[0]: r for r in (AFIDS / "landmarks_groundtruth_ras_and_voxel.csv").read_text().splitlines()}
    # the shared table lists the same points (AFID01_AC ...) in RAS
    ac = [float(v) for v in ref["AFID01_AC"].split(",")[1:4]]
    np.testing.assert_allclose(gt.position("AC"), ac, atol=1e-3)
    # The raters' files name points by description or by acronym (see afids_names.csv): map both
    # to the AFID number and compare each rater with the ground truth point by point.
    rows = [line.split(",") for line in (AFIDS / "afids_names.csv").read_text().splitlines()[1:]]
    number = {r[1]: int(r[0]) for r in rows} | {r[2]: int(r[0]) for r in rows}
    assert [number[n] for n in gt.names] == list(range(1, 33))
    for rater in (1, 2, 4):
        r = read_landmarks(AFIDS / f"tpl-MNI152NLin2009cSym_res-1_desc-rater0{rater}_afids.fcsv")
        assert sorted(number[n] for n in r.names) == list(range(1, 33))
        by_number = r.reorder(sorted(r.names, key=lambda n: number[n]))
        assert np.linalg.norm(by_number.xyz_mm_ras - gt.xyz_mm_ras, axis=1).mean() < 3.0
    # rater 3's file labels both inferior AM temporal horns 'RIAMTH' (the second is on the left):
    # a real duplicate, refused with a message that names the file and the landmark.
    with pytest.raises(LandmarkFormatError, match=r"rater03_afids\.fcsv: duplicate landmark names: RIAMTH"):
        read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-rater03_afids.fcsv")


def test_afids_ac_pc_on_anatomy():
    """AC and PC are small white-matter bundles on the midline: bright in T1, between dark CSF spaces.

    The MNI template intensity at each point must be brighter than the ventricle/CSF level and the
    points must sit on the mid-sagittal plane (x ~ 0), AC anterior to PC by about 25-30 mm.
    """
    vol = read_image(AFIDS / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gt = read_landmarks(AFIDS / "tpl-MNI152NLin2009cSym_res-1_desc-groundtruth_afids.fcsv")
    brain = vol.array[vol.array > np.percentile(vol.array, 60)]
    for name in ("AC", "PC"):
        i, j, k = np.round(vol.ras_to_ijk(gt.position(name))).astype(int)
        assert vol.array[i, j, k] > np.percentile(brain, 50), f"{name} is not on white matter"
        assert abs(gt.position(name)[0]) < 1.0
    d = gt.position("AC")[1] - gt.position("PC")[1]
    assert 24.0 < d < 32.0


def test_fcsv_lps_input(tmp_path):
    text = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            "1,-10,20,30,0,0,0,1,1,1,0,A,,\n")
    (tmp_path / "a.fcsv").write_text(text)
    np.testing.assert_allclose(read_landmarks(tmp_path / "a.fcsv").position("A"), [10, -20, 30])


def test_table_roundtrip_and_shared_format(tmp_path):
    shared = read_table(DATA / "hippocampus" / "landmarks.csv")
    assert len(shared) == 200
    first = next(iter(shared.values()))
    assert first.names == ("HIPPO_ANTERIOR_CENTROID", "HIPPO_POSTERIOR_CENTROID", "HIPPO_ANTERIOR_TIP",
                           "HIPPO_POSTERIOR_TIP")
    write_table(tmp_path / "t.csv", shared, with_scores=False)
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == "case,name,x_ras,y_ras,z_ras"
    back = read_table(tmp_path / "t.csv")
    assert list(back) == list(shared)
    assert all(back[c].allclose(shared[c], atol_mm=1e-4) for c in shared)
    # partial annotation and predictions with scores
    sets = {"a": example_set(), "b": example_set().reorder(["odont_p", "chin"])}
    write_table(tmp_path / "p.csv", sets)
    back = read_table(tmp_path / "p.csv")
    assert back["a"].allclose(sets["a"], 1e-4) and back["b"].allclose(sets["b"], 1e-4)
    write_json_table(tmp_path / "p.json", sets)
    assert read_json_table(tmp_path / "p.json")["a"].allclose(sets["a"], 1e-9)
    assert read_collection(tmp_path / "p.json")["b"].names == ("odont_p", "chin")


@pytest.mark.parametrize("seed", [0, 1])
def test_sphere_label_map_roundtrip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    affine = oblique_affine(rng, spacing=(0.8, 0.8, 1.5))
    shape = (60, 50, 40)
    ijk = np.array([[30, 25, 20], [10, 12, 30], [45, 40, 8], [20, 35, 25.5]], dtype=float)
    s = LandmarkSet.from_ijk(("a", "b", "c", "d"), ijk, affine, found=np.array([True, True, True, False]))
    ref = write_image(tmp_path / "img.nii.gz", np.zeros(shape, np.float32), affine)
    path = write_landmarks(tmp_path / "lab.nii.gz", s, reference=read_image(ref))
    lab = nib.load(str(path)).get_fdata()
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}  # d is not found: not drawn
    back = read_landmarks(path, names=s.names)
    np.testing.assert_array_equal(back.found, s.found)
    np.testing.assert_allclose(back.xyz_mm_ras[:3], s.xyz_mm_ras[:3], atol=0.35)


def test_sphere_clipped_at_border_is_recovered():
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = (40, 40, 40)
    centre = np.array([[1.2, 20.0, 38.6]])  # 1.2 voxels from one face, 1.4 from another
    s = LandmarkSet.from_ijk(("edge",), centre, affine)
    lab = sphere_label_map(s, shape, affine, radius_mm=4.0)
    naive = np.argwhere(lab == 1).mean(axis=0)
    back = landmarks_from_label_map(lab, affine, ["edge"])
    err = np.linalg.norm(back.xyz_mm_ras[0] - centre[0])
    assert err < 0.4, f"clipped sphere centre off by {err:.2f} mm"
    assert np.linalg.norm(naive - centre[0]) > 2 * err  # the plain centre of mass would be biased


# --- bad input -------------------------------------------------------------------------------------
def test_markups_missing_fields_and_unknown_system(tmp_path):
    good = markups_dict(example_set())
    bad = json.loads(json.dumps(good))
    del bad["markups"][0]["controlPoints"][0]["label"]
    (tmp_path / "nolabel.mrk.json").write_text(json.dumps(bad))
    with pytest.raises(LandmarkFormatError, match=r"nolabel\.mrk\.json.*label"):
        read_landmarks(tmp_path / "nolabel.mrk.json")
    bad = json.loads(json.dumps(good))
    bad["markups"][0]["coordinateSystem"] = "XYZ"
    (tmp_path / "sys.mrk.json").write_text(json.dumps(bad))
    with pytest.raises(LandmarkFormatError, match="coordinateSystem 'XYZ'"):
        read_landmarks(tmp_path / "sys.mrk.json")
    bad = json.loads(json.dumps(good))
    del bad["markups"][0]["controlPoints"][0]["position"]
    (tmp_path / "nopos.mrk.json").write_text(json.dumps(bad))
    with pytest.raises(LandmarkFormatError, match="position"):
        read_landmarks(tmp_path / "nopos.mrk.json")
    (tmp_path / "trunc.mrk.json").write_text(json.dumps(good)[:100])
    with pytest.raises(LandmarkFormatError, match="not valid JSON"):
        read_landmarks(tmp_path / "trunc.mrk.json")
    (tmp_path / "other.mrk.json").write_text(json.dumps({"markups": [{"type": "Line"}]}))
    with pytest.raises(LandmarkFormatError, match="Fiducial"):
        read_landmarks(tmp_path / "other.mrk.json")


def test_fcsv_unknown_system_and_bad_rows(tmp_path):
    (tmp_path / "a.fcsv").write_text("# CoordinateSystem = 7\n1,0,0,0,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(LandmarkFormatError, match="CoordinateSystem '7'"):
        read_landmarks(tmp_path / "a.fcsv")
    (tmp_path / "b.fcsv").write_text("# CoordinateSystem = 0\n1,x,0,0,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(LandmarkFormatError, match=r"b\.fcsv.*not numbers"):
        read_landmarks(tmp_path / "b.fcsv")


def test_duplicate_names(tmp_path):
    with pytest.raises(LandmarkFormatError, match="duplicate landmark names: A"):
        LandmarkSet(("A", "B", "A"), np.zeros((3, 3)))
    (tmp_path / "d.fcsv").write_text("1,0,0,0,0,0,0,1,1,1,0,A,,\n2,1,1,1,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(LandmarkFormatError, match=r"d\.fcsv.*duplicate"):
        read_landmarks(tmp_path / "d.fcsv")
    (tmp_path / "d.csv").write_text("case,name,x_ras,y_ras,z_ras\nc,A,0,0,0\nc,A,1,1,1\n")
    with pytest.raises(LandmarkFormatError, match=r"d\.csv:3: duplicate landmark 'A'"):
        read_table(tmp_path / "d.csv")


def test_table_unknown_and_missing_columns(tmp_path):
    (tmp_path / "u.csv").write_text("case,name,x_ras,y_ras,z_ras,colour\nc,A,0,0,0,red\n")
    with pytest.raises(LandmarkFormatError, match="unknown column.*colour"):
        read_table(tmp_path / "u.csv")
    (tmp_path / "m.csv").write_text("case,name,x,y,z\nc,A,0,0,0\n")
    with pytest.raises(LandmarkFormatError, match="missing column.*x_ras"):
        read_table(tmp_path / "m.csv")
    (tmp_path / "f.csv").write_text("case,name,x_ras,y_ras,z_ras,score,found\nc,A,0,0,0,0.5,maybe\n")
    with pytest.raises(LandmarkFormatError, match="maybe"):
        read_table(tmp_path / "f.csv")


def test_label_map_unknown_values_and_missing_names(tmp_path):
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:4, 2:4, 2:4] = 3
    with pytest.raises(LandmarkFormatError, match=r"values \[3\] have no landmark name"):
        landmarks_from_label_map(lab, np.eye(4), ["a", "b"])
    write_image(tmp_path / "l.nii.gz", lab, np.eye(4))
    with pytest.raises(LandmarkFormatError, match="needs the landmark names"):
        read_landmarks(tmp_path / "l.nii.gz")


def test_unknown_landmark_suffix(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(LandmarkFormatError, match=r"x\.txt: unknown landmark file type"):
        read_landmarks(tmp_path / "x.txt")


# --- images ----------------------------------------------------------------------------------------
def test_truncated_and_unreadable_images(tmp_path):
    src = DATA / "hippocampus" / "images" / "hippocampus_004.nii.gz"
    data = src.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"trunc\.nii\.gz: cannot read"):
        read_image(tmp_path / "trunc.nii.gz")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match=r"junk\.nrrd: cannot read"):
        read_image(tmp_path / "junk.nrrd")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "absent.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM"):
        read_image(tmp_path / "empty")


def test_2d_4d_and_nan_images(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(ImageReadError, match=r"flat\.nii\.gz: expected a 3D image, got 2D"):
        read_image(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(ImageReadError, match="single slice"):
        read_image(tmp_path / "slice.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with pytest.raises(ImageReadError, match="got 4D"):
        read_image(tmp_path / "t.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 1), np.float32), np.eye(4)), str(tmp_path / "t1.nii.gz"))
    assert read_image(tmp_path / "t1.nii.gz").shape == (8, 8, 8)
    arr = np.zeros((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ImageReadError, match=r"nan\.nii\.gz: 1 voxels are NaN"):
        read_image(tmp_path / "nan.nii.gz")
