"""The cascade's stage-1 network: a 3D U-Net regressing ``N + 1`` heatmap channels, with deep supervision.

Tan et al. (2019) customise the 3D U-Net of Ronneberger et al.: a contracting path (two 3x3x3
convolutions with ReLU per level, 2x max-pooling), an expanding path (2x transposed convolution,
concatenation with the skip connection of equal resolution, two convolutions), "same" padding, and
three side paths whose auxiliary losses shorten the gradient path. Here the side paths are 1x1x1
heads on the three coarsest decoder inputs (the bottleneck and the next two up-sampled levels),
trilinearly up-sampled to the input size; the main output comes from the finest level. The output
is linear: the heatmap targets lie in ``[0, 1]`` and are regressed with a (weighted) MSE.

Example:
    >>> import torch
    >>> net = HeatmapUNet(spatial_dims=3, in_channels=1, out_channels=5, channels=(4, 8, 16, 32))
    >>> out, sides = net.forward_deep(torch.zeros(2, 1, 17, 20, 9))
    >>> tuple(out.shape), [tuple(s.shape) for s in sides]
    ((2, 5, 17, 20, 9), [(2, 5, 17, 20, 9), (2, 5, 17, 20, 9), (2, 5, 17, 20, 9)])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmk3d.networks.blocks import Convolution
from lmk3d.networks.pooling import max_pool


def _crop(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The first ``size`` voxels along each spatial axis of ``(B, C, *spatial)`` (undoes the padding)."""
    for axis, n in enumerate(size):
        t = t.narrow(2 + axis, 0, int(n))
    return t


class _DoubleConv(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by ``norm`` and ReLU ("same" padding)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str | None) -> None:
        super().__init__(
            Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, act="RELU", norm=norm),
            Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, act="RELU", norm=norm),
        )


class HeatmapUNet(nn.Module):
    """3D U-Net with ``out_channels`` linear heatmap outputs and ``num_side_outputs`` deep-supervision heads.

    Args:
        spatial_dims: 3 (2 works too, for 2D experiments).
        in_channels: image channels (1).
        out_channels: heatmap channels, ``N + 1`` for ``N`` landmarks and the background.
        channels: features per level, coarsest last; ``len(channels) - 1`` poolings.
        norm: norm name per convolution (``"INSTANCE"``, ``"BATCH"``) or None (the paper's plain ReLU).
        num_side_outputs: deep-supervision heads (the paper: 3), at most ``len(channels) - 1``.
        out_bias: initial bias of each output channel (all heads), e.g. the targets' mean: 0 for the
            landmark channels and 1 for the background. Starting there saves the many steps a bias
            takes to travel to 1 at Adam's step size. None keeps PyTorch's default initialisation.

    Inputs of any size work: they are zero-padded up to a multiple of ``2 ** (len(channels) - 1)`` and
    the outputs are cropped back.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str | None = "INSTANCE",
        num_side_outputs: int = 3,
        out_bias: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if len(chans) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {tuple(channels)}")
        if not 0 <= num_side_outputs <= len(chans) - 1:
            raise ValueError(f"num_side_outputs must be in 0..{len(chans) - 1} for {len(chans)} levels, "
                             f"got {num_side_outputs}")
        self.spatial_dims = spatial_dims
        self.num_side_outputs = num_side_outputs
        self.encoders = nn.ModuleList()
        prev = in_channels
        for c in chans:
            self.encoders.append(_DoubleConv(spatial_dims, prev, c, norm))
            prev = c
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for lvl in range(len(chans) - 2, -1, -1):
            self.ups.append(Convolution(spatial_dims, chans[lvl + 1], chans[lvl], strides=2, kernel_size=2,
                                        is_transposed=True, conv_only=True, padding=0, output_padding=0))
            self.decoders.append(_DoubleConv(spatial_dims, 2 * chans[lvl], chans[lvl], norm))
        self.head = Convolution(spatial_dims, chans[0], out_channels, kernel_size=1, conv_only=True)
        # Side heads read the bottleneck and the following decoder levels, coarsest first (s = 1, 2, 3).
        side_in = [chans[-1]] + [chans[lvl] for lvl in range(len(chans) - 2, 0, -1)]
        self.side_heads = nn.ModuleList(
            Convolution(spatial_dims, c, out_channels, kernel_size=1, conv_only=True)
            for c in side_in[:num_side_outputs]
        )
        self._multiple = 2 ** (len(chans) - 1)
        if out_bias is not None:
            if len(out_bias) != out_channels:
                raise ValueError(f"out_bias needs {out_channels} values (one per output channel), got {len(out_bias)}")
            with torch.no_grad():
                for head in [self.head, *self.side_heads]:
                    head.conv.bias.copy_(torch.as_tensor([float(b) for b in out_bias]))

    def _run(self, x: torch.Tensor, with_sides: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[2:]
        pad: list[int] = []
        for n in reversed(size):
            pad += [0, (-int(n)) % self._multiple]
        h = F.pad(x, pad) if any(pad) else x
        skips = []
        for lvl, enc in enumerate(self.encoders):
            if lvl > 0:
                h = max_pool(h, self.spatial_dims, 2)
            h = enc(h)
            skips.append(h)
        feats = [h]
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            h = dec(torch.cat([up(h), skip], dim=1))
            feats.append(h)
        out = _crop(self.head(h), size)
        sides = []
        if with_sides:
            mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
            padded = tuple(int(n) for n in h.shape[2:])
            for head, f in zip(self.side_heads, feats, strict=False):
                s = F.interpolate(head(f), size=padded, mode=mode, align_corners=False)
                sides.append(_crop(s, size))
        return out, sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmaps.

        Args:
            x: ``(B, in_channels, D, H, W)``.

        Returns:
            ``(B, out_channels, D, H, W)``.
        """
        return self._run(x, with_sides=False)[0]

    def forward_deep(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Heatmaps and the side-path heatmaps (for the deep-supervision loss).

        Args:
            x: ``(B, in_channels, D, H, W)``.

        Returns:
            ``(main, sides)``: ``main`` is ``(B, out_channels, D, H, W)``; ``sides`` holds
            ``num_side_outputs`` tensors of the same shape, coarsest level first.
        """
        return self._run(x, with_sides=True)
