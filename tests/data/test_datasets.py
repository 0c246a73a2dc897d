"""Dataset readers (every form gives the same samples) and the case-level split."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmk3d.data import (
    LandmarkGroup,
    Split,
    apply_split,
    image_geometry,
    load_dataset,
    make_split,
    model_split,
    read_groups,
    read_split,
    write_groups,
    write_split,
)
from lmk3d.data.phantoms import PROFILES, generate
from lmk3d.errors import LandmarkFormatError
from lmk3d.io import Volume, read_image, read_table, write_image, write_landmarks, write_table
from tests.conftest import DATA, oblique_affine

HIPPOCAMPUS = DATA / "hippocampus"


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hn")
    generate(out, 4, seed=21, config=PROFILES["small"], progress=None)
    return out


def _same(a: list, b: list) -> None:
    assert [s.case for s in a] == [s.case for s in b]
    for x, y in zip(a, b, strict=True):
        assert os.path.samefile(x.image_path, y.image_path) or x.image_path.read_bytes() == y.image_path.read_bytes()
        assert (x.landmarks is None) == (y.landmarks is None)
        if x.landmarks is not None:
            assert x.landmarks.reorder(y.landmarks.names).allclose(y.landmarks, atol_mm=1e-3), x.case


def test_three_forms_give_the_same_samples(phantom_dir: Path, tmp_path: Path) -> None:
    phantom = load_dataset(phantom_dir)
    # (a) a plain table folder, the hippocampus layout
    table = tmp_path / "table"
    (table / "images").mkdir(parents=True)
    shutil.copy(phantom_dir / "landmarks.csv", table / "landmarks.csv")
    for s in phantom:
        (table / "images" / s.image_path.name).symlink_to(s.image_path)
    # (b) per-case Slicer files beside the images, half .mrk.json (LPS) and half .fcsv (RAS)
    per_case = tmp_path / "per_case"
    per_case.mkdir()
    for k, s in enumerate(phantom):
        (per_case / s.image_path.name).symlink_to(s.image_path)
        assert s.landmarks is not None
        write_landmarks(per_case / f"{s.case}{'.mrk.json' if k % 2 else '.fcsv'}", s.landmarks)
    # (c) a table CSV with an explicit image folder
    forms = {"table": load_dataset(table), "per_case": load_dataset(per_case),
             "csv": load_dataset(phantom_dir / "landmarks.csv", images=phantom_dir / "images")}
    assert phantom.form == "phantom" and forms["table"].form == "table" and forms["per_case"].form == "per_case"
    for name, ds in forms.items():
        _same(list(phantom), list(ds))
        assert ds.names == phantom.names, name


def test_per_case_files_in_a_landmarks_folder_and_unlabelled_images(phantom_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "landmarks").mkdir()
    phantom = load_dataset(phantom_dir)
    for s in phantom:
        (root / "images" / s.image_path.name).symlink_to(s.image_path)
    labelled = phantom[:2]
    for s in labelled:
        assert s.landmarks is not None
        write_landmarks(root / "landmarks" / f"{s.case}.mrk.json", s.landmarks)
    ds = load_dataset(root)
    assert len(ds) == len(phantom)
    assert [s.case for s in ds.labelled()] == [s.case for s in labelled]
    assert all(s.landmarks is None for s in ds if s.case not in {x.case for x in labelled})
    assert set(ds.truth()) == {s.case for s in labelled}


def test_landmarks_without_an_image_name_the_case(phantom_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(phantom_dir, root)
    sets = read_table(root / "landmarks.csv")
    sets["ghost_case_17"] = next(iter(sets.values()))
    write_table(root / "landmarks.csv", sets, with_scores=False)
    with pytest.raises(LandmarkFormatError, match="ghost_case_17"):
        load_dataset(root)


def test_clear_errors(phantom_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LandmarkFormatError, match="no such file or folder"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LandmarkFormatError, match="no images"):
        load_dataset(tmp_path / "empty")
    dup = tmp_path / "dup"
    dup.mkdir()
    s = load_dataset(phantom_dir)[0]
    (dup / s.image_path.name).symlink_to(s.image_path)
    assert s.landmarks is not None
    write_landmarks(dup / f"{s.case}.mrk.json", s.landmarks)
    write_landmarks(dup / f"{s.case}.fcsv", s.landmarks)
    with pytest.raises(LandmarkFormatError, match="two landmark files"):
        load_dataset(dup)


def test_hippocampus_folder_and_csv_forms() -> None:
    ds = load_dataset(HIPPOCAMPUS)
    assert len(ds) == 200 and ds.form == "table" and not ds.groups
    assert ds.names == ("HIPPO_ANTERIOR_CENTROID", "HIPPO_POSTERIOR_CENTROID", "HIPPO_ANTERIOR_TIP",
                        "HIPPO_POSTERIOR_TIP")
    assert list(ds.cases) == sorted(ds.cases)
    by_csv = load_dataset(HIPPOCAMPUS / "landmarks.csv")
    _same(list(ds)[:20], list(by_csv)[:20])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_header_geometry_equals_the_reader(tmp_path: Path, rng: np.random.Generator, suffix: str) -> None:
    affine = oblique_affine(rng, spacing=(0.6, 1.1, 2.7), flip=(-1, 1, -1))
    path = write_image(tmp_path / f"img{suffix}", Volume(np.zeros((7, 9, 5), np.int16), affine))
    shape, aff = image_geometry(path)
    vol = read_image(path)
    assert shape == vol.shape == (7, 9, 5)
    np.testing.assert_allclose(aff, vol.affine, atol=1e-6)


# --- split ------------------------------------------------------------------------------------------
def test_split_is_deterministic_case_level_and_disjoint() -> None:
    cases = load_dataset(HIPPOCAMPUS).cases
    a, b = make_split(cases), make_split(list(reversed(cases)))
    assert a == b  # depends on the set of cases and the seed only
    assert (len(a.train), len(a.val), len(a.test)) == (140, 20, 40)
    parts = [set(a.train), set(a.val), set(a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(cases)
    assert make_split(cases, seed=1).test != a.test
    assert a.subset("all") == tuple(sorted(cases))


def test_split_small_sets_and_bad_fractions() -> None:
    s = make_split(["a", "b", "c", "d", "e"])
    assert (len(s.train), len(s.val), len(s.test)) == (3, 1, 1)
    with pytest.raises(LandmarkFormatError, match="summing to 1"):
        make_split(["a", "b", "c"], (0.5, 0.5, 0.5))
    with pytest.raises(LandmarkFormatError, match="duplicate"):
        make_split(["a", "a", "b"])
    with pytest.raises(LandmarkFormatError, match="leave one for training"):
        make_split(["a", "b"], (0.0, 0.5, 0.5))


def test_split_file_roundtrip_and_apply(tmp_path: Path) -> None:
    ds = load_dataset(HIPPOCAMPUS)
    split = make_split(ds.cases, seed=3)
    path = write_split(tmp_path / "split.json", split, {"data": str(HIPPOCAMPUS)})
    doc = json.loads(path.read_text())
    assert doc["seed"] == 3 and doc["counts"] == {"train": 140, "val": 20, "test": 40}
    assert read_split(path) == split and read_split(tmp_path) == split
    train, val, test = apply_split(list(ds), split)
    assert [s.case for s in test] == list(split.test)
    cut = model_split(tmp_path, HIPPOCAMPUS)  # a model folder holding split.json
    assert cut.split == split and [s.case for s in cut.test] == list(split.test)
    assert [s.case for s in cut.train] == [s.case for s in train] and len(cut.val) == len(val) == 20
    doc["val"].append(doc["train"][0])
    path.write_text(json.dumps(doc))
    with pytest.raises(LandmarkFormatError, match="both"):
        read_split(path)
    with pytest.raises(LandmarkFormatError, match="not in the data"):
        apply_split(list(ds)[:10], split)
    assert isinstance(split, Split)


def test_groups_roundtrip_and_validation(tmp_path: Path) -> None:
    groups = (LandmarkGroup("mid_sagittal", ("chin", "occ_bone"), "LR"),)
    path = write_groups(tmp_path / "groups.json", groups, ["chin", "mand_l", "occ_bone"])
    assert read_groups(path) == groups
    assert json.loads(path.read_text())["independent"] == ["mand_l"]
    path.write_text(json.dumps({"groups": [{"name": "g", "landmarks": ["a"], "axis": "XY"}]}))
    with pytest.raises(LandmarkFormatError, match="LR, AP, SI"):
        read_groups(path)
