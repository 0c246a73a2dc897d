"""DICOM SR (TID 1500, Comprehensive 3D SR) landmark reports on the real DICOM series in ../shared/data.

Landmarks are placed at known voxel indices of each series, converted with the series' own affine
(``lmk3d.io.read_image``), written with ``write_sr``, and read back three ways: with highdicom's
parser, with ``read_sr``, and with dcmtk's ``dsrdump``. Independently of lmk3d's geometry, every
point must also equal the patient position of its voxel computed from the DICOM headers
(Image Position/Orientation (Patient), Pixel Spacing). dicom3tools' ``dciodvfy`` must report no error.

The abdominal CT series has empty SOP/Study/Series Instance UIDs in its data sets (a damaged
anonymisation; only the file meta keeps the SOP UIDs). ``repaired_ct_series`` writes a copy with the
SOP UIDs from the file meta and stable Study/Series UIDs; the raw series is refused with a message.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import lmk3d
from lmk3d import LandmarkSet
from lmk3d.errors import ImageReadError, LandmarkFormatError
from lmk3d.io import read_image
from lmk3d.io.dicom_sr import (
    LANDMARK_CODES,
    SCHEME,
    build_sr,
    landmark_coding,
    load_source_series,
    read_sr,
    sr_frame_of_reference_uids,
    write_sr,
)
from tests.conftest import DATA

MR_SERIES = DATA / "dicom" / "mr_brain_sagittal_mprage"
CT_SERIES_RAW = DATA / "ct_abdomen_examples" / "example_ct_dicom"
TOL_MM = 1e-3


# ------------------------------------------------------------------------------------------------
# helpers shared with tests/test_pacs.py


def repaired_ct_series(dst: Path) -> Path:
    """Copy the abdominal CT series into ``dst`` with usable UIDs (see the module docstring)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(CT_SERIES_RAW.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        # Stable across runs: derived from the series' frame of reference.
        ds.StudyInstanceUID = generate_uid(entropy_srcs=["lmk3d test CT study", str(ds.FrameOfReferenceUID)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["lmk3d test CT series", str(ds.FrameOfReferenceUID)])
        ds.save_as(dst / f.name, write_like_original=False)
    return dst


def read_series(folder: Path) -> list[Dataset]:
    """All DICOM files of a folder (pixel data included), skipping non-DICOM files."""
    out = []
    for f in sorted(folder.iterdir()):
        try:
            out.append(pydicom.dcmread(f))
        except pydicom.errors.InvalidDicomError:
            continue
    return out


def header_lps(datasets: Sequence[Dataset], ijk: np.ndarray) -> np.ndarray:
    """Patient (LPS mm) positions of integer voxels ``(N, 3)`` from the DICOM headers alone.

    ``i`` runs along a row (column index), ``j`` down a column (row index), ``k`` over the slices
    sorted along the slice normal: the order SimpleITK/GDCM (and so ``read_image``) use.
    """
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices = sorted(datasets, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)  # row spacing, column spacing
    out = []
    for i, j, k in np.asarray(ijk, dtype=int):
        origin = np.asarray(slices[k].ImagePositionPatient, dtype=np.float64)
        out.append(origin + i * dc * row_dir + j * dr * col_dir)
    return np.array(out)


def landmarks_for(folder: Path) -> tuple[LandmarkSet, np.ndarray]:
    """Landmarks at integer voxels spread over the volume (table names, an unknown name, one not found).

    Returns:
        The landmarks (RAS) and their voxel indices ``(N, 3)`` (the not-found one has a made-up index).
    """
    vol = read_image(folder)
    hi = np.array(vol.shape) - 1
    ijk = np.array([[0, 0, 0], hi // 3, hi // 2 + 1, hi, [hi[0], 0, hi[2] // 4]])
    names = ["AC", "HIPPO_ANTERIOR_TIP", "kidney_left_centroid", "some point (not in the table)", "PC"]
    found = np.array([True, True, True, True, False])
    lm = LandmarkSet.from_ijk(names, ijk.astype(float), vol.affine, scores=np.array([0.9, 0.75, 0.5, 0.25, 0.05]),
                              found=found)
    return lm, ijk


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return repaired_ct_series(tmp_path_factory.mktemp("ct") / "example_ct_dicom")


@pytest.fixture(scope="module", params=["mr_sagittal_oblique", "ct_abdomen"])
def case(request: pytest.FixtureRequest, ct_series: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One written SR per series: folder, header datasets, landmarks, voxel indices and SR path."""
    folder, n_slices = (MR_SERIES, 192) if request.param == "mr_sagittal_oblique" else (ct_series, 20)
    lm, ijk = landmarks_for(folder)
    path = write_sr(tmp_path_factory.mktemp("sr") / "landmarks.dcm", lm, folder,
                    algorithm_parameters=["detector=pin"])
    return {"folder": folder, "series": load_source_series(folder), "landmarks": lm, "ijk": ijk, "sr": path,
            "n_slices": n_slices}


# ------------------------------------------------------------------------------------------------
# geometry round trips


def test_read_sr_round_trips_landmarks(case: dict) -> None:
    lm, back = case["landmarks"], read_sr(case["sr"])
    assert back.names == lm.names  # document order, not-found groups included
    assert np.array_equal(back.found, lm.found)
    assert np.allclose(back.xyz_mm_ras[lm.found], lm.xyz_mm_ras[lm.found], atol=TOL_MM, rtol=0)
    assert np.all(np.isnan(back.xyz_mm_ras[~lm.found]))
    assert np.allclose(back.scores, lm.scores)


def test_points_are_the_voxels_patient_positions_from_the_dicom_headers(case: dict) -> None:
    """The SR's LPS points, parsed by highdicom, equal the header-derived voxel positions."""
    lm, series = case["landmarks"], case["series"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(case["sr"]))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [n for n, f in zip(lm.names, lm.found, strict=True) if f]
    points = np.array([np.asarray(g.roi.value, dtype=float).reshape(3) for g in groups])
    assert all(g.roi.graphic_type == hd.sr.GraphicTypeValues3D.POINT for g in groups)
    expected = header_lps(series, case["ijk"][lm.found])
    assert np.abs(points - expected).max() < TOL_MM
    frame = str(series[0].FrameOfReferenceUID)
    assert {str(g.roi.frame_of_reference_uid) for g in groups} == {frame}
    assert sr_frame_of_reference_uids(pydicom.dcmread(case["sr"])) == {frame}


def test_read_sr_checks_the_frame_of_reference(case: dict) -> None:
    frame = str(case["series"][0].FrameOfReferenceUID)
    assert read_sr(case["sr"], frame_of_reference_uid=frame).allclose(read_sr(case["sr"]))
    with pytest.raises(LandmarkFormatError, match="frame of reference"):
        read_sr(case["sr"], frame_of_reference_uid="1.2.3.4")


# ------------------------------------------------------------------------------------------------
# document content


def test_sr_references_the_source_series_and_copies_patient_and_study(case: dict) -> None:
    series = case["series"]
    sr = pydicom.dcmread(case["sr"])
    src = series[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.Modality == "SR"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                    "AccessionNumber"):
        assert str(sr.get(keyword, "")) == str(src.get(keyword, "")), keyword
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == src.StudyInstanceUID
    (ref_series,) = evidence[0].ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
    referenced = {str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedSOPSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in series}
    assert len(referenced) == case["n_slices"]


def test_measurement_groups_carry_tracking_codes_and_algorithm(case: dict) -> None:
    lm = case["landmarks"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(case["sr"]))
    planar = sr.content.get_planar_roi_measurement_groups()
    others = sr.content.get_image_measurement_groups()
    groups = {g.tracking_identifier: g for g in [*planar, *others]}
    assert set(groups) == set(lm.names)
    uids = {g.tracking_uid for g in groups.values()}
    assert len(uids) == len(lm)
    for name, g in groups.items():
        coding = landmark_coding(name)
        assert (g.finding_type.value, g.finding_type.scheme_designator) == (coding.finding.value,
                                                                            coding.finding.scheme_designator)
        if coding.site is not None:
            assert [s.value.value for s in g.finding_sites] == [coding.site.value]
        # TID 4019 Algorithm Identification: name (111001), version (111003), parameters (111002).
        texts: dict[str, list[str]] = {}
        for item in g[0].ContentSequence:
            if item.ValueType == "TEXT":
                texts.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item.TextValue)
        assert texts["111001"] == ["lmk3d"]
        assert texts["111003"] == [lmk3d.__version__]
        assert texts["111002"] == ["detector=pin"]
    # The not-found landmark is a TID 1501 group without coordinates, evaluated "Not found".
    (missing,) = others
    assert missing.tracking_identifier == "PC"
    (status,) = missing.get_qualitative_evaluations()
    assert (status.value.value, status.value.scheme_designator) == ("NOT_FOUND", SCHEME)


def test_tracking_uids_are_stable_and_instances_new(case: dict, tmp_path: Path) -> None:
    lm = case["landmarks"]
    again = write_sr(tmp_path / "again.dcm", lm, case["series"], algorithm_parameters=["detector=pin"])
    a, b = (hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(p)) for p in (case["sr"], again))
    assert a.SOPInstanceUID != b.SOPInstanceUID

    def tracking(sr: hd.sr.Comprehensive3DSR) -> dict[str, str]:
        groups = [*sr.content.get_planar_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]
        return {g.tracking_identifier: str(g.tracking_uid) for g in groups}

    assert tracking(a) == tracking(b)


def test_datasets_and_folder_give_the_same_report(case: dict) -> None:
    lm = case["landmarks"]
    from_datasets = build_sr(lm, read_series(case["folder"]))
    # In memory the points are float64; the file stores them as FL (float32): ~1e-5 mm apart.
    assert read_sr(from_datasets).allclose(read_sr(case["sr"]), atol_mm=TOL_MM)
    assert from_datasets.PatientID == pydicom.dcmread(case["sr"]).PatientID


# ------------------------------------------------------------------------------------------------
# external validators


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {'dcmtk' if tool == 'dsrdump' else 'dicom3tools'}; "
                    "scripts/install_system_tools.sh installs it as root)")
    return path


def test_dsrdump_parses_the_sr_and_prints_the_same_points(case: dict) -> None:
    dsrdump = _require("dsrdump")
    run = subprocess.run([dsrdump, "+Pu", "+Pl", str(case["sr"])], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Comprehensive 3D SR" in run.stdout
    assert not re.search(r"\b(E|W):", run.stderr), run.stderr  # dcmtk logs errors/warnings as "E:"/"W:"
    points: dict[str, tuple[str, np.ndarray]] = {}
    current = None
    for line in run.stdout.splitlines():
        m = re.search(r'"Tracking Identifier"\)="(.*)">', line)
        if m:
            current = m.group(1)
        m = re.search(r'SCOORD3D:.*=\(POINT,"([0-9.]+)",([-0-9.e+]+)/([-0-9.e+]+)/([-0-9.e+]+)\)', line)
        if m:
            assert current is not None
            points[current] = (m.group(1), np.array([float(v) for v in m.group(2, 3, 4)]))
    lm, series = case["landmarks"], case["series"]
    assert list(points) == [n for n, f in zip(lm.names, lm.found, strict=True) if f]
    assert {frame for frame, _ in points.values()} == {str(series[0].FrameOfReferenceUID)}
    printed = np.array([xyz for _, xyz in points.values()])
    assert np.abs(printed - lm.xyz_mm_lps[lm.found]).max() < TOL_MM
    assert np.abs(printed - header_lps(series, case["ijk"][lm.found])).max() < TOL_MM


def test_dciodvfy_reports_no_errors(case: dict) -> None:
    dciodvfy = _require("dciodvfy")
    run = subprocess.run([dciodvfy, str(case["sr"])], capture_output=True, text=True, timeout=300)
    report = run.stdout + run.stderr
    assert "Comprehensive3DSR" in report, report  # it recognised the IOD
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert run.returncode == 0, report


# ------------------------------------------------------------------------------------------------
# codes


def test_snomed_codes_in_the_table_are_those_dicom_uses() -> None:
    """Every SCT code of the table is in DICOM PS3.16 (pydicom's concept dictionary) with that meaning."""
    from pydicom.sr._concepts_dict import concepts

    sct: dict[str, set[str]] = {}
    for entries in concepts["SCT"].values():
        for code, (meaning, _) in entries.items():
            sct.setdefault(code, set()).add(meaning.lower())
    codes = [c for coding in LANDMARK_CODES.values() for c in (coding.finding, coding.site, coding.laterality) if c]
    assert any(c.scheme_designator == "SCT" for c in codes)
    for c in codes:
        assert c.scheme_designator in ("SCT", SCHEME), c
        if c.scheme_designator == "SCT":
            assert c.value in sct, c
            assert c.meaning.lower() in sct[c.value], (c, sct[c.value])
        assert len(c.value) <= 16, c  # Code Value is SH


def test_standard_concepts_match_pydicom() -> None:
    from pydicom.sr.codedict import codes

    from lmk3d.io import dicom_sr

    pairs = [(dicom_sr._DCM_MODALITY, codes.DCM.Modality), (dicom_sr._DCM_IMAGE_LIBRARY, codes.DCM.ImageLibrary),
             (dicom_sr._DCM_IMAGE_LIBRARY_GROUP, codes.DCM.ImageLibraryGroup),
             (dicom_sr._DCM_FRAME_OF_REFERENCE_UID, codes.DCM.FrameOfReferenceUID),
             (dicom_sr._DCM_DEVICE, codes.cid270.Device), (dicom_sr._UCUM_NO_UNITS, codes.UCUM.NoUnits),
             (dicom_sr._PROCEDURES["CT"], codes.cid100.CTUnspecifiedBodyRegion),
             (dicom_sr._PROCEDURES["MR"], codes.cid100.MRIUnspecifiedBodyRegion),
             (dicom_sr._SCT_IMAGING_PROCEDURE, codes.cid100.ImagingProcedure),
             (dicom_sr._MODALITIES["CT"], codes.DCM.ComputedTomography),
             (dicom_sr._MODALITIES["MR"], codes.DCM.MagneticResonance),
             (dicom_sr._MODALITIES["PT"], codes.DCM.PositronEmissionTomography)]
    for (value, meaning, scheme), code in pairs:
        assert (value, meaning, scheme) == (code.value, code.meaning, code.scheme_designator)


def test_unknown_names_get_stable_local_codes() -> None:
    a, b = landmark_coding("my landmark"), landmark_coding("my landmark")
    assert a == b and a.finding.scheme_designator == SCHEME and len(a.finding.value) <= 16
    assert a.finding.meaning == "my landmark"
    assert landmark_coding("my landmark 2").finding.value != a.finding.value
    assert len(landmark_coding("x" * 200).finding.meaning) == 64
    # The AFIDs tables prefix names with AFIDnn_; the look-up strips it.
    assert landmark_coding("AFID01_AC") == landmark_coding("AC") == LANDMARK_CODES["AC"]


# ------------------------------------------------------------------------------------------------
# bad input


def test_raw_ct_series_with_empty_uids_is_refused() -> None:
    lm = LandmarkSet.from_dict({"AC": (0.0, 0.0, 0.0)})
    with pytest.raises(ImageReadError, match="SOPInstanceUID.*SeriesInstanceUID.*StudyInstanceUID"):
        build_sr(lm, CT_SERIES_RAW)


def test_bad_sources_and_landmarks_are_refused(tmp_path: Path, ct_series: Path) -> None:
    lm = LandmarkSet.from_dict({"AC": (0.0, 0.0, 0.0)})
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ImageReadError, match="no DICOM image instances"):
        build_sr(lm, tmp_path)
    with pytest.raises(ImageReadError, match="not a folder"):
        build_sr(lm, tmp_path / "notes.txt")
    with pytest.raises(LandmarkFormatError, match="no landmarks"):
        build_sr(LandmarkSet((), np.zeros((0, 3))), ct_series)
    # Two series in one folder: refused unless one is named.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in sorted(ct_series.iterdir())[:3] + sorted(MR_SERIES.glob("*.dcm"))[:3]:
        shutil.copy(f, mixed / f.name)
    with pytest.raises(ImageReadError, match="2 image series"):
        build_sr(lm, mixed)
    ct_uid = str(pydicom.dcmread(next(ct_series.iterdir())).SeriesInstanceUID)
    sr = build_sr(lm, mixed, series_uid=ct_uid)
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 3
    with pytest.raises(ImageReadError, match="no image series 1.2.3"):
        build_sr(lm, mixed, series_uid="1.2.3")


def test_read_sr_refuses_what_is_not_a_landmark_sr(tmp_path: Path) -> None:
    with pytest.raises(LandmarkFormatError, match="not a DICOM SR"):
        read_sr(sorted(MR_SERIES.glob("*.dcm"))[0])
    (tmp_path / "x.dcm").write_bytes(b"nothing")
    with pytest.raises(LandmarkFormatError, match="not a DICOM file"):
        read_sr(tmp_path / "x.dcm")
    with pytest.raises(LandmarkFormatError, match="no such file"):
        read_sr(tmp_path / "missing.dcm")


def test_cli_predict_writes_sr_matching_the_table(tmp_path):
    """`lmk3d predict --format sr` on a DICOM folder: the SR holds the same points as predictions.csv."""
    from lmk3d.cli import main
    from lmk3d.io.table import read_table

    model = Path(__file__).resolve().parents[1] / "models" / "mean_shape-hippocampus"
    assert main(["predict", "--model", str(model), "--out", str(tmp_path), "--format", "sr", str(MR_SERIES)]) == 0
    table = read_table(tmp_path / "predictions.csv")[MR_SERIES.name]
    sr = read_sr(tmp_path / f"{MR_SERIES.name}.sr.dcm")
    assert sr.names == table.names
    np.testing.assert_array_equal(sr.found, table.found)
    np.testing.assert_allclose(sr.xyz_mm_ras[sr.found], table.xyz_mm_ras[table.found], atol=1e-3)
    nifti = DATA / "hippocampus" / "images" / "hippocampus_004.nii.gz"
    assert main(["predict", "--model", str(model), "--out", str(tmp_path / "x"), "--format", "sr", str(nifti)]) == 2
