"""The cascade detector's settings: :class:`CascadeConfig` and its named profiles."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmk3d.detectors.base import freeze_sequences
from lmk3d.errors import LandmarkError
from lmk3d.training.cascade_losses import SIDE_WEIGHTS

#: Shapes of stage 2's lattice of patch centres (``CascadeConfig.refine_lattice``).
LATTICES = ("cube", "cross", "centre")


@dataclass(frozen=True)
class CascadeConfig:
    """Resolved settings of the cascade detector (stored in the checkpoint).

    Attributes:
        spatial_dims, in_channels: MONAI names; 3 and 1.
        modality: ``"CT"`` (HU window), ``"MR"`` (percentiles) or ``"auto"`` (decided on the first training
            image: CT when it holds air at about -1000 HU), see :mod:`lmk3d.transforms.intensity`.
        coarse_size: the largest stage-1 grid in voxels (the whole field of view, isotropic).
        coarse_pixdim: the finest stage-1 spacing in mm. Training fixes the grid (``coarse_shape`` in the
            checkpoint) at the smallest size, rounded up to a multiple of the U-Net's pooling factor, that
            holds the largest training field of view at this spacing, and at most ``coarse_size``: small
            crops get a small grid, whole CT gets ``coarse_size``.
        channels: U-Net features per level (``len - 1`` poolings; 3 side outputs need 4 levels or more).
        norm: U-Net normalisation (MONAI name) or None.
        sigma: stage-1 heatmap standard deviation in coarse-grid voxels.
        heatmap_height: ``k``, the Gaussian height of the targets (at most 1).
        weight_gamma: the loss weights are ``exp(weight_gamma * prediction)``.
        weight_target: False is the paper's weighting; True weighs the landmark channels by
            ``exp(weight_gamma * max(prediction, target))`` (see ``exp_weighted_mse``): the ``cpu_ct``
            profile's answer to heat spots that a small network, in a short training, never lifts off
            the background of a whole CT (the paper's form left peaks of 0.1-0.25 on the training images).
        side_weights: deep-supervision weights of the side paths, coarsest first.
        min_peak: a landmark whose peak is below ``min_peak * k`` is not found.
        roi_size: stage-2 patch in voxels (at least 16 per axis).
        pixdim: stage-2 patch spacing in mm ("full resolution").
        cnn_channels, cnn_hidden, cnn_norm: the displacement CNN's 4 conv widths, FC width and norm.
        range_quantile, range_scale, min_range_mm: how the stage-2 range ``r_n`` follows the stage-1 errors.
        refine_lattice_mm: 0 runs stage 2 once, on the patch centred at ``S0`` (the paper). A positive
            ``a`` is the spacing of a lattice of patch centres around ``S0`` (``refine_lattice``) whose
            estimates are averaged (test-time averaging: less variance at the cost of one stage-2 pass
            per patch).
        refine_lattice: the lattice's shape when ``refine_lattice_mm`` is positive: ``"cube"`` (the 27
            points of ``S0 + {-a, 0, a}^3``), ``"cross"`` (``S0`` and its 6 face neighbours at distance
            ``a``: 7 patches) or ``"centre"`` (``S0`` alone, as with 0).
        fit_lattice: at the end of training, choose ``refine_lattice`` among the three on the validation
            images (``fit_lattice`` in ``training.py``: the fewest patches whose validation MRE is within
            2 % of the cube's, with no more points over 3 mm); False keeps the configured one.
        shape_decode, decode_candidates: let stage 1 choose among ``decode_candidates`` local maxima per
            channel with the pairwise shape prior (see the module docstring) when that beats the paper's
            per-channel maximum on the validation images; False always takes the maximum (the paper).
        fit_step_weights: after training, choose per landmark the share ``w_n`` in {0, 0.1, ..., 1} of
            stage 2's displacement that minimises the validation error (the prediction is
            ``S0 + w_n * d``); False keeps ``w_n = 1``, the paper's full step. Where stage 2 cannot
            beat stage 1 on held-out images, it is thus damped or switched off.
        lr, patch_lr: Adam learning rates of stage 1 and stage 2 (cosine-decayed over the epochs).
        batch_size: images per stage-1 step.
        max_epochs, patience: stage-1 epochs and early-stopping patience (validations without improvement).
        min_iterations: stage-1 optimiser steps at least (like the paper, which counts iterations): a small
            training set gets more epochs than ``max_epochs``.
        patch_batch_size: images per stage-2 step (each gives one patch per landmark).
        patch_epochs, patches_per_case: stage-2 epochs and patches per image and landmark per epoch.
        patch_min_iterations: stage-2 optimiser steps at least.
        rotation_deg, scale_range, translation_mm: augmentation (grid motion), 0 / (1, 1) / 0 to disable.
        stage1_share: share of a time budget given to stage 1.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    modality: str = "auto"
    coarse_size: tuple[int, int, int] = (48, 48, 48)
    coarse_pixdim: float = 2.0
    channels: tuple[int, ...] = (8, 16, 32, 64)
    norm: str | None = "INSTANCE"
    sigma: float = 2.0
    heatmap_height: float = 1.0
    weight_gamma: float = 1.0
    weight_target: bool = False
    side_weights: tuple[float, ...] = SIDE_WEIGHTS
    min_peak: float = 0.15
    roi_size: tuple[int, int, int] = (32, 32, 32)
    pixdim: float = 1.0
    cnn_channels: tuple[int, int, int, int] = (8, 16, 32, 64)
    cnn_hidden: int = 128
    cnn_norm: str | None = "INSTANCE"
    range_quantile: float = 0.95
    range_scale: float = 1.5
    min_range_mm: float = 2.0
    refine_lattice_mm: float = 1.5
    refine_lattice: str = "cube"
    fit_lattice: bool = True
    fit_step_weights: bool = True
    shape_decode: bool = True
    decode_candidates: int = 3
    lr: float = 3e-3
    batch_size: int = 2
    max_epochs: int = 40
    patience: int = 40
    min_iterations: int = 2800
    patch_lr: float = 1e-3
    patch_batch_size: int = 8
    patch_epochs: int = 100
    patches_per_case: int = 1
    patch_min_iterations: int = 1800
    rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translation_mm: float = 4.0
    stage1_share: float = 0.6

    def __post_init__(self) -> None:
        freeze_sequences(self, ("coarse_size", "channels", "side_weights", "roi_size", "cnn_channels", "scale_range"))
        if self.modality not in ("CT", "MR", "auto"):
            raise LandmarkError(f"cascade: unknown modality {self.modality!r}; choose CT, MR or auto")
        if self.spatial_dims != 3 or self.in_channels != 1:
            raise LandmarkError("cascade: only spatial_dims=3 and in_channels=1 are supported, got "
                                f"{self.spatial_dims} and {self.in_channels}")
        if len(self.coarse_size) != 3 or len(self.roi_size) != 3:
            raise LandmarkError(f"cascade: coarse_size and roi_size need 3 sizes, got {self.coarse_size}, "
                                f"{self.roi_size}")
        if len(self.side_weights) > len(self.channels) - 1:
            raise LandmarkError(f"cascade: {len(self.side_weights)} side outputs need at least "
                                f"{len(self.side_weights) + 1} U-Net levels, got channels={self.channels}")
        if self.refine_lattice not in LATTICES:
            raise LandmarkError(f"cascade: unknown refine_lattice {self.refine_lattice!r}; choose "
                                f"{' or '.join(LATTICES)}")
        if self.decode_candidates < 1:
            raise LandmarkError(f"cascade: decode_candidates must be at least 1, got {self.decode_candidates}")
        if not 0.0 < self.heatmap_height <= 1.0:
            raise LandmarkError(f"cascade: heatmap_height must be in (0, 1], got {self.heatmap_height}")


