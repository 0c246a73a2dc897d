"""PIN's CNN (Li et al. 2018, Fig. 2c): shared 2D convolutions on a 2.5D patch stack, two task heads.

The input stacks three orthogonal ``s x s`` patches per landmark (``3N`` channels). Five blocks of
3x3 convolution + ReLU + 2x2 max-pooling (stride 2) are shared; after them each task has its own
fully connected layers with dropout:

- regression: the displacement ``d`` in shape space (``out_channels = n_b`` values);
- classification: ``2 n_b`` logits, the direction classes ``(+mode 1, -mode 1, +mode 2, ...)``.

Example:
    >>> import torch
    >>> net = PinCNN(in_channels=12, out_channels=5, roi_size=33, channels=(8, 8, 8, 8, 8), fc_channels=(16,))
    >>> d, logits = net(torch.zeros(2, 12, 33, 33))
    >>> tuple(d.shape), tuple(logits.shape)
    ((2, 5), (2, 10))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmk3d.networks.blocks import Convolution, FullyConnectedNet
from lmk3d.networks.pooling import MaxPool2d


class PinCNN(nn.Module):
    """Shared conv trunk + regression head + direction-classification head.

    Args:
        spatial_dims: 2 (the 2.5D representation: 2D convolutions over a stack of planes).
        in_channels: ``3N`` planes (three per landmark).
        out_channels: ``n_b``, the shape-space dimension (3 for the single-landmark variant).
        roi_size: patch side ``s`` in pixels (any size >= 1; odd sizes keep the landmark on a pixel centre).
        channels: filters of the five conv layers (paper: 32, 64, 128, 256, 512).
        fc_channels: hidden widths of each head's fully connected layers (the paper uses three FC
            layers per head, i.e. two hidden ones plus the output).
        dropout: dropout probability after each hidden FC layer.
        norm: optional normalisation in the conv blocks (``None`` as in the paper, or e.g. ``"batch"``).
        output_scale: optional ``(out_channels,)`` scale of the regression output (e.g. ``sqrt(lambda)``
            per mode), so that a freshly initialised head already predicts at the right scale; the
            loss is unchanged, only its conditioning. Stored as a buffer (saved with the weights).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        roi_size: int,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        fc_channels: Sequence[int] = (1024, 1024),
        dropout: float = 0.5,
        norm: str | None = None,
        output_scale: Sequence[float] | torch.Tensor | None = None,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"PinCNN works on 2.5D patch stacks: spatial_dims must be 2, got {spatial_dims}")
        if in_channels < 1 or out_channels < 1 or roi_size < 1 or not channels:
            raise ValueError(f"PinCNN needs in_channels, out_channels, roi_size >= 1 and some channels; got "
                             f"{in_channels}, {out_channels}, {roi_size}, {tuple(channels)}")
        layers: list[nn.Module] = []
        c_in, side = in_channels, int(roi_size)
        for c_out in channels:
            layers.append(Convolution(spatial_dims, c_in, int(c_out), kernel_size=3, act="RELU", norm=norm,
                                      padding=1))
            # ceil_mode keeps a 1-pixel map alive for small patches (the cpu/tiny profiles).
            layers.append(MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            c_in, side = int(c_out), (side + 1) // 2
        self.features = nn.Sequential(*layers)
        flat = c_in * side * side
        self.out_channels = int(out_channels)
        self.regression = FullyConnectedNet(flat, out_channels, list(fc_channels), dropout=dropout, act="RELU")
        self.classification = FullyConnectedNet(flat, 2 * out_channels, list(fc_channels), dropout=dropout,
                                                act="RELU")
        scale = torch.ones(out_channels) if output_scale is None else torch.as_tensor(output_scale).float()
        if scale.shape != (out_channels,):
            raise ValueError(f"output_scale must have {out_channels} values, got shape {tuple(scale.shape)}")
        self.register_buffer("output_scale", scale.clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: ``(B, 3N, s, s)`` patch stacks.

        Returns:
            ``d``: ``(B, n_b)`` displacement in shape space; ``logits``: ``(B, 2 n_b)`` direction
            logits, class ``2i`` = ``+`` along mode ``i``, class ``2i + 1`` = ``-``.
        """
        f = self.features(x).flatten(1)
        return self.regression(f) * self.output_scale, self.classification(f)
