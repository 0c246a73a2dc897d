"""``cascade``: a heatmap U-Net on the whole downsampled image, then per-landmark displacement CNNs.

Tan et al., "A Cascade Regression Model for Anatomical Landmark Detection", STACOM 2019.

Stage 1 (``stage1_heatmap``)
    The whole image on a coarse RAS-aligned grid (:meth:`Grid.covering`, ``coarse_shape`` voxels,
    box-filtered first so big CT does not alias) goes through :class:`HeatmapUNet`, which regresses
    ``N + 1`` channels: one Gaussian spot per landmark and a background channel normalised as in
    :mod:`lmk3d.training.cascade_losses`. Each landmark is the maximum of its channel, refined to
    sub-voxel precision (:func:`decode_peaks`).
Stage 2 (``stage2_displacement``)
    For landmark ``n``, a patch of ``roi_size`` voxels at ``pixdim`` mm (full resolution) centred on
    the stage-1 estimate ``S0`` goes through network ``n`` of :class:`DisplacementCNN`, which regresses
    the displacement to the landmark. The prediction is ``S0 + d`` with ``|d|`` clamped to the
    landmark's range ``r_n``. The ``N`` patches are sampled in one call and go through the ``N``
    networks in one grouped forward pass.

Training: stage 1 first; then stage 1 is run on the training and validation images, and ``r_n`` is
set from that *real* error distribution (``range_scale`` times its ``range_quantile``-quantile,
between ``min_range_mm`` and a limit that keeps the landmark inside the patch). Stage 2 trains on
patches centred at points drawn uniformly in the ball of radius ``r_n`` around the true landmark, so
it sees every offset that stage 1 makes in practice, including the larger ones of unseen images.
Augmentation moves the sampling grids (random rotation, scaling, translation); the landmarks stay
where they are in world space, and stage 2's targets are expressed along the moved patch's axes.

Three additions to the paper, all switched off in the ``paper`` profile:

- stage 2 may average its estimates over a small lattice of patch centres around ``S0``
  (``refine_lattice_mm``);
- after training, the share ``w_n`` of stage 2's displacement kept for landmark ``n`` is chosen on the
  validation images (``fit_step_weights``): the prediction is ``S0 + w_n * d``, so a refinement network
  that does not beat stage 1 on held-out images is damped or switched off instead of making things worse;
- stage 1 may decode its heatmaps jointly (``shape_decode``): each channel's few highest local maxima
  are candidates, and :class:`lmk3d.shape.pairwise.PairwisePrior`, fitted on the training
  configurations, picks the combination that is both bright and laid out like a real configuration.
  A channel that also lights up on the landmark's twin (the other side's mandible angle, the vertebra
  below) then keeps the right peak even when the twin's is brighter. Whether a model uses it is decided
  on the validation images after stage 1 (the paper's per-channel maximum on ties), and recorded.

Score (per landmark, in [0, 1]): ``s1 * s2`` where ``s1 = clip(peak / k, 0, 1)`` is the stage-1 peak
height relative to the target height ``k``, and ``s2 = 1 - 0.5 * min(|d_raw| / r_n, 1)`` falls from 1
(stage 2 agrees with stage 1) to 0.5 (stage 2 wants to move by the whole range or more; ``d_raw`` is
the unclamped displacement). A landmark whose channel has no clear peak (``s1 < min_peak``) is not
found; the base class also marks points outside the field of view not found.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Prediction, Stage, default_device, freeze_sequences
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.displacement_cnn import DisplacementCNN
from lmk3d.networks.heatmap_unet import HeatmapUNet
from lmk3d.shape.pairwise import PairwisePrior
from lmk3d.training.cascade_losses import (
    SIDE_WEIGHTS,
    deep_supervision_loss,
    displacement_loss,
    heatmap_channel_mask,
    heatmap_targets,
)
from lmk3d.training.loop import deadline_from, seed_everything, train_network
from lmk3d.transforms.grid import Grid, antialias, image_tensor, random_world_transform, sample
from lmk3d.transforms.heatmap import decode_peaks, local_peaks
from lmk3d.transforms.intensity import IntensityMap, fit_intensity


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
            ``a`` also centres patches on the 3x3x3 lattice ``S0 + {-a, 0, a}^3`` and averages the 27
            estimates (test-time averaging: less variance at 27 times stage 2's small cost).
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
    rotation_deg=0.0, scale_range=(1.0, 1.0), translation_mm=0.0, refine_lattice_mm=0.0, fit_step_weights=False,
    shape_decode=False,
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


@dataclass(eq=False)
class _Prepared:
    """One image ready for sampling: the raw voxels on the device and the fitted intensity map.

    Reduced (box-filtered) copies for coarser sampling are made once per spacing and kept.
    """

    tensor: torch.Tensor  # (1, 1, I, J, K) raw intensities
    affine: np.ndarray
    shape: tuple[int, int, int]
    intensity: IntensityMap
    pad: float
    reduced: dict[tuple[int, ...], tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict)

    def at_spacing(self, spacing_mm: float) -> tuple[torch.Tensor, np.ndarray]:
        # Keyed by antialias's integer factors, so the slightly different spacings of augmented
        # grids share one reduced copy.
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        key = tuple(max(1, int(np.floor(spacing_mm / s + 1e-6))) for s in spacing)
        if key not in self.reduced:
            self.reduced[key] = antialias(self.tensor, self.affine, float(spacing_mm))
        return self.reduced[key]

    def sample(self, grids: Sequence[Grid], spacing_mm: float) -> torch.Tensor:
        """Normalised intensities on ``grids`` (equal shapes): ``(B, 1, D, H, W)``."""
        t, a = self.at_spacing(spacing_mm)
        out = self.intensity(sample(t, a, grids, padding_value=self.pad))
        # A plain tensor: MONAI's MetaTensor bookkeeping would follow it through every network layer.
        return out.as_tensor() if isinstance(out, MetaTensor) else out


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the image holds air at about -1000 HU (1st percentile below -500), else ``"MR"``."""
    step = max(1, int(round((array.size / 1_000_000) ** (1 / 3))))
    sub = np.asarray(array)[::step, ::step, ::step]
    return "CT" if float(np.percentile(sub, 1.0)) < -500.0 else "MR"


