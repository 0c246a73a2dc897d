"""``prior_guided``'s config, its profiles and the correlated landmark groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmk3d.data.datasets import GROUPS_FILE, LandmarkGroup, read_groups
from lmk3d.data.samples import Sample
from lmk3d.detectors.base import freeze_sequences
from lmk3d.errors import LandmarkError
from lmk3d.networks.resnet_regressor import RESNET34_CHANNELS, RESNET34_LAYERS

#: Key-slice axis names (the axis is perpendicular to the key slice) -> RAS world axis = grid axis.
AXES: dict[str, int] = {"LR": 0, "AP": 1, "SI": 2}

#: One correlated group: its landmark names and its key-slice axis name.
Group = tuple[tuple[str, ...], str]


def axis_index(name: str) -> int:
    """The world (and grid) axis of a key-slice axis name (``LR``, ``AP``, ``SI``; any case)."""
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
        axis_index(str(axis))
        out.append((names_t, str(axis).upper()))
    return tuple(out)


def resolve_groups(groups: Any, landmark_names: Sequence[str]) -> tuple[Group, ...]:
    """Keep groups whose landmarks the detector has (at least two of them), without overlaps."""
    out: list[Group] = []
    used: set[str] = set()
    for names, axis in normalise_groups(groups):
        keep = tuple(n for n in names if n in landmark_names and n not in used)
        if len(keep) >= 2:
            out.append((keep, axis))
            used.update(keep)
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
            training image by :func:`lmk3d.preprocessing.guess_modality`; stored in the checkpoint).
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
        canonical_blocks: box-filter the image in its canonical (R/A/S-pointing) view, so the filter's
            blocks do not depend on the storage order. False only for models trained before the shared
            preprocessing (they filtered in storage order; ``upgrade_config`` sets it for them).
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
    canonical_blocks: bool = True

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

__all__ = ["AXES", "CPU", "PAPER", "TINY", "Group", "PriorGuidedConfig", "axis_index", "find_groups",
           "normalise_groups", "resolve_groups"]
