"""3D ResNet coordinate regressor: the coarse stage of ``prior_guided`` (Pang et al. 2023).

The whole (downsampled) volume goes in; the final fully connected layer gives ``3 N`` numbers, the
landmark coordinates normalised to the input grid (``-1`` and ``1`` are the centres of the first and
last voxels along each axis, as in ``grid_sample`` with ``align_corners=True``). Regressing all
landmarks jointly from the whole image keeps their structural relationships.

The backbone is a ResNet of basic blocks (:class:`lmk3d.networks.blocks.ResNet`, MONAI's layout);
``layers=(3, 4, 6, 3)`` and ``channels=(64, 128, 256, 512)`` is ResNet-34.

Example:
    >>> import torch
    >>> net = ResNetRegressor(spatial_dims=3, in_channels=1, out_channels=4, layers=(1, 1, 1, 1),
    ...                       channels=(8, 16, 32, 64))
    >>> net(torch.zeros(2, 1, 33, 29, 31)).shape
    torch.Size([2, 4, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmk3d.networks.blocks import ResNet

RESNET34_LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)
RESNET34_CHANNELS: tuple[int, int, int, int] = (64, 128, 256, 512)


class ResNetRegressor(nn.Module):
    """ResNet with a ``spatial_dims * out_channels`` fully connected head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of landmarks ``N``.
        layers: basic blocks per stage (ResNet-34: ``(3, 4, 6, 3)``).
        channels: widths of the four stages (ResNet-34: ``(64, 128, 256, 512)``).
        conv1_t_size: kernel size of the stem convolution.
        conv1_t_stride: stride of the stem convolution.
        norm: the stem's normalisation name (``"batch"``, ``"instance"``...).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        layers: Sequence[int] = RESNET34_LAYERS,
        channels: Sequence[int] = RESNET34_CHANNELS,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if len(layers) != len(channels):
            raise ValueError(f"layers {tuple(layers)} and channels {tuple(channels)} must have the same length "
                             "(one width per ResNet stage)")
        if out_channels < 1:
            raise ValueError(f"out_channels (the number of landmarks) must be at least 1, got {out_channels}")
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels
        self.backbone = ResNet(
            layers=list(layers),
            block_inplanes=list(channels),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            num_classes=spatial_dims * out_channels,
            norm=norm,
        )
        # Start from the centre of the grid: the first steps then learn the mean shape, not noise.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @property
    def fc(self) -> nn.Linear:
        """The final fully connected layer (``spatial_dims * out_channels`` outputs)."""
        return self.backbone.fc

    def set_mean_position(self, mean_normalised: torch.Tensor) -> None:
        """Set the output bias to a mean position, so the untrained network predicts the mean shape.

        Args:
            mean_normalised: ``(N, spatial_dims)`` normalised coordinates.
        """
        with torch.no_grad():
            self.fc.bias.copy_(mean_normalised.reshape(-1).to(self.fc.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: ``(B, in_channels, D, H, W)``.

        Returns:
            ``(B, out_channels, spatial_dims)`` normalised coordinates in grid-axis order.
        """
        return self.backbone(x).reshape(x.shape[0], self.out_channels, self.spatial_dims)


def normalise_coordinates(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Grid indices -> ``[-1, 1]`` (voxel centres of the first and last voxel).

    Args:
        idx: ``(..., spatial_dims)`` continuous grid indices.
        shape: the grid size along each axis.
    """
    size = torch.as_tensor([max(int(n) - 1, 1) for n in shape], dtype=idx.dtype, device=idx.device)
    return 2.0 * idx / size - 1.0


def denormalise_coordinates(norm: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`normalise_coordinates`."""
    size = torch.as_tensor([max(int(n) - 1, 1) for n in shape], dtype=norm.dtype, device=norm.device)
    return (norm + 1.0) * size / 2.0
