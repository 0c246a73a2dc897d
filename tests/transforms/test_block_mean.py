"""``block_mean`` against PyTorch's ``avg_pool3d`` (ceil_mode, partial blocks over their voxels), bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lmk3d.transforms import block_mean as bm
from lmk3d.transforms.block_mean import block_mean


def _reference(x: torch.Tensor, factors: tuple[int, int, int], flip: tuple[int, ...] = ()) -> torch.Tensor:
    src = x.flip(list(flip)).contiguous() if flip else x.contiguous()
    return F.avg_pool3d(src, kernel_size=factors, stride=factors, ceil_mode=True, count_include_pad=False)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = torch.int32 if a.dtype == torch.float32 else torch.int64
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(ints), b[~nan].view(ints)))


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 1, 3), (3, 1, 1), (5, 2, 2), (2, 3, 4), (1, 1, 1)])
@pytest.mark.parametrize("shape", [(1, 1, 10, 12, 14), (1, 1, 7, 9, 11), (2, 3, 5, 4, 6), (1, 1, 1, 2, 3)])
def test_block_means_are_pytorchs_bit_for_bit(shape: tuple[int, ...], factors: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 1000.0  # sums that round: a change of order would show
    if any(f > n for f, n in zip(factors, shape[2:], strict=True)):
        with pytest.raises(RuntimeError, match="smaller than kernel size"):  # PyTorch's error, as PyTorch says it
            block_mean(x[..., 1:] if shape[-1] > 1 else x, factors)
        return
    assert _same_bits(block_mean(x, factors), _reference(x, factors))
    if factors[2] < shape[-1]:  # a strided crop too
        assert _same_bits(block_mean(x[..., 1:], factors), _reference(x[..., 1:], factors))


def test_strided_crops_and_flips_give_the_means_of_their_copies() -> None:
    gen = torch.Generator().manual_seed(1)
    whole = torch.randn(1, 1, 23, 31, 29, generator=gen) * 100.0
    crop = whole[..., 3:20, 1:30, 4:27]  # not contiguous: PyTorch would copy it first
    assert not crop.is_contiguous()
    for factors in [(1, 2, 2), (5, 2, 2), (3, 3, 3), (2, 1, 4)]:
        assert _same_bits(block_mean(crop, factors), _reference(crop, factors))
        for r in range(1, 4):
            for dims in itertools.combinations((2, 3, 4), r):
                assert _same_bits(block_mean(crop, factors, dims), _reference(crop, factors, dims)), (factors, dims)
                assert _same_bits(block_mean(whole, factors, dims), _reference(whole, factors, dims)), (factors, dims)


def test_double_precision_and_special_values() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 9, 10, 11, generator=gen, dtype=torch.float64) * 1e6
    assert _same_bits(block_mean(x[..., 1:, :, 2:], (2, 2, 3)), _reference(x[..., 1:, :, 2:], (2, 2, 3)))
    y = torch.randn(1, 1, 8, 8, 9, generator=gen)
    y[0, 0, 0:2, 0:2, 1:3] = -0.0  # the first block of y[..., 1:] is negative zeros: PyTorch's sum starts from +0
    y[0, 0, 4, 4, 4] = float("nan")
    y[0, 0, 6, 0, 0] = float("inf")
    y[0, 0, 6, 0, 1] = float("-inf")
    y[0, 0, 0, 6, 0] = float("inf")
    view = y[..., :, :, :]
    for factors in [(2, 2, 2), (1, 2, 2), (1, 1, 2)]:
        got = block_mean(view[..., :, :, 1:] if factors == (1, 1, 2) else view, factors)
        want = _reference(view[..., :, :, 1:] if factors == (1, 1, 2) else view, factors)
        assert _same_bits(got, want), factors
    assert torch.signbit(block_mean(y[..., :, :, 1:], (2, 2, 2)))[0, 0, 0, 0, 0].item() is False


def test_the_slabs_do_not_change_the_values(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 17, 13, 15, generator=gen)[..., 1:, :, :]
    want = _reference(x, (2, 2, 2))
    for slab in (1, 64, 1 << 30):  # one output row per slab, a few, all at once
        monkeypatch.setattr(bm, "SLAB_BYTES", slab)
        assert _same_bits(block_mean(x, (2, 2, 2)), want)
        assert _same_bits(block_mean(x, (2, 2, 2), (2, 4)), _reference(x, (2, 2, 2), (2, 4)))


def test_what_it_leaves_to_pytorch() -> None:
    x = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    out = block_mean(x, (2, 2, 2))
    assert out.requires_grad  # autograd follows: PyTorch's pooling ran
    out.sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, torch.full_like(x, 1 / 8))
    ints = torch.arange(216).reshape(1, 1, 6, 6, 6)[..., 1:]
    assert torch.equal(block_mean(ints, (2, 2, 2)), _reference(ints, (2, 2, 2)))
    six = torch.randn(1, 1, 1, 4, 4, 4)[..., 1:]
    with pytest.raises(RuntimeError):  # PyTorch's error for a 6D input, as PyTorch gives it
        block_mean(six, (1, 1, 1))
    dense = torch.randn(1, 1, 10, 10, 10)
    assert _same_bits(block_mean(dense, (5, 2, 2)), _reference(dense, (5, 2, 2)))  # PyTorch's loop
