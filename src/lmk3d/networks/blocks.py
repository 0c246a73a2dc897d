"""Building blocks of every network, from ``torch.nn`` alone, laid out as MONAI lays out its own.

The networks were first built from MONAI's blocks (``Convolution``/``ADN``, ``TwoConv``,
``FullyConnectedNet``, ``ResNet`` with basic blocks, the ``Conv``/``Pool`` factories). Importing any
``monai`` module imports all of MONAI (seconds on a CPU, the largest part of a detector's cold start),
so these blocks rebuild the same modules here: the same submodule names (so the shipped checkpoints'
state dicts load unchanged), the same layers in the same order, and the same initialisation calls in
the same order (so a new network built under a given seed starts from the same weights).
``tests/networks/test_blocks.py`` checks each block against MONAI's: same parameter names and shapes,
same initial weights under one seed, same outputs in training and evaluation mode.

Names follow MONAI's: a norm is ``"instance"`` or ``"batch"`` (any case) or a ``(name, kwargs)`` pair,
e.g. ``("instance", {"affine": True})``; an activation is ``"relu"``, ``"leakyrelu"`` or ``"prelu"``,
optionally with kwargs; a dropout is a probability.

Example:
    >>> import torch
    >>> block = Convolution(3, 2, 4, kernel_size=3, act="RELU", norm="INSTANCE")
    >>> [name for name, _ in block.named_children()], block(torch.zeros(1, 2, 5, 6, 7)).shape
    (['conv', 'adn'], torch.Size([1, 4, 5, 6, 7]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lmk3d.networks.conv import Conv3d
from lmk3d.networks.pooling import MaxPool1d, MaxPool2d, MaxPool3d

__all__ = ["Convolution", "FullyConnectedNet", "ResNet", "TwoConv", "act_layer", "conv_type", "conv_transpose_type",
           "max_pool_type", "norm_layer"]

LayerSpec = str | tuple[str, Mapping[str, Any]]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {1: MaxPool1d, 2: MaxPool2d, 3: MaxPool3d}
_AVG_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_NORM: dict[str, dict[int, type[nn.Module]]] = {
    "instance": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}
_ACT: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "prelu": nn.PReLU}


def _dims(table: Mapping[int, Any], spatial_dims: int, what: str) -> Any:
    if spatial_dims not in table:
        raise ValueError(f"{what}: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return table[spatial_dims]


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (as :mod:`lmk3d.networks.conv` runs it: the same values)."""
    return _dims(_CONV, spatial_dims, "convolution")  # type: ignore[no-any-return]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose1d``, ``2d`` or ``3d``."""
    return _dims(_CONV_T, spatial_dims, "transposed convolution")  # type: ignore[no-any-return]


