"""Patch U-Nets: the fine stage of ``prior_guided``, one independent U-Net per landmark.

Each landmark has its own full-resolution patch (centred at its coarse estimate) and its own U-Net,
which predicts a Gaussian heatmap (decoded to a sub-voxel peak by
:func:`lmk3d.transforms.heatmap.decode_peaks`). The ``G`` U-Nets of a detector are stored as one
module whose convolutions are *grouped* (``groups=G``): group ``g`` only ever sees patch ``g``, so
they are exactly ``G`` independent networks, yet all patches go through one forward pass (the
contract's batching of per-landmark patches; on a CPU it also keeps small batches on the fast
oneDNN convolution path). Channel ``g`` of the input is landmark ``g``'s patch; channel ``g`` of the
output is its heatmap.

Built from :class:`lmk3d.networks.blocks.Convolution` blocks (MONAI's layout) (instance normalisation is per
channel, hence per group); the encoder and decoder are separate modules so the correlated-landmark
module (:mod:`lmk3d.networks.correlated_module`) reuses them. Odd sizes work: the up path pads to
the skip connection's size.

Example:
    >>> import torch
    >>> net = PatchUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8, 16), num_landmarks=3)
    >>> net(torch.zeros(2, 3, 17, 19, 15)).shape
    torch.Size([2, 3, 17, 19, 15])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmk3d.networks.blocks import Convolution, conv_transpose_type, conv_type, max_pool_type

ACT: tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
NORM: tuple = ("instance", {"affine": True})


def group_cat(tensors: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Concatenate channels group by group, so each group's channels stay contiguous.

    Args:
        tensors: ``(B, groups * C_t, *spatial)`` each.

    Returns:
        ``(B, groups * sum(C_t), *spatial)`` ordered ``[group 0: t0, t1, ...; group 1: ...]``.
    """
    b, spatial = tensors[0].shape[0], tensors[0].shape[2:]
    parts = [t.reshape(b, groups, t.shape[1] // groups, *spatial) for t in tensors]
    return torch.cat(parts, dim=2).reshape(b, -1, *spatial)


def _two_conv(spatial_dims: int, in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    """Two 3x3 conv-norm-act blocks, ``in_ch`` and ``out_ch`` per group."""
    return nn.Sequential(
        Convolution(spatial_dims, groups * in_ch, groups * out_ch, kernel_size=3, act=ACT, norm=NORM, groups=groups),
        Convolution(spatial_dims, groups * out_ch, groups * out_ch, kernel_size=3, act=ACT, norm=NORM, groups=groups),
    )


class PatchEncoder(nn.Module):
    """Contracting path of ``groups`` independent encoders: ``len(channels)`` levels, max pooling between.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels per group.
        channels: feature widths per level (per group), finest first.
        groups: independent encoders (one per patch).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                 groups: int = 1) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels (finest first), got {tuple(channels)}")
        if groups < 1:
            raise ValueError(f"groups (independent networks) must be at least 1, got {groups}")
        self.channels = tuple(int(c) for c in channels)
        self.groups = groups
        self.pool = max_pool_type(spatial_dims)(kernel_size=2)
        ins = (in_channels, *self.channels[:-1])
        self.levels = nn.ModuleList(
            _two_conv(spatial_dims, a, b, groups) for a, b in zip(ins, self.channels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args:
            x: ``(B, groups * in_channels, D, H, W)``.

        Returns:
            One feature map per level, finest first: ``(B, groups * channels[l], ~D / 2**l, ...)``.
        """
        feats = [self.levels[0](x)]
        for level in self.levels[1:]:
            feats.append(level(self.pool(feats[-1])))
        return feats


class PatchDecoder(nn.Module):
    """Expanding path of ``groups`` independent decoders with skip connections and a 1x1 head.

    Args:
        spatial_dims: 2 or 3.
        out_channels: heatmaps per group.
        channels: the encoder's widths per group, finest first.
        bottleneck_channels: per-group width of the deepest input if it differs from ``channels[-1]``
            (e.g. own plus fused features).
        groups: independent decoders.
    """

    def __init__(self, spatial_dims: int = 3, out_channels: int = 1, channels: Sequence[int] = (16, 32, 64),
                 bottleneck_channels: int | None = None, groups: int = 1) -> None:
        super().__init__()
        ch = tuple(int(c) for c in channels)
        self.groups = groups
        deep = [bottleneck_channels or ch[-1], *ch[-2:0:-1]]
        skips = ch[-2::-1]
        up = conv_transpose_type(spatial_dims)
        self.ups = nn.ModuleList(up(groups * d, groups * s, kernel_size=2, stride=2, groups=groups)
                                 for d, s in zip(deep, skips, strict=True))
        self.convs = nn.ModuleList(_two_conv(spatial_dims, 2 * s, s, groups) for s in skips)
        self.head = conv_type(spatial_dims)(groups * ch[0], groups * out_channels, kernel_size=1, groups=groups)

    def forward(self, feats: Sequence[torch.Tensor], bottleneck: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            feats: the encoder's features, finest first.
            bottleneck: replaces ``feats[-1]`` (e.g. features fused across patches), same size.

        Returns:
            ``(B, groups * out_channels, D, H, W)`` at the size of ``feats[0]``.
        """
        x = feats[-1] if bottleneck is None else bottleneck
        for up, conv, skip in zip(self.ups, self.convs, feats[-2::-1], strict=True):
            x = up(x)
            # Max pooling floors odd sizes: pad the upsampled map back to the skip's size.
            pad: list[int] = []
            for d in range(x.ndim - 1, 1, -1):
                pad += [0, skip.shape[d] - x.shape[d]]
            if any(pad):
                x = F.pad(x, pad, mode="replicate")
            x = conv(group_cat([skip, x], self.groups))
        return self.head(x)


class PatchUNet(nn.Module):
    """``num_landmarks`` independent heatmap U-Nets, one per landmark patch, run as one module.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels per patch.
        out_channels: heatmaps per landmark (1).
        channels: widths per level, finest first (e.g. ``(16, 32, 64)``: three levels).
        num_landmarks: independent U-Nets (grouped convolutions).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 64), num_landmarks: int = 1) -> None:
        super().__init__()
        self.num_landmarks = num_landmarks
        self.in_channels = in_channels
        self.encoder = PatchEncoder(spatial_dims, in_channels, channels, num_landmarks)
        self.decoder = PatchDecoder(spatial_dims, out_channels, channels, groups=num_landmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``(B, num_landmarks * in_channels, D, H, W)``, landmark ``g``'s patch in channel block ``g``.

        Returns:
            ``(B, num_landmarks * out_channels, D, H, W)`` heatmap logits (trained towards peak-1 Gaussians).
        """
        if x.shape[1] != self.num_landmarks * self.in_channels:
            raise ValueError(f"expected {self.num_landmarks * self.in_channels} input channels "
                             f"({self.num_landmarks} patches of {self.in_channels}), got {x.shape[1]}")
        return self.decoder(self.encoder(x))
