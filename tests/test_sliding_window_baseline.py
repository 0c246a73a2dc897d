"""Smoke tests of ``benchmarks/sliding_window_baseline.py``, so the benchmark cannot rot unnoticed.

Tiny synthetic volumes with oblique, anisotropic, flipped affines written under ``tmp_path``; nibabel
is the geometry oracle. The script's own functions are used: preprocessing, sliding-window inference
and decoding (checked exactly with a network that passes its input through), heatmap targets, patch
sampling, one epoch of training, and the checkpoint round trip.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch

from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkError
from lmk3d.io import read_image
from lmk3d.landmarks import LandmarkSet
from tests.conftest import load_benchmark, oblique_affine


@pytest.fixture(scope="module")
def swb() -> ModuleType:
    return load_benchmark("sliding_window_baseline")


def _blob_volume(shape: tuple[int, int, int], centres_ijk: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Gaussian spots (peak 1000) at continuous voxel positions ``(M, 3)``, on a zero background."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    vol = np.zeros(shape)
    for c in centres_ijk:
        vol += 1000.0 * np.exp(-((grid - c) ** 2).sum(-1) / (2 * sigma**2))
    return vol.astype(np.float32)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_sliding_window_inference_lands_where_nibabel_says(swb: ModuleType, tmp_path: Path,
                                                           rng: np.random.Generator) -> None:
    # A network that passes its input through: the blended output is the image itself, so the argmax of
    # the one channel is the spot, wherever the windows and the canonical view put it.
    shape = (13, 17, 6)  # the last axis is shorter than the window: the inferer pads it
    spot = np.array([[8.3, 4.6, 2.2]])
    path = _write(tmp_path / "spot.nii.gz", _blob_volume(shape, spot), oblique_affine(rng))
    config = swb.SlidingWindowConfig(roi_size=(8, 8, 8), filters=(4, 8, 16), overlap=0.25)
    got = swb.predict(torch.nn.Identity(), config, read_image(path), ["spot"], "MR")
    expected = nib.affines.apply_affine(nib.load(str(path)).affine, spot)
    assert got.names == ("spot",) and bool(got.found[0])
    np.testing.assert_allclose(got.xyz_mm_ras, expected, atol=0.02)


def test_heatmap_targets_peak_at_the_landmark_of_each_patch(swb: ModuleType, rng: np.random.Generator) -> None:
    from lmk3d.transforms.heatmap import decode_peaks

    affine = oblique_affine(rng)
    ijk = np.array([[5.25, 9.5, 3.75], [np.nan, np.nan, np.nan]])
    xyz = nib.affines.apply_affine(affine, ijk)
    origin = np.array([-2, 4, 0])
    targets = swb.heatmap_targets(xyz, affine, origin, (12, 8, 8), sigma=1.5)
    assert targets.shape == (2, 12, 8, 8)
    assert float(targets[1].abs().max()) == 0.0  # a missing landmark gives an empty map
    pos, peak = decode_peaks(targets[:1])
    np.testing.assert_allclose(pos.numpy()[0] + origin, ijk[0], atol=1e-3)
    d2 = float(((np.round(ijk[0] - origin) - (ijk[0] - origin)) ** 2).sum())
    assert float(peak[0]) == pytest.approx(np.exp(-d2 / (2 * 1.5**2)), rel=1e-5)  # the nearest voxel's value


def test_patches_hold_the_asked_voxel_and_pad_with_background(swb: ModuleType) -> None:
    rng = np.random.default_rng(0)
    image = torch.arange(5 * 9 * 4, dtype=torch.float32).reshape(1, 5, 9, 4) + 1.0
    roi = (8, 8, 8)
    for _ in range(50):
        voxel = rng.uniform([0, 0, 0], [4, 8, 3])
        o = swb.patch_origin(image.shape[1:], roi, rng, inside=voxel)
        local = np.round(voxel).astype(int) - o
        assert np.all(local >= 0) and np.all(local < np.array(roi))
        patch = swb.extract_patch(image, o, roi)
        v = np.round(voxel).astype(int)
        assert float(patch[0, local[0], local[1], local[2]]) == float(image[0, v[0], v[1], v[2]])
        # every image voxel is positive: the zeros are exactly the padding
        assert int((patch > 0).sum()) == int(np.prod(np.minimum(np.array(roi) + np.minimum(o, 0),
                                                                 np.array(image.shape[1:]) - np.maximum(o, 0))))


def test_one_epoch_trains_saves_and_predicts_inside_the_image(swb: ModuleType, tmp_path: Path,
                                                              rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    names = ["A", "B"]
    samples = []
    for i in range(6):
        affine = oblique_affine(rng, spacing=(1.1, 0.9, 1.6), flip=(1, -1, 1) if i % 2 else (-1, 1, 1))
        shape = (15, 12, 9)
        centres = np.array([[4.0, 4.0, 3.0], [10.0, 7.0, 5.0]]) + rng.uniform(-1, 1, size=(2, 3))
        path = _write(tmp_path / f"case_{i}.nii.gz", _blob_volume(shape, centres), affine)
        lm = LandmarkSet(tuple(names), nib.affines.apply_affine(affine, centres))
        if i == 1:  # a partly annotated training case: masked out of the loss, not a crash
            lm = lm.with_found(np.array([True, False]))
        samples.append(Sample(f"case_{i}", path, lm))
    config = swb.SlidingWindowConfig(roi_size=(8, 8, 8), filters=(4, 8, 16), batch_size=2, max_epochs=1)
    out = tmp_path / "model"
    net, report = swb.train(config, samples[:4], samples[4:], names, out, seed=0, progress=False)
    assert report["phase"]["epochs"] == 1 and np.isfinite(report["phase"]["best_val"])
    assert (out / "checkpoint.pt").is_file() and (out / "train_report.json").is_file()
    assert not (out / "train_state.pt").exists()  # a finished run leaves no resume state
    loaded, config2, names2, modality = swb.load(out)
    assert config2 == config and names2 == names and modality == "MR"
    for s in samples[4:]:
        volume = read_image(s.image_path)
        a = swb.predict(net, config, volume, names, modality)
        b = swb.predict(loaded, config2, volume, names2, modality)
        np.testing.assert_array_equal(a.xyz_mm_ras, b.xyz_mm_ras)
        # world positions that nibabel maps back into the image's voxels
        ijk = nib.affines.apply_affine(np.linalg.inv(nib.load(str(s.image_path)).affine), a.xyz_mm_ras)
        assert np.all(ijk > -0.5) and np.all(ijk < np.array(volume.shape) - 0.5)


def test_bad_sizes_are_named(swb: ModuleType) -> None:
    with pytest.raises(LandmarkError, match="multiple of 4"):
        swb.SlidingWindowConfig(roi_size=(8, 10, 8), filters=(4, 8, 16))
    with pytest.raises(LandmarkError, match="at least 3 levels"):
        swb.SlidingWindowConfig(roi_size=(8, 8, 8), filters=(4, 8))
    with pytest.raises(LandmarkError, match="unknown sliding-window config key"):
        swb.SlidingWindowConfig.from_dict({"roi": [8, 8, 8]})


def test_paired_difference_is_the_mean_gap_with_an_interval_around_it(swb: ModuleType) -> None:
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.5, 2.0, size=(40, 4))
    errors = reference + 0.3 + rng.normal(0.0, 0.05, size=(40, 4))
    errors[3, 1] = np.nan  # not scored: left out of both
    mean, lo, hi = swb.paired_difference(errors, reference, n_boot=2000, seed=0)
    d = errors - reference
    assert mean == pytest.approx(float(np.nanmean(d)))
    assert lo < mean < hi and hi - lo < 0.05
    assert swb.paired_difference(errors, reference, n_boot=2000, seed=0) == (mean, lo, hi)  # seeded
    mean_r, lo_r, hi_r = swb.paired_difference(reference, errors, n_boot=2000, seed=0)
    assert mean_r == pytest.approx(-mean) and hi_r < 0
