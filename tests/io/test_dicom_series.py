"""lmk3d.io.dicom_series: the series geometry check, and read_image applying it to DICOM folders.

The server (the app's DICOMweb datastore) and the CLI (``lmk3d.io.read_image``) must refuse the same
series with the same message: a tilted (gantry tilt), unevenly spaced or non-parallel series is
refused rather than read as a regular grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lmk3d.errors import ImageReadError, LandmarkError
from lmk3d.io import read_image
from lmk3d.io.dicom_series import check_series_files, check_series_geometry

ROW, COL = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
NORMAL = np.cross(ROW, COL)
N_SLICES, STEP_MM = 8, 2.5


def _positions(defect: str) -> list[np.ndarray]:
    out = []
    for k in range(N_SLICES):
        pos = np.array([-10.0, -12.0, 30.0]) + k * STEP_MM * NORMAL
        if defect == "uneven":
            pos = pos + 0.5 * STEP_MM * NORMAL * (k >= N_SLICES // 2)
        elif defect == "tilt":
            pos = pos + 0.3 * k * ROW
        elif defect == "duplicate" and k == 1:
            pos = pos - STEP_MM * NORMAL
        out.append(pos)
    return out


def _series(defect: str = "", rotate_last: bool = False) -> list[Dataset]:
    """A small CT series (8 slices of 6 x 5 pixels), regular unless ``defect`` says otherwise."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k, pos in enumerate(_positions(defect)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "CT", k + 1
        iop = [*ROW, *COL]
        if rotate_last and k == N_SLICES - 1:
            iop = [1.0, 0.0, 0.0, 0.0, 0.9950042, 0.0998334]  # 5.7 degrees about the row
        ds.ImageOrientationPatient = [f"{v:.7f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = ["0.8", "0.9"]
        ds.SliceThickness = str(STEP_MM)
        ds.Rows, ds.Columns = 5, 6
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.arange(30, dtype=np.uint16).reshape(5, 6) + 100 * k).tobytes()
        out.append(ds)
    return out


def _write(datasets: list[Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"slice{k:03d}.dcm", write_like_original=False)
    return folder


def test_a_regular_series_passes_in_any_order() -> None:
    slices = _series()
    check_series_geometry(slices[::-1])
    check_series_geometry(slices[:1])  # a single slice: nothing to check (the reader decides)


@pytest.mark.parametrize(("defect", "message"), [("uneven", "not evenly spaced"), ("tilt", "gantry tilt"),
                                                 ("duplicate", "same position")])
def test_irregular_series_are_refused_with_the_numbers(defect: str, message: str) -> None:
    with pytest.raises(LandmarkError, match=message):
        check_series_geometry(_series(defect))


def test_slices_of_different_orientations_are_refused() -> None:
    with pytest.raises(LandmarkError, match="different Image Orientation"):
        check_series_geometry(_series(rotate_last=True))


def test_ds_rounding_is_tolerated() -> None:
    slices = _series()
    for ds in slices:  # positions written with 4 decimals, as many scanners do
        ds.ImagePositionPatient = [f"{float(v) + 4e-5:.4f}" for v in ds.ImagePositionPatient]
    check_series_geometry(slices)


def test_check_series_files_reads_headers(tmp_path: Path) -> None:
    folder = _write(_series("tilt"), tmp_path / "tilt")
    with pytest.raises(LandmarkError, match="gantry tilt"):
        check_series_files(sorted(folder.iterdir()))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(LandmarkError, match="junk.dcm"):
        check_series_files([tmp_path / "junk.dcm"])


def test_read_image_reads_a_regular_series(tmp_path: Path) -> None:
    vol = read_image(_write(_series(), tmp_path / "ok"))
    assert vol.shape == (6, 5, N_SLICES)
    np.testing.assert_allclose(vol.spacing_mm, [0.9, 0.8, STEP_MM], atol=1e-4)


@pytest.mark.parametrize(("defect", "message"), [("uneven", "not evenly spaced"), ("tilt", "gantry tilt")])
def test_read_image_refuses_what_the_server_refuses(tmp_path: Path, defect: str, message: str) -> None:
    folder = _write(_series(defect), tmp_path / defect)
    with pytest.raises(ImageReadError, match=message) as e:
        read_image(folder)
    assert str(folder) in str(e.value)  # the message names the folder, then the server's reason
