"""Correlated-landmark module of ``prior_guided`` (Pang et al. 2023): fusion, axis attention, key slice.

Some landmarks are annotated on one shared *key slice* (e.g. chin and occipital bone on the
mid-sagittal plane). The *axis* is the grid axis perpendicular to that slice. Each correlated
landmark has its own patch; the patches share their extent along the axis (same slice positions),
so features at slice ``s`` of every patch describe the same world plane.

- **Separate encoders**, one per landmark patch (:class:`lmk3d.networks.patch_unet.PatchEncoder`).
- **Deep fusion**: the bottleneck features of all patches are concatenated and mixed by a 1x1x1
  convolution, slice by slice along the axis.
- **Axis attention** (CBAM style, :class:`AxisAttention`): channel attention computed per slice,
  ``M_c = sigmoid(MLP(F_max) + MLP(F_avg))`` with the max/mean taken over the in-slice dimensions
  (``MLP`` = two 1x1x1 convolutions shared by both inputs); spatial attention
  ``M_s = sigmoid(Conv([F_max, F_avg]))`` with the max/mean over channels; ``F_w = F * M_s * M_c``.
- **Key-slice detection** (:class:`KeySliceHead`): the fused features are averaged over the in-slice
  dimensions into 1D profiles along the axis, and 1D convolutions decode them (coarse to fine, with
  the fused skip profiles) into a Gaussian heatmap over slice positions; its peak fixes the
  correlated landmarks' coordinate on the axis.
- **Heatmap heads**: one decoder per landmark, fed with its own bottleneck and the fused one plus
  its own skip features, gives a 3D heatmap whose peak (near the key slice) gives the in-slice
  position.

The three parts can be switched off for the ablation (paper, Table 2): without fusion the module is
``k`` independent U-Nets.

Example:
    >>> import torch
    >>> m = CorrelatedModule(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), axis=0)
    >>> heat, key = m(torch.zeros(1, 2, 17, 19, 15))
    >>> heat.shape, key.shape
    (torch.Size([1, 2, 17, 19, 15]), torch.Size([1, 17]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmk3d.networks.blocks import Convolution, TwoConv, conv_type
from lmk3d.networks.patch_unet import ACT, NORM, PatchDecoder, PatchEncoder, group_cat
from lmk3d.transforms.heatmap import decode_peaks, gaussian_heatmaps


def _in_slice_dims(spatial_dims: int, axis: int) -> list[int]:
    """Tensor dimensions (of a ``(B, C, *spatial)`` tensor) that lie within a slice."""
    if not 0 <= axis < spatial_dims:
        raise ValueError(f"axis must be a spatial axis in 0..{spatial_dims - 1}, got {axis}")
    return [2 + d for d in range(spatial_dims) if d != axis]


def axis_profile(features: torch.Tensor, axis: int) -> torch.Tensor:
    """Average over the in-slice dimensions: ``(B, C, *spatial)`` -> ``(B, C, L)`` along ``axis``."""
    dims = _in_slice_dims(features.ndim - 2, axis)
    return features.mean(dim=dims)


class AxisAttention(nn.Module):
    """CBAM-style channel and spatial attention whose channel weights vary along the axis.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``C``.
        axis: spatial axis perpendicular to the key slice (0, 1 or 2).
        reduction: channel reduction of the shared 1x1x1 MLP.
        kernel_size: spatial-attention kernel (the paper uses 1).
    """

    def __init__(self, spatial_dims: int, channels: int, axis: int, reduction: int = 4, kernel_size: int = 1) -> None:
        super().__init__()
        self.dims = _in_slice_dims(spatial_dims, axis)
        conv = conv_type(spatial_dims)
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(conv(channels, hidden, kernel_size=1), nn.ReLU(inplace=True),
                                 conv(hidden, channels, kernel_size=1))
        self.spatial = conv(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention maps of ``x``: ``(B, C, *spatial)``.

        Returns:
            ``M_c``: ``(B, C, ...)`` with size 1 in every in-slice dimension (one weight per channel
            and slice); ``M_s``: ``(B, 1, *spatial)``.
        """
        f_max = x.amax(dim=self.dims, keepdim=True)
        f_avg = x.mean(dim=self.dims, keepdim=True)
        m_c = torch.sigmoid(self.mlp(f_max) + self.mlp(f_avg))
        s = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        m_s = torch.sigmoid(self.spatial(s))
        return m_c, m_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F_w = F * M_s * M_c``, same shape as ``x``."""
        m_c, m_s = self.maps(x)
        return x * m_s * m_c


class KeySliceHead(nn.Module):
    """1D convolutional decoder of axis profiles into a key-slice heatmap.

    Args:
        skip_channels: channels of the fused skip profiles, finest first (one per encoder level except
            the deepest).
        bottleneck_channels: channels of the deepest (fused, attended) profile.
    """

    def __init__(self, skip_channels: Sequence[int], bottleneck_channels: int) -> None:
        super().__init__()
        widths = [int(c) for c in skip_channels]
        deep = [bottleneck_channels, *[max(8, c // 2) for c in widths[:0:-1]]]
        outs = [max(8, c // 2) for c in widths[::-1]]
        self.blocks = nn.ModuleList(
            TwoConv(1, d + s, o, ACT, NORM, True) for d, s, o in zip(deep, widths[::-1], outs, strict=True)
        )
        self.head = nn.Conv1d(outs[-1], 1, kernel_size=1)

    def forward(self, skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Args:
            skips: ``(B, C_l, L_l)`` profiles, finest first.
            bottleneck: ``(B, C, L_deep)``.

        Returns:
            ``(B, L_0)`` key-slice heatmap over the finest slice positions.
        """
        x = bottleneck
        for block, skip in zip(self.blocks, skips[::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-1], mode="linear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)[:, 0]


class CorrelatedModule(nn.Module):
    """Joint detector of ``k`` landmarks that share a key slice.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels per patch.
        out_channels: number of correlated landmarks ``k`` (one patch and one heatmap each).
        channels: encoder widths per level, finest first.
        axis: spatial axis of the patches perpendicular to the key slice.
        fusion: fuse the bottleneck features of all patches (off: ``k`` independent U-Nets).
        axis_attention: refine the fused features with :class:`AxisAttention` (needs ``fusion``).
        slice_detection: add the key-slice branch (needs ``fusion``).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
                 channels: Sequence[int] = (16, 32, 64), axis: int = 0, fusion: bool = True,
                 axis_attention: bool = True, slice_detection: bool = True) -> None:
        super().__init__()
        if out_channels < 2:
            raise ValueError(f"a correlated group needs at least 2 landmarks (out_channels), got {out_channels}")
        if (axis_attention or slice_detection) and not fusion:
            raise ValueError("axis_attention and slice_detection work on fused features; set fusion=True "
                             "(the ablation adds fusion, then axis attention, then slice detection)")
        _in_slice_dims(spatial_dims, axis)
        ch = tuple(int(c) for c in channels)
        self.k, self.in_channels, self.axis = out_channels, in_channels, axis
        self.fusion, self.axis_attention, self.slice_detection = fusion, axis_attention, slice_detection
        # Grouped convolutions: one independent encoder (and decoder) per patch, run in one pass.
        self.encoder = PatchEncoder(spatial_dims, in_channels, ch, groups=out_channels)
        c = ch[-1]
        self.fuse = (Convolution(spatial_dims, out_channels * c, c, kernel_size=1, act=ACT, norm=NORM)
                     if fusion else None)
        self.attention = AxisAttention(spatial_dims, c, axis) if axis_attention else None
        self.key_slice = KeySliceHead([out_channels * w for w in ch[:-1]], c) if slice_detection else None
        self.decoder = PatchDecoder(spatial_dims, 1, ch, bottleneck_channels=2 * c if fusion else c,
                                    groups=out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args:
            x: ``(B, k * in_channels, *spatial)``, the ``k`` patches (sharing their axis extent).

        Returns:
            ``(heatmaps (B, k, *spatial), key_slice (B, spatial[axis]) or None)``.
        """
        if x.shape[1] != self.k * self.in_channels:
            raise ValueError(f"expected {self.k * self.in_channels} input channels ({self.k} patches of "
                             f"{self.in_channels}), got {x.shape[1]}")
        feats = self.encoder(x)  # per level: (B, k * C_l, ...), patch g in channel block g
        fused = None
        bottleneck = feats[-1]
        if self.fuse is not None:
            fused = self.fuse(feats[-1])
            if self.attention is not None:
                fused = self.attention(fused)
            # Each decoder gets its own bottleneck plus the fused one.
            bottleneck = group_cat([feats[-1], fused.repeat(1, self.k, *([1] * (fused.ndim - 2)))], self.k)
        heat = self.decoder(feats, bottleneck)
        key = None
        if self.key_slice is not None and fused is not None:
            skips = [axis_profile(f, self.axis) for f in feats[:-1]]
            key = self.key_slice(skips, axis_profile(fused, self.axis))
        return heat, key


def key_slice_heatmap(positions: torch.Tensor, length: int, sigma: float) -> torch.Tensor:
    """Encode key-slice positions as 1D Gaussians (peak 1) over slice indices.

    Args:
        positions: ``(B,)`` continuous slice indices along the axis (NaN: an all-zero target).
        length: number of slices ``L``.
        sigma: standard deviation in slices.

    Returns:
        ``(B, L)``.
    """
    pts = torch.zeros(*positions.shape, 3, dtype=positions.dtype, device=positions.device)
    pts[..., 0] = positions
    return gaussian_heatmaps(pts, (int(length), 1, 1), sigma)[..., 0, 0]


def decode_key_slice(heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-slice peak of key-slice heatmaps (argmax refined by a log-parabola, as for 3D peaks).

    Args:
        heatmap: ``(B, L)``.

    Returns:
        ``(positions (B,), peaks (B,))``.
    """
    pos, peak = decode_peaks(heatmap[..., None, None])
    return pos[..., 0], peak
