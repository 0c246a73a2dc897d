"""lmk3d.io.label_map.write_label_map: the writer the app's infer task uses (dtype, compression)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmk3d.errors import LandmarkFormatError
from lmk3d.io import Volume, read_image
from lmk3d.io.label_map import read_label_map, write_label_map
from lmk3d.landmarks import LandmarkSet

NAMES = ("a", "b")
REFERENCE = Volume(np.zeros((30, 28, 20), dtype=np.float32), np.diag([1.0, 1.2, 1.5, 1.0]))
LANDMARKS = LandmarkSet(NAMES, np.array([[10.0, 12.0, 15.0], [18.0, 20.4, 9.0]]))


@pytest.mark.parametrize(("dtype", "expected"), [(None, np.uint8), ("uint8", np.uint8), ("uint16", np.uint16)])
def test_dtype(tmp_path: Path, dtype: str | None, expected: type) -> None:
    path = write_label_map(tmp_path / "l.nii.gz", LANDMARKS, REFERENCE, dtype=dtype)
    vol = read_image(path, dtype=None)
    assert vol.array.dtype == expected and vol.shape == REFERENCE.shape
    np.testing.assert_allclose(read_label_map(path, NAMES).xyz_mm_ras, LANDMARKS.xyz_mm_ras, atol=1e-3)


def test_a_bad_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LandmarkFormatError, match="uint8, uint16"):
        write_label_map(tmp_path / "l.nii.gz", LANDMARKS, REFERENCE, dtype="float32")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_uncompressed_files_are_raw_and_read_back(tmp_path: Path, suffix: str) -> None:
    raw = write_label_map(tmp_path / f"raw{suffix}", LANDMARKS, REFERENCE, compress=False)
    packed = write_label_map(tmp_path / f"packed{suffix}", LANDMARKS, REFERENCE)
    assert raw.stat().st_size > packed.stat().st_size >= 0
    assert raw.stat().st_size >= int(np.prod(REFERENCE.shape))  # one byte per voxel, not compressed
    np.testing.assert_allclose(read_label_map(raw, NAMES).xyz_mm_ras, LANDMARKS.xyz_mm_ras, atol=1e-3)