def max_pool_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.MaxPool1d``, ``2d`` or ``3d`` (as :mod:`lmk3d.networks.pooling` runs them: the same values)."""
    return _dims(_MAX_POOL, spatial_dims, "max pooling")  # type: ignore[no-any-return]


def _spec(spec: LayerSpec, what: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec.lower(), {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return spec[0].lower(), dict(spec[1])
    raise ValueError(f"{what} {spec!r}: give a name or a (name, keyword arguments) pair")


def norm_layer(norm: LayerSpec, spatial_dims: int, channels: int) -> nn.Module:
    """An instance or batch norm over ``channels`` features.

    Args:
        norm: ``"instance"``, ``"batch"`` (any case) or ``(name, kwargs)``, e.g. ``("instance", {"affine": True})``.
    """
    name, kwargs = _spec(norm, "norm")
    if name not in _NORM:
        raise ValueError(f"unknown norm {name!r}; choose one of {', '.join(_NORM)} (or None for no norm)")
    return _dims(_NORM[name], spatial_dims, "norm")(channels, **kwargs)  # type: ignore[no-any-return]


def act_layer(act: LayerSpec) -> nn.Module:
    """A ReLU, leaky ReLU or PReLU, e.g. ``act_layer(("leakyrelu", {"negative_slope": 0.1}))``."""
    name, kwargs = _spec(act, "activation")
    if name not in _ACT:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACT)}")
    return _ACT[name](**kwargs)


def _norm_dropout_act(channels: int, spatial_dims: int, norm: LayerSpec | None, dropout: float | None,
                      act: LayerSpec | None) -> nn.Sequential:
    """MONAI's ``ADN`` in its default order: children ``N`` (norm), ``D`` (dropout), ``A`` (activation),
    each only when given. Dropout is element-wise (``nn.Dropout``) whatever ``spatial_dims``."""
    seq = nn.Sequential()
    if norm is not None:
        seq.add_module("N", norm_layer(norm, spatial_dims, channels))
    if dropout is not None:
        seq.add_module("D", nn.Dropout(float(dropout)))
    if act is not None:
        seq.add_module("A", act_layer(act))
    return seq


class Convolution(nn.Sequential):
    """A convolution (child ``conv``) followed by norm, dropout and activation (child ``adn``).

    ``padding`` defaults to "same" for odd kernels (``(kernel_size - 1) // 2 * dilation``); ``conv_only``
    (or no norm, dropout or activation) leaves out ``adn``. ``is_transposed`` makes it a transposed
    convolution (``output_padding`` defaults to ``strides - 1``).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: feature channels in and out.
        strides, kernel_size, dilation, groups, bias, padding, output_padding: as in ``nn.Conv3d``.
        act, norm, dropout: see the module docstring; ``act`` defaults to PReLU and ``norm`` to instance
            norm, MONAI's defaults.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, strides: int = 1,
                 kernel_size: int = 3, act: LayerSpec | None = "PRELU", norm: LayerSpec | None = "INSTANCE",
                 dropout: float | None = None, dilation: int = 1, groups: int = 1, bias: bool = True,
                 conv_only: bool = False, is_transposed: bool = False, padding: int | None = None,
                 output_padding: int | None = None) -> None:
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        conv: nn.Module
        if is_transposed:
            conv = conv_transpose_type(spatial_dims)(
                in_channels, out_channels, kernel_size=kernel_size, stride=strides, padding=padding,
                output_padding=strides - 1 if output_padding is None else output_padding, groups=groups, bias=bias,
                dilation=dilation)
        else:
            conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size=kernel_size, stride=strides,
                                           padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.add_module("conv", conv)
        if not conv_only and not (act is None and norm is None and dropout is None):
            self.add_module("adn", _norm_dropout_act(out_channels, spatial_dims, norm, dropout, act))


