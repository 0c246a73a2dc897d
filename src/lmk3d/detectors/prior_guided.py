"""``prior_guided``: coarse ResNet regression, fine patch U-Nets and the correlated-landmark module.

Pang et al., "Prior Guided 3D Medical Image Landmark Localization", MIDL 2023
(``../shared/papers/prior_guided_pang_midl2023.txt``).

Stages (``stages()``; ``predict_all`` times each):

1. ``coarse``: a 3D ResNet (:class:`lmk3d.networks.resnet_regressor.ResNetRegressor`) sees the whole
   image on an isotropic RAS-aligned grid (``coarse_roi_size`` voxels) and regresses all ``N``
   landmark coordinates at once (normalised to the grid; L1 loss on present landmarks only).
2. ``fine``: patches at ``pixdim`` mm (``roi_size`` voxels; by default the training images' native
   resolution) centred at the coarse estimates, sampled
   in one batched call. *Independent* landmarks: one :class:`~lmk3d.networks.patch_unet.PatchUNet` each
   predicts a Gaussian heatmap; the landmark is its sub-voxel peak. *Correlated* landmarks (groups
   annotated on one key slice, from ``config.groups`` or a dataset's ``groups.json``): one
   :class:`~lmk3d.networks.correlated_module.CorrelatedModule` per group; its patches share their
   extent along the group's axis, and the key-slice peak fixes the group's coordinate on that axis.

Training: the coarse network first (grid moved by random rotation, scaling and translation; the
landmarks stay in world space), then its errors on the training cases are measured and the fine
networks are trained on patches whose centres are jittered like those errors (per landmark and
axis RMS times ``jitter_scale``). Both keep their best-on-validation weights (validation MRE in mm;
the fine one through the whole chain, each error capped at the patch half-size, since a coarse
failure that leaves the landmark outside its patch is beyond any fine epoch).

Score (per landmark, in ``[0, 1]``): the fine heatmap's peak value (the targets peak at 1); for a
correlated landmark with slice detection, the smaller of that and the key-slice heatmap's peak. A
landmark whose score is below ``min_score``, or that falls outside the field of view, is not found.
The coarse stage's own output carries score 1 (a regression has no confidence of its own).

Example:
    >>> det = PriorGuidedDetector.create(["a", "b"], profile="tiny")
    >>> [s.name for s in det.stages()]
    ['coarse', 'fine']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from lmk3d import geometry
from lmk3d.data.datasets import GROUPS_FILE, LandmarkGroup, image_geometry, read_groups
from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Prediction, Stage, default_device, freeze_sequences
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.correlated_module import CorrelatedModule, decode_key_slice, key_slice_heatmap
from lmk3d.networks.patch_unet import PatchUNet
from lmk3d.networks.resnet_regressor import (
    RESNET34_CHANNELS,
    RESNET34_LAYERS,
    ResNetRegressor,
    denormalise_coordinates,
    normalise_coordinates,
)
from lmk3d.training.loop import LoopReport, deadline_from, seed_everything, train_network
from lmk3d.transforms.grid import Grid, antialias, image_tensor, random_world_transform, sample
from lmk3d.transforms.heatmap import decode_peaks, gaussian_heatmaps
from lmk3d.transforms.intensity import IntensityMap, fit_intensity

#: Key-slice axis names (the axis is perpendicular to the key slice) -> RAS world axis = grid axis.
AXES: dict[str, int] = {"LR": 0, "AP": 1, "SI": 2}

Group = tuple[tuple[str, ...], str]



def _axis(name: str) -> int:
    key = str(name).upper()
    if key not in AXES:
        raise LandmarkError(f"unknown key-slice axis {name!r}; choose one of {', '.join(AXES)}")
    return AXES[key]


def normalise_groups(groups: Any) -> tuple[Group, ...]:
    """Groups as ``((names...), axis), ...``.

    Accepted: :class:`lmk3d.data.datasets.LandmarkGroup` objects (what ``load_dataset`` and
    ``read_groups`` give), ``[names, axis]`` pairs (config, checkpoint), or dicts with ``landmarks``
    and ``axis`` (the ``groups.json`` entries); optionally wrapped in ``{"groups": [...]}``.
    """
    if isinstance(groups, dict):
        groups = groups.get("groups", [])
    out: list[Group] = []
    for g in groups or ():
        names: Any
        axis: Any
        if isinstance(g, LandmarkGroup):
            names, axis = g.landmarks, g.axis
        elif isinstance(g, dict):
            names, axis = g.get("landmarks", g.get("names")), g.get("axis")
        else:
            names, axis = g
        if names is None or axis is None:
            raise LandmarkError(f"landmark group {g!r}: needs landmark names and a key-slice axis "
                                "(keys 'landmarks' and 'axis')")
        names_t = tuple(str(n) for n in names)
        if len(names_t) < 2:
            raise LandmarkError(f"landmark group {names_t}: a correlated group needs at least 2 landmarks")
        _axis(str(axis))
        out.append((names_t, str(axis).upper()))
    return tuple(out)


def find_groups(samples: Sequence[Sample]) -> tuple[Group, ...]:
    """The ``groups.json`` of the samples' dataset (beside their image folder), if there is one."""
    for s in samples[:1]:
        for folder in (Path(s.image_path).parent, Path(s.image_path).parent.parent):
            if (folder / GROUPS_FILE).is_file():
                return normalise_groups(read_groups(folder / GROUPS_FILE))
    return ()


