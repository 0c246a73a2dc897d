"""``pin``: the Patch-based Iterative Network (Li et al., MICCAI 2018).

A point configuration is moved towards the landmarks by a CNN that looks at small patches around
its current position:

1. **Working frame** (:func:`prepare`, the one preprocessing function of training, validation and
   inference): RAS-aligned axes at ``pixdim`` mm with the origin at the centre of the field of view.
   Shapes live in this frame (in units of ``pixdim``): an axis permutation, flip, resampling or
   translation of the image gives the same frame relative to the anatomy, hence the same answer; a
   rotation is learnt (rotation augmentation). The image is box-filtered to about ``pixdim``
   (``antialias``) and mapped to [0, 1] by modality (CT: HU window; MR: percentiles).
2. **Shape space** (:class:`lmk3d.shape.pca.ShapeModel`): ``X = mean + W b`` fitted on the training
   configurations in their working frames (99.5 % of the variance); the single-landmark variant uses
   one model per landmark with ``W = I`` (the paper's PIN-Single).
3. **2.5D patches** (:func:`extract_patches`): for every landmark three orthogonal ``s x s`` planes
   through its current position, along the frame axes, sampled with one ``grid_sample`` call for all
   landmarks, initialisations and cases; out-of-volume parts are padded with the background value.
4. **CNN** (:class:`lmk3d.networks.pin_cnn.PinCNN`): regression of ``d`` (``n_b`` values) and
   classification of the direction (``2 n_b`` classes), loss ``(1 - alpha) MSE + alpha CE``.
   Training draws ``b`` uniformly within ``+-sample_range * sqrt(lambda)`` per mode.
5. **Inference**: update rule A (one unit step along the most probable direction), B (``b + d``) or
   C (``b + P_max * d``, the default), ``iterations`` times (``iterations_rule_a`` for A), stopping
   early when no landmark moves more than ``tolerance_mm``. Initialisations (the previous stage's
   configuration, ``b = 0`` by default, plus ``n_random_inits`` random ones, or the paper's 19-point
   layout) run as one batch per iteration; the answer is their mean.

**Fine level** (beyond the paper; ``fine_factor = 0``, as in the ``paper`` profile, turns it off): the
paper's volumes are 160 mm wide and its 101-pixel patches 50 mm, so one scale both covers the
anatomical variation and resolves the landmarks. A head-and-neck CT is 250+ mm wide and its
landmarks move by centimetres relative to the field of view: a 33-pixel patch that covers that
range has 5-7 mm pixels. A second PIN (same CNN and rules, its own shape model in a frame of
``max(image spacing, pixdim / fine_factor)`` mm) starts from the first one's answer; it is trained on
shapes drawn around the truth within ``+-sample_range`` RMS residuals of the first level on the
validation cases (the training cases when there are fewer than 5; gross failures left out). On the hippocampus crops
``pixdim`` is already the image spacing, so the second level works at the same scale with a CNN
trained on the narrower distribution of shapes the first level hands over (on the validation split
one multiple-landmark CNN took the MRE from 1.78 to 1.69 mm, single-landmark CNNs from 1.87 to
1.35 mm). The fine level's multiple-landmark shape model keeps every mode (``fine_variance_kept``),
and ``fine_levels`` chains more fine levels the same way, each trained on the residuals its
predecessor leaves and, with ``fine_step`` above 1, working at finer pixels.
``fine_variant = "single"`` makes the fine levels the paper's single-landmark variant (one CNN and
``W = I`` per landmark), started from the first level's configuration. ``tta`` adds test-time views
(rotated and scaled frames, as in training augmentation) to every level's initialisations.

**Score** (per landmark, in [0, 1]): ``exp(-spread^2 / (2 spread_scale_mm^2))`` where ``spread`` is the
RMS distance (mm) of the initialisations' final positions from their mean: initialisations that agree
mean a well-defined optimum. A landmark with ``score < min_score`` (or outside the field of view) is
"not found". The classification confidence is deliberately not part of the score: at convergence
the true direction is ambiguous by construction, so ``P_max`` is low exactly when the point is right.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Stage, default_device
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.pin_cnn import PinCNN
from lmk3d.shape.pca import ShapeModel
from lmk3d.training.loop import deadline_from, seed_everything, train_network
from lmk3d.training.pin_loss import pin_loss
from lmk3d.transforms.grid import antialias, image_tensor, random_world_transform
from lmk3d.transforms.intensity import fit_intensity

RULES = ("A", "B", "C")
VARIANTS = ("multiple", "single")
INIT_LAYOUTS = ("random", "grid19")
MODALITIES = ("auto", "CT", "MR")


@dataclass(frozen=True)
class PinConfig:
    """PIN's hyper-parameters (MONAI names where one exists).

    Attributes:
        spatial_dims: 2 (the CNN convolves the 2.5D plane stack).
        roi_size: patch side ``s`` in pixels (paper: 101).
        pixdim: patch pixel size = working-frame unit in mm (paper: 0.5); ``None`` = chosen at fit
            time (the median finest image spacing, enlarged if needed so a patch spans 1.25 x the
            +-3 SD range of every landmark coordinate); the resolved value is stored.
        modality: ``"CT"``, ``"MR"`` or ``"auto"`` (CT when the training images hold air at about -1000).
        variant: ``"multiple"`` (one CNN, PCA shape space) or ``"single"`` (one CNN per landmark, ``W = I``).
        fine_variant: the same for the fine levels (an extension, like the fine levels themselves):
            ``"single"`` refines each landmark on its own from the first level's configuration, so
            the shape model keeps the search among plausible configurations (the twin on the other
            side is not one) while each landmark's last millimetres depend only on its own patches.
        variance_kept: PCA variance kept (paper: 99.5 %).
        fine_variance_kept: the same for the fine level's shape model (an extension, like the fine level
            itself). 1.0 keeps every mode (at most ``3N`` and one fewer than the training cases): on
            whole CT the variance is dominated by where the head lies in the field of view, so the 0.5 %
            that 99.5 % leaves out is millimetres (the phantoms' true test configurations lie 2.9 mm
            on average from a 7-mode space, a floor no search can go below), while the fine level
            exists to resolve millimetres.
        channels: the five conv layers' filters (paper: 32, 64, 128, 256, 512).
        fc_channels: hidden FC widths per head (three FC layers per head = two hidden plus the output).
        dropout: after each hidden FC layer.
        norm: conv normalisation: ``"batch"`` (trains several times faster here) or None (the paper).
        alpha: classification weight in the loss (paper: 0.5).
        sample_range: training ``b`` drawn uniformly within ``+-sample_range * sqrt(lambda)``.
        batch_size, learning_rate: Adam, as in the paper (64, 1e-3); cosine-annealed over ``max_epochs``
            (or over the time budget, whichever ends first).
        cases_per_batch: images per batch (each gives ``batch_size / cases_per_batch`` shapes), so that
            patch sampling costs one call per image.
        steps_per_epoch, max_epochs, patience: ``max_epochs * steps_per_epoch`` iterations at most
            (paper: 100,000); validation MRE after every epoch, early stop after ``patience`` epochs
            without improvement.
        val_statistic: ``"mean"`` or ``"median"`` of the validation errors, the number that picks the
            best epoch and stops early. With few validation cases, one the search cannot reach (a
            truncated field of view, a pose far outside the training ones) carries the mean and makes
            the choice noise; the median follows the cases the network can improve. The fine levels
            leave such cases out of their validation either way (:meth:`PinDetector.reachable`).
        max_rotation_deg, scale_range, intensity_jitter: augmentation (the frame is rotated/scaled about
            the field-of-view centre; intensities are scaled and shifted by up to ``intensity_jitter``).
        rule: inference update rule ``"A"``, ``"B"`` or ``"C"``.
        iterations: ``T`` for rules B and C (paper: 10); ``iterations_rule_a`` for A (paper: 350).
        tolerance_mm: early stop once no landmark of any initialisation moves more than this.
        fine_factor, fine_pixdim: a second, finer PIN level (an extension of the paper, see the module
            docstring). ``fine_pixdim`` None = chosen at fit time: ``max(median finest image spacing,
            pixdim / fine_factor)``; 0 = no fine level; ``fine_factor`` 0 = never.
        fine_levels: how many fine levels; each starts from the previous one's answer and is trained on
            the narrower window of that level's validation residuals.
        fine_step: each fine level after the first works at pixels ``fine_step`` times finer than the one
            before, never finer than the median finest image spacing (1 = all at ``fine_pixdim``).
        fine_pixdims: the fine levels' pixel sizes, resolved at fit time from the three settings above
            (empty = ``fine_levels`` times ``fine_pixdim``, as checkpoints from before ``fine_step`` had).
        n_random_inits: random initialisations besides the previous stage's (paper: 5).
        init_range: random initialisations uniform within ``+-init_range * sqrt(lambda)`` of the first.
        init_layout: ``"random"`` or ``"grid19"`` (the paper's 19 points: the centre and 18 shifts of a
            quarter of the field of view, applied to the mean shape).
        b_limit: ``b`` is kept within ``+-b_limit * sqrt(lambda)`` (the plausible shapes the CNN was trained on).
        spread_scale_mm, min_score: the score (see the module docstring) and the "not found" threshold.
        tta: test-time augmentation (an extension; 0 = off, as in the paper): every level also runs
            in this many extra views of the image, each a frame rotated and scaled about the
            field-of-view centre within the training augmentation (``max_rotation_deg``,
            ``scale_range``), drawn once from ``seed``; the answer and the spread are taken over all
            views' initialisations, mapped back to world coordinates. Meant to average out the part of
            the CNN's error that depends on how the patches happen to be sampled; on the phantoms'
            validation cases 8 views made two multiple-landmark models worse (2.04 to 2.15 mm, 1.90
            to 2.37 mm), so no profile uses it.
        seed: of the random initialisations and views (inference is deterministic).
    """

    spatial_dims: int = 2
    roi_size: int = 33
    pixdim: float | None = None
    modality: str = "auto"
    variant: str = "multiple"
    fine_variant: str = "multiple"
    variance_kept: float = 0.995
    fine_variance_kept: float = 1.0
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    fc_channels: tuple[int, ...] = (256, 256)
    dropout: float = 0.2
    norm: str | None = "batch"
    alpha: float = 0.5
    sample_range: float = 3.0
    batch_size: int = 64
    cases_per_batch: int = 16
    learning_rate: float = 1e-3
    steps_per_epoch: int = 100
    max_epochs: int = 60
    patience: int = 20
    val_statistic: str = "mean"
    max_rotation_deg: float = 5.0
    scale_range: tuple[float, float] = (0.95, 1.05)
    intensity_jitter: float = 0.1
    rule: str = "C"
    iterations: int = 10
    iterations_rule_a: int = 100
    tolerance_mm: float = 0.05
    fine_factor: float = 4.0
    fine_pixdim: float | None = None
    fine_levels: int = 1
    fine_step: float = 1.0
    fine_pixdims: tuple[float, ...] = ()
    n_random_inits: int = 5
    init_range: float = 1.0
    init_layout: str = "random"
    b_limit: float = 3.0
    spread_scale_mm: float = 3.0
    min_score: float = 0.05
    tta: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.rule in RULES, f"rule {self.rule!r}; choose one of {', '.join(RULES)}"),
            (self.variant in VARIANTS, f"variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"),
            (self.fine_variant in VARIANTS, f"fine_variant {self.fine_variant!r}; choose one of {', '.join(VARIANTS)}"),
            (self.init_layout in INIT_LAYOUTS, f"init_layout {self.init_layout!r}; choose one of "
             f"{', '.join(INIT_LAYOUTS)}"),
            (self.modality in MODALITIES, f"modality {self.modality!r}; choose one of {', '.join(MODALITIES)}"),
            (self.spatial_dims == 2, f"spatial_dims {self.spatial_dims}; PIN's CNN is 2D (2.5D input): use 2"),
            (self.roi_size >= 1 and len(self.channels) >= 1, "roi_size must be >= 1 with at least one conv layer"),
            (self.pixdim is None or self.pixdim > 0, f"pixdim {self.pixdim}; use a positive mm value or None"),
            (self.val_statistic in ("mean", "median"), f"val_statistic {self.val_statistic!r}; choose mean or median"),
            (self.fine_levels >= 1, f"fine_levels {self.fine_levels}; use 1 or more"),
            (self.fine_step >= 1.0, f"fine_step {self.fine_step}; use 1 or more"),
            (self.fine_pixdim is None or self.fine_pixdim >= 0,
             f"fine_pixdim {self.fine_pixdim}; use a positive mm value, 0 (no fine level) or None"),
            (0.0 <= self.alpha <= 1.0, f"alpha {self.alpha}; use a value in [0, 1]"),
            (self.iterations >= 0 and self.iterations_rule_a >= 0 and self.n_random_inits >= 0 and self.tta >= 0,
             "iterations, iterations_rule_a, n_random_inits and tta must be >= 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise LandmarkError(f"pin config: unknown or invalid {what}")
        # Checkpoints store tuples as lists (JSON-like); keep the dataclass hashable and comparable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "fc_channels", tuple(int(c) for c in self.fc_channels))
        object.__setattr__(self, "fine_pixdims", tuple(float(p) for p in self.fine_pixdims))
        object.__setattr__(self, "scale_range", (float(self.scale_range[0]), float(self.scale_range[1])))


PROFILES: dict[str, PinConfig] = {
    # The paper's sizes (Li et al. 2018, Sec. 3): 101-pixel patches at 0.5 mm, 32..512 filters,
    # 100,000 Adam iterations of 64, 350 rule-A steps. Not trained here.
    "paper": PinConfig(roi_size=101, pixdim=0.5, channels=(32, 64, 128, 256, 512), fc_channels=(1024, 1024),
                       dropout=0.5, norm=None, steps_per_epoch=1000, max_epochs=100, patience=100,
                       iterations_rule_a=350, fine_factor=0.0, fine_pixdim=0.0),
    # 33-pixel patches, 16..128 filters, two levels of at most 60 epochs x 100 batches of 64: about
    # 25 minutes on the 140 hippocampus training cases on one idle CPU thread (use --max-minutes on a
    # busy machine: the learning rate then anneals over the time budget). The fine level refines each
    # landmark on its own: on validation 1.35 against 1.80 mm (hippocampus) and 0.65 against 2.04 mm
    # (phantoms, cases within the first level's reach) for one multiple-landmark fine level.
    "cpu": PinConfig(fine_variant="single"),
    # For tests: seconds.
    "tiny": PinConfig(roi_size=15, channels=(8, 8, 16, 16, 16), fc_channels=(32,), dropout=0.0, norm="batch",
                      batch_size=32, learning_rate=3e-3, steps_per_epoch=30, max_epochs=10, patience=10,
                      iterations=6, iterations_rule_a=20, n_random_inits=3, fine_factor=0.0),
}


# --- preprocessing --------------------------------------------------------------------------------
def canonical_frame(affine: np.ndarray, shape: Sequence[int], pixdim: float) -> np.ndarray:
    """The working frame: frame coordinates -> world RAS mm, ``(4, 4)``.

    Axes along R, A, S (the canonical frame of the shared working grids), unit ``pixdim`` mm, origin at
    the centre of the image's field of view. The world frame, not the image's axes, is the anatomy's
    frame: a gantry tilt or an oblique slab says how the image was acquired, not how the patient lies.
    """
    lo, hi = geometry.world_bounds_ras(geometry.check_affine(affine), shape)
    frame = np.diag([float(pixdim)] * 3 + [1.0])
    # The axis-aligned bounds of a box's corners are symmetric about the box centre, for any rotation.
    frame[:3, 3] = (lo + hi) / 2.0
    return frame


@dataclass(eq=False)
class Prepared:
    """One image, ready for patch sampling.

    Attributes:
        tensor: ``(1, 1, I, J, K)`` box-filtered, intensity-normalised image, minus ``pad``.
        ijk_from_world: ``(4, 4)`` inverse of the (filtered) image affine.
        frame: ``(4, 4)`` working frame -> world RAS mm.
        half_extent: ``(3,)`` half the field of view along the frame axes, in frame units.
        pad: value outside the field of view (the normalised background).
        pixdim: the frame unit in mm.
    """

    tensor: torch.Tensor
    ijk_from_world: np.ndarray
    frame: np.ndarray
    half_extent: np.ndarray
    pad: float
    pixdim: float = 1.0


def resolve_modality(array: np.ndarray) -> str:
    """``"CT"`` if the image holds air at about -1000 HU (its 1st percentile is below -500), else ``"MR"``."""
    step = max(1, int(round((array.size / 1_000_000) ** (1 / 3))))
    return "CT" if float(np.percentile(array[::step, ::step, ::step], 1.0)) < -500.0 else "MR"


def _flip_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A view of ``array`` (and its affine) whose axes point to R, A or S, in memory order.

    The box filter's blocks start at index 0 of each axis, so flips are undone (the blocks then start
    at the same anatomical side whatever the storage order); axis permutations do not change which
    voxels share a block, so the axis order is left as stored (Fortran-ordered NIfTI data is taken as
    its C-ordered transpose, so nothing is copied across strides).
    """
    a, aff = array, np.asarray(affine, dtype=np.float64)
    if not a.flags.c_contiguous and a.flags.f_contiguous:
        a = a.T
        aff = aff @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    ornt = nib.orientations.io_orientation(aff)
    for axis in range(3):
        if ornt[axis, 1] < 0:
            a = np.flip(a, axis=axis)
            flip = np.eye(4)
            flip[axis, axis], flip[axis, 3] = -1.0, a.shape[axis] - 1
            aff = aff @ flip
    return a, aff


