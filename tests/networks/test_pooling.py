"""lmk3d.networks.pooling gives PyTorch's max pooling values bit for bit, and leaves training to PyTorch."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmk3d.networks import pooling
from lmk3d.networks.pooling import MaxPool1d, MaxPool2d, MaxPool3d, max_pool

TORCH = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
CASES = [  # (kernel, stride, padding) as the networks use them, and some that they do not
    (2, None, 0), (2, 2, 0), (3, 2, 1), (5, 1, 2), (3, 1, 1), (1, 1, 0), (1, 2, 0), (3, 3, 0), (4, 3, 2), (2, 1, 1),
]
SIZES: dict[int, list[tuple[int, ...]]] = {
    1: [(7,), (8,), (1,), (2,)],
    2: [(33, 33), (17, 9), (5, 5), (3, 3), (1, 4), (8, 6)],
    3: [(32, 32, 32), (7, 6, 5), (48, 13, 9), (3, 4, 2), (1, 1, 5)],
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a, nan=7.5),
                                                                       torch.nan_to_num(b, nan=7.5)) \
        and torch.equal(torch.isnan(a), torch.isnan(b))


def _inputs(shape: tuple[int, ...], gen: torch.Generator) -> list[torch.Tensor]:
    x = torch.randn(shape, generator=gen)
    ties = torch.randint(0, 3, shape, generator=gen).float()  # many equal values, as after a ReLU
    odd = x.clone()
    flat = odd.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)] = float("nan")
    flat[0] = float("-inf")
    flat[-1] = float("inf")
    return [x, torch.relu(x), ties, odd, x.to(torch.float64)]


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_the_values_are_pytorchs_bit_for_bit(spatial_dims: int, ceil_mode: bool) -> None:
    gen = torch.Generator().manual_seed(spatial_dims + 10 * ceil_mode)
    checked = 0
    for size, (kernel, stride, pad) in itertools.product(SIZES[spatial_dims], CASES):
        for channels in (1, 3):
            shape = (2, channels, *size)
            try:
                TORCH[spatial_dims](torch.zeros(shape), kernel, stride, pad, ceil_mode=ceil_mode)
            except RuntimeError:  # a window larger than the padded input: PyTorch's error is kept
                with pytest.raises(RuntimeError), torch.no_grad():
                    max_pool(torch.zeros(shape), spatial_dims, kernel, stride, pad, ceil_mode)
                continue
            for x in _inputs(shape, gen):
                with torch.no_grad():
                    want = TORCH[spatial_dims](x, kernel, stride, pad, ceil_mode=ceil_mode)
                    got = max_pool(x, spatial_dims, kernel, stride, pad, ceil_mode)
                assert _same(got, want), (shape, kernel, stride, pad, ceil_mode, x.dtype)
                assert got.is_contiguous()
                checked += 1
    assert checked > 300


def test_a_non_contiguous_view_pools_as_its_copy() -> None:
    x = torch.randn(1, 4, 20, 18, 16, generator=torch.Generator().manual_seed(3))
    view = x[:, :, 2:17, ::2, 1:].transpose(2, 4)
    with torch.no_grad():
        assert _same(max_pool(view, 3, 2, ceil_mode=True), F.max_pool3d(view.contiguous(), 2, ceil_mode=True))


def test_inference_does_not_call_pytorchs_pooling_and_training_does(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = dict(pooling._TORCH_POOL)

    def counted(dims: int):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(dims)
            return real[dims](*args, **kwargs)
        return run

    monkeypatch.setattr(pooling, "_TORCH_POOL", {d: counted(d) for d in real})
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.no_grad():
        max_pool(x, 3, 2)
    max_pool(x, 3, 2)  # no gradient asked for: still the fast path
    assert calls == []
    max_pool(x.requires_grad_(), 3, 2)
    max_pool(torch.arange(64).reshape(1, 1, 4, 4, 4), 3, 2)  # integers
    assert calls == [3, 3]


@pytest.mark.parametrize("ours, theirs, shape", [
    (MaxPool1d, nn.MaxPool1d, (2, 3, 9)),
    (MaxPool2d, nn.MaxPool2d, (2, 3, 9, 7)),
    (MaxPool3d, nn.MaxPool3d, (2, 3, 9, 7, 6)),
])
def test_the_modules_match_pytorchs_in_evaluation_and_in_training(ours: type[nn.Module], theirs: type[nn.Module],
                                                                    shape: tuple[int, ...]) -> None:
    x = torch.randint(0, 4, shape).float()  # ties: PyTorch sends the gradient to the first maximum
    for kwargs in ({"kernel_size": 2}, {"kernel_size": 2, "stride": 2, "ceil_mode": True},
                   {"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": 3, "dilation": 2}):
        a, b = ours(**kwargs), theirs(**kwargs)
        assert isinstance(a, theirs) and a.state_dict() == {} and repr(a) == repr(b)
        with torch.no_grad():
            assert _same(a(x), b(x))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        assert _same(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        assert xa.grad is not None and xb.grad is not None and torch.equal(xa.grad, xb.grad)
    with_indices = ours(kernel_size=2, return_indices=True)
    assert len(with_indices(x)) == 2
