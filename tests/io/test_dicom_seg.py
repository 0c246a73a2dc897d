"""lmk3d.io.dicom_seg: landmarks from a DICOM SEG of sphere markers, as OHIF exports a correction.

The SEGs are made by highdicom (an independent writer) over a series written by
``lmk3d.io.dicom_export`` from a volume with an oblique, anisotropic, left-handed affine; the decoded
centres must be where the spheres were drawn (world mm), whatever the frame order, and a SEG of
another grid must be refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from lmk3d.errors import LandmarkFormatError
from lmk3d.io import Volume
from lmk3d.io.dicom_export import SeriesIds, series_from_volume
from lmk3d.io.dicom_seg import is_segmentation, landmarks_from_seg, referenced_series_uids, segment_labels
from lmk3d.io.label_map import sphere_label_map
from lmk3d.landmarks import LandmarkSet
from tests.conftest import oblique_affine

# highdicom warns that the series' patient name (the image id) has a single component: it is meant.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")

NAMES = ("nasion", "sella", "menton")
SHAPE = (24, 22, 16)


def _volume(rng: np.random.Generator) -> Volume:
    affine = oblique_affine(rng, spacing=(0.9, 1.1, 2.0), flip=(1, -1, 1))
    return Volume(rng.integers(0, 500, size=SHAPE).astype(np.int16), affine)


def _landmarks(volume: Volume, ijk: Sequence[Sequence[float]]) -> LandmarkSet:
    return LandmarkSet(NAMES, volume.ijk_to_ras(np.array(ijk, dtype=float)))


def _seg(volume: Volume, labels: np.ndarray, names: Sequence[str] = NAMES, reverse: bool = False,
         fractional: bool = False) -> object:
    """A highdicom SEG of the label map ``labels`` (value k+1 = names[k]) over the volume's series."""
    series = series_from_volume(volume, SeriesIds.derive("case", "1"))
    order = list(range(len(series.headers)))[::-1] if reverse else list(range(len(series.headers)))
    sources = [series.dataset(k) for k in order]
    frames = np.stack([labels[:, :, k].T for k in order])  # (F, rows j, columns i)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in enumerate(names)]
    masks = np.stack([frames == n + 1 for n in range(len(names))], axis=-1)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.float32) if fractional else masks,
        segmentation_type=(hd.seg.SegmentationTypeValues.FRACTIONAL if fractional
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")


@pytest.mark.parametrize(("reverse", "fractional"), [(False, False), (True, False), (False, True)])
def test_moved_spheres_decode_to_their_centres(rng: np.random.Generator, reverse: bool, fractional: bool) -> None:
    volume = _volume(rng)
    truth = _landmarks(volume, [[6.3, 7.1, 4.2], [15.0, 12.5, 8.0], [9.4, 16.2, 11.6]])
    labels = sphere_label_map(truth, SHAPE, volume.affine, radius_mm=3.5)
    seg = _seg(volume, labels, reverse=reverse, fractional=fractional)
    assert is_segmentation(seg) and segment_labels(seg) == {1: "nasion", 2: "sella", 3: "menton"}
    assert referenced_series_uids(seg) == [SeriesIds.derive("case", "1").series_uid]
    back = landmarks_from_seg(seg, SHAPE, volume.affine)
    assert back.names == NAMES and back.found.all()
    # A voxelised sphere's centre of mass is within a fraction of a voxel of the true centre.
    assert np.abs(back.xyz_mm_ras - truth.xyz_mm_ras).max() < 0.5


def test_an_empty_segment_is_a_landmark_not_placed(rng: np.random.Generator) -> None:
    volume = _volume(rng)
    truth = _landmarks(volume, [[6.0, 7.0, 4.0], [15.0, 12.0, 8.0], [9.0, 16.0, 11.0]])
    labels = sphere_label_map(truth, SHAPE, volume.affine, radius_mm=3.0)
    labels[labels == 2] = 0
    back = landmarks_from_seg(_seg(volume, labels), SHAPE, volume.affine)
    assert back.found.tolist() == [True, False, True]


def test_a_seg_of_another_grid_is_refused(rng: np.random.Generator) -> None:
    volume = _volume(rng)
    labels = sphere_label_map(_landmarks(volume, [[6, 7, 4], [15, 12, 8], [9, 16, 11]]), SHAPE, volume.affine, 3.0)
    seg = _seg(volume, labels)
    shifted = volume.affine.copy()
    shifted[:3, 3] += volume.affine[:3, 0] * 0.5  # half a voxel along i
    with pytest.raises(LandmarkFormatError, match="not on the image's voxel grid"):
        landmarks_from_seg(seg, SHAPE, shifted)
    with pytest.raises(LandmarkFormatError, match="outside the image"):
        landmarks_from_seg(seg, (SHAPE[0], SHAPE[1], 12), volume.affine)
    with pytest.raises(LandmarkFormatError, match="more than its 3 segments can cover"):
        landmarks_from_seg(seg, (4, 4, 4), volume.affine)


def test_duplicate_labels_and_other_objects_are_refused(rng: np.random.Generator) -> None:
    volume = _volume(rng)
    labels = sphere_label_map(_landmarks(volume, [[6, 7, 4], [15, 12, 8], [9, 16, 11]]), SHAPE, volume.affine, 3.0)
    with pytest.raises(LandmarkFormatError, match="several segments named nasion"):
        landmarks_from_seg(_seg(volume, labels, names=("nasion", "nasion", "menton")), SHAPE, volume.affine)
    image = series_from_volume(volume, SeriesIds.derive("case", "1")).dataset(0)
    with pytest.raises(LandmarkFormatError, match="not a DICOM Segmentation"):
        landmarks_from_seg(image, SHAPE, volume.affine)