class TwoConv(nn.Sequential):
    """Two 3x3 ``Convolution`` blocks with padding 1 (children ``conv_0``, ``conv_1``), as in a basic U-Net.

    Args:
        spatial_dims: 1, 2 or 3.
        in_chns, out_chns: channels in and out.
        act, norm: for both blocks.
        bias: of both convolutions.
        dropout: probability after each norm (0.0 still adds the, inert, dropout layer MONAI adds).
    """

    def __init__(self, spatial_dims: int, in_chns: int, out_chns: int, act: LayerSpec, norm: LayerSpec,
                 bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.add_module("conv_0", Convolution(spatial_dims, in_chns, out_chns, act=act, norm=norm, dropout=dropout,
                                              bias=bias, padding=1))
        self.add_module("conv_1", Convolution(spatial_dims, out_chns, out_chns, act=act, norm=norm, dropout=dropout,
                                              bias=bias, padding=1))


class FullyConnectedNet(nn.Sequential):
    """Flatten, then linear layers: ``hidden_i`` = (linear, dropout, activation) per hidden width, ``output`` linear.

    Args:
        in_channels: flattened input features.
        out_channels: outputs.
        hidden_channels: widths of the hidden layers.
        dropout: probability after each hidden linear layer (None: no dropout layer).
        act: activation after each hidden layer (default PReLU, MONAI's).
        bias: of every linear layer.

    ``(B, *) -> (B, out_channels)``.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: Sequence[int],
                 dropout: float | None = None, act: LayerSpec | None = "PRELU", bias: bool = True) -> None:
        super().__init__()
        self.add_module("flatten", nn.Flatten())
        prev = in_channels
        for i, c in enumerate(hidden_channels):
            self.add_module(f"hidden_{i}", nn.Sequential(nn.Linear(prev, c, bias),
                                                         _norm_dropout_act(c, 1, None, dropout, act)))
            prev = c
        self.add_module("output", nn.Linear(prev, out_channels, bias))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, spatial_dims: int, stride: int,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        conv = conv_type(spatial_dims)
        self.conv1 = conv(in_planes, planes, kernel_size=3, padding=1, stride=stride, bias=False)
        self.bn1 = norm_layer("batch", spatial_dims, planes)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm_layer("batch", spatial_dims, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.act(out)  # type: ignore[no-any-return]


class ResNet(nn.Module):
    """A ResNet of basic blocks: stem convolution, norm, ReLU, 3x3 max pool (stride 2), four stages, global
    average pool, linear layer ``fc``.

    As in MONAI's ``ResNet(block="basic", shortcut_type="B")``: ``norm`` applies to the stem only (the
    blocks and their projections use batch norm), convolutions start from Kaiming-normal (fan out) and
    norm weights from 1, biases from 0.

    Args:
        layers: blocks per stage (4 values).
        block_inplanes: widths per stage (4 values).
        spatial_dims: 1, 2 or 3.
        n_input_channels: image channels.
        conv1_t_size, conv1_t_stride: the stem's kernel size and stride.
        num_classes: outputs of ``fc``.
        norm: the stem's norm.

    ``(B, n_input_channels, *spatial) -> (B, num_classes)``.
    """

    def __init__(self, layers: Sequence[int], block_inplanes: Sequence[int], spatial_dims: int = 3,
                 n_input_channels: int = 3, conv1_t_size: int = 7, conv1_t_stride: int = 1, num_classes: int = 400,
                 norm: LayerSpec = "batch") -> None:
        super().__init__()
        if len(layers) != 4 or len(block_inplanes) != 4:
            raise ValueError(f"ResNet needs 4 stages: layers {tuple(layers)}, block_inplanes {tuple(block_inplanes)}")
        conv = conv_type(spatial_dims)
        self.in_planes = int(block_inplanes[0])
        self.conv1 = conv(n_input_channels, self.in_planes, kernel_size=conv1_t_size, stride=conv1_t_stride,
                          padding=conv1_t_size // 2, bias=False)
        self.bn1 = norm_layer(norm, spatial_dims, self.in_planes)
        self.act = nn.ReLU(inplace=True)
        self.maxpool = max_pool_type(spatial_dims)(kernel_size=3, stride=2, padding=1)
        for i, (n, planes) in enumerate(zip(layers, block_inplanes, strict=True)):
            self.add_module(f"layer{i + 1}", self._stage(int(planes), int(n), spatial_dims, 1 if i == 0 else 2))
        self.avgpool = _AVG_POOL[spatial_dims]((1,) * spatial_dims)
        self.fc = nn.Linear(int(block_inplanes[3]), num_classes)
        stem_norm = type(self.bn1)
        for m in self.modules():
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(m, conv) and isinstance(weight, torch.Tensor):
                nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, stem_norm) and isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor):
                nn.init.constant_(weight, 1)
                nn.init.constant_(bias, 0)
            elif isinstance(m, nn.Linear) and bias is not None:
                nn.init.constant_(bias, 0)

    def _stage(self, planes: int, blocks: int, spatial_dims: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(conv_type(spatial_dims)(self.in_planes, planes, kernel_size=1, stride=stride,
                                                               bias=True),
                                       norm_layer("batch", spatial_dims, planes))
        out = [_BasicBlock(self.in_planes, planes, spatial_dims, stride, downsample)]
        self.in_planes = planes
        out += [_BasicBlock(planes, planes, spatial_dims, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.avgpool(x).flatten(1))  # type: ignore[no-any-return]
