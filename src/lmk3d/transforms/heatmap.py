"""Gaussian heatmaps: encode landmark positions on a grid, decode peaks with sub-voxel refinement."""

from __future__ import annotations

import torch

from lmk3d.networks.pooling import max_pool


def gaussian_heatmaps(points: torch.Tensor, shape: tuple[int, int, int], sigma: float | torch.Tensor) -> torch.Tensor:
    """One unnormalised Gaussian (peak 1) per point.

    Args:
        points: ``(..., 3)`` continuous grid indices (NaN rows give all-zero maps).
        shape: ``(D, H, W)``.
        sigma: standard deviation in voxels (a scalar or broadcastable to ``points[..., 0]``).

    Returns:
        ``(..., D, H, W)`` in ``[0, 1]``.
    """
    axes = [torch.arange(n, dtype=points.dtype, device=points.device) for n in shape]
    lead = points.shape[:-1]
    p = points.reshape(-1, 3)
    s = torch.as_tensor(sigma, dtype=points.dtype, device=points.device).expand(lead).reshape(-1)
    # separable: exp(-(dx^2 + dy^2 + dz^2) / 2 s^2) = gx * gy * gz
    g = [torch.exp(-((axes[a][None, :] - p[:, a, None]) ** 2) / (2 * s[:, None] ** 2)) for a in range(3)]
    out = g[0][:, :, None, None] * g[1][:, None, :, None] * g[2][:, None, None, :]
    out = torch.nan_to_num(out, nan=0.0)
    return out.reshape(*lead, *shape)


def decode_peaks(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak position (sub-voxel) and peak value of each heatmap.

    The integer argmax is refined along each axis by fitting a parabola to the logarithm of the
    peak and its two neighbours: exact for a Gaussian peak, and local, so a second blob elsewhere
    does not pull the estimate. The offset is clamped to half a voxel; at the border, or where a
    neighbour is not positive, that axis keeps the integer position.

    Args:
        heatmaps: ``(..., D, H, W)``.

    Returns:
        ``(positions (..., 3) float grid indices, peaks (...))``.
    """
    lead = heatmaps.shape[:-3]
    dims = heatmaps.shape[-3:]
    flat = heatmaps.reshape(-1, dims[0] * dims[1] * dims[2])
    peak, arg = flat.max(dim=1)
    rows = torch.arange(arg.shape[0], device=heatmaps.device)
    pos = _refine(heatmaps.reshape(-1, *dims), rows, _unravel(arg, dims), peak)
    return pos.reshape(*lead, 3), peak.reshape(lead)


def local_peaks(heatmaps: torch.Tensor, k: int, radius: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest local maxima of each heatmap, sub-voxel refined as in :func:`decode_peaks`.

    A voxel is a local maximum when it is the largest in the cube of ``2 radius + 1`` voxels around it
    and positive. Candidates are sorted by value, the first being the global maximum of
    :func:`decode_peaks`; a heatmap with fewer than ``k`` maxima pads its rows with NaN positions and
    ``-inf`` values.

    Args:
        heatmaps: ``(..., D, H, W)``.
        k: candidates per heatmap (at least 1).
        radius: half-size of the neighbourhood, in voxels.

    Returns:
        ``(positions (..., k, 3) float grid indices, values (..., k))``.
    """
    if k < 1 or radius < 0:
        raise ValueError(f"local_peaks needs k >= 1 and radius >= 0, got k={k}, radius={radius}")
    lead = heatmaps.shape[:-3]
    dims = heatmaps.shape[-3:]
    vol = heatmaps.reshape(-1, *dims)
    pooled = max_pool(vol[:, None], 3, 2 * radius + 1, 1, radius)[:, 0]
    is_max = (vol >= pooled) & (vol > 0)
    flat = torch.where(is_max, vol, torch.full_like(vol, -torch.inf)).reshape(vol.shape[0], -1)
    kk = min(k, flat.shape[1])
    val, arg = flat.topk(kk, dim=1)
    pos = torch.full((vol.shape[0], k, 3), torch.nan, dtype=heatmaps.dtype, device=heatmaps.device)
    values = torch.full((vol.shape[0], k), -torch.inf, dtype=heatmaps.dtype, device=heatmaps.device)
    values[:, :kk] = val
    rows = torch.arange(vol.shape[0], device=heatmaps.device).repeat_interleave(kk)
    idx = _unravel(arg.reshape(-1), dims)
    refined = _refine(vol, rows, idx, val.reshape(-1)).reshape(vol.shape[0], kk, 3)
    pos[:, :kk] = torch.where(torch.isfinite(val)[..., None], refined, torch.full_like(refined, torch.nan))
    return pos.reshape(*lead, k, 3), values.reshape(*lead, k)


def _unravel(arg: torch.Tensor, dims: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Flat indices ``(M,)`` -> ``(M, 3)`` voxel indices."""
    return torch.stack([arg // (dims[1] * dims[2]), (arg // dims[2]) % dims[1], arg % dims[2]], dim=1)


def _refine(vol: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Log-parabola sub-voxel refinement of voxel ``idx[m]`` of heatmap ``vol[rows[m]]`` (value ``peak[m]``).

    ``vol`` is ``(V, D, H, W)``; several candidates of one heatmap share its row, nothing is copied.
    """
    dims = vol.shape[-3:]
    m = rows
    pos = idx.to(vol.dtype).clone()
    eps = 1e-12
    for axis in range(3):
        lo_i, hi_i = idx.clone(), idx.clone()
        lo_i[:, axis] = (idx[:, axis] - 1).clamp(min=0)
        hi_i[:, axis] = (idx[:, axis] + 1).clamp(max=dims[axis] - 1)
        v0 = peak
        vm = vol[m, lo_i[:, 0], lo_i[:, 1], lo_i[:, 2]]
        vp = vol[m, hi_i[:, 0], hi_i[:, 1], hi_i[:, 2]]
        ok = (idx[:, axis] > 0) & (idx[:, axis] < dims[axis] - 1) & (vm > eps) & (vp > eps) & (v0 > eps)
        lm, l0, lp = (torch.log(v.clamp(min=eps)) for v in (vm, v0, vp))
        denom = lm - 2 * l0 + lp
        curved = ok & (denom < -eps)  # a maximum: the log-parabola opens downwards
        safe = torch.where(curved, denom, -torch.ones_like(denom))
        off = torch.where(curved, 0.5 * (lm - lp) / safe, torch.zeros_like(denom))
        pos[:, axis] += off.clamp(-0.5, 0.5)
    return pos
