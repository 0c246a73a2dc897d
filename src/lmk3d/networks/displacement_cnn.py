"""The cascade's stage-2 network: a small CNN regressing a displacement from a patch, one per landmark.

Tan et al. (2019): four convolutional layers each followed by max-pooling, then two fully connected
layers; ReLU after every layer except the last. The paper trains one such network per landmark.

Here ``num_networks`` independent networks live in one module: the convolutions are *grouped*
(``groups = num_networks``) and the fully connected layers are batched matrix products with one
weight matrix per network, so the ``N`` per-landmark patches of an image go through in one forward
pass. Network ``n`` only ever sees channel group ``n`` of the input and owns its own weights, so
this is exactly ``N`` separate CNNs (their losses can be summed: no weight is shared).

Example:
    >>> import torch
    >>> net = DisplacementCNN(roi_size=(15, 16, 17), channels=(4, 4, 8, 8), hidden=16, num_networks=3)
    >>> tuple(net(torch.zeros(2, 3, 15, 16, 17)).shape)
    (2, 3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmk3d.networks.blocks import Convolution
from lmk3d.networks.pooling import MaxPool2d, MaxPool3d


class GroupedLinear(nn.Module):
    """``groups`` independent fully connected layers applied side by side.

    Args:
        groups: number of independent layers.
        in_features, out_features: per layer.
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        bound = 1.0 / math.sqrt(in_features)
        # The same initialisation as nn.Linear, one layer at a time.
        for g in range(groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, groups, in_features)`` -> ``(B, groups, out_features)``."""
        return torch.einsum("bgi,goi->bgo", x, self.weight) + self.bias


class DisplacementCNN(nn.Module):
    """``num_networks`` displacement regressors (4 conv + max-pool layers, 2 FC layers) run in one pass.

    Args:
        spatial_dims: 3 (2 works too).
        in_channels: image channels per network (1).
        out_channels: outputs per network (the displacement: ``spatial_dims``).
        roi_size: patch size; at least 16 along each axis (four 2x poolings).
        channels: features of the four convolutional layers (per network).
        hidden: units of the first fully connected layer (per network).
        num_networks: independent networks (one per landmark).
        norm: norm after each convolution (``"BATCH"``, ``"INSTANCE"``) or None (the paper's plain ReLU);
            per-channel norms keep the networks independent.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 3,
        roi_size: Sequence[int] = (64, 64, 64),
        channels: Sequence[int] = (32, 64, 128, 256),
        hidden: int = 256,
        num_networks: int = 1,
        norm: str | None = "BATCH",
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if len(chans) != 4:
            raise ValueError(f"channels must give the 4 convolutional layers' widths, got {tuple(channels)}")
        roi = [int(r) for r in roi_size]
        if len(roi) != spatial_dims or min(roi) < 16:
            raise ValueError(f"roi_size must have {spatial_dims} sizes of at least 16 (four 2x poolings), got {roi}")
        g = int(num_networks)
        if g < 1:
            raise ValueError(f"num_networks must be at least 1, got {num_networks}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_networks = g
        layers: list[nn.Module] = []
        prev = in_channels
        for c in chans:
            layers.append(Convolution(spatial_dims, prev * g, c * g, kernel_size=3, act="RELU", norm=norm, groups=g))
            layers.append(MaxPool3d(2) if spatial_dims == 3 else MaxPool2d(2))
            prev = c
        self.features = nn.Sequential(*layers)
        flat = chans[-1] * math.prod(r // 16 for r in roi)
        self.fc1 = GroupedLinear(g, flat, hidden)
        self.fc2 = GroupedLinear(g, hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Displacements.

        Args:
            x: ``(B, num_networks * in_channels, D, H, W)``; channel group ``n`` is network ``n``'s patch.

        Returns:
            ``(B, num_networks, out_channels)``.
        """
        if x.shape[1] != self.num_networks * self.in_channels:
            raise ValueError(f"expected {self.num_networks * self.in_channels} input channels "
                             f"({self.num_networks} networks x {self.in_channels}), got {x.shape[1]}")
        h = self.features(x)
        h = h.reshape(h.shape[0], self.num_networks, -1)
        return self.fc2(F.relu(self.fc1(h)))