def prepare(volume: Volume, pixdim: float, modality: str, device: str | torch.device = "cpu",
            roi_ras: tuple[np.ndarray, np.ndarray] | None = None) -> Prepared:
    """The one preprocessing function (training, validation, inference).

    Box-filters to about ``pixdim`` (so large CT does not alias), maps intensities by modality, and
    sets up the working frame. The intensity map is linear, so filtering first gives the same image
    (except where a CT value lies outside the HU window) at a fraction of the cost.

    Args:
        roi_ras: optional world box ``(lo, hi)``: only the voxels inside it are prepared (the fine
            level at inference: patches near the first level's answer). The frame, the intensity map
            and the box-filter blocks still come from the whole image, so the result is the same
            inside the box.
    """
    if modality not in ("CT", "MR"):
        raise LandmarkError(f"pin: modality must be resolved to CT or MR before preprocessing, got {modality!r}")
    array, affine = _flip_canonical(volume.array, volume.affine)
    if roi_ras is not None:
        corners = np.array([[x, y, z] for x in (roi_ras[0][0], roi_ras[1][0]) for y in (roi_ras[0][1], roi_ras[1][1])
                            for z in (roi_ras[0][2], roi_ras[1][2])])
        ijk = geometry.ras_to_ijk(corners, affine)
        size = np.asarray(array.shape)
        # The crop starts on a box-filter block boundary, so its blocks are the whole image's blocks.
        factor = np.maximum(1, np.floor(pixdim / geometry.spacing_from_affine(affine) + 1e-6)).astype(int)
        lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, size - 1) // factor * factor
        hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, lo + 2, size)
        array = array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        shift = np.eye(4)
        shift[:3, 3] = lo
        affine = affine @ shift
    src = image_tensor(array, device)
    t, aff = antialias(src, affine, pixdim)
    if t.data_ptr() == src.data_ptr():
        t = t.clone()  # it may share memory with the caller's array, which the in-place steps must not touch
    intensity = fit_intensity(volume.array, modality)
    # The shared map ([lo, hi] -> [0, 1], clipped for CT) applied in place: on a full-resolution CT
    # its out-of-place MONAI form costs several passes over hundreds of MB.
    t.sub_(intensity.lo).mul_(1.0 / (intensity.hi - intensity.lo))
    if intensity.clip:
        t.clamp_(0.0, 1.0)
    # The background is the whole image's darkest value, mapped; the tensor is stored minus it so
    # that grid_sample's zero padding outside the field of view is that background.
    pad = float(intensity(torch.tensor([float(volume.array.min())])).min())
    t.sub_(pad)
    frame = canonical_frame(volume.affine, volume.shape, pixdim)
    box = np.array([[x, y, z] for x in (-0.5, volume.shape[0] - 0.5) for y in (-0.5, volume.shape[1] - 0.5)
                    for z in (-0.5, volume.shape[2] - 0.5)])
    in_frame = geometry.apply_affine(np.linalg.inv(frame), geometry.ijk_to_ras(box, volume.affine))
    return Prepared(t.contiguous(), np.linalg.inv(aff), frame, np.abs(in_frame).max(axis=0), pad, float(pixdim))