@dataclass(frozen=True)
class PriorGuidedConfig:
    """Resolved settings of ``prior_guided`` (stored in the checkpoint).

    Attributes:
        spatial_dims, in_channels: MONAI names; 3 and 1.
        modality: ``"CT"`` (HU window), ``"MR"`` (percentiles) or ``"auto"`` (decided on the first
            training image: CT when it holds air-like values below -200; stored in the checkpoint).
        coarse_roi_size: the coarse grid in voxels (whole field of view, isotropic).
        coarse_layers, coarse_channels: ResNet blocks and widths per stage (ResNet-34: (3, 4, 6, 3),
            (64, 128, 256, 512)).
        roi_size: fine patch size in voxels.
        pixdim: fine patch spacing in mm; None = "full resolution": the median over the training images
            of the geometric mean of their voxel sizes, at least ``min_pixdim`` (fitted, stored in the
            checkpoint).
        channels: fine U-Net (and correlated encoder) widths per level, finest first.
        sigma: heatmap standard deviation in patch voxels.
        groups: correlated landmark groups, ``((names...), axis)`` with axis LR, AP or SI (the
            direction perpendicular to the key slice); empty = take ``groups.json`` from the data.
        fusion, axis_attention, slice_detection: the correlated module's parts (ablation switches).
        slice_sigma: key-slice heatmap standard deviation in slices; slice_loss_weight: its loss weight.
        slice_constraint: how far the key slice moves the correlated landmarks' axis coordinate at
            inference: 1 = onto the slice (the paper's constraint), 0 = not at all (the branch then
            only shapes the fused features through its training loss); in between, a blend.
        jitter_scale: fine patch centres are jittered by this times the coarse stage's per-axis RMS
            training error (at least one voxel, at most ``max_jitter_fraction`` of the patch half-size).
        max_jitter_fraction: see ``jitter_scale``.
        rotation_deg, scale_range: augmentation (grid motion; correlated patches rotate only about their
            axis so the key slice stays a slice).
        translation_fraction: coarse augmentation shift, as a fraction of the field of view.
        coarse_epochs, coarse_batch_size, coarse_lr: coarse training.
        fine_epochs, fine_batch_size, fine_lr: fine training (images per step; one patch per landmark).
        patience: early stopping, in validations without improvement.
        coarse_share: share of a time budget given to the coarse stage.
        min_score: landmarks scored below this are not found.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    modality: str = "auto"
    coarse_roi_size: tuple[int, int, int] = (64, 64, 64)
    coarse_layers: tuple[int, ...] = (1, 1, 1, 1)
    coarse_channels: tuple[int, ...] = (16, 32, 64, 128)
    roi_size: tuple[int, int, int] = (24, 24, 24)
    pixdim: float | None = None
    min_pixdim: float = 1.0
    channels: tuple[int, ...] = (8, 16, 32)
    sigma: float = 2.0
    groups: tuple[Group, ...] = ()
    fusion: bool = True
    axis_attention: bool = True
    slice_detection: bool = True
    slice_sigma: float = 2.0
    slice_loss_weight: float = 1.0
    slice_constraint: float = 1.0
    jitter_scale: float = 2.0
    max_jitter_fraction: float = 0.4
    rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translation_fraction: float = 0.1
    coarse_epochs: int = 150
    coarse_batch_size: int = 8
    coarse_lr: float = 1e-3
    fine_epochs: int = 60
    fine_batch_size: int = 8
    fine_lr: float = 2e-3
    patience: int = 30
    coarse_share: float = 0.25
    min_score: float = 0.1

    def __post_init__(self) -> None:
        freeze_sequences(self, ("coarse_roi_size", "coarse_layers", "coarse_channels", "roi_size", "channels",
                                "scale_range"))
        object.__setattr__(self, "groups", normalise_groups(self.groups))
        if self.modality not in ("CT", "MR", "auto"):
            raise LandmarkError(f"prior_guided: unknown modality {self.modality!r}; choose CT, MR or auto")
        if self.spatial_dims != 3 or self.in_channels != 1:
            raise LandmarkError("prior_guided: only spatial_dims=3 and in_channels=1 are supported, got "
                                f"{self.spatial_dims} and {self.in_channels}")
        if len(self.coarse_roi_size) != 3 or len(self.roi_size) != 3:
            raise LandmarkError(f"prior_guided: coarse_roi_size and roi_size need 3 sizes, got "
                                f"{self.coarse_roi_size} and {self.roi_size}")
        if (self.axis_attention or self.slice_detection) and not self.fusion:
            raise LandmarkError("prior_guided: axis_attention and slice_detection need fusion=True")
        if not 0.0 <= self.slice_constraint <= 1.0:
            raise LandmarkError(f"prior_guided: slice_constraint must be in [0, 1], got {self.slice_constraint}")


#: The paper's sizes: ResNet-34 at full width on a 128^3 downsampled volume, 64^3 full-resolution patches.
PAPER = PriorGuidedConfig(
    coarse_roi_size=(128, 128, 128), coarse_layers=RESNET34_LAYERS,
    coarse_channels=RESNET34_CHANNELS, roi_size=(64, 64, 64), channels=(32, 64, 128, 256),
    sigma=3.0, coarse_epochs=300, coarse_batch_size=4, fine_epochs=200, fine_batch_size=4, fine_lr=1e-3,
    patience=40,
)
#: Sized to train on the 140 hippocampus training cases in under 30 minutes on one CPU thread.
CPU = PriorGuidedConfig()
#: Seconds, for tests.
TINY = PriorGuidedConfig(
    coarse_roi_size=(16, 16, 16), coarse_channels=(4, 8, 16, 16), roi_size=(16, 16, 16),
    channels=(4, 8, 16), sigma=2.0, coarse_epochs=3, fine_epochs=12, patience=12, coarse_batch_size=8,
    fine_batch_size=4, fine_lr=5e-3,
)


# --- preprocessing (one path for training, validation and inference) ----------------------------------
@dataclass(eq=False)
class PreparedImage:
    """One image ready for sampling: raw voxels on the device and the intensity map fitted on them.

    Sampling box-filters (:func:`lmk3d.transforms.grid.antialias`) and reads only the part of the
    image the grids reach, so fine patches of a large CT never touch the whole volume. Box-filtered
    copies made by :meth:`at_spacing` are kept and reused.
    """

    tensor: torch.Tensor  # (1, 1, I, J, K) raw intensities
    affine: np.ndarray
    shape: tuple[int, int, int]
    intensity: IntensityMap
    background: float
    reduced: dict[tuple[int, ...], tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict)

    def factors(self, spacing_mm: float) -> tuple[int, ...]:
        """The box filter's integer factors per array axis for sampling at ``spacing_mm``."""
        spacing = geometry.spacing_from_affine(self.affine)
        return tuple(max(1, int(np.floor(spacing_mm / s + 1e-6))) for s in spacing)

    def at_spacing(self, spacing_mm: float) -> tuple[torch.Tensor, np.ndarray]:
        """The whole image box-filtered for ``spacing_mm`` (kept for reuse) and its affine."""
        key = self.factors(spacing_mm)
        if key not in self.reduced:
            self.reduced[key] = antialias(self.tensor, self.affine, float(spacing_mm))
        return self.reduced[key]

    def sample(self, grids: Sequence[Grid], spacing_mm: float) -> torch.Tensor:
        """Normalised intensities on ``grids`` (equal shapes): ``(B, 1, D, H, W)``."""
        grids = list(grids)
        corners = np.concatenate([_grid_corners(g) for g in grids])
        key = self.factors(spacing_mm)
        if key in self.reduced:
            src, a = self.reduced[key]
        else:
            # Filter only the reachable part; blocks aligned with the whole image's, so values are the same.
            f = np.asarray(key)
            lo, hi = _index_box(corners, self.affine, self.shape, 2 * f + 2, f)
            src, a = antialias(_crop(self.tensor, lo, hi), self.affine @ _shift(lo), float(spacing_mm))
        lo, hi = _index_box(corners, a, tuple(src.shape[2:]), np.ones(3, dtype=int), np.ones(3, dtype=int))
        out = self.intensity(sample(_crop(src, lo, hi), a @ _shift(lo), grids, padding_value=self.background))
        # MONAI returns a MetaTensor, whose per-operation bookkeeping doubles the networks' CPU time.
        return out.as_tensor() if isinstance(out, MetaTensor) else out

    def cropped(self, spacing_mm: float, lo_ras: np.ndarray, hi_ras: np.ndarray) -> PreparedImage:
        """A copy holding only the box ``[lo, hi]`` (world RAS mm) of the image reduced for ``spacing_mm``.

        Training keeps this instead of whole large images; sampling inside the box is unchanged.
        """
        t, a = self.at_spacing(spacing_mm)
        corners = np.array([[x, y, z] for x in (lo_ras[0], hi_ras[0]) for y in (lo_ras[1], hi_ras[1])
                            for z in (lo_ras[2], hi_ras[2])])
        lo, hi = _index_box(corners, a, tuple(t.shape[2:]), np.ones(3, dtype=int), np.ones(3, dtype=int))
        crop = _crop(t, lo, hi).clone()
        out_affine = a @ _shift(lo)
        return PreparedImage(crop, out_affine, (int(crop.shape[2]), int(crop.shape[3]), int(crop.shape[4])),
                             self.intensity, self.background, {(1, 1, 1): (crop, out_affine)})


