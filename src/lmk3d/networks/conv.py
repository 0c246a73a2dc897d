"""3D convolution for inference on the CPU: PyTorch's reference path bit for bit, one slab at a time.

For a batch of one image with few channels, PyTorch runs a 3D convolution on its reference code
(``slow_conv3d``), not on oneDNN: its heuristic sends a float input to oneDNN only when
``batch x channels x depth x height`` exceeds 20480 (or for grouped, batched, or wide-kernel
convolutions). The reference code copies every input voxel once per kernel offset into a column matrix
(``channels x kernel volume`` rows, one column per output voxel: 95 MB for 8 channels of 48^3 with a 3^3
kernel), fills the output with the bias, and adds one BLAS matrix product (``sgemm``, ``beta = 1``).
Writing that matrix, far larger than the cache, is most of the time: 73 ms of the 78 ms of the
convolution of ``cascade``'s stage-1 U-Net on 8 channels of 48^3 on one thread.

:func:`conv3d` builds the same columns one slab of output planes at a time (the copies of the padded
input's strided views, through numpy), small enough to stay in the cache, and adds the product of the
same weight matrix with them into the bias-filled output (``Tensor.addmm_``, the same ``sgemm``
call with fewer output columns). Each output voxel is the same sum of the same products: the columns
hold the same values, and MKL's ``sgemm`` adds a column's products over the kernel in the same order
whatever the number of columns, for the matrix sizes this path allows (:data:`OUT_CHANNELS`,
:data:`MAX_ROW`, :data:`MIN_SLAB_COLUMNS`: measured, not promised by MKL). ``tests/networks/test_conv.py``
checks this against ``F.conv3d`` bit for bit for the shipped networks' shapes and others, and
``benchmarks/compare_predictions.py`` end to end.

Only what PyTorch itself would send to its reference code takes this path (:func:`uses_reference_path`
asks PyTorch): CPU float32 inference (autograd not following), one image, no groups, stride and dilation
1, zero padding, a kernel of more than one voxel. Everything else, training included, runs ``F.conv3d``.

Example:
    >>> import torch
    >>> x = torch.arange(64.0).reshape(1, 1, 4, 4, 4)
    >>> w = torch.ones(1, 1, 3, 3, 3)
    >>> bool(torch.equal(conv3d(x, w, None, (1, 1, 1)), torch.nn.functional.conv3d(x, w, None, 1, 1)))
    True
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv3d", "conv3d", "uses_reference_path"]

#: Bytes of columns per slab of output planes (at least one plane): they stay in the cache between their
#: copy and the matrix product.
SLAB_BYTES = 1 << 21
#: The matrix products this path makes: a slab has at least this many output voxels (columns) ...
MIN_SLAB_COLUMNS = 64
#: ... the weight matrix at least 4 and at most 128 rows (output channels) and at most 1728 columns
#: (input channels x kernel voxels). Within these bounds MKL's ``sgemm`` gave every column the same bits
#: whatever the number of columns around it (1,620 random blocks, ``tests/networks/test_conv.py`` repeats
#: a sample); with 2 or 3 rows, or fewer than 12 columns, it did not.
OUT_CHANNELS = (4, 128)
MAX_ROW = 1728


def uses_reference_path(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int] | str,
                        dilation: Sequence[int], groups: int) -> bool:
    """True where ``F.conv3d`` runs PyTorch's reference code, :func:`conv3d` gives its values, and it pays.

    PyTorch says which code it would run (``torch._C._select_conv_backend``: ``Slow3d`` for its reference
    code); this path takes CPU float32 inference of one image, without groups, stride or dilation, with
    zero padding and a kernel of more than one voxel, where that is the answer, within the matrix sizes
    of :data:`OUT_CHANNELS` and :data:`MAX_ROW`. It pays when the reference code's column matrix is larger
    than one slab (:data:`SLAB_BYTES`); below that the two take about the same time
    (``benchmarks/bench_conv.py``).
    """
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 5
            or x.shape[0] != 1 or groups != 1 or isinstance(padding, str) or not x.is_contiguous()
            or any(int(s) != 1 for s in stride) or any(int(d) != 1 for d in dilation)
            or any(int(p) < 0 for p in padding)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return False
    kernel = tuple(int(k) for k in weight.shape[2:])
    if not (OUT_CHANNELS[0] <= int(weight.shape[0]) <= OUT_CHANNELS[1]) \
            or int(x.shape[1]) * int(np.prod(kernel)) > MAX_ROW:
        return False
    out_voxels = np.prod([int(n) + 2 * int(p) - k + 1 for n, p, k in zip(x.shape[2:], padding, kernel, strict=True)])
    if kernel == (1, 1, 1) or 4 * int(x.shape[1]) * int(np.prod(kernel)) * max(int(out_voxels), 0) <= SLAB_BYTES:
        return False  # no columns, or they fit in the cache already: the reference code's own loop is as fast
    select = getattr(torch._C, "_select_conv_backend", None)
    slow3d = getattr(getattr(torch._C, "_ConvBackend", None), "Slow3d", None)
    if select is None or slow3d is None:
        return False
    backend = select(x, weight, None, list(stride), [int(p) for p in padding], list(dilation), False, [0, 0, 0],
                     groups, None)
    return bool(backend == slow3d)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Sequence[int]) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, 1, padding)`` for one image, as PyTorch's reference code computes it.

    Args:
        x: ``(1, C, D, H, W)`` float32, contiguous.
        weight: ``(O, C, kD, kH, kW)``.
        bias: ``(O,)`` or None.
        padding: zero padding per axis.

    Returns:
        ``(1, O, D', H', W')``.
    """
    _, c, *size = x.shape
    o = int(weight.shape[0])
    kernel = [int(k) for k in weight.shape[2:]]
    pad = [int(p) for p in padding]
    out_size = [n + 2 * p - k + 1 for n, p, k in zip(size, pad, kernel, strict=True)]
    if min(out_size) < 1:
        return F.conv3d(x, weight, bias, 1, pad)
    xp = F.pad(x[0].detach(), (pad[2], pad[2], pad[1], pad[1], pad[0], pad[0])) if any(pad) else x[0].detach()
    src = xp.numpy()
    out = torch.empty((1, o, *out_size), dtype=x.dtype)
    if bias is not None:
        out.copy_(bias.detach().reshape(1, o, 1, 1, 1).expand_as(out))
    else:
        out.zero_()
    w2 = weight.detach().reshape(o, -1)
    plane = out_size[1] * out_size[2]
    kvol = kernel[0] * kernel[1] * kernel[2]
    slab = max(1, -(-MIN_SLAB_COLUMNS // plane), SLAB_BYTES // (4 * c * kvol * plane))
    slab = min(slab, out_size[0])
    if out_size[0] - slab * ((out_size[0] - 1) // slab) < -(-MIN_SLAB_COLUMNS // plane):
        slab = out_size[0]  # the last slab would hold too few columns: one product over the whole output
    out2 = out.view(o, out_size[0], plane)
    buffers: dict[int, torch.Tensor] = {}
    for z0 in range(0, out_size[0], slab):
        n = min(slab, out_size[0] - z0)
        if n not in buffers:  # torch's allocator: aligned as the reference code's columns are
            buffers[n] = torch.empty((c * kvol, n * plane), dtype=x.dtype)
        cols = buffers[n].numpy().reshape(c, *kernel, n, out_size[1], out_size[2])
        for kd, kh, kw in itertools.product(range(kernel[0]), range(kernel[1]), range(kernel[2])):
            np.copyto(cols[:, kd, kh, kw], src[:, z0 + kd:z0 + kd + n, kh:kh + out_size[1], kw:kw + out_size[2]])
        # the output's planes z0..z0+n of every channel: a view, rows one channel apart
        out2[:, z0:z0 + n].view(o, n * plane).addmm_(w2, buffers[n])
    return out


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same arguments and parameters) with :func:`conv3d`'s inference path where it applies."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002 (PyTorch's name)
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode == "zeros" and uses_reference_path(input, weight, self.stride, self.padding,
                                                                 self.dilation, self.groups):
            return conv3d(input, weight, bias, self.padding)  # type: ignore[arg-type]
        return super()._conv_forward(input, weight, bias)