def prepare(image: Volume, modality: str, device: str | torch.device) -> _Prepared:
    """The one preprocessing entry point (training, validation, inference): tensor, intensity map, padding.

    The array axes are first permuted and flipped to the closest RAS order (a view, exact), so the
    box filter of coarser sampling groups the same voxels whatever the storage order of the input.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(image.affine)
    array = nib.orientations.apply_orientation(image.array, ornt)
    affine = np.asarray(image.affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    t = image_tensor(array, device)
    shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    return _Prepared(t, affine, shape, fit_intensity(array, modality), float(t.amin()))


@dataclass(eq=False)
class _Case:
    """A training image with its true landmarks, in the detector's landmark order."""

    case: str
    prep: _Prepared
    xyz: np.ndarray  # (N, 3) world RAS mm, NaN where missing
    present: np.ndarray  # (N,) bool
    stage1: np.ndarray | None = None  # (N, 3) stage-1 estimates, once stage 1 is trained


class _Stage1(Stage):
    name = "stage1_heatmap"

    def __init__(self, det: CascadeDetector) -> None:
        self.det = det

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        return self.det._run_stage1(image)


class _Stage2(Stage):
    name = "stage2_displacement"

    def __init__(self, det: CascadeDetector) -> None:
        self.det = det

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        if previous is None:
            raise RuntimeError("cascade stage 2 needs stage 1's landmarks")
        return self.det._run_stage2(image, previous)


