"""lmk3d.networks.blocks against MONAI's blocks (the oracle): same parameter names, initial weights and outputs.

The blocks replace MONAI's so that building a network does not import MONAI; the shipped checkpoints hold
state dicts named after MONAI's modules, and new trainings should start from the weights they did. Each
case builds MONAI's block and ours under the same seed and compares the state dicts (names, order, shapes,
values), the leaf modules, and the outputs in training mode (dropout drawn under the same seed) and in
evaluation mode, on odd sizes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from monai.networks.blocks import Convolution as MonaiConvolution
from monai.networks.nets import FullyConnectedNet as MonaiFullyConnectedNet
from monai.networks.nets import ResNet as MonaiResNet
from monai.networks.nets.basic_unet import TwoConv as MonaiTwoConv
from torch import nn

from lmk3d.networks import blocks
from tests.conftest import DATA

LEAKY = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
AFFINE_INSTANCE = ("instance", {"affine": True})

CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv3d_instance_relu": (
        lambda: MonaiConvolution(3, 2, 4, kernel_size=3, act="RELU", norm="INSTANCE"),
        lambda: blocks.Convolution(3, 2, 4, kernel_size=3, act="RELU", norm="INSTANCE"),
        (2, 2, 7, 6, 5)),
    "conv3d_grouped_affine_leaky": (
        lambda: MonaiConvolution(3, 6, 9, kernel_size=3, act=LEAKY, norm=AFFINE_INSTANCE, groups=3),
        lambda: blocks.Convolution(3, 6, 9, kernel_size=3, act=LEAKY, norm=AFFINE_INSTANCE, groups=3),
        (2, 6, 5, 7, 3)),
    "conv3d_batch_grouped": (
        lambda: MonaiConvolution(3, 4, 8, kernel_size=3, act="RELU", norm="BATCH", groups=2),
        lambda: blocks.Convolution(3, 4, 8, kernel_size=3, act="RELU", norm="BATCH", groups=2),
        (3, 4, 5, 6, 7)),
    "conv3d_no_norm": (
        lambda: MonaiConvolution(3, 1, 3, kernel_size=3, act="RELU", norm=None),
        lambda: blocks.Convolution(3, 1, 3, kernel_size=3, act="RELU", norm=None),
        (1, 1, 6, 5, 4)),
    "conv2d_padding1_batch": (
        lambda: MonaiConvolution(2, 3, 5, kernel_size=3, act="RELU", norm="batch", padding=1),
        lambda: blocks.Convolution(2, 3, 5, kernel_size=3, act="RELU", norm="batch", padding=1),
        (4, 3, 9, 11)),
    "conv1d_fuse": (
        lambda: MonaiConvolution(1, 6, 3, kernel_size=1, act=LEAKY, norm=AFFINE_INSTANCE),
        lambda: blocks.Convolution(1, 6, 3, kernel_size=1, act=LEAKY, norm=AFFINE_INSTANCE),
        (2, 6, 13)),
    "conv3d_head_conv_only": (
        lambda: MonaiConvolution(3, 4, 2, kernel_size=1, conv_only=True),
        lambda: blocks.Convolution(3, 4, 2, kernel_size=1, conv_only=True),
        (2, 4, 3, 5, 4)),
    "conv3d_transposed": (
        lambda: MonaiConvolution(3, 8, 4, strides=2, kernel_size=2, is_transposed=True, conv_only=True, padding=0,
                                 output_padding=0),
        lambda: blocks.Convolution(3, 8, 4, strides=2, kernel_size=2, is_transposed=True, conv_only=True, padding=0,
                                   output_padding=0),
        (2, 8, 3, 4, 5)),
    "conv3d_defaults_dropout": (
        lambda: MonaiConvolution(3, 2, 3, dropout=0.3),
        lambda: blocks.Convolution(3, 2, 3, dropout=0.3),
        (2, 2, 5, 5, 5)),
    "two_conv_1d": (
        lambda: MonaiTwoConv(1, 10, 6, LEAKY, AFFINE_INSTANCE, True),
        lambda: blocks.TwoConv(1, 10, 6, LEAKY, AFFINE_INSTANCE, True),
        (2, 10, 9)),
    "two_conv_3d_dropout": (
        lambda: MonaiTwoConv(3, 2, 4, "RELU", "INSTANCE", False, dropout=0.2),
        lambda: blocks.TwoConv(3, 2, 4, "RELU", "INSTANCE", False, dropout=0.2),
        (2, 2, 5, 4, 6)),
    "fully_connected_dropout": (
        lambda: MonaiFullyConnectedNet(48, 6, [32, 16], dropout=0.5, act="RELU"),
        lambda: blocks.FullyConnectedNet(48, 6, [32, 16], dropout=0.5, act="RELU"),
        (5, 3, 4, 4)),
    "fully_connected_no_dropout": (
        lambda: MonaiFullyConnectedNet(20, 4, [8], dropout=0.0, act="RELU"),
        lambda: blocks.FullyConnectedNet(20, 4, [8], dropout=0.0, act="RELU"),
        (3, 20)),
    "fully_connected_prelu_default": (
        lambda: MonaiFullyConnectedNet(12, 2, [7]),
        lambda: blocks.FullyConnectedNet(12, 2, [7]),
        (4, 12)),
    "resnet_3d_batch": (
        lambda: MonaiResNet(block="basic", layers=[1, 2, 1, 1], block_inplanes=[4, 8, 8, 16], spatial_dims=3,
                            n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, num_classes=9, norm="batch"),
        lambda: blocks.ResNet(layers=[1, 2, 1, 1], block_inplanes=[4, 8, 8, 16], spatial_dims=3, n_input_channels=1,
                              conv1_t_size=7, conv1_t_stride=2, num_classes=9, norm="batch"),
        (2, 1, 33, 29, 31)),
    "resnet_2d_affine_instance_stem": (
        lambda: MonaiResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 4, 8, 8], spatial_dims=2,
                            n_input_channels=2, conv1_t_size=3, conv1_t_stride=1, num_classes=4,
                            norm=AFFINE_INSTANCE),
        lambda: blocks.ResNet(layers=[1, 1, 1, 1], block_inplanes=[4, 4, 8, 8], spatial_dims=2, n_input_channels=2,
                              conv1_t_size=3, conv1_t_stride=1, num_classes=4, norm=AFFINE_INSTANCE),
        (3, 2, 19, 23)),
}


def _leaves(module: nn.Module) -> list[tuple[str, str]]:
    return [(name, repr(m)) for name, m in module.named_modules() if not list(m.children())]


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_matches_monai(case: str) -> None:
    make_ref, make_ours, shape = CASES[case]
    torch.manual_seed(0)
    ref = make_ref()
    torch.manual_seed(0)
    ours = make_ours()
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert [(k, tuple(v.shape)) for k, v in our_state.items()] == [(k, tuple(v.shape)) for k, v in ref_state.items()]
    for k, v in ref_state.items():
        assert torch.equal(our_state[k], v), f"{case}: initial {k} differs"
    assert _leaves(ours) == _leaves(ref)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        torch.manual_seed(2)
        expected = ref(x.clone())
        torch.manual_seed(2)
        got = ours(x.clone())
        assert torch.equal(got, expected), f"{case}: outputs differ (train={train})"
    # A state dict saved from MONAI's block loads strictly into ours (the shipped checkpoints' case).
    ref.train()
    ref(x.clone())  # moves batch-norm running statistics away from their initial values
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    assert torch.equal(ours(x.clone()), ref(x.clone()))


def test_unknown_norm_and_activation_are_named() -> None:
    with pytest.raises(ValueError, match="unknown norm 'group'; choose one of instance, batch"):
        blocks.Convolution(3, 2, 2, norm="GROUP")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        blocks.Convolution(3, 2, 2, act="gelu")
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        blocks.conv_type(4)


def test_building_every_detector_does_not_import_monai() -> None:
    """The point of the blocks: networks are built, shipped models load and predict (with their calibration
    models), without importing MONAI."""
    code = ("import sys\n"
            "from pathlib import Path\n"
            "from lmk3d.detectors import detector_class, load_detector\n"
            "for name in ('prior_guided', 'pin', 'cascade'):\n"
            "    detector_class(name).create(('a', 'b'), 'tiny')\n"
            "from lmk3d.checkpoint import versions\n"
            "from lmk3d.io import read_image\n"
            f"image = read_image({str(sorted((DATA / 'hippocampus' / 'images').glob('*.nii.gz'))[0])!r})\n"
            "for folder in sorted(Path('models').glob('*-*/checkpoint.pt')):\n"
            "    det = load_detector(folder.parent, 'cpu')\n"
            "    if folder.parent.name.endswith('hippocampus'):\n"
            "        assert det.predict_all(image).landmarks.found.any()\n"
            "assert versions()['monai']\n"
            "assert 'monai' not in sys.modules, sorted(m for m in sys.modules if m.startswith('monai'))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