#: The paper's sizes (coronary CTA: 512^3 at 0.4 mm downsampled 4x, 64^3 patches, batch 4, Adam 1e-3,
#: 11,250 and 45,000 iterations, no augmentation, one patch per landmark). The paper gives no widths:
#: these are those of the 3D U-Net it customises, and the CNN doubles per layer alike.
PAPER = CascadeConfig(
    modality="CT", coarse_size=(128, 128, 128), coarse_pixdim=1.6, channels=(32, 64, 128, 256), norm=None,
    roi_size=(64, 64, 64), pixdim=0.4, cnn_channels=(32, 64, 128, 256), cnn_hidden=512, cnn_norm=None,
    lr=1e-3, patch_lr=1e-3, batch_size=4, max_epochs=1, min_iterations=11250, patience=100_000,
    patch_batch_size=4, patch_epochs=1, patch_min_iterations=45000, patches_per_case=1,
    rotation_deg=0.0, scale_range=(1.0, 1.0), translation_mm=0.0, refine_lattice_mm=0.0, fit_lattice=False,
    fit_step_weights=False, shape_decode=False,
)
#: Sized for this 2-core CPU: the 140 hippocampus training cases train in about 20 minutes of one
#: thread (32^3 stage-1 grid); whole CT gets a 48^3 grid (about 5 mm) and the same number of steps.
CPU = CascadeConfig()
#: ``cpu`` for whole CT: the same sizes, but the stage-1 loss also weighs the landmark channels by their
#: target (``weight_target``, ``weight_gamma`` 4: a spot voxel counts up to e^4 = 55 times a background
#: one). Not the paper's loss: with it, the ``cpu`` profile's stage 1 left peaks of 0.1-0.25 (target 1)
#: on the phantoms' training images after 20 minutes, and a test MRE of 42 mm.
CPU_CT = dataclasses.replace(CPU, weight_target=True, weight_gamma=4.0)
#: Seconds, for tests.
TINY = CascadeConfig(
    coarse_size=(16, 16, 16), coarse_pixdim=0.5, channels=(8, 16, 16, 32), roi_size=(16, 16, 16), pixdim=1.5,
    cnn_channels=(4, 4, 8, 8), cnn_hidden=16, batch_size=4, max_epochs=4, min_iterations=0, patience=4,
    patch_batch_size=8, patch_epochs=4, patch_min_iterations=0,
)


PROFILES = {"paper": PAPER, "cpu": CPU, "cpu_ct": CPU_CT, "tiny": TINY}

__all__ = ["CPU", "CPU_CT", "LATTICES", "PAPER", "PROFILES", "TINY", "CascadeConfig"]
