"""Block means of a 3D image on the CPU: PyTorch's ``avg_pool3d`` values bit for bit, faster, from a strided view.

The box filter that reduces an image for a stage (:func:`lmk3d.transforms.grid.antialias`) is
``F.avg_pool3d(x, f, f, ceil_mode=True, count_include_pad=False)``: each output voxel is the sum of its
block, added one voxel after the other from 0 in (i, j, k) order, divided by the number of voxels in the
block (partial blocks at the far ends count theirs). On one thread PyTorch does this one output voxel at
a time, after copying a strided input (a crop, a flipped view) to a dense one.

:func:`block_mean` makes the same additions in the same order, but one block offset at a time over all
blocks (numpy's ``add`` of strided views, negative strides for flipped axes), in slabs of output rows
small enough to stay in the cache. Float additions in the same order round the same way, so the values
are PyTorch's bit for bit (``tests/transforms/test_block_mean.py`` checks sizes, partial blocks, flips,
signed zeros, NaN and infinities against ``avg_pool3d``). It pays for strided views, which are not
copied first (the 1x2x2 filter of pin's fine crop of a 512 x 512 x 200 image), and for dense images with
small blocks; for larger blocks of a dense image PyTorch's own loop is faster and runs (:data:`MAX_DENSE_BLOCK`).

Only inference on the CPU takes this path (float tensors that autograd does not follow); otherwise
PyTorch's ``avg_pool3d`` runs.

Example:
    >>> import torch
    >>> x = torch.arange(6.0).reshape(1, 1, 1, 2, 3)
    >>> block_mean(x, (1, 2, 2)).flatten().tolist()
    [2.0, 4.5]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["block_mean"]

#: Bytes of output per slab: the running sums stay in the cache while every block offset is added.
SLAB_BYTES = 1 << 19
#: Blocks of more voxels than this, in a dense input, are left to PyTorch's loop, faster there on one thread
#: (``benchmarks/bench_block_mean.py``, docs/benchmarks.md); from strided views this function is faster.
MAX_DENSE_BLOCK = 8


def _torch_pool(x: torch.Tensor, factors: Sequence[int], flip: Sequence[int]) -> torch.Tensor:
    src = x.flip(list(flip)) if flip else x
    return F.avg_pool3d(src, kernel_size=list(factors), stride=list(factors), ceil_mode=True,
                        count_include_pad=False)


def block_mean(x: torch.Tensor, factors: Sequence[int], flip: Sequence[int] = ()) -> torch.Tensor:
    """``F.avg_pool3d(x.flip(flip), factors, factors, ceil_mode=True, count_include_pad=False)``, bit for bit.

    Args:
        x: ``(C, I, J, K)`` or ``(N, C, I, J, K)`` (as ``avg_pool3d`` takes it), any strides.
        factors: the block size along ``I, J, K`` (each at least 1).
        flip: axes of ``x`` (non-negative indices) read backwards, as if ``x`` were flipped along them first.

    Returns:
        ``(..., ceil(I / fi), ceil(J / fj), ceil(K / fk))``, a new C-ordered tensor.
    """
    f = [int(v) for v in factors]
    flip = [int(d) for d in flip]
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() not in (4, 5)
            or (torch.is_grad_enabled() and x.requires_grad) or x.is_conj() or x.is_neg() or len(f) != 3
            or min(f) < 1 or min(x.shape) < 1 or any(not 0 <= d < x.dim() for d in flip)
            or any(k > n for k, n in zip(f, x.shape[-3:], strict=True))  # PyTorch's error
            or (x.is_contiguous() and not flip and math.prod(f) > MAX_DENSE_BLOCK)):
        return _torch_pool(x, f, flip)
    a = x.detach().numpy()
    if flip:
        a = a[tuple(slice(None, None, -1) if d in flip else slice(None) for d in range(a.ndim))]
    sizes = a.shape[-3:]
    out = np.empty(a.shape[:-3] + tuple(-(-n // k) for n, k in zip(sizes, f, strict=True)), dtype=a.dtype)
    # Per axis, the full blocks and (where the size is not a multiple) the partial one at the end.
    parts = []
    for n, k in zip(sizes, f, strict=True):
        full, rest = divmod(n, k)
        axis = [(0, full, k)] if full else []
        if rest:
            axis.append((full, 1, rest))
        parts.append(axis)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN come out as PyTorch's, without warnings
        _add_blocks(a, f, parts, out)
    return torch.from_numpy(out)


def _add_blocks(a: np.ndarray, f: Sequence[int], parts: Sequence[Sequence[tuple[int, int, int]]],
                out: np.ndarray) -> None:
    """Fill ``out`` with the block means of ``a``: per region of full or partial blocks, slab by slab."""
    zero = a.dtype.type(0)
    row_bytes = out[..., 0, :, :].nbytes or 1
    for (i0, ni, ki), (j0, nj, kj), (k0, nk, kk) in itertools.product(*parts):
        count = a.dtype.type(ki * kj * kk)
        offsets = list(itertools.product(range(ki), range(kj), range(kk)))
        step = max(1, SLAB_BYTES // row_bytes) if ni > 1 else 1
        for s in range(i0, i0 + ni, step):
            rows = min(step, i0 + ni - s)
            acc = out[..., s:s + rows, j0:j0 + nj, k0:k0 + nk]
            first = (s * f[0], j0 * f[1], k0 * f[2])
            counts = (rows, nj, nk)
            views = [_offset_view(a, first, counts, f, offset) for offset in offsets]
            np.add(views[0], zero, out=acc)  # from +0, as PyTorch's sum starts (-0 becomes +0)
            for v in views[1:]:
                np.add(acc, v, out=acc)
            np.divide(acc, count, out=acc)


def _offset_view(a: np.ndarray, first: Sequence[int], counts: Sequence[int], f: Sequence[int],
                 offset: Sequence[int]) -> np.ndarray:
    """The voxel at ``offset`` inside each of ``counts`` blocks of ``f`` whose first starts at index ``first``."""
    index: tuple[Any, ...] = (Ellipsis, *(slice(b + o, b + o + (n - 1) * k + 1, k)
                                         for b, n, k, o in zip(first, counts, f, offset, strict=True)))
    return a[index]  # type: ignore[no-any-return]
