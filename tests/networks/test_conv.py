"""The slab convolution gives PyTorch's values bit for bit, and only where PyTorch runs its reference code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmk3d.networks import conv
from lmk3d.networks.blocks import conv_type
from lmk3d.networks.conv import Conv3d, conv3d, uses_reference_path

# (in channels, out channels, size, kernel, padding): the shipped networks' shapes and odd ones
CASES = [
    (8, 8, (48, 48, 48), (3, 3, 3), (1, 1, 1)),  # cascade's stage-1 U-Net, its slowest convolution
    (32, 16, (24, 24, 24), (3, 3, 3), (1, 1, 1)),
    (1, 8, (48, 48, 48), (3, 3, 3), (1, 1, 1)),
    (2, 8, (40, 40, 40), (3, 3, 3), (1, 1, 1)),  # the presence network's first layer
    (8, 8, (50, 47, 33), (3, 3, 3), (1, 1, 1)),  # a last slab shorter than the others
    (3, 5, (17, 9, 30), (3, 1, 1), (1, 0, 0)),
    (64, 32, (12, 12, 12), (3, 3, 3), (1, 1, 1)),
    (4, 6, (19, 21, 23), (1, 3, 3), (0, 1, 1)),
    (5, 4, (20, 22, 18), (2, 2, 2), (0, 0, 0)),
    (6, 4, (21, 20, 19), (3, 5, 3), (2, 0, 1)),
    (4, 4, (18, 18, 18), (3, 3, 3), (2, 2, 2)),
]


def _data(cin: int, cout: int, size: tuple[int, ...], kernel: tuple[int, ...], seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, cin, *size, generator=g), torch.randn(cout, cin, *kernel, generator=g),
            torch.randn(cout, generator=g))


def test_mkl_gives_a_block_of_columns_the_bits_it_gives_them_in_the_whole_product() -> None:
    """What the slabs rest on (measured, not promised by MKL): within the sizes the path allows, a product
    over some of the columns gives them the same bits as the product over all of them."""
    import random

    rnd = random.Random(1)
    g = torch.Generator().manual_seed(1)
    lo, hi = conv.OUT_CHANNELS
    for _ in range(12):
        n, k, m = rnd.randint(lo, hi), rnd.randint(8, conv.MAX_ROW), rnd.randint(2000, 12000)
        a, w, b = torch.randn(k, m, generator=g), torch.randn(n, k, generator=g), torch.randn(n, 1, generator=g)
        whole = torch.addmm(b.expand(n, m), w, a)
        for _ in range(8):
            length = rnd.randint(conv.MIN_SLAB_COLUMNS, m)
            start = rnd.choice([0, m - length, rnd.randint(0, m - length)])
            part = torch.addmm(b.expand(n, length), w, a[:, start:start + length].contiguous())
            assert torch.equal(part, whole[:, start:start + length]), (n, k, m, start, length)


@pytest.mark.parametrize("slab_bytes", [conv.SLAB_BYTES, 1 << 14])
@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "padding"), CASES)
def test_the_slab_convolution_is_pytorchs_bit_for_bit(monkeypatch: pytest.MonkeyPatch, slab_bytes: int, cin: int,
                                                      cout: int, size: tuple[int, ...], kernel: tuple[int, ...],
                                                      padding: tuple[int, ...]) -> None:
    monkeypatch.setattr(conv, "SLAB_BYTES", slab_bytes)  # small slabs: many of them, and a short last one
    x, w, b = _data(cin, cout, size, kernel)
    with torch.no_grad():
        assert torch.equal(conv3d(x, w, b, padding), F.conv3d(x, w, b, 1, padding))
        assert torch.equal(conv3d(x, w, None, padding), F.conv3d(x, w, None, 1, padding))


def test_special_values_follow_pytorchs() -> None:
    x, w, b = _data(8, 8, (48, 48, 48), (3, 3, 3), seed=1)
    x[0, 0, 3, 4, 5] = float("nan")
    x[0, 1, 10, 10, 10] = float("inf")
    x[0, 2, 20] = -0.0
    w[0] = -0.0
    with torch.no_grad():
        ours, ref = conv3d(x, w, b, (1, 1, 1)), F.conv3d(x, w, b, 1, 1)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(ref))
    assert torch.equal(torch.signbit(ours), torch.signbit(ref))


def test_only_pytorchs_reference_path_is_taken() -> None:
    x, w, _ = _data(8, 8, (48, 48, 48), (3, 3, 3))
    one = (1, 1, 1)
    with torch.no_grad():
        assert uses_reference_path(x, w, one, one, one, 1)
        # oneDNN's in PyTorch (more channels x depth x height, a batch, groups), other strides, dilations,
        # types, layouts, 1x1x1 kernels, and small ones whose columns fit in the cache
        assert not uses_reference_path(torch.randn(1, 16, 48, 48, 48), torch.randn(8, 16, 3, 3, 3), one, one, one, 1)
        assert not uses_reference_path(torch.cat([x, x]), w, one, one, one, 1)
        assert not uses_reference_path(x, w.reshape(8, 8, 3, 3, 3)[:, :4].contiguous(), one, one, one, 2)
        assert not uses_reference_path(x, w, (2, 2, 2), one, one, 1)
        assert not uses_reference_path(x, w, one, (2, 2, 2), (2, 2, 2), 1)
        assert not uses_reference_path(x.double(), w.double(), one, one, one, 1)
        assert not uses_reference_path(x.transpose(2, 4), w, one, one, one, 1)
        assert not uses_reference_path(x, w[:, :, :1, :1, :1].contiguous(), one, (0, 0, 0), one, 1)
        assert not uses_reference_path(torch.randn(1, 8, 6, 6, 6), w, one, one, one, 1)
        assert not uses_reference_path(x, w, one, "same", one, 1)
        # matrix products outside the sizes measured (2 or 3 output channels, rows over 1728)
        assert not uses_reference_path(x, w[:3].contiguous(), one, one, one, 1)
        assert not uses_reference_path(torch.randn(1, 65, 20, 20, 20), torch.randn(8, 65, 3, 3, 3), one, one, one, 1)
    # where autograd follows, PyTorch's convolution runs (its gradients)
    assert not uses_reference_path(x, w.requires_grad_(), one, one, one, 1)


def test_the_module_loads_nn_conv3d_weights_and_answers_alike_in_inference_and_training() -> None:
    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 8, 3, padding=1)
    ours = conv_type(3)(8, 8, 3, padding=1)
    assert isinstance(ours, Conv3d) and isinstance(ours, torch.nn.Conv3d)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 48, 48, 48)
    with torch.no_grad():
        assert uses_reference_path(x, ours.weight, ours.stride, ours.padding, ours.dilation, ours.groups)
        assert torch.equal(ours(x), plain(x))
    xs = x[:, :, :10, :10, :10].clone().requires_grad_()
    ours(xs).square().sum().backward()
    g_ours, w_ours = xs.grad.clone(), ours.weight.grad.clone()  # type: ignore[union-attr]
    xs.grad = None
    plain(xs).square().sum().backward()
    assert torch.equal(g_ours, xs.grad) and torch.equal(w_ours, plain.weight.grad)  # type: ignore[arg-type]