class CascadeDetector(Detector):
    """The two-stage cascade (see the module docstring).

    Example:
        >>> det = CascadeDetector.create(["a", "b"], profile="tiny")
        >>> [s.name for s in det.stages()]
        ['stage1_heatmap', 'stage2_displacement']
    """

    name = "cascade"
    config_class = CascadeConfig
    profiles = {"paper": PAPER, "cpu": CPU, "cpu_ct": CPU_CT, "tiny": TINY}

    def __init__(self, landmark_names: Sequence[str], config: CascadeConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile)
        if not self.landmark_names:
            raise LandmarkError("cascade: at least one landmark name is needed")
        self.device = torch.device(device or default_device())
        self.unet, self.cnn = self._build()
        n = len(self.landmark_names)
        self.ranges_mm = np.full(n, float(config.min_range_mm))
        self.step_weights = np.ones(n)
        self.pair_prior: PairwisePrior | None = None
        self.decode = "peak"  # or "shape": the pairwise prior chooses among local maxima
        self.coarse_shape: tuple[int, int, int] = tuple(int(v) for v in config.coarse_size)  # type: ignore[assignment]
        self.fitted_modality: str | None = None
        self.fitted_info: dict[str, Any] = {}
        self._cache: tuple[weakref.ref[Volume], _Prepared] | None = None

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints from before shape_decode always took each channel's maximum.
        cfg.setdefault("shape_decode", False)
        return cfg

    # --- networks -------------------------------------------------------------------------------
    def _build(self) -> tuple[HeatmapUNet, DisplacementCNN]:
        """The same networks for training and for loading a checkpoint."""
        c, n = self.config, len(self.landmark_names)
        unet = HeatmapUNet(c.spatial_dims, c.in_channels, n + 1, c.channels, c.norm, len(c.side_weights),
                           out_bias=[0.0] * n + [1.0])
        cnn = DisplacementCNN(c.spatial_dims, c.in_channels, c.spatial_dims, c.roi_size, c.cnn_channels,
                              c.cnn_hidden, n, c.cnn_norm)
        return unet.to(self.device).eval(), cnn.to(self.device).eval()

    def stages(self) -> list[Stage]:
        return [_Stage1(self), _Stage2(self)]

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sd = {"stage1": self.unet.state_dict(), "stage2": self.cnn.state_dict()}
        fitted = {"ranges_mm": self.ranges_mm.tolist(), "coarse_shape": list(self.coarse_shape),
                  "modality": self.fitted_modality, "step_weights": self.step_weights.tolist(), "decode": self.decode,
                  "pair_prior": None if self.pair_prior is None else self.pair_prior.state()}
        return sd, {**fitted, **self.fitted_info}

    def load_state(self, state_dicts: dict[str, Any], fitted: dict[str, Any], device: str) -> None:
        self.device = torch.device(device)
        self.unet, self.cnn = self._build()
        self.unet.load_state_dict(state_dicts["stage1"])
        self.cnn.load_state_dict(state_dicts["stage2"])
        self.ranges_mm = np.asarray(fitted["ranges_mm"], dtype=np.float64)
        self.coarse_shape = tuple(int(v) for v in fitted["coarse_shape"])  # type: ignore[assignment]
        self.fitted_modality = fitted.get("modality")
        self.step_weights = np.asarray(fitted.get("step_weights", np.ones(len(self.landmark_names))), dtype=np.float64)
        prior = fitted.get("pair_prior")
        self.pair_prior = None if prior is None else PairwisePrior.from_state(prior)
        self.decode = str(fitted.get("decode", "peak"))
        own = ("ranges_mm", "coarse_shape", "modality", "step_weights", "decode", "pair_prior")
        self.fitted_info = {k: v for k, v in fitted.items() if k not in own}

    # --- preprocessing --------------------------------------------------------------------------
    def prepared(self, image: Volume) -> _Prepared:
        """The image prepared once per prediction and shared by both stages (it stays on the device)."""
        if self._cache is not None and self._cache[0]() is image:
            return self._cache[1]
        prep = prepare(image, self.modality(image.array), self.device)
        self._cache = (weakref.ref(image), prep)
        return prep

    def prepare(self, image: Volume) -> _Prepared:
        self._cache = None
        return self.prepared(image)

    def predict_all(self, image: Volume) -> Prediction:
        try:
            return super().predict_all(image)
        finally:
            self._cache = None

    def modality(self, array: np.ndarray) -> str:
        """The resolved modality: the config's, else the one fixed in training, else a guess from ``array``."""
        if self.config.modality != "auto":
            return str(self.config.modality)
        return self.fitted_modality or guess_modality(array)

    def coarse_grid(self, prep: _Prepared) -> Grid:
        """Stage 1's grid: the whole field of view, RAS-aligned and isotropic."""
        return Grid.covering(prep.affine, prep.shape, self.coarse_shape)

    def _fit_coarse_shape(self, images: Sequence[Volume | _Prepared]) -> tuple[int, int, int]:
        """The smallest grid holding every training field of view at ``coarse_pixdim`` (see the config)."""
        from lmk3d.geometry import world_bounds_ras

        c = self.config
        extent = max(float(np.max(np.subtract(*world_bounds_ras(im.affine, im.shape)[::-1]))) for im in images)
        multiple = 2 ** (len(c.channels) - 1)
        n = int(math.ceil(extent / c.coarse_pixdim / multiple) * multiple)
        return tuple(int(min(max(n, multiple), m)) for m in c.coarse_size)  # type: ignore[return-value]

    def patch_grids(self, centres_ras: np.ndarray) -> list[Grid]:
        """Stage 2's grids: ``roi_size`` voxels at ``pixdim`` mm around each ``(N, 3)`` centre."""
        return [Grid.around(c, self.config.roi_size, self.config.pixdim) for c in centres_ras]

    def _autocast(self) -> Any:
        # Mixed precision only on CUDA; the heatmaps are decoded in float32.
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    # --- inference ------------------------------------------------------------------------------
    def _heatmaps(self, preps: Sequence[_Prepared], grids: Sequence[Grid]) -> torch.Tensor:
        """``(B, N + 1, D, H, W)`` stage-1 outputs for images on their (possibly moved) grids."""
        x = torch.cat([p.sample([g], float(g.spacing_mm.min())) for p, g in zip(preps, grids, strict=True)])
        with self._autocast():
            return self.unet(x).float()

    def _decode(self, heatmaps: torch.Tensor, grids: Sequence[Grid],
                decode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Peaks -> ``(B, N, 3)`` world RAS mm and ``(B, N)`` stage-1 scores ``clip(peak / k, 0, 1)``.

        ``decode`` overrides the model's: ``"peak"`` (each channel's maximum) or ``"shape"`` (the pairwise
        prior chooses among each channel's local maxima).
        """
        n = len(self.landmark_names)
        k = self.config.heatmap_height
        pos, peak_t = decode_peaks(heatmaps[:, :n])
        pos_np = pos.detach().cpu().double().numpy()
        xyz = np.stack([g.grid_to_world(p) for g, p in zip(grids, pos_np, strict=True)])
        peak = peak_t.detach().cpu().double().numpy()
        if (decode or self.decode) == "shape" and self.pair_prior is not None:
            pos_t, val_t = local_peaks(heatmaps[:, :n], self.config.decode_candidates, radius=2)
            pos_c = pos_t.detach().cpu().double().numpy()  # (B, N, K, 3)
            val = val_t.detach().cpu().double().numpy()
            rows = np.arange(n)
            for b, g in enumerate(grids):
                world = g.grid_to_world(pos_c[b].reshape(-1, 3)).reshape(pos_c[b].shape)
                choice = self.pair_prior.select(world, val[b], val[b, :, 0] >= self.config.min_peak * k)
                # A channel without any local maximum (flat zero) keeps the per-channel answer.
                ok = np.isfinite(world[rows, choice]).all(axis=1)
                xyz[b, ok], peak[b, ok] = world[rows, choice][ok], val[b, rows, choice][ok]
        return xyz, np.clip(peak / k, 0.0, 1.0)

    def _displacements(self, preps: Sequence[_Prepared], centres: np.ndarray,
                       grids: Sequence[Sequence[Grid]] | None = None) -> torch.Tensor:
        """Stage-2 raw displacements ``(B, N, 3)`` in mm along the patch axes.

        Args:
            centres: ``(B, N, 3)`` world centres (used when ``grids`` is None).
            grids: per image, its ``N`` patch grids (training passes moved grids).
        """
        c = self.config
        gs = grids if grids is not None else [self.patch_grids(ct) for ct in centres]
        x = torch.stack([p.sample(g, c.pixdim)[:, 0] for p, g in zip(preps, gs, strict=True)])
        r = torch.as_tensor(self.ranges_mm, dtype=torch.float32, device=self.device)
        with self._autocast():
            out = self.cnn(x).float()
        # The network regresses the displacement in units of its landmark's range.
        return out * r[None, :, None]

    def _clamped(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clamp ``(B, N, 3)`` displacements to the ranges; also return the raw lengths ``(B, N)``."""
        length = np.linalg.norm(d, axis=-1)
        factor = np.minimum(1.0, self.ranges_mm[None, :] / np.maximum(length, 1e-12))
        return d * factor[..., None], length

    @torch.no_grad()
    def _run_stage1(self, image: Volume) -> LandmarkSet:
        self.unet.eval()
        prep = self.prepared(image)
        grid = self.coarse_grid(prep)
        xyz, score = self._decode(self._heatmaps([prep], [grid]), [grid])
        return LandmarkSet(self.landmark_names, xyz[0], score[0], score[0] >= self.config.min_peak)

    @torch.no_grad()
    def _run_stage2(self, image: Volume, previous: LandmarkSet) -> LandmarkSet:
        self.cnn.eval()
        prep = self.prepared(image)
        prev = previous.reorder(self.landmark_names)
        centres = prev.xyz_mm_ras.copy()
        known = np.isfinite(centres).all(axis=1)
        # A landmark without any stage-1 position stays not found; its patch is taken at the image centre.
        centres[~known] = image.ijk_to_ras((np.asarray(image.shape) - 1) / 2.0)
        d, length = self._refine(prep, centres)
        xyz = centres + self.step_weights[:, None] * d
        xyz[~known] = np.nan
        s2 = 1.0 - 0.5 * np.minimum(length / self.ranges_mm, 1.0)
        scores = np.where(known, prev.scores * s2, 0.0)
        return LandmarkSet(self.landmark_names, xyz, scores, prev.found & known)

    def _refine(self, prep: _Prepared, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2 around ``(N, 3)`` centres: the clamped displacement ``(N, 3)`` and the raw length ``(N,)``."""
        a = float(self.config.refine_lattice_mm)
        offsets = np.zeros((1, 3)) if a <= 0 else a * np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3,
                                                                              indexing="ij"), -1).reshape(-1, 3)
        starts = centres[None] + offsets[:, None, :]  # (K, N, 3): one patch per landmark and lattice point
        raw = self._displacements([prep] * len(offsets), starts).detach().cpu().double().numpy()
        # Each lattice point's estimate is clamped to the range around its own patch centre; their mean,
        # taken from S0, is clamped again, so the result never leaves the ball of radius r_n around S0.
        d_each, _ = self._clamped(raw)
        d, _ = self._clamped(((starts + d_each).mean(axis=0) - centres)[None])
        return d[0], np.linalg.norm((starts + raw).mean(axis=0) - centres, axis=-1)

    # --- training -------------------------------------------------------------------------------
    def fit_step_weights(self, val: Sequence[Sample]) -> dict[str, Any]:
        """Choose the stage-2 step weights ``w_n`` on held-out samples (what :meth:`fit` does at its end).

        Lets a model trained before the weights existed get them without retraining; returns the
        per-landmark table (weight, validation MRE of stage 1 alone, of the full step, and of the chosen one).
        """
        cases = self._cases(val)
        if not cases:
            raise LandmarkError("cascade: fit_step_weights needs labelled validation samples")
        self._stage1_estimates(cases)
        table = self._fit_step_weights(cases)
        self.fitted_info.setdefault("training", {})["step_weights"] = table
        return table

    def _fit_step_weights(self, val: list[_Case]) -> dict[str, Any]:
        """Per landmark, the share ``w_n`` of stage 2's displacement that minimises the validation error."""
        n = len(self.landmark_names)
        starts, moves, truths, present = [], [], [], []
        with torch.no_grad():
            for k in val:
                assert k.stage1 is not None
                d, _ = self._refine(k.prep, k.stage1)
                starts.append(k.stage1)
                moves.append(d)
                truths.append(np.nan_to_num(k.xyz))
                present.append(k.present)
        s0, d, t, m = (np.stack(a) for a in (starts, moves, truths, present))
        grid = np.round(np.linspace(1.0, 0.0, 11), 2)  # from 1 down: ties keep the paper's full step
        weights, table = np.ones(n), {}
        for i, name in enumerate(self.landmark_names):
            if not m[:, i].any():
                continue
            errs = [float(np.linalg.norm(s0[m[:, i], i] + w * d[m[:, i], i] - t[m[:, i], i], axis=1).mean())
                    for w in grid]
            weights[i] = grid[int(np.argmin(errs))]
            table[name] = {"weight": float(weights[i]), "val_mre_stage1_mm": errs[-1], "val_mre_full_step_mm": errs[0],
                           "val_mre_mm": min(errs)}
        self.step_weights = weights
        return table

    def _cases(self, samples: Sequence[Sample] | None) -> list[_Case]:
        out = []
        for s in samples or []:
            if s.landmarks is None:
                continue
            lm = s.landmarks.reorder(self.landmark_names)
            xyz = np.where(lm.found[:, None], lm.xyz_mm_ras, np.nan)
            image = s.load_image()
            if self.config.modality == "auto" and self.fitted_modality is None:
                self.fitted_modality = guess_modality(image.array)
            out.append(_Case(s.case, prepare(image, self.modality(image.array), self.device), xyz, lm.found.copy()))
        return out

    def _stage1_estimates(self, cases: Sequence[_Case], batch: int = 8, decode: str | None = None) -> None:
        self.unet.eval()
        with torch.no_grad():
            for i in range(0, len(cases), batch):
                chunk = cases[i:i + batch]
                grids = [self.coarse_grid(c.prep) for c in chunk]
                xyz, _ = self._decode(self._heatmaps([c.prep for c in chunk], grids), grids, decode)
                for c, p in zip(chunk, xyz, strict=True):
                    c.stage1 = p

    def _pair_prior_from(self, train: list[_Case]) -> tuple[PairwisePrior, float]:
        """The pairwise prior of the training configurations, and its candidate noise: the coarsest stage-1 voxel."""
        noise = float(max(self.coarse_grid(k.prep).spacing_mm.max() for k in train))
        return PairwisePrior.fit(np.stack([k.xyz for k in train]), noise), noise

    def _fit_decode(self, train: list[_Case], val: list[_Case]) -> dict[str, Any]:
        """Fit the pairwise prior on the training configurations; keep it if it beats the peaks on ``val``."""
        self.decode, self.pair_prior = "peak", None
        if not (self.config.shape_decode and val and len(self.landmark_names) > 1):
            return {"chosen": "peak"}
        try:
            self.pair_prior, noise = self._pair_prior_from(train)
        except LandmarkError as err:  # e.g. too few training cases for any pair
            return {"chosen": "peak", "why": str(err)}
        mre = {}
        for mode in ("peak", "shape"):
            self._stage1_estimates(val, decode=mode)
            mre[mode] = self._mre(val, [v.stage1 for v in val if v.stage1 is not None])
        # Ties keep the paper's per-channel maximum.
        self.decode = "shape" if mre["shape"] < mre["peak"] else "peak"
        if self.decode == "peak":
            self.pair_prior = None
        return {"chosen": self.decode, "noise_mm": noise, "val_mre_peak_mm": mre["peak"],
                "val_mre_shape_mm": mre["shape"]}

    @staticmethod
    def _mre(cases: Sequence[_Case], preds: Sequence[np.ndarray]) -> float:
        errs = [np.linalg.norm(p - c.xyz, axis=1)[c.present] for c, p in zip(cases, preds, strict=True)]
        flat = np.concatenate(errs) if errs else np.zeros(0)
        return float(flat.mean()) if flat.size else float("nan")

    def _augment(self, rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
        c = self.config
        return random_world_transform(rng, centre, c.rotation_deg, (float(c.scale_range[0]), float(c.scale_range[1])),
                                      c.translation_mm)

    @staticmethod
    def _cosine_lr(optimizer: torch.optim.Optimizer, base: float, epoch: int, epochs: int) -> None:
        lr = 0.5 * base * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))
        for group in optimizer.param_groups:
            group["lr"] = max(lr, 0.02 * base)

    def _fit_stage1(self, train: list[_Case], val: list[_Case], rng: np.random.Generator,
                    deadline: float | None, progress: bool) -> dict[str, Any]:
        c = self.config
        opt = torch.optim.Adam(self.unet.parameters(), lr=c.lr)
        epochs = max(c.max_epochs, math.ceil(c.min_iterations / math.ceil(len(train) / c.batch_size)))

        def epoch_fn(epoch: int) -> float:
            self._cosine_lr(opt, c.lr, epoch, epochs)
            order = rng.permutation(len(train))
            losses = []
            for i in range(0, len(order), c.batch_size):
                chunk = [train[j] for j in order[i:i + c.batch_size]]
                grids = []
                for case in chunk:
                    g = self.coarse_grid(case.prep)
                    grids.append(g.moved(self._augment(rng, g.grid_to_world((np.asarray(g.shape) - 1) / 2.0))))
                x = torch.cat([case.prep.sample([g], float(g.spacing_mm.min())) for case, g in zip(chunk, grids,
                                                                                                    strict=True)])
                pts = np.stack([g.world_to_grid(np.nan_to_num(case.xyz)) for case, g in zip(chunk, grids, strict=True)])
                present = torch.as_tensor(np.stack([case.present for case in chunk]), device=self.device)
                target = heatmap_targets(torch.as_tensor(pts, dtype=torch.float32, device=self.device), present,
                                         self.coarse_shape, c.sigma, c.heatmap_height)
                main, sides = self.unet.forward_deep(x)
                loss = deep_supervision_loss(main, sides, target, heatmap_channel_mask(present), c.weight_gamma,
                                             c.side_weights, c.weight_target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            return float(np.mean(losses))

        def validate() -> float:
            self._stage1_estimates(val)
            return self._mre(val, [v.stage1 for v in val if v.stage1 is not None])

        rep = train_network("cascade stage 1", self.unet, epoch_fn, validate if val else None,
                            max_epochs=epochs, deadline=deadline, patience=c.patience, progress=progress)
        return rep.to_dict()

    def _set_ranges(self, train: list[_Case], val: list[_Case]) -> dict[str, Any]:
        """``r_n`` from the real stage-1 errors on the training and validation images."""
        c = self.config
        self._stage1_estimates(train + val)
        half_patch = 0.5 * c.pixdim * (min(c.roi_size) - 1)
        info: dict[str, Any] = {}
        ranges = []
        for n, name in enumerate(self.landmark_names):
            q = []
            for group in (train, val):
                e = [np.linalg.norm(k.stage1[n] - k.xyz[n]) for k in group if k.present[n] and k.stage1 is not None]
                if e:
                    q.append(float(np.quantile(e, c.range_quantile)))
            r = c.range_scale * max(q) if q else c.min_range_mm
            ranges.append(float(np.clip(r, c.min_range_mm, 0.75 * half_patch)))
            info[name] = {"stage1_error_quantile_mm": q, "range_mm": ranges[-1]}
        self.ranges_mm = np.asarray(ranges)
        return info

    def _fit_stage2(self, train: list[_Case], val: list[_Case], rng: np.random.Generator,
                    deadline: float | None, progress: bool) -> dict[str, Any]:
        c = self.config
        n = len(self.landmark_names)
        opt = torch.optim.Adam(self.cnn.parameters(), lr=c.patch_lr)
        steps = math.ceil(len(train) * c.patches_per_case / c.patch_batch_size)
        epochs = max(c.patch_epochs, math.ceil(c.patch_min_iterations / steps))
        r = self.ranges_mm
        centre_idx = (np.asarray(c.roi_size, dtype=np.float64) - 1) / 2.0

        def draw(case: _Case) -> tuple[list[Grid], np.ndarray]:
            # Centres uniform in the ball of radius r_n around the truth (the range stage 1 really needs).
            u = rng.normal(size=(n, 3))
            u *= (r * rng.uniform(size=n) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
            assert case.stage1 is not None
            centres = np.where(case.present[:, None], np.nan_to_num(case.xyz) + u, case.stage1)
            grids = [g.moved(self._augment(rng, ct)) for g, ct in zip(self.patch_grids(centres), centres, strict=True)]
            target = np.stack([(g.world_to_grid(np.nan_to_num(x)) - centre_idx) * c.pixdim
                               for g, x in zip(grids, case.xyz, strict=True)])
            return grids, target

        def epoch_fn(epoch: int) -> float:
            self._cosine_lr(opt, c.patch_lr, epoch, epochs)
            order = np.concatenate([rng.permutation(len(train)) for _ in range(c.patches_per_case)])
            losses = []
            for i in range(0, len(order), c.patch_batch_size):
                chunk = [train[j] for j in order[i:i + c.patch_batch_size]]
                draws = [draw(case) for case in chunk]
                target = torch.as_tensor(np.stack([d[1] for d in draws]), dtype=torch.float32, device=self.device)
                present = torch.as_tensor(np.stack([case.present for case in chunk]), device=self.device)
                pred = self._displacements([case.prep for case in chunk], np.zeros(0), [d[0] for d in draws])
                loss = displacement_loss(pred, target, present)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            return float(np.mean(losses))

        def validate() -> float:
            preds = []
            for i in range(0, len(val), 8):
                chunk = val[i:i + 8]
                centres = np.stack([k.stage1 for k in chunk if k.stage1 is not None])
                d, _ = self._clamped(self._displacements([k.prep for k in chunk], centres).cpu().double().numpy())
                preds.extend(centres + d)
            return self._mre(val, preds)

        rep = train_network("cascade stage 2", self.cnn, epoch_fn, validate if val else None,
                            max_epochs=epochs, deadline=deadline, patience=c.patience, progress=progress)
        return rep.to_dict()

    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample] | None = None,
        *,
        seed: int = 0,
        max_minutes: float | None = None,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Train stage 1, measure its errors, then train stage 2.

        Options:
            init: ``"scratch"`` (default: new weights) or ``"current"`` (fine-tune the current weights).
            stages: ``"all"`` (default) or ``"stage2"`` (keep stage 1, retrain stage 2 only).
        """
        init = options.pop("init", "scratch")
        which = options.pop("stages", "all")
        if options:
            raise LandmarkError(f"cascade.fit: unknown option(s) {', '.join(options)}; accepted: init, stages")
        if init not in ("scratch", "current"):
            raise LandmarkError(f"cascade.fit: init must be 'scratch' or 'current', got {init!r}")
        if which not in ("all", "stage2"):
            raise LandmarkError(f"cascade.fit: stages must be 'all' or 'stage2', got {which!r}")
        t0 = time.monotonic()
        end = deadline_from(max_minutes)
        rng = seed_everything(seed)
        if init == "scratch" and which == "all":
            self.fitted_modality = None
        tr, va = self._cases(train), self._cases(val)
        if not tr:
            raise LandmarkError("cascade.fit: no training sample has landmarks")
        if init == "scratch":
            unet, cnn = self._build()
            if which == "all":
                self.unet = unet
                self.coarse_shape = self._fit_coarse_shape([k.prep for k in tr])
            self.cnn = cnn
        report: dict[str, Any] = {"detector": self.name, "profile": self.profile, "seed": seed, "init": init,
                                  "n_train": len(tr), "n_val": len(va), "modality": self.modality(np.zeros(1)),
                                  "coarse_shape": list(self.coarse_shape)}
        if which == "all":
            self.decode, self.pair_prior = "peak", None  # stage 1's validation during training: the paper's
            report["stage1"] = self._fit_stage1(tr, va, rng, deadline_from(max_minutes, self.config.stage1_share),
                                                progress)
            report["decode"] = self._fit_decode(tr, va)
        report["ranges"] = self._set_ranges(tr, va)
        if va:
            report["stage1_val_mre_mm"] = self._mre(va, [v.stage1 for v in va if v.stage1 is not None])
        report["stage2"] = self._fit_stage2(tr, va, rng, end, progress)
        self.step_weights = np.ones(len(self.landmark_names))
        if va and self.config.fit_step_weights:
            report["step_weights"] = self._fit_step_weights(va)
        report["seconds"] = time.monotonic() - t0
        self.fitted_info = {"training": {k: v for k, v in report.items() if k not in ("stage1", "stage2")}}
        return report
