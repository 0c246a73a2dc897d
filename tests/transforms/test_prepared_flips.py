"""The prepared image does not copy flipped storage, yet filters and samples as the canonical copy would.

Oracle: the same voxels stored canonically (axes along R, A, S), where the box filter is plain
``avg_pool3d``; the flipped storage must give the same values up to float rounding (the additions
within a block run the other way), the same affines and the same shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmk3d.io.image import Volume
from lmk3d.preprocessing import PreparedImage, axis_flips, dense_copy, flip_index, pool_from_end
from lmk3d.transforms.grid import Grid

SHAPE = (23, 19, 11)
SPACING = (0.7, 0.8, 1.3)
#: a world box whose corners fall between voxel centres (on one, rounding would decide the crop)
ROI = (np.array([-2.03, 9.07, 35.11]), np.array([6.02, 17.05, 41.13]))


def _canonical_volume(fortran: bool) -> Volume:
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 40.0, size=SHAPE).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-8.0, 5.0, 30.0]
    return Volume(np.asfortranarray(data) if fortran else data, affine)


def _stored_backwards(vol: Volume, flipped: tuple[bool, bool, bool]) -> Volume:
    """The same world image with the ``flipped`` axes stored in reverse (as an LPS file stores x and y)."""
    data = vol.array[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]
    data = np.asfortranarray(data) if vol.array.flags.f_contiguous else np.ascontiguousarray(data)
    return Volume(data, vol.affine @ flip_index(flipped, vol.shape))


def _canonical(t: torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (tensor, affine) pair in the canonical view, whatever its storage directions."""
    flips = axis_flips(affine)
    dims = [2 + a for a in range(3) if flips[a]]
    return (t.flip(dims) if dims else t).numpy(), affine @ flip_index(flips, t.shape[2:])


@pytest.mark.parametrize(("shape", "factors", "flipped"), [
    ((23, 19, 11), (2, 3, 2), (True, True, False)),
    ((23, 19, 11), (4, 6, 3), (True, False, True)),
    ((20, 19, 12), (10, 5, 4), (False, True, True)),  # gcd(lead, factor) > 1: two passes
    ((17, 13, 11), (6, 4, 9), (True, True, True)),
    ((16, 9, 7), (4, 3, 1), (False, False, False)),
])
def test_pool_from_end_equals_pooling_the_flipped_copy(shape: tuple[int, int, int], factors: tuple[int, int, int],
                                                       flipped: tuple[bool, bool, bool]) -> None:
    x = torch.from_numpy(np.random.default_rng(1).normal(50.0, 20.0, size=(1, 1, *shape)).astype(np.float32))
    copy = x.flip([2 + a for a in range(3) if flipped[a]]) if any(flipped) else x
    expected = F.avg_pool3d(copy, kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False)
    out = pool_from_end(x, factors, flipped)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("fortran", [True, False])
@pytest.mark.parametrize("flipped", [(True, True, False), (False, True, True), (True, True, True)])
def test_flipped_storage_prepares_like_canonical_storage(fortran: bool, flipped: tuple[bool, bool, bool]) -> None:
    canon_vol = _canonical_volume(fortran)
    stored = _stored_backwards(canon_vol, flipped)
    ref = PreparedImage.from_volume(canon_vol, "MR")
    prep = PreparedImage.from_volume(stored, "MR")
    assert prep.shape == ref.shape and prep.background == ref.background
    np.testing.assert_allclose(prep.affine, ref.affine, atol=1e-9)
    # The stored voxels are not copied (the flips are recorded instead).
    assert prep.tensor.data_ptr() == stored.array.ctypes.data
    for spacing in (0.7, 1.6, 2.7, 4.0):  # factors 1 to 5 along the axes
        a, a_aff = _canonical(*prep.at_spacing(spacing))
        b, b_aff = _canonical(*ref.at_spacing(spacing))
        np.testing.assert_allclose(a_aff, b_aff, atol=1e-9)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
        t, t_aff, pad = prep.normalised(spacing, ROI)
        u, u_aff, upad = ref.normalised(spacing, ROI)
        assert pad == pytest.approx(upad)
        a, a_aff = _canonical(t, t_aff)
        b, b_aff = _canonical(u, u_aff)
        np.testing.assert_allclose(a_aff, b_aff, atol=1e-9)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grids = [Grid.around(np.array([1.0, 12.0, 37.0]) + d, (5, 6, 7), 1.1) for d in (np.zeros(3), np.ones(3))]
    for spacing in (0.6, 1.1, 2.2):
        fresh = PreparedImage.from_volume(stored, "MR")  # sample() filters a crop when nothing is kept
        torch.testing.assert_close(fresh.sample(grids, spacing), ref.sample(grids, spacing), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prep.sample(grids, spacing), ref.sample(grids, spacing), rtol=1e-5, atol=1e-5)


def test_cropped_is_in_the_canonical_view() -> None:
    canon_vol = _canonical_volume(True)
    stored = _stored_backwards(canon_vol, (True, True, False))
    lo, hi = np.array([-5.03, 7.07, 33.11]), np.array([4.02, 15.05, 44.13])
    for spacing in (0.7, 2.0):
        part = PreparedImage.from_volume(stored, "MR").cropped(spacing, lo, hi)
        ref = PreparedImage.from_volume(canon_vol, "MR").cropped(spacing, lo, hi)
        assert axis_flips(part.affine) == (False, False, False) and part.shape == ref.shape
        np.testing.assert_allclose(part.affine, ref.affine, atol=1e-9)
        torch.testing.assert_close(part.tensor, ref.tensor, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dims", [(), (2,), (3, 4), (2, 3, 4)])
def test_dense_copy_holds_the_flipped_or_cloned_values_in_c_order(dims: tuple[int, ...]) -> None:
    whole = torch.randn(1, 1, 13, 12, 11, generator=torch.Generator().manual_seed(len(dims)))
    before = whole.clone()
    for view in (whole, whole[:, :, 2:11, 1:, :7], whole[:, :, ::2, 3:9, 1:10].transpose(2, 4)):
        want = view.flip(list(dims)) if dims else view.clone()
        got = dense_copy(view, dims)
        assert got.is_contiguous() and torch.equal(got, want)
        got[...] = 0.0  # a copy: the image is not written
        assert torch.equal(whole, before)
    tracked = whole.clone().requires_grad_()
    assert torch.equal(dense_copy(tracked, dims).detach(), tracked.flip(list(dims)) if dims else tracked)
