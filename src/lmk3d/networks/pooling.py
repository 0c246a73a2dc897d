"""Max pooling for inference on the CPU: the same values as PyTorch's, axis by axis, without its indices.

PyTorch's CPU max pooling (``max_pool2d``/``max_pool3d``) keeps the position of every maximum for a
backward pass and runs one window at a time: a 2x2x2 pooling of ``(1, 40, 32, 32, 32)`` took 5.2 ms
here, and ``cascade``'s local-maximum search (a 5^3 window, stride 1, on 5 channels of 48^3) 87 ms.
The maximum over a box is the maximum, along one axis, of the maxima along the others, and a maximum
rounds nothing, so pooling one axis at a time (``torch.maximum`` of the window's strided views) gives
the same values: 0.3 ms and 1.8 ms for those two. NaN spreads as in PyTorch's (a window holding one is
NaN), padding is ``-inf`` as in PyTorch's, and the output sizes follow PyTorch's rule, ``ceil_mode``
included.

The fast path is taken only for inference on the CPU: where autograd would need the gradient
(``torch.maximum`` splits it between equal values, PyTorch's pooling gives it to the first), on other
devices, for integer tensors, with dilation or indices, PyTorch's own pooling runs, so training is
unchanged.

Example:
    >>> import torch
    >>> x = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    >>> max_pool(x, 3, kernel_size=2, ceil_mode=True).flatten().tolist()
    [13.0, 14.0, 16.0, 17.0, 22.0, 23.0, 25.0, 26.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxPool1d", "MaxPool2d", "MaxPool3d", "max_pool"]

_TORCH_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values * n if len(values) == 1 else values


def _out_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (dilation 1)."""
    out = (size + 2 * pad - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:  # the last window must start inside the input
        out -= 1
    return out


def _pool_axis(x: torch.Tensor, dim: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> torch.Tensor:
    size = int(x.shape[dim])
    out = _out_size(size, kernel, stride, pad, ceil_mode)
    span = (out - 1) * stride + kernel  # the padded length the windows cover
    right = span - size - pad
    if pad or right > 0:
        parts = []
        if pad:
            parts.append(x.new_full((*x.shape[:dim], pad, *x.shape[dim + 1:]), float("-inf")))
        parts.append(x)
        if right > 0:
            parts.append(x.new_full((*x.shape[:dim], right, *x.shape[dim + 1:]), float("-inf")))
        x = torch.cat(parts, dim)
    lead = (slice(None),) * dim
    last = (out - 1) * stride + 1
    y = x[(*lead, slice(0, last, stride))]
    for offset in range(1, kernel):
        y = torch.maximum(y, x[(*lead, slice(offset, offset + last, stride))])
    return y if kernel > 1 else y.contiguous()


def _fast(x: torch.Tensor, spatial_dims: int, kernel: tuple[int, ...], pad: tuple[int, ...]) -> bool:
    return (x.device.type == "cpu" and x.is_floating_point() and x.dim() == spatial_dims + 2
            and not (torch.is_grad_enabled() and x.requires_grad)
            and all(0 <= p <= k // 2 for k, p in zip(kernel, pad, strict=True)))


def max_pool(x: torch.Tensor, spatial_dims: int, kernel_size: int | Sequence[int],
             stride: int | Sequence[int] | None = None, padding: int | Sequence[int] = 0,
             ceil_mode: bool = False) -> torch.Tensor:
    """``F.max_pool{1,2,3}d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)``, the same values.

    Args:
        x: ``(B, C, *spatial)`` with ``spatial_dims`` spatial axes.
        stride: the kernel size when None, as in PyTorch.

    Returns:
        ``(B, C, *pooled)``.
    """
    kernel = _per_axis(kernel_size, spatial_dims)
    steps = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else \
        _per_axis(stride, spatial_dims)
    pad = _per_axis(padding, spatial_dims)
    if not _fast(x, spatial_dims, kernel, pad) or len(kernel) != spatial_dims or len(steps) != spatial_dims \
            or len(pad) != spatial_dims or min(steps) < 1 or min(kernel) < 1 \
            or any(_out_size(int(n), k, s, p, ceil_mode) < 1
                   for n, k, s, p in zip(x.shape[2:], kernel, steps, pad, strict=True)):
        return _TORCH_POOL[spatial_dims](x, kernel, steps, pad, ceil_mode=ceil_mode)  # type: ignore[no-any-return]
    # Outer axes first: their strided views are long contiguous runs, and each pass shrinks the next one's input.
    for axis in range(spatial_dims):
        x = _pool_axis(x, 2 + axis, kernel[axis], steps[axis], pad[axis], ceil_mode)
    return x


class _Fast:
    """``forward`` of a PyTorch max-pooling module through :func:`max_pool` where that gives the same values."""

    spatial_dims: int
    kernel_size: Any
    stride: Any
    padding: Any
    dilation: Any
    ceil_mode: bool
    return_indices: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices or any(d != 1 for d in _per_axis(self.dilation, self.spatial_dims)):
            return super().forward(x)  # type: ignore[misc, no-any-return]
        return max_pool(x, self.spatial_dims, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class MaxPool1d(_Fast, nn.MaxPool1d):
    """``nn.MaxPool1d`` (same arguments, no parameters) with :func:`max_pool`'s inference path."""

    spatial_dims = 1


class MaxPool2d(_Fast, nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, no parameters) with :func:`max_pool`'s inference path."""

    spatial_dims = 2


class MaxPool3d(_Fast, nn.MaxPool3d):
    """``nn.MaxPool3d`` (same arguments, no parameters) with :func:`max_pool`'s inference path."""

    spatial_dims = 3
