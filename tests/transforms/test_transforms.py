"""Working grids, intensity maps and heatmaps: exactness against analytic values and SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from lmk3d import geometry
from lmk3d.io.image import read_image
from lmk3d.transforms.grid import Grid, antialias, image_tensor, random_world_transform, sample
from lmk3d.transforms.heatmap import decode_peaks, gaussian_heatmaps, local_peaks
from lmk3d.transforms.intensity import fit_intensity
from tests.conftest import DATA, oblique_affine

COEF = np.array([0.5, -1.25, 2.0])


def linear_volume(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel value = COEF . world position (+3): trilinear interpolation reproduces it exactly."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return (geometry.ijk_to_ras(idx.astype(float), affine) @ COEF + 3.0).reshape(shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_any_affine_is_exact_on_linear_images(seed):
    rng = np.random.default_rng(seed)
    affine = oblique_affine(rng, spacing=(0.6, 0.9, 2.5), flip=(1, -1, -1))
    shape = (40, 30, 16)
    vol = linear_volume(affine, shape)
    centre = geometry.ijk_to_ras(np.array(shape) / 2.0, affine)
    grids = [Grid.around(centre + rng.uniform(-4, 4, 3), (7, 6, 5), 1.3) for _ in range(3)]
    grids.append(grids[0].moved(random_world_transform(rng, centre, 20.0, (0.8, 1.2), 3.0)))
    out = sample(image_tensor(vol), affine, grids).numpy()
    assert out.shape == (4, 1, 7, 6, 5)
    for b, g in enumerate(grids):
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij"), -1).reshape(-1, 3)
        expect = (g.grid_to_world(idx.astype(float)) @ COEF + 3.0).reshape(g.shape)
        np.testing.assert_allclose(out[b, 0], expect, atol=2e-3)


def test_outside_field_of_view_is_padding():
    affine = np.eye(4)
    vol = np.full((10, 10, 10), 5.0)
    vol[0, 0, 0] = -7.0
    g = Grid.around(np.array([100.0, 0, 0]), (3, 3, 3), 1.0)
    assert torch.all(sample(image_tensor(vol), affine, g) == -7.0)
    assert torch.all(sample(image_tensor(vol), affine, g, padding_value=0.0) == 0.0)


def test_sampling_reads_only_the_reachable_box_with_the_same_values(monkeypatch):
    from lmk3d.transforms import grid as grid_module

    rng = np.random.default_rng(3)
    img = torch.as_tensor(rng.normal(size=(1, 1, 40, 30, 20)).astype(np.float32))
    affine = oblique_affine(rng, spacing=(0.7, 0.8, 1.5))
    centre = geometry.ijk_to_ras(np.array([19.5, 14.5, 9.5]), affine)
    cases = []
    for _ in range(60):  # inside, across the border, wholly outside (both sides), thin and wide grids
        c = centre + rng.uniform(-45, 45, 3)
        spacing = rng.uniform(0.3, 2.5)
        cases.append([Grid.around(c + rng.uniform(-3, 3, 3), (5, 4, 3), spacing) for _ in range(3)])
    cropped = [sample(img, affine, gs, padding_value=-7.0) for gs in cases]
    boxes = [grid_module._crop_to_grids(img, affine, np.stack([g.affine for g in gs]), gs[0].shape) for gs in cases]
    assert any(b is not None and b[0].numel() < img.numel() / 4 for b in boxes)  # the crop does crop
    assert any(b is None for b in boxes)  # and grids far outside skip the image altogether
    # Reference: the whole image, no crop.
    monkeypatch.setattr(grid_module, "_crop_to_grids", lambda image, a, ga, shape: (image, a))
    for gs, got in zip(cases, cropped, strict=True):
        torch.testing.assert_close(got, sample(img, affine, gs, padding_value=-7.0), atol=1e-4, rtol=0)


def test_patch_matches_simpleitk_resample_on_real_oblique_mprage():
    mprage = DATA / "dicom" / "mr_brain_sagittal_mprage"
    vol = read_image(mprage)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(mprage)))
    img = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    centre = vol.ijk_to_ras(np.array(vol.shape) / 2.0 + [3.3, -7.1, 5.6])
    g = Grid.around(centre, (24, 20, 16), (1.0, 1.2, 0.8))
    ours = sample(image_tensor(vol.array), vol.affine, g)[0, 0].numpy()
    ref = sitk.Image(list(g.shape), sitk.sitkFloat32)
    origin, spacing, direction = geometry.itk_geometry_from_affine(g.affine)
    ref.SetOrigin(origin)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    theirs = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    theirs = theirs.transpose(2, 1, 0)
    scale = float(np.percentile(vol.array, 99))
    assert np.abs(ours - theirs).max() < 1e-3 * scale


def test_antialias_keeps_world_geometry():
    rng = np.random.default_rng(3)
    affine = oblique_affine(rng, spacing=(0.5, 0.5, 2.0))
    shape = (64, 64, 12)
    vol = linear_volume(affine, shape)
    small, small_aff = antialias(image_tensor(vol), affine, target_spacing_mm=2.0)
    assert small.shape[2:] == (16, 16, 12)
    np.testing.assert_allclose(geometry.spacing_from_affine(small_aff), [2.0, 2.0, 2.0], atol=1e-9)
    # the box mean of a linear function is its value at the box centre: the new affine must say where
    np.testing.assert_allclose(small[0, 0].numpy(), linear_volume(small_aff, (16, 16, 12)), atol=2e-3)


def test_covering_grid_holds_the_whole_field_of_view():
    rng = np.random.default_rng(4)
    affine = oblique_affine(rng)
    shape = (50, 40, 20)
    g = Grid.covering(affine, shape, (32, 32, 32))
    lo, hi = geometry.world_bounds_ras(affine, shape)
    glo, ghi = geometry.world_bounds_ras(g.affine, g.shape)
    assert np.all(glo <= lo + 1e-6) and np.all(ghi >= hi - 1e-6)


def test_heatmap_encode_decode_roundtrip():
    rng = np.random.default_rng(5)
    pts = torch.as_tensor(np.c_[rng.uniform(2, 13, 6), rng.uniform(2, 10, 6), rng.uniform(2, 6, 6)])
    h = gaussian_heatmaps(pts, (16, 13, 9), sigma=1.5)
    assert h.shape == (6, 16, 13, 9)
    pos, peak = decode_peaks(h)
    np.testing.assert_allclose(pos.numpy(), pts.numpy(), atol=1e-6)
    assert torch.all(peak > 0.7) and torch.all(peak <= 1.0)
    # a second, weaker blob elsewhere does not move the decoded peak
    h2 = h[0] + 0.6 * gaussian_heatmaps(pts[0] + torch.tensor([0.0, 0.0, 4.0], dtype=pts.dtype), (16, 13, 9), 1.5)
    np.testing.assert_allclose(decode_peaks(h2)[0].numpy(), pts[0].numpy(), atol=0.15)


def test_local_peaks_lists_every_blob_brightest_first():
    a = torch.tensor([4.3, 5.6, 6.2], dtype=torch.float64)
    b = torch.tensor([13.7, 12.2, 15.4], dtype=torch.float64)
    shape = (20, 18, 22)
    # Two far-apart Gaussian blobs of heights 0.7 and 0.9 (the second brighter), one heatmap; a second
    # heatmap with only one blob.
    h = torch.stack([0.7 * gaussian_heatmaps(a, shape, 1.5) + 0.9 * gaussian_heatmaps(b, shape, 1.5),
                     gaussian_heatmaps(a, shape, 1.5)])
    pos, val = local_peaks(h, k=3, radius=2)
    assert pos.shape == (2, 3, 3) and val.shape == (2, 3)
    np.testing.assert_allclose(pos[0, 0].numpy(), b.numpy(), atol=1e-3)
    np.testing.assert_allclose(pos[0, 1].numpy(), a.numpy(), atol=1e-3)
    assert float(val[0, 0]) > float(val[0, 1]) > 0.6
    # The first candidate is decode_peaks' answer; missing candidates are NaN with value -inf.
    np.testing.assert_allclose(pos[:, 0].numpy(), decode_peaks(h)[0].numpy())
    assert torch.isnan(pos[0, 2]).all() and torch.isnan(pos[1, 1:]).all()
    assert torch.isinf(val[1, 1:]).all() and bool((val[1, 1:] < 0).all())
    with pytest.raises(ValueError, match="k >= 1"):
        local_peaks(h, k=0)


def test_intensity_maps():
    ct = fit_intensity(np.array([[-2000.0, 0.0, 3000.0]]), "CT")
    np.testing.assert_allclose(ct(torch.tensor([-2000.0, -1000.0, 500.0, 3000.0])).numpy(), [0, 0, 0.5, 1])
    mr = fit_intensity(np.arange(1000.0).reshape(10, 10, 10), "MR")
    assert mr.lo == pytest.approx(4.995) and mr.hi == pytest.approx(994.005)
    with pytest.raises(ValueError, match="unknown modality 'PET'"):
        fit_intensity(np.zeros(3), "PET")


@pytest.mark.parametrize(("lo", "hi", "clip"), [(-1000.0, 2000.0, True), (4.995, 994.005, False),
                                                 (0.1234567, 0.7654321, False), (3.0, 3.0, False)])
def test_intensity_map_is_monai_scale_intensity_range_bit_for_bit(lo, hi, clip):
    """The map replaced MONAI's ScaleIntensityRange (the oracle; the shipped models were trained on its output)."""
    import warnings

    from monai.transforms import ScaleIntensityRange

    from lmk3d.transforms.intensity import IntensityMap

    x = torch.randn(3, 17, 19, 23, generator=torch.Generator().manual_seed(0)) * 1500.0 + 400.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns when lo == hi
        expected = torch.as_tensor(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=clip)(x))
    got = IntensityMap(lo, hi, clip)(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected.as_subclass(torch.Tensor))