def plane_offsets(roi_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Frame-unit offsets of the three orthogonal planes: ``(3, s, s, 3)``.

    Plane 0 spans frame axes (0, 1) (normal 2, "axial"), plane 1 spans (0, 2), plane 2 spans (1, 2).
    """
    r = torch.arange(roi_size, dtype=torch.float32, device=device) - (roi_size - 1) / 2.0
    u, v = torch.meshgrid(r, r, indexing="ij")
    z = torch.zeros_like(u)
    return torch.stack([torch.stack([u, v, z], -1), torch.stack([u, z, v], -1), torch.stack([z, u, v], -1)])


def extract_patches(prep: Prepared, centres: torch.Tensor, frames: torch.Tensor | None, roi_size: int) -> torch.Tensor:
    """Three orthogonal planes through each point, all points in one ``grid_sample`` call.

    Args:
        prep: the image.
        centres: ``(B, L, 3)`` frame coordinates (e.g. ``B`` initialisations of ``L`` landmarks).
        frames: ``(B, 4, 4)`` frame -> world per row (augmentation moves them), or None for ``prep.frame``.
        roi_size: ``s``.

    Returns:
        ``(B, 3L, s, s)``; channels ``3l .. 3l + 2`` are landmark ``l``'s three planes.
    """
    dev = prep.tensor.device
    b, n = centres.shape[:2]
    inv = torch.as_tensor(prep.ijk_from_world, dtype=torch.float32, device=dev)
    if frames is None:
        m = (inv @ torch.as_tensor(prep.frame, dtype=torch.float32, device=dev))[None].expand(b, 4, 4)
    else:
        m = inv[None] @ frames.to(device=dev, dtype=torch.float32)
    pts = centres.to(dev, torch.float32)[:, :, None, None, None, :] + plane_offsets(roi_size, dev)  # (B,L,3,s,s,3)
    ijk = torch.einsum("bij,blpuvj->blpuvi", m[:, :3, :3], pts) + m[:, None, None, None, None, :3, 3]
    size = torch.as_tensor([max(int(d) - 1, 1) for d in prep.tensor.shape[2:]], dtype=torch.float32, device=dev)
    grid = (2.0 * ijk / size - 1.0).flip(-1).reshape(1, b * n * 3, roi_size, roi_size, 3)
    # The tensor holds image - pad: zero padding, then + pad, gives outside samples the background value.
    out = F.grid_sample(prep.tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(b, n * 3, roi_size, roi_size) + prep.pad


# --- update rules ---------------------------------------------------------------------------------
def update_step(d: torch.Tensor, logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The move in shape space for one iteration.

    Args:
        d: ``(B, n_b)`` regressed displacement.
        logits: ``(B, 2 n_b)`` direction logits (class ``2i``: ``+`` mode ``i``; ``2i + 1``: ``-``).
        rule: ``"A"``: one unit (one frame voxel) along the most probable direction; ``"B"``: ``d``;
            ``"C"``: ``P_max * d`` with ``P_max_i = max(P(+i), P(-i))``.

    Returns:
        ``(B, n_b)``.
    """
    if rule == "B":
        return d
    p = torch.softmax(logits.float(), dim=1)
    if rule == "C":
        return torch.maximum(p[:, 0::2], p[:, 1::2]) * d
    if rule == "A":
        c = p.argmax(dim=1)
        step = torch.zeros_like(d)
        sign = 1.0 - 2.0 * (c % 2).to(d.dtype)
        step[torch.arange(d.shape[0], device=d.device), c // 2] = sign
        return step
    raise LandmarkError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")


# --- the detector ---------------------------------------------------------------------------------
@dataclass(eq=False)
class PinUnit:
    """One CNN and its shape space at one level: all landmarks (multiple) or one landmark (single).

    Attributes:
        landmarks: indices of its landmarks in the detector's names.
        shape: its shape model, in working-frame units of its level.
        net: its CNN.
        window: ``(n_b,)`` scale of its starting points (training samples within ``+-sample_range``
            times it, random initialisations within ``+-init_range`` times it): ``sqrt(lambda)`` at the
            first level, the SD of the first level's residuals at the fine level.
        centred: training samples around the true ``b`` (the fine level) rather than around 0.
    """

    landmarks: list[int]
    shape: ShapeModel
    net: nn.Module
    window: np.ndarray | None = None
    centred: bool = False
    mean_t: torch.Tensor = field(init=False)
    w_t: torch.Tensor = field(init=False)
    std_t: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.window = np.array(self.shape.std if self.window is None else self.window, dtype=np.float64)
        self.to(next(self.net.parameters()).device)

    def to(self, device: str | torch.device) -> None:
        self.net.to(device)
        self.mean_t = torch.tensor(self.shape.mean.reshape(-1), dtype=torch.float32, device=device)
        self.w_t = torch.tensor(self.shape.components, dtype=torch.float32, device=device)
        self.std_t = torch.tensor(self.shape.std, dtype=torch.float32, device=device)

    def shapes(self, b: torch.Tensor) -> torch.Tensor:
        """``(..., n_b)`` -> frame configurations ``(..., L, 3)``."""
        return (self.mean_t + b @ self.w_t.T).reshape(*b.shape[:-1], len(self.landmarks), 3)


class PinStart(Stage):
    """Stage 1: the mean configuration placed in the image's working frame (``b = 0``)."""

    name = "mean_shape"

    def __init__(self, detector: PinDetector) -> None:
        self.detector = detector

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        det = self.detector
        frame = canonical_frame(image.affine, image.shape, det.pixdim)
        xyz = np.full((len(det.landmark_names), 3), np.nan)
        for unit in det.units:
            xyz[unit.landmarks] = geometry.apply_affine(frame, unit.shape.mean)
        return LandmarkSet(det.landmark_names, xyz, np.zeros(len(xyz)), np.isfinite(xyz).all(axis=1))


def level_name(level: int) -> str:
    """The stage name of a level: ``pin``, ``pin_fine``, ``pin_fine2``, ..."""
    return "pin" if level == 0 else "pin_fine" if level == 1 else f"pin_fine{level}"


class PinIterate(Stage):
    """PIN's iterative search at one level, from the previous stage's configuration (plus random starts)."""

    def __init__(self, detector: PinDetector, level: int) -> None:
        self.detector = detector
        self.level = level
        self.name = level_name(level)

    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        det = self.detector
        pixdim = det.level_pixdims[self.level]
        roi = None
        if self.level > 0 and previous is not None and previous.found.any():
            # The fine level only looks near the first level's answer: prepare that box, not the
            # whole (possibly 512 x 512 x 300) image. Margin: a patch side plus the search window.
            c = det.config
            reach = max(float(np.max(np.asarray(u.window))) for u in det.levels[self.level])
            margin = pixdim * (c.roi_size + c.sample_range * reach)
            pts = previous.xyz_mm_ras[previous.found]
            roi = (pts.min(axis=0) - margin, pts.max(axis=0) + margin)
        prep = prepare(image, pixdim, det.modality, det.device, roi)
        return det.refine([prep], None if previous is None else [previous], level=self.level)[0]


Data = list[tuple[Prepared, np.ndarray, np.ndarray]]  # per case: image, true world xyz (N, 3; NaN), found (N,)


class PinDetector(Detector):
    """PIN (see the module docstring). Build with ``PinDetector.create(names, profile)``."""

    name = "pin"
    config_class = PinConfig
    profiles = PROFILES

    def __init__(self, landmark_names: Sequence[str], config: PinConfig, profile: str = "custom") -> None:
        super().__init__(landmark_names, config, profile)
        self.config: PinConfig = config
        self.levels: list[list[PinUnit]] = []
        self.device = "cpu"

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints from before fine_variance_kept fitted both levels with variance_kept, and had one
        # fine level at most.
        cfg.setdefault("fine_variance_kept", cfg.get("variance_kept", PinConfig.variance_kept))
        cfg.setdefault("fine_levels", 1)
        cfg.setdefault("fine_variant", cfg.get("variant", PinConfig.variant))  # the fine level had the first's
        return cfg

    # --- resolved settings ------------------------------------------------------------------------
    @property
    def units(self) -> list[PinUnit]:
        """The first level's units."""
        return self.levels[0] if self.levels else []

    @units.setter
    def units(self, units: list[PinUnit]) -> None:
        self.levels = [list(units)]

    @property
    def pixdim(self) -> float:
        if self.config.pixdim is None:
            raise LandmarkError("pin: pixdim is chosen when training; this detector has not been trained")
        return float(self.config.pixdim)

    @property
    def level_pixdims(self) -> list[float]:
        """The frame unit (mm) of each level."""
        c = self.config
        if c.fine_pixdims:
            return [self.pixdim] + list(c.fine_pixdims)
        return [self.pixdim] + ([float(c.fine_pixdim)] * c.fine_levels if c.fine_pixdim else [])

    @property
    def modality(self) -> str:
        if self.config.modality == "auto":
            raise LandmarkError("pin: the modality is chosen when training; this detector has not been trained")
        return self.config.modality

    def _check_trained(self) -> None:
        if not self.units:
            raise LandmarkError("pin: this detector has not been trained (fit it or load a checkpoint)")

    def stages(self) -> list[Stage]:
        self._check_trained()
        return [PinStart(self)] + [PinIterate(self, level) for level in range(len(self.levels))]

    def _build_net(self, n_landmarks: int, shape: ShapeModel) -> PinCNN:
        """The CNN of one unit (the same code for training and for loading a checkpoint)."""
        c = self.config
        return PinCNN(in_channels=3 * n_landmarks, out_channels=shape.n_modes, roi_size=c.roi_size,
                      channels=c.channels, fc_channels=c.fc_channels, dropout=c.dropout, norm=c.norm,
                      output_scale=torch.tensor(shape.std), spatial_dims=c.spatial_dims)

    # --- inference ------------------------------------------------------------------------------
    def initial_params(self, unit: PinUnit, prep: Prepared, first: np.ndarray | None) -> torch.Tensor:
        """Initialisations of one image: ``(K, n_b)``.

        Row 0 is ``first`` (the previous stage's configuration projected, or ``b = 0``); then either
        ``n_random_inits`` rows uniform within ``+-init_range * window`` of it (seeded: the same every
        call), or (first level only) the 18 other points of the paper's 19-point layout: the mean shape
        moved by a quarter of the field of view along one or two axes.
        """
        c = self.config
        std = unit.shape.std
        b0 = np.zeros(unit.shape.n_modes) if first is None else np.asarray(first, dtype=np.float64)
        if c.init_layout == "grid19" and not unit.centred:
            steps = [np.array(s) for s in np.ndindex(3, 3, 3)]
            shifts = [s - 1 for s in steps if 1 <= np.count_nonzero(s - 1) <= 2]
            t = np.array([np.zeros(3)] + [s * prep.half_extent / 2.0 for s in shifts])  # quarter of the FOV
            rows = b0 + np.stack([unit.shape.to_params(unit.shape.mean + ti) for ti in t])
        else:
            rng = np.random.default_rng(c.seed)
            rand = rng.uniform(-c.init_range, c.init_range, size=(c.n_random_inits, std.size)) * np.asarray(unit.window)
            rows = np.concatenate([b0[None], b0 + rand])
        rows = np.clip(rows, -c.b_limit * std, c.b_limit * std)
        return torch.as_tensor(rows, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def iterate(self, unit: PinUnit, preps: Sequence[Prepared], b0: torch.Tensor, rule: str | None = None,
                iterations: int | None = None, frames: Sequence[np.ndarray] | None = None) -> tuple[torch.Tensor, int]:
        """Run the update rule for ``C`` images at once (one CNN batch per iteration).

        Args:
            b0: ``(C, K, n_b)`` initialisations.
            rule, iterations: override the config's.
            frames: per image, ``(K, 4, 4)`` frame -> world of each row (test-time views); None = the
                image's working frame for every row.

        Returns:
            The final ``(C, K, n_b)`` and the number of iterations run.
        """
        c = self.config
        rule = rule or c.rule
        t_max = iterations if iterations is not None else (c.iterations_rule_a if rule == "A" else c.iterations)
        unit.net.eval()
        b = b0.clone()
        limit = c.b_limit * unit.std_t
        n_c, k, _ = b.shape
        done = 0
        rows = [None] * n_c if frames is None else [
            torch.as_tensor(f, dtype=torch.float32, device=self.device) for f in frames]
        for _ in range(t_max):
            x = unit.shapes(b)  # (C, K, L, 3)
            patches = torch.cat([extract_patches(p, x[i], rows[i], c.roi_size) for i, p in enumerate(preps)])
            d, logits = unit.net(patches)
            step = update_step(d.float(), logits, rule).reshape(n_c, k, -1)
            b = torch.maximum(torch.minimum(b + step, limit), -limit)
            done += 1
            move = (step @ unit.w_t.T).reshape(n_c, k, len(unit.landmarks), 3).norm(dim=-1)
            # Rule A always moves one unit (it oscillates at the optimum): it runs all its iterations.
            if rule != "A" and float(move.max()) * preps[0].pixdim < c.tolerance_mm:
                break
        return b, done

    def views(self, preps: Sequence[Prepared]) -> list[np.ndarray]:
        """Per image, ``(1 + tta, 4, 4)`` view frames -> world: the working frame, then ``tta`` rotated and
        scaled copies of it (the same draws for every image, about each one's field-of-view centre)."""
        c = self.config
        out = []
        for p in preps:
            rng = np.random.default_rng(c.seed + 1)
            extra = [random_world_transform(rng, p.frame[:3, 3], c.max_rotation_deg, c.scale_range) @ p.frame
                     for _ in range(c.tta)]
            out.append(np.stack([p.frame] + extra))
        return out

    def _starts(self, unit: PinUnit, preps: Sequence[Prepared], previous: Sequence[LandmarkSet | None] | None,
                views: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """``(C, V K, n_b)`` initialisations: around each image's previous configuration, or the mean, in
        each of its ``V`` view frames (default: the working frame only)."""
        rows = []
        for i, p in enumerate(preps):
            prev = None if previous is None else previous[i]
            sel, xyz = None, None
            if prev is not None:
                prev = prev.reorder(self.landmark_names)
                sel, xyz = prev.found[unit.landmarks], np.nan_to_num(prev.xyz_mm_ras[unit.landmarks])
            per_view = []
            for frame in (p.frame[None] if views is None else views[i]):
                first = None
                if sel is not None and xyz is not None and sel.any():
                    pts = geometry.apply_affine(np.linalg.inv(frame), xyz).reshape(-1, 3)
                    first = unit.shape.project(pts, sel)
                per_view.append(self.initial_params(unit, p, first))
            rows.append(torch.cat(per_view))
        return torch.stack(rows)

    def refine(self, preps: Sequence[Prepared], previous: Sequence[LandmarkSet | None] | None = None,
               rule: str | None = None, level: int = 0) -> list[LandmarkSet]:
        """Run one PIN level on images prepared at its ``pixdim`` (one batch per iteration for all).

        Args:
            previous: per image, the configuration to start from (landmarks not found are filled in
                by the shape model); None = the mean shape.
            rule: override the config's update rule.
            level: 0, or 1 for the fine level.

        Returns:
            Per image, world RAS landmarks with the spread score and found flags.
        """
        self._check_trained()
        c = self.config
        n = len(self.landmark_names)
        out_xyz = np.full((len(preps), n, 3), np.nan)
        out_spread = np.full((len(preps), n), np.inf)
        views = self.views(preps)
        for unit in self.levels[level]:
            starts = self._starts(unit, preps, previous, views)
            per_view = starts.shape[1] // len(views[0])
            frames = [np.repeat(v, per_view, axis=0) for v in views]  # (V K, 4, 4) per image
            b, _ = self.iterate(unit, preps, starts, rule, frames=frames if c.tta else None)
            x = unit.shapes(b).double().cpu().numpy()  # (C, V K, L, 3) view frames
            for i in range(len(preps)):
                world = np.einsum("kij,klj->kli", frames[i][:, :3, :3], x[i]) + frames[i][:, None, :3, 3]
                mean = world.mean(axis=0)
                out_xyz[i, unit.landmarks] = mean
                out_spread[i, unit.landmarks] = np.sqrt(((world - mean) ** 2).sum(-1).mean(axis=0))
        results = []
        for i in range(len(preps)):
            score = np.exp(-0.5 * (out_spread[i] / c.spread_scale_mm) ** 2)
            found = np.isfinite(out_xyz[i]).all(axis=1) & (score >= c.min_score)
            results.append(LandmarkSet(self.landmark_names, out_xyz[i], score, found))
        return results

    # --- training -------------------------------------------------------------------------------
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
        """Fit the shape model(s) and train the CNN(s), level by level.

        Options:
            init: ``"scratch"`` (default: new shape models and networks) or ``"current"`` (fine-tune the
                current networks with the current shape models and settings).
            device: ``"cpu"``/``"cuda"``; default CUDA when present.
            groups: accepted and ignored (the shape model learns how landmarks co-vary).
        """
        t_start = time.monotonic()
        init = options.pop("init", "scratch")
        device = options.pop("device", None) or default_device()
        options.pop("groups", None)  # landmark groups (the prior-guided detector's); PIN's PCA needs none
        if options:
            raise LandmarkError(f"pin.fit: unknown option(s) {', '.join(options)}; accepted: init, device, groups")
        if init not in ("scratch", "current"):
            raise LandmarkError(f"pin.fit: init must be 'scratch' or 'current', got {init!r}")
        if init == "current":
            self._check_trained()
        train = [s for s in train if s.landmarks is not None]
        if len(train) < 2:
            raise LandmarkError(f"pin.fit: need at least 2 labelled training cases, got {len(train)}")
        val = [s for s in (val or []) if s.landmarks is not None]
        rng = seed_everything(seed)
        self.device = str(device)
        c = self.config

        def truth(s: Sample) -> tuple[np.ndarray, np.ndarray]:
            lm = s.landmarks.reorder(self.landmark_names)  # type: ignore[union-attr]
            return np.where(lm.found[:, None], lm.xyz_mm_ras, np.nan), lm.found.copy()

        if init == "scratch" and (c.pixdim is None or c.modality == "auto" or c.fine_pixdim is None
                                  or (c.fine_step != 1.0 and not c.fine_pixdims)):
            self.config = c = self._resolve(train, c, truth)
        n_levels = len(self.level_pixdims)
        n = len(self.landmark_names)

        def level_groups(variant: str) -> list[list[int]]:
            return [list(range(n))] if variant == "multiple" else [[k] for k in range(n)]

        groups = [level_groups(c.variant if lv == 0 else c.fine_variant) for lv in range(n_levels)]
        n_units, trained = sum(len(g) for g in groups), 0
        reports: list[dict[str, Any]] = []
        if init == "scratch":
            self.levels = []
        starts_train: list[LandmarkSet | None] = [None] * len(train)
        starts_val: list[LandmarkSet | None] = [None] * len(val)
        prepared_at: float | None = None
        for level, pixdim in enumerate(self.level_pixdims):
            if pixdim != prepared_at:  # fine levels share one spacing: prepare the images once
                train_data = [(prepare(s.load_image(), pixdim, self.modality, self.device), *truth(s)) for s in train]
                val_data = [(prepare(s.load_image(), pixdim, self.modality, self.device), *truth(s)) for s in val]
                prepared_at = pixdim
            if init == "scratch":
                # The fine level's window comes from the previous level's residuals on the validation
                # cases when there are enough of them: on the training cases they are optimistic.
                held_out = (val_data, starts_val) if len(val_data) >= 5 else (train_data, starts_train)
                self.levels.append(self._new_units(level, groups[level], train_data, held_out, seed))
            # A fine level is validated on the cases its predecessor brought within reach (see
            # reachable()): a case the first level put centimetres off would carry the mean and pick
            # the epochs by noise, and no fine level can repair it.
            keep = self.reachable(val_data, starts_val) if level > 0 else [True] * len(val_data)
            val_used = [v for v, k in zip(val_data, keep, strict=True) if k]
            starts_used = [st for st, k in zip(starts_val, keep, strict=True) if k]
            for unit in self.levels[level]:
                unit.to(self.device)
                remaining = None if max_minutes is None else max(
                    0.0, max_minutes - (time.monotonic() - t_start) / 60.0) / (n_units - trained)
                title = f"{level_name(level)}[{','.join(self.landmark_names[k] for k in unit.landmarks)}]"
                rep = self._train_unit(unit, train_data, val_used, starts_used, rng, deadline_from(remaining),
                                       progress, title)
                reports.append({"level": level, "pixdim": pixdim, "val_cases": len(val_used),
                                "val_left_out": [i for i, k in enumerate(keep) if not k], **rep})
                trained += 1
            if level + 1 < n_levels:
                # The next level starts where this one ends, on training and validation cases alike.
                starts_train = self._refine_batched([p for p, _, _ in train_data], starts_train, level)
                starts_val = self._refine_batched([p for p, _, _ in val_data], starts_val, level)
        return {
            "detector": self.name, "variant": c.variant, "fine_variant": c.fine_variant,
            "pixdim": self.level_pixdims, "modality": self.modality,
            "n_train": len(train), "n_val": len(val), "seed": seed,
            "modes": [u.shape.n_modes for u in self.units],
            "explained": [u.shape.explained for u in self.units],
            "units": reports, "val_statistic": c.val_statistic,
            "best_val_mre_mm" if c.val_statistic == "mean" else "best_val_median_mm":
                float(np.mean([r["best_val"] for r in reports[-len(groups[-1]):]])),
            "seconds": time.monotonic() - t_start,
        }

    @staticmethod
    def _frame_truth(data: Data) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Per case ``frame -> world`` inverses, true frame coordinates ``(M, N, 3)`` (NaN if missing), found."""
        inv = [np.linalg.inv(p.frame) for p, _, _ in data]
        gt = np.stack([geometry.apply_affine(m, np.nan_to_num(xyz)) for m, (_, xyz, _) in zip(inv, data, strict=True)])
        observed = np.stack([f for _, _, f in data])
        gt[~observed] = np.nan
        return inv, gt, observed

    def _new_units(self, level: int, groups: list[list[int]], data: Data,
                   held_out: tuple[Data, Sequence[LandmarkSet | None]], seed: int) -> list[PinUnit]:
        """Fit the shape models of one level (on ``data``) and build fresh CNNs.

        At the fine level the starting window is the RMS (per mode, at least one frame unit) of the
        residuals ``b_true - b_previous`` the previous level leaves on the ``held_out`` cases, gross
        failures (residual norm over 3 x the median) left out.
        """
        c = self.config
        _, gt, _ = self._frame_truth(data)
        units: list[PinUnit] = []
        variant = c.variant if level == 0 else c.fine_variant
        for g in groups:
            kept = c.variance_kept if level == 0 else c.fine_variance_kept
            model = ShapeModel.fit(gt[:, g], kept) if variant == "multiple" else \
                ShapeModel.coordinates(gt[:, g])
            window = None
            if level > 0:
                inv, hgt, hobs = self._frame_truth(held_out[0])
                prev = np.stack([geometry.apply_affine(m, np.nan_to_num(s.reorder(self.landmark_names).xyz_mm_ras))
                                 for m, s in zip(inv, held_out[1], strict=True) if s is not None])
                resid = model.project(hgt[:, g], hobs[:, g]) - model.project(prev[:, g])
                resid = resid[hobs[:, g].any(axis=1)]  # a case without these landmarks says nothing
                # Gross failures of the previous level (over 3 x the median residual) are left out: the
                # fine level cannot repair them, and one of them would widen its window many times over.
                norms = np.linalg.norm(resid, axis=1)
                resid = resid[norms <= 3.0 * np.median(norms)]
                window = np.maximum(np.sqrt(np.mean(resid**2, axis=0)), 1.0)
            torch.manual_seed(seed + 100 * level + len(units))
            units.append(PinUnit(g, model, self._build_net(len(g), model), window, centred=level > 0))
        return units

    def reachable(self, data: Data, starts: Sequence[LandmarkSet | None]) -> list[bool]:
        """Per case, whether the previous level's answer is not a gross failure: its mean landmark error
        at most 3 x the median over the cases (the rule the fine level's window uses). Cases without a
        previous answer or without annotated landmarks count as reachable."""
        errors = np.full(len(data), np.nan)
        for i, ((_, xyz, found), st) in enumerate(zip(data, starts, strict=True)):
            if st is not None and found.any():
                err = np.linalg.norm(st.reorder(self.landmark_names).xyz_mm_ras - xyz, axis=1)[found]
                if np.isfinite(err).any():
                    errors[i] = np.nanmean(err)
        if not np.isfinite(errors).any():
            return [True] * len(data)
        limit = 3.0 * float(np.nanmedian(errors))
        return [not (np.isfinite(e) and e > limit) for e in errors]

    def _refine_batched(self, preps: list[Prepared], starts: Sequence[LandmarkSet | None], level: int,
                        chunk: int = 32) -> list[LandmarkSet | None]:
        out: list[LandmarkSet | None] = []
        for i in range(0, len(preps), chunk):
            out.extend(self.refine(preps[i:i + chunk], starts[i:i + chunk], level=level))
        return out

    def _resolve(self, train: Sequence[Sample], c: PinConfig, truth: Any) -> PinConfig:
        """Choose ``pixdim``, ``fine_pixdim(s)`` and ``modality`` from the training set (see :class:`PinConfig`)."""
        from lmk3d.data.datasets import image_geometry

        modality = resolve_modality(train[0].load_image().array) if c.modality == "auto" else c.modality
        spacings, offsets = [], []
        for s in train:
            shape, affine = image_geometry(s.image_path)  # headers only
            spacings.append(float(geometry.spacing_from_affine(affine).min()))
            xyz, _ = truth(s)
            offsets.append(xyz - canonical_frame(affine, shape, 1.0)[:3, 3])
        finest = float(np.median(spacings))
        pixdim = c.pixdim
        if pixdim is None:
            spread = float(np.nanmax(3.0 * np.nanstd(np.stack(offsets), axis=0)))
            pixdim = round(max(finest, 2.0 * 1.25 * spread / c.roi_size), 3)
        fine = c.fine_pixdim
        if fine is None:
            fine = round(max(finest, pixdim / c.fine_factor), 3) if c.fine_factor > 0 else 0.0
        floor = min(fine, finest)  # later levels go no finer than the images (or than a finer first fine level)
        fines = tuple(round(max(floor, fine / c.fine_step**k), 3) for k in range(c.fine_levels)) if fine else ()
        return dataclasses.replace(c, pixdim=pixdim, fine_pixdim=fine, fine_pixdims=fines, modality=modality)

    def training_params(self, unit: PinUnit, b_true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Training shapes ``(B, n_b)`` for true parameters ``b_true`` ``(B, n_b)``: uniform within
        ``+-sample_range`` windows per mode, about 0 at the first level (the paper) and about the truth
        at the fine levels, there clipped to the plausible range."""
        c = self.config
        b = rng.uniform(-c.sample_range, c.sample_range, size=b_true.shape) * np.asarray(unit.window)
        if not unit.centred:
            return b
        std = unit.shape.std
        return np.clip(b + b_true, -c.b_limit * std, c.b_limit * std)

    def _train_unit(self, unit: PinUnit, train_data: Data, val_data: Data, val_starts: Sequence[LandmarkSet | None],
                    rng: np.random.Generator, deadline: float | None, progress: bool, title: str) -> dict[str, Any]:
        c = self.config
        lm = unit.landmarks
        usable = [i for i, (_, _, f) in enumerate(train_data) if f[lm].any()]
        if not usable:
            raise LandmarkError(f"pin.fit: no training case annotates {', '.join(self.landmark_names[k] for k in lm)}")
        opt = torch.optim.Adam(unit.net.parameters(), lr=c.learning_rate, betas=(0.9, 0.999))
        t0 = time.monotonic()

        def set_lr(epoch: int) -> None:
            # Cosine annealing over max_epochs, or over the time budget when that ends first, so a
            # run cut by --max-minutes still finishes at a small learning rate.
            done = epoch / max(c.max_epochs, 1)
            if deadline is not None:
                done = max(done, (time.monotonic() - t0) / max(deadline - t0, 1e-9))
            for g in opt.param_groups:
                g["lr"] = 0.5 * c.learning_rate * (1.0 + math.cos(math.pi * min(done, 1.0)))

        amp = self.device.startswith("cuda")

        def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # A few cases per batch, several shapes each: one patch-sampling call per case.
            cases = rng.choice(usable, size=min(c.cases_per_batch, c.batch_size))
            idx = np.resize(cases, c.batch_size)
            frames = np.stack([train_data[i][0].frame for i in idx])
            if c.max_rotation_deg > 0 or c.scale_range != (1.0, 1.0):
                frames = np.stack([random_world_transform(rng, f[:3, 3], c.max_rotation_deg, c.scale_range) @ f
                                   for f in frames])
            world = np.stack([train_data[i][1][lm] for i in idx])
            obs = np.stack([train_data[i][2][lm] for i in idx])
            inv = np.linalg.inv(frames)
            gt = np.einsum("bij,blj->bli", inv[:, :3, :3], np.nan_to_num(world)) + inv[:, None, :3, 3]
            b_gt = unit.shape.project(np.where(obs[..., None], gt, np.nan), obs)
            b = self.training_params(unit, b_gt, rng)
            centres = torch.as_tensor(unit.shape.from_params(b), dtype=torch.float32, device=self.device)
            frames_t = torch.as_tensor(frames, dtype=torch.float32, device=self.device)
            patches = torch.empty(c.batch_size, 3 * len(lm), c.roi_size, c.roi_size, device=self.device)
            for i in np.unique(idx):
                sel = np.flatnonzero(idx == i)
                patches[sel] = extract_patches(train_data[i][0], centres[sel], frames_t[sel], c.roi_size)
            if c.intensity_jitter > 0:
                gain = rng.uniform(1 - c.intensity_jitter, 1 + c.intensity_jitter, size=(c.batch_size, 1, 1, 1))
                shift = rng.uniform(-c.intensity_jitter, c.intensity_jitter, size=(c.batch_size, 1, 1, 1))
                patches = patches * torch.as_tensor(gain, dtype=torch.float32, device=self.device) + torch.as_tensor(
                    shift, dtype=torch.float32, device=self.device)
            d_gt = torch.as_tensor(b_gt - b, dtype=torch.float32, device=self.device)
            mask = torch.as_tensor(np.repeat(obs, 3, axis=1), dtype=torch.float32, device=self.device)
            return patches, d_gt, mask

        def train_epoch(epoch: int) -> float:
            total = 0.0
            set_lr(epoch)
            for _ in range(c.steps_per_epoch):
                patches, d_gt, mask = batch()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    d, logits = unit.net(patches)
                partial = not bool(mask.bool().all())
                loss, _ = pin_loss(d.float(), logits.float(), d_gt, c.alpha, mask if partial else None,
                                   unit.w_t if partial else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            return total / max(c.steps_per_epoch, 1)

        validate = None
        if val_data:
            def validate() -> float:
                preps = [p for p, _, _ in val_data]
                b, _ = self.iterate(unit, preps, self._starts(unit, preps, val_starts))
                x = unit.shapes(b).double().cpu().numpy()
                errs = []
                for i, (p, w, f) in enumerate(val_data):
                    pos = geometry.apply_affine(p.frame, x[i].reshape(-1, 3)).reshape(x.shape[1], -1, 3).mean(axis=0)
                    errs.append(np.linalg.norm(pos - w[lm], axis=1)[f[lm]])
                flat = np.concatenate(errs)
                if not flat.size:
                    return float("nan")
                return float(np.median(flat)) if c.val_statistic == "median" else float(flat.mean())

        report = train_network(title, unit.net, train_epoch, validate, max_epochs=c.max_epochs, deadline=deadline,
                               patience=c.patience, progress=progress,
                               metric_name="val_mre_mm" if c.val_statistic == "mean" else "val_median_mm")
        return report.to_dict()

    # --- checkpoint -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._check_trained()
        sds = {f"cnn_{lv}_{u}": {k: v.detach().cpu() for k, v in unit.net.state_dict().items()}
               for lv, units in enumerate(self.levels) for u, unit in enumerate(units)}
        fitted = {"levels": [[{"landmarks": unit.landmarks, "shape_model": unit.shape.state(),
                               "window": np.asarray(unit.window).tolist(), "centred": unit.centred}
                              for unit in units] for units in self.levels]}
        return sds, fitted

    def load_state(self, state_dicts: dict[str, Any], fitted: dict[str, Any], device: str) -> None:
        self.device = str(device)
        self.levels = []
        for lv, entries in enumerate(fitted["levels"]):
            units = []
            for u, entry in enumerate(entries):
                model = ShapeModel.from_state(entry["shape_model"])
                net = self._build_net(len(entry["landmarks"]), model)
                net.load_state_dict(state_dicts[f"cnn_{lv}_{u}"])
                net.to(self.device).eval()
                units.append(PinUnit(list(entry["landmarks"]), model, net, np.asarray(entry["window"]),
                                     bool(entry["centred"])))
            self.levels.append(units)
