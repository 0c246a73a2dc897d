"""lmk3d.io.labels: one reader for every label an annotator sends back (points, label maps, SRs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmk3d.errors import LandmarkFormatError
from lmk3d.io import Volume
from lmk3d.io.fcsv import write_fcsv
from lmk3d.io.label_map import write_label_map
from lmk3d.io.labels import label_kind, label_value_map, read_label
from lmk3d.io.markups import write_markups
from lmk3d.landmarks import LandmarkSet

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