def _grid_corners(g: Grid) -> np.ndarray:
    """World positions ``(8, 3)`` of a grid's corner voxel centres (the grid is their convex hull)."""
    n = np.asarray(g.shape, dtype=np.float64) - 1.0
    idx = np.array([[x, y, z] for x in (0.0, n[0]) for y in (0.0, n[1]) for z in (0.0, n[2])])
    return g.grid_to_world(idx)


def _index_box(points_ras: np.ndarray, affine: np.ndarray, size: Sequence[int], margin: np.ndarray,
               align: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index range ``[lo, hi)`` of an array (``affine``, ``size``) holding ``points_ras`` plus ``margin`` voxels.

    ``lo`` and ``hi`` are rounded out to multiples of ``align`` (box-filter blocks) and clipped to the
    array; each axis keeps at least 2 voxels (or the whole axis), enough for trilinear sampling.
    """
    n = np.asarray(size, dtype=int)
    ijk = geometry.ras_to_ijk(points_ras, affine).reshape(-1, 3)
    lo = (np.floor(ijk.min(axis=0)).astype(int) - margin) // align * align
    hi = -((-(np.ceil(ijk.max(axis=0)).astype(int) + margin + 1)) // align) * align
    lo = np.clip(lo, 0, np.maximum(n - 2, 0))
    hi = np.clip(hi, np.minimum(lo + 2, n), n)
    return lo, hi


def _crop(t: torch.Tensor, lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    return t[:, :, int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]


def _shift(lo: np.ndarray) -> np.ndarray:
    """Index translation: voxel 0 of a crop starting at ``lo`` is voxel ``lo`` of the array."""
    m = np.eye(4)
    m[:3, 3] = lo
    return m


def prepare(image: Volume, modality: str, device: str | torch.device) -> PreparedImage:
    """The one preprocessing entry point (training, validation, inference): tensor, intensity map, padding."""
    array, affine = image.array, np.asarray(image.affine, dtype=np.float64)
    if not array.flags.c_contiguous and array.flags.f_contiguous:
        # NIfTI arrays come Fortran-ordered: view them with reversed axes (and the affine's columns
        # reversed to match) instead of copying the whole volume. Sampling happens in world space.
        array = array.T
        affine = affine[:, [2, 1, 0, 3]]
    t = image_tensor(array, device)
    shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
    return PreparedImage(t, affine, shape, fit_intensity(array, modality), float(t.amin()))


# --- stages ----------------------------------------------------------------------------------------------
class _CoarseStage(Stage):
    name = "coarse"

    def __init__(self, det: PriorGuidedDetector) -> None:
        self.det = det

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        prep = self.det._prepared(image)
        xyz = self.det._coarse_predict([prep], [self.det.coarse_grid(image.affine, image.shape)])[0]
        n = len(self.det.landmark_names)
        return LandmarkSet(self.det.landmark_names, xyz, np.ones(n), np.ones(n, dtype=bool))


class _FineStage(Stage):
    name = "fine"

    def __init__(self, det: PriorGuidedDetector) -> None:
        self.det = det

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        prep = self.det._prepared(image)
        if previous is None:
            centres = np.repeat(((np.asarray(image.shape) - 1) / 2.0)[None], len(self.det.landmark_names), 0)
            centres = geometry.ijk_to_ras(centres, image.affine)
        else:
            centres = previous.reorder(self.det.landmark_names).xyz_mm_ras.copy()
            bad = ~np.isfinite(centres).all(axis=1)
            centres[bad] = geometry.ijk_to_ras((np.asarray(image.shape) - 1) / 2.0, image.affine)
        xyz, scores = self.det._fine_predict(prep, centres)
        return LandmarkSet(self.det.landmark_names, xyz, scores, scores >= self.det.config.min_score)


@dataclass(eq=False)
class _Case:
    """A training image with its true landmarks (detector order) and what training caches for it."""

    case: str
    xyz: np.ndarray  # (N, 3) world RAS mm, NaN where missing
    present: np.ndarray  # (N,) bool
    coarse_grid: Grid
    coarse_src: PreparedImage
    fine_src: PreparedImage
    coarse: np.ndarray | None = None  # (N, 3) coarse estimates once the coarse stage is trained


# --- the detector ----------------------------------------------------------------------------------------
class PriorGuidedDetector(Detector):
    """Coarse-to-fine detector with a correlated-landmark module (see the module docstring)."""

    name = "prior_guided"
    config_class = PriorGuidedConfig
    profiles = {"paper": PAPER, "cpu": CPU, "tiny": TINY}

    def __init__(self, landmark_names: Sequence[str], config: PriorGuidedConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile)
        self.config: PriorGuidedConfig = config
        self.device = device or default_device()
        self.fitted: dict[str, Any] = {}
        self._cache: tuple[int, PreparedImage] | None = None
        self._build(config.groups)

    # --- networks -------------------------------------------------------------------------------------
    def _resolve_groups(self, groups: Sequence[Group]) -> tuple[Group, ...]:
        """Keep groups whose landmarks this detector has (at least two of them), without overlaps."""
        out: list[Group] = []
        used: set[str] = set()
        for names, axis in normalise_groups(groups):
            keep = tuple(n for n in names if n in self.landmark_names and n not in used)
            if len(keep) >= 2:
                out.append((keep, axis))
                used.update(keep)
        return tuple(out)

    def _build(self, groups: Sequence[Group]) -> None:
        """Build every network from the config, the landmark names and the groups (training and loading)."""
        torch_dev = torch.device(self.device)
        cfg = self.config
        self.groups = self._resolve_groups(groups)
        grouped = {n for names, _ in self.groups for n in names}
        self.independent = tuple(i for i, n in enumerate(self.landmark_names) if n not in grouped)
        self.group_index = tuple(tuple(self.landmark_names.index(n) for n in names) for names, _ in self.groups)
        self.coarse_net = ResNetRegressor(cfg.spatial_dims, cfg.in_channels, len(self.landmark_names),
                                          cfg.coarse_layers, cfg.coarse_channels).to(torch_dev)
        # One module holds every independent landmark's U-Net (grouped convolutions); empty if none.
        self.fine_nets = nn.ModuleList(
            [PatchUNet(cfg.spatial_dims, cfg.in_channels, 1, cfg.channels, len(self.independent))]
            if self.independent else []
        ).to(torch_dev)
        self.group_nets = nn.ModuleList(
            CorrelatedModule(cfg.spatial_dims, cfg.in_channels, len(names), cfg.channels, _axis(axis),
                             cfg.fusion, cfg.axis_attention, cfg.slice_detection)
            for names, axis in self.groups
        ).to(torch_dev)
        for m in (self.coarse_net, self.fine_nets, self.group_nets):
            m.eval()

    def stages(self) -> list[Stage]:
        return [_CoarseStage(self), _FineStage(self)]

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        sd = {"coarse": self.coarse_net.state_dict(), "fine": self.fine_nets.state_dict(),
              "groups": self.group_nets.state_dict()}
        fitted = {**self.fitted, "groups": [[list(names), axis] for names, axis in self.groups]}
        return sd, fitted

    def load_state(self, state_dicts: dict[str, Any], fitted: dict[str, Any], device: str) -> None:
        self.device = device
        self.fitted = dict(fitted)
        self._build(normalise_groups(fitted.get("groups", self.config.groups)))
        self.coarse_net.load_state_dict(state_dicts["coarse"])
        self.fine_nets.load_state_dict(state_dicts["fine"])
        self.group_nets.load_state_dict(state_dicts["groups"])

    # --- inference ------------------------------------------------------------------------------------
    def prepare(self, image: Volume) -> PreparedImage:
        """Preprocess ``image`` now (tensor on the device, intensity map); the next ``predict`` reuses it."""
        self._cache = (id(image.array), prepare(image, self.modality(image.array), self.device))
        return self._cache[1]

    def _prepared(self, image: Volume) -> PreparedImage:
        # Both stages of one predict call share the prepared image (and its reduced copies).
        if self._cache is None or self._cache[0] != id(image.array):
            return self.prepare(image)
        return self._cache[1]

    def predict_all(self, image: Volume) -> Prediction:
        try:
            return super().predict_all(image)
        finally:
            self._cache = None

    def modality(self, array: np.ndarray) -> str:
        """The resolved modality: the config's, the one fitted in training, or a guess from ``array``."""
        if self.config.modality != "auto":
            return self.config.modality
        if "modality" in self.fitted:
            return str(self.fitted["modality"])
        return guess_modality(array)

    @property
    def pixdim(self) -> float:
        """Fine patch spacing in mm: the configured one, or the one fitted on the training images."""
        if self.config.pixdim is not None:
            return float(self.config.pixdim)
        return float(self.fitted.get("pixdim", self.config.min_pixdim))

    def coarse_grid(self, affine: np.ndarray, shape: Sequence[int]) -> Grid:
        return Grid.covering(affine, shape, self.config.coarse_roi_size)

    def _autocast(self) -> AbstractContextManager[Any]:
        if torch.device(self.device).type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def _coarse_predict(self, preps: Sequence[PreparedImage], grids: Sequence[Grid]) -> list[np.ndarray]:
        """World RAS estimates ``(N, 3)`` of each image from the coarse network (grids: unaugmented)."""
        size = self.config.coarse_roi_size
        x = torch.cat([p.sample([g], float(g.spacing_mm.max())) for p, g in zip(preps, grids, strict=True)])
        with torch.no_grad(), self._autocast():
            out = self.coarse_net(x).float()
        idx = denormalise_coordinates(out, size).cpu().numpy().astype(np.float64)
        return [g.grid_to_world(i) for g, i in zip(grids, idx, strict=True)]

    def patch_grids(self, centres: np.ndarray) -> list[Grid]:
        """One patch grid per landmark (detector order); correlated patches share their axis extent."""
        centres = np.array(centres, dtype=np.float64)
        for idx, (_, axis) in zip(self.group_index, self.groups, strict=True):
            a = _axis(axis)
            centres[list(idx), a] = centres[list(idx), a].mean()
        return [Grid.around(c, self.config.roi_size, self.pixdim) for c in centres]

    def _fine_forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """All fine networks on one batch of patches.

        Args:
            patches: ``(B, N, D, H, W)``, one patch per landmark in detector order.

        Returns:
            ``(heatmaps (B, N, D, H, W), key-slice heatmaps per group, (B, L) or None)``.
        """
        heat = torch.zeros_like(patches)
        for net in self.fine_nets:
            heat[:, list(self.independent)] = net(patches[:, list(self.independent)]).to(heat.dtype)
        keys: list[torch.Tensor | None] = []
        for net, idx in zip(self.group_nets, self.group_index, strict=True):
            h, k = net(patches[:, list(idx)])
            heat[:, list(idx)] = h.to(heat.dtype)
            keys.append(k)
        return heat, keys

    def _decode(self, heat: torch.Tensor, keys: Sequence[torch.Tensor | None], grids: Sequence[Grid]
                ) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps of one image -> world positions ``(N, 3)`` and scores ``(N,)``.

        Args:
            heat: ``(N, D, H, W)``; keys: per group ``(L,)`` or None.
        """
        heat = heat.float()
        pos, peak = decode_peaks(heat)
        pos, peak = pos.clone(), peak.clone()
        lam = float(self.config.slice_constraint)
        for idx, (_, axis), key in zip(self.group_index, self.groups, keys, strict=True):
            if key is None or lam == 0.0:
                continue
            a = _axis(axis)
            s, s_peak = decode_key_slice(key.float()[None])
            # Look for each correlated landmark near the key slice (in-slice position), then move its axis
            # coordinate onto the slice (all the way when slice_constraint is 1).
            w = key_slice_heatmap(s, heat.shape[1 + a], self.config.slice_sigma)[0]
            view = [1, 1, 1]
            view[a] = -1
            p, _ = decode_peaks(heat[list(idx)] * w.reshape(view)[None])
            p[:, a] = (1.0 - lam) * pos[list(idx), a] + lam * s[0]
            pos[list(idx)] = p
            peak[list(idx)] = torch.minimum(peak[list(idx)], s_peak.expand(len(idx)))
        ijk = pos.cpu().numpy().astype(np.float64)
        xyz = np.stack([g.grid_to_world(i) for g, i in zip(grids, ijk, strict=True)])
        scores = np.clip(peak.cpu().numpy().astype(np.float64), 0.0, 1.0)
        return xyz, scores

    def _fine_predict(self, prep: PreparedImage, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grids = self.patch_grids(centres)
        patches = prep.sample(grids, self.pixdim)[:, 0][None]  # (1, N, D, H, W)
        with torch.no_grad(), self._autocast():
            heat, keys = self._fine_forward(patches)
        return self._decode(heat[0], [None if k is None else k[0] for k in keys], grids)

    # --- training -------------------------------------------------------------------------------------
    def _fit_pixdim(self, samples: Sequence[Sample]) -> None:
        """Resolve ``pixdim=None`` to the training images' native resolution (headers only)."""
        if self.config.pixdim is not None:
            return
        sizes = []
        for s in samples:
            _, affine = image_geometry(s.image_path)
            sizes.append(float(np.prod(geometry.spacing_from_affine(affine)) ** (1.0 / 3.0)))
        native = float(np.median(sizes)) if sizes else self.config.min_pixdim
        self.fitted["pixdim"] = round(max(self.config.min_pixdim, native), 3)

    def _cases(self, samples: Sequence[Sample] | None) -> list[_Case]:
        cfg = self.config
        pixdim = self.pixdim
        half = np.asarray(cfg.roi_size, dtype=np.float64) * pixdim / 2.0
        # Patches rotate and scale about a jittered centre: keep everything they can reach.
        margin = float(np.linalg.norm(half)) * max(cfg.scale_range) + cfg.max_jitter_fraction * float(half.max()) * 2
        out = []
        for s in samples or ():
            if s.landmarks is None:
                continue
            lm = s.landmarks.reorder(self.landmark_names)
            if not lm.found.any():
                continue
            img = s.load_image()
            if cfg.modality == "auto" and "modality" not in self.fitted:
                self.fitted["modality"] = guess_modality(img.array)
            prep = prepare(img, self.modality(img.array), self.device)
            grid = self.coarse_grid(img.affine, img.shape)
            coarse_sp = float(grid.spacing_mm.max())
            coarse_src = prep.cropped(coarse_sp, *geometry.world_bounds_ras(img.affine, img.shape))
            pts = lm.xyz_mm_ras[lm.found]
            fine_src = prep.cropped(pixdim, pts.min(axis=0) - margin, pts.max(axis=0) + margin)
            xyz = np.where(lm.found[:, None], lm.xyz_mm_ras, np.nan)
            out.append(_Case(s.case, xyz, lm.found.copy(), grid, coarse_src, fine_src))
        return out

    def _coarse_estimates(self, cases: Sequence[_Case], batch: int = 16) -> None:
        self.coarse_net.eval()
        for i in range(0, len(cases), batch):
            chunk = cases[i:i + batch]
            preds = self._coarse_predict([c.coarse_src for c in chunk], [c.coarse_grid for c in chunk])
            for c, p in zip(chunk, preds, strict=True):
                c.coarse = p

    @staticmethod
    def _mre(cases: Sequence[_Case], preds: Sequence[np.ndarray], cap_mm: float = np.inf) -> float:
        """Mean radial error over present landmarks, each error capped at ``cap_mm``."""
        errs = [np.linalg.norm(p[c.present] - c.xyz[c.present], axis=1) for c, p in zip(cases, preds, strict=True)]
        cat = np.concatenate(errs) if errs else np.zeros(0)
        return float(np.minimum(cat, cap_mm).mean()) if cat.size else float("nan")

    def _fit_coarse(self, train: list[_Case], val: list[_Case], rng: np.random.Generator,
                    deadline: float | None, progress: bool) -> LoopReport:
        cfg = self.config
        net = self.coarse_net
        size = cfg.coarse_roi_size
        opt = torch.optim.Adam(net.parameters(), lr=cfg.coarse_lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, cfg.patience // 3))
        dev = torch.device(self.device)
        # Start at the mean position: the untrained regressor then already equals the mean-shape guess.
        targets = []
        for c in train:
            idx = torch.as_tensor(c.coarse_grid.world_to_grid(c.xyz), dtype=torch.float32)
            targets.append(normalise_coordinates(idx, size))
        mean = torch.nanmean(torch.stack(targets), dim=0)
        net.set_mean_position(torch.nan_to_num(mean, nan=0.0))

        def epoch_fn(epoch: int) -> float:
            losses = []
            order = rng.permutation(len(train))
            for start in range(0, len(order), cfg.coarse_batch_size):
                batch = [train[i] for i in order[start:start + cfg.coarse_batch_size]]
                xs, ys = [], []
                for c in batch:
                    centre = c.coarse_grid.grid_to_world((np.asarray(size) - 1) / 2.0)
                    shift = cfg.translation_fraction * float(np.max(c.coarse_grid.spacing_mm)) * max(size)
                    t = random_world_transform(rng, centre, cfg.rotation_deg, cfg.scale_range, shift)
                    g = c.coarse_grid.moved(t)
                    xs.append(c.coarse_src.sample([g], float(g.spacing_mm.max())))
                    ys.append(normalise_coordinates(torch.as_tensor(g.world_to_grid(c.xyz), dtype=torch.float32),
                                                    size))
                x = torch.cat(xs).to(dev)
                y = torch.stack(ys).to(dev)
                mask = torch.isfinite(y).all(dim=-1)
                out = net(x)
                loss = (out - torch.nan_to_num(y))[mask].abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            return float(np.mean(losses))

        def validate() -> float:
            cases = val or train
            self._coarse_estimates(cases)
            mre = self._mre(cases, [c.coarse for c in cases])  # type: ignore[misc]
            sched.step(mre)
            return mre

        return train_network("coarse", net, epoch_fn, validate, max_epochs=cfg.coarse_epochs, deadline=deadline,
                             patience=cfg.patience, progress=progress)

    def _jitter_sd(self, train: Sequence[_Case], val: Sequence[_Case]) -> np.ndarray:
        """Per landmark and axis jitter SD in mm, from the coarse stage's RMS errors on the training cases."""
        cfg = self.config
        n = len(self.landmark_names)
        err = np.full((len(train), n, 3), np.nan)
        for k, c in enumerate(train):
            err[k] = np.where(c.present[:, None], c.coarse - c.xyz, np.nan)  # type: ignore[operator]
        rms = np.sqrt(np.nanmean(err**2, axis=0)) if len(train) else np.zeros((n, 3))
        rms = np.nan_to_num(rms, nan=float(np.nanmean(rms)) if np.isfinite(rms).any() else self.pixdim)
        half = np.asarray(cfg.roi_size, dtype=np.float64) * self.pixdim / 2.0
        sd = np.clip(cfg.jitter_scale * rms, self.pixdim, cfg.max_jitter_fraction * half)
        val_err = [np.linalg.norm(c.coarse[c.present] - c.xyz[c.present], axis=1) for c in val]  # type: ignore[index]
        self.fitted["coarse_train_rms_mm"] = rms.tolist()
        self.fitted["coarse_val_mre_mm"] = float(np.concatenate(val_err).mean()) if val_err else None
        self.fitted["jitter_sd_mm"] = sd.tolist()
        return sd

    def _draw_patches(self, c: _Case, rng: np.random.Generator, sd: np.ndarray) -> tuple[list[Grid], np.ndarray]:
        """Training patch grids for one case (jittered, augmented) and the truth on each grid ``(N, 3)``."""
        cfg = self.config
        half = np.asarray(cfg.roi_size, dtype=np.float64) * self.pixdim / 2.0
        lim = cfg.max_jitter_fraction * half
        jitter = np.clip(rng.normal(size=sd.shape) * sd, -lim, lim)
        base = np.where(c.present[:, None], c.xyz, c.coarse)  # type: ignore[arg-type]
        centres = base + jitter
        grids = self.patch_grids(centres)
        moved: list[Grid] = [grids[i] for i in range(len(grids))]
        for i in self.independent:
            t = random_world_transform(rng, centres[i], cfg.rotation_deg, cfg.scale_range, 0.0)
            moved[i] = grids[i].moved(t)
        for idx, (_, axis) in zip(self.group_index, self.groups, strict=True):
            # One rotation about the axis and one scaling per group, each about its own patch centre:
            # the axis coordinate of a world point is then the same in every patch of the group.
            m = _axis_rotation(rng, _axis(axis), cfg.rotation_deg, cfg.scale_range)
            for i in idx:
                moved[i] = grids[i].moved(_about(m, centres[i]))
        truth = np.stack([g.world_to_grid(p) for g, p in zip(moved, c.xyz, strict=True)])
        return moved, truth

    def _fit_fine(self, train: list[_Case], val: list[_Case], rng: np.random.Generator, sd: np.ndarray,
                  deadline: float | None, progress: bool, groups_only: bool = False) -> LoopReport:
        cfg = self.config
        dev = torch.device(self.device)
        # Groups only (the ablation): the independent U-Nets keep their weights and stay in eval mode.
        module = self.group_nets if groups_only else nn.ModuleList([self.fine_nets, self.group_nets])
        params = list(module.parameters())
        if not params:
            raise LandmarkError("prior_guided: no fine networks to train (no landmarks, or parts=('groups',) "
                                "without a correlated group)")
        opt = torch.optim.Adam(params, lr=cfg.fine_lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, cfg.patience // 3))
        shape = cfg.roi_size

        def epoch_fn(epoch: int) -> float:
            losses = []
            order = rng.permutation(len(train))
            for start in range(0, len(order), cfg.fine_batch_size):
                batch = [train[i] for i in order[start:start + cfg.fine_batch_size]]
                xs, ms, truths = [], [], []
                for c in batch:
                    grids, truth = self._draw_patches(c, rng, sd)
                    xs.append(c.fine_src.sample(grids, self.pixdim)[:, 0])
                    truths.append(torch.as_tensor(truth, dtype=torch.float32))
                    ms.append(torch.as_tensor(c.present))
                x = torch.stack(xs).to(dev)  # (B, N, D, H, W)
                truth_t = torch.stack(truths).to(dev)  # (B, N, 3)
                mask = torch.stack(ms).to(dev)  # (B, N)
                ts_t = gaussian_heatmaps(truth_t, shape, cfg.sigma)
                heat, keys = self._fine_forward(x)
                per = ((heat - ts_t) ** 2).flatten(2).mean(-1)  # (B, N)
                loss = per[mask].sum() / mask.sum().clamp(min=1)
                for idx, (_, axis), key in zip(self.group_index, self.groups, keys, strict=True):
                    if key is None:
                        continue
                    a = _axis(axis)
                    sub = truth_t[:, list(idx), a]
                    m = mask[:, list(idx)]
                    # The key slice is where the present members lie (their mean along the axis).
                    s = torch.where(m, sub, torch.zeros_like(sub)).sum(1) / m.sum(1).clamp(min=1)
                    ok = m.any(1)
                    if ok.any():
                        target = key_slice_heatmap(s, shape[a], cfg.slice_sigma)
                        loss = loss + cfg.slice_loss_weight * ((key - target) ** 2).mean(-1)[ok].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            return float(np.mean(losses)) if losses else float("nan")

        # Errors beyond the patch are coarse failures no fine epoch can fix: capped, they do not drive the choice.
        cap = float(np.min(shape)) * self.pixdim / 2.0

        def validate() -> float:
            cases = val or train
            preds = [self._fine_predict(c.fine_src, c.coarse)[0] for c in cases]  # type: ignore[arg-type]
            mre = self._mre(cases, preds, cap)
            sched.step(mre)
            return mre

        frozen = list(self.fine_nets.parameters()) if groups_only else []
        for q in frozen:
            q.requires_grad_(False)
        try:
            return train_network("fine", module, epoch_fn, validate, max_epochs=cfg.fine_epochs, deadline=deadline,
                                 patience=cfg.patience, progress=progress, metric_name="val_mre_capped_mm")
        finally:
            for q in frozen:
                q.requires_grad_(True)

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
        """Train the coarse network, measure its errors, then train the fine networks.

        Options:
            init: ``"scratch"`` (default: new networks; groups from the config or ``groups.json``) or
                ``"current"`` (fine-tune the current weights).
            parts: which stages to train, default ``("coarse", "fine")``; ``("fine",)`` keeps the coarse
                network; ``("groups",)`` trains only the correlated modules (the ablation of the paper's
                Table 2), keeping the coarse network and the independent U-Nets.
            groups: correlated groups overriding the config and ``groups.json`` (``init="scratch"`` only).
        """
        known = {"init", "parts", "groups"}
        unknown = set(options) - known
        if unknown:
            raise LandmarkError(f"prior_guided.fit: unknown option(s) {', '.join(sorted(unknown))}; "
                                f"accepted: {', '.join(sorted(known))}")
        init = options.get("init", "scratch")
        if init not in ("scratch", "current"):
            raise LandmarkError(f"prior_guided.fit: init must be 'scratch' or 'current', got {init!r}")
        parts = tuple(options.get("parts", ("coarse", "fine")))
        if not parts or set(parts) - {"coarse", "fine", "groups"}:
            raise LandmarkError(f"prior_guided.fit: parts must be a non-empty subset of ('coarse', 'fine', "
                                f"'groups'), got {parts!r}")
        t0, cpu0 = time.monotonic(), time.process_time()
        rng = seed_everything(seed)
        if init == "scratch":
            groups = options.get("groups") or self.config.groups or find_groups(train)
            self._build(groups)
            self.fitted = {}
        if init == "scratch" or "pixdim" not in self.fitted:
            self._fit_pixdim(train)
        train_cases = self._cases(train)
        val_cases = self._cases(val)
        if not train_cases:
            raise LandmarkError("prior_guided.fit: no training sample has any of the landmarks "
                                f"{', '.join(self.landmark_names)}")
        report: dict[str, Any] = {"seed": seed, "init": init, "parts": list(parts), "n_train": len(train_cases),
                                  "n_val": len(val_cases), "groups": [[list(n), a] for n, a in self.groups]}
        if "coarse" in parts:
            deadline = deadline_from(max_minutes, self.config.coarse_share if len(parts) > 1 else 1.0)
            report["coarse"] = self._fit_coarse(train_cases, val_cases, rng, deadline, progress).to_dict()
        self._coarse_estimates(train_cases + val_cases)
        sd = self._jitter_sd(train_cases, val_cases)
        if "fine" in parts or "groups" in parts:
            left = None if max_minutes is None else max(0.0, max_minutes - (time.monotonic() - t0) / 60.0)
            report["fine"] = self._fit_fine(train_cases, val_cases, rng, sd, deadline_from(left), progress,
                                            groups_only="fine" not in parts).to_dict()
        report["seconds"] = time.monotonic() - t0
        report["cpu_seconds"] = time.process_time() - cpu0
        self.fitted["training"] = {k: v for k, v in report.items() if k not in ("coarse", "fine")} | {
            k: {kk: vv for kk, vv in report[k].items() if kk != "history"} for k in ("coarse", "fine") if k in report
        }
        for m in (self.coarse_net, self.fine_nets, self.group_nets):
            m.eval()
        return report


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the image holds air-like values (1st percentile below -200 HU), else ``"MR"``."""
    step = max(1, int(round((array.size / 1_000_000) ** (1 / 3))))
    sub = np.asarray(array)[::step, ::step, ::step] if array.ndim == 3 else np.asarray(array).ravel()
    return "CT" if float(np.percentile(sub, 1.0)) < -200.0 else "MR"


def _axis_rotation(rng: np.random.Generator, axis: int, max_deg: float, scale_range: tuple[float, float]
                   ) -> np.ndarray:
    """A random ``(3, 3)`` rotation about one world axis times an isotropic scaling.

    Planes perpendicular to ``axis`` stay perpendicular to it, so a key slice stays a slice.
    """
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    c, s = np.cos(angle), np.sin(angle)
    u, v = [d for d in range(3) if d != axis]
    r = np.eye(3)
    r[u, u], r[u, v], r[v, u], r[v, v] = c, -s, s, c
    return r * rng.uniform(*scale_range)


def _about(linear: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` world transform applying ``linear`` ``(3, 3)`` about ``pivot``."""
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = pivot - linear @ pivot
    return m


__all__ = ["PriorGuidedConfig", "PriorGuidedDetector", "PreparedImage", "prepare", "find_groups", "normalise_groups"]
