"""``prior_guided``'s two stages: the coarse ResNet regressor and the fine patch networks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmk3d.detectors.base import Stage, autocast
from lmk3d.detectors.prior_guided.config import Group, PriorGuidedConfig, axis_index, resolve_groups
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.correlated_module import CorrelatedModule, decode_key_slice, key_slice_heatmap
from lmk3d.networks.patch_unet import PatchUNet
from lmk3d.networks.resnet_regressor import ResNetRegressor, denormalise_coordinates
from lmk3d.preprocessing import PreparedImage
from lmk3d.transforms.grid import Grid
from lmk3d.transforms.heatmap import decode_peaks


class CoarseStage(Stage):
    """A 3D ResNet regresses every landmark from the whole image on an isotropic RAS-aligned grid.

    Networks: ``coarse`` (:class:`~lmk3d.networks.resnet_regressor.ResNetRegressor`). Fitted state:
    the training errors the fine stage's jitter comes from (``coarse_train_rms_mm`` ``(N, 3)``,
    ``coarse_val_mre_mm``), for the record. Output scores are 1 (a regression has no confidence).
    """

    name = "coarse"

    def __init__(self, landmark_names: Sequence[str], config: PriorGuidedConfig, device: torch.device) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.device = device
        self.errors: dict[str, Any] = {}
        self.build(device)

    def build(self, device: torch.device) -> None:
        """A new (untrained) network on ``device``."""
        cfg = self.config
        self.device = device
        self.net = ResNetRegressor(cfg.spatial_dims, cfg.in_channels, len(self.landmark_names), cfg.coarse_layers,
                                   cfg.coarse_channels).to(device).eval()

    def networks(self) -> dict[str, nn.Module]:
        return {"coarse": self.net}

    def fitted(self) -> dict[str, Any]:
        return dict(self.errors)

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        self.errors = dict(fitted)

    def grid(self, affine: np.ndarray, shape: Sequence[int]) -> Grid:
        """The coarse grid of an image as given (``affine`` ``(4, 4)``, ``shape``)."""
        return Grid.covering(affine, shape, self.config.coarse_roi_size)

    def estimate(self, images: Sequence[PreparedImage], grids: Sequence[Grid]) -> list[np.ndarray]:
        """World RAS estimates ``(N, 3)`` of each image on its (unaugmented) coarse grid."""
        size = self.config.coarse_roi_size
        x = torch.cat([p.sample([g], float(g.spacing_mm.max())) for p, g in zip(images, grids, strict=True)])
        with torch.no_grad(), autocast(self.device):
            out = self.net(x.to(self.device)).float()
        idx = denormalise_coordinates(out, size).cpu().numpy().astype(np.float64)
        return [g.grid_to_world(i) for g, i in zip(grids, idx, strict=True)]

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        xyz = self.estimate([image], [self.grid(image.source_affine, image.source_shape)])[0]
        n = len(self.landmark_names)
        return LandmarkSet(self.landmark_names, xyz, np.ones(n), np.ones(n, dtype=bool))


class FineStage(Stage):
    """Patches at ``pixdim`` mm around the previous estimates; heatmap networks refine each landmark.

    Independent landmarks: one :class:`~lmk3d.networks.patch_unet.PatchUNet` (grouped convolutions,
    one U-Net per landmark). Correlated groups: one
    :class:`~lmk3d.networks.correlated_module.CorrelatedModule` each; their patches share the extent
    along the group's axis and the key slice fixes that coordinate.

    Networks: ``fine`` (the independent U-Nets; empty when none) and ``groups``. Fitted state:
    ``groups`` (as resolved for these landmarks; the networks are rebuilt from them), ``pixdim``
    (when the config leaves it to training), ``jitter_sd_mm`` ``(N, 3)`` (training's patch jitter).
    """

    name = "fine"

    def __init__(self, landmark_names: Sequence[str], config: PriorGuidedConfig, device: torch.device) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.pixdim_fitted: float | None = None
        self.jitter_sd_mm: list[list[float]] | None = None
        self.build(config.groups, device)

    def build(self, groups: Any, device: torch.device) -> None:
        """New (untrained) networks on ``device`` for ``groups`` (kept where the landmarks exist)."""
        cfg = self.config
        self.device = device
        self.groups: tuple[Group, ...] = resolve_groups(groups, self.landmark_names)
        grouped = {n for names, _ in self.groups for n in names}
        self.independent = tuple(i for i, n in enumerate(self.landmark_names) if n not in grouped)
        self.group_index = tuple(tuple(self.landmark_names.index(n) for n in names) for names, _ in self.groups)
        self.fine_nets = nn.ModuleList(
            [PatchUNet(cfg.spatial_dims, cfg.in_channels, 1, cfg.channels, len(self.independent))]
            if self.independent else []
        ).to(device).eval()
        self.group_nets = nn.ModuleList(
            CorrelatedModule(cfg.spatial_dims, cfg.in_channels, len(names), cfg.channels, axis_index(axis),
                             cfg.fusion, cfg.axis_attention, cfg.slice_detection)
            for names, axis in self.groups
        ).to(device).eval()

    def networks(self) -> dict[str, nn.Module]:
        return {"fine": self.fine_nets, "groups": self.group_nets}

    def fitted(self) -> dict[str, Any]:
        out: dict[str, Any] = {"groups": [[list(names), axis] for names, axis in self.groups]}
        if self.pixdim_fitted is not None:
            out["pixdim"] = self.pixdim_fitted
        if self.jitter_sd_mm is not None:
            out["jitter_sd_mm"] = self.jitter_sd_mm
        return out

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        pixdim = fitted.get("pixdim")
        self.pixdim_fitted = None if pixdim is None else float(pixdim)
        self.jitter_sd_mm = fitted.get("jitter_sd_mm")
        self.build(fitted.get("groups", self.config.groups), self.device)

    @property
    def pixdim(self) -> float:
        """Patch spacing in mm: the configured one, or the one fitted on the training images."""
        if self.config.pixdim is not None:
            return float(self.config.pixdim)
        return float(self.pixdim_fitted if self.pixdim_fitted is not None else self.config.min_pixdim)

    def patch_grids(self, centres: np.ndarray) -> list[Grid]:
        """One patch grid per landmark (detector order) around ``centres`` ``(N, 3)``; correlated
        patches share their extent along the group's axis."""
        centres = np.array(centres, dtype=np.float64)
        for idx, (_, axis) in zip(self.group_index, self.groups, strict=True):
            a = axis_index(axis)
            centres[list(idx), a] = centres[list(idx), a].mean()
        return [Grid.around(c, self.config.roi_size, self.pixdim) for c in centres]

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
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

    def decode(self, heat: torch.Tensor, keys: Sequence[torch.Tensor | None], grids: Sequence[Grid]
               ) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps of one image -> world positions ``(N, 3)`` and scores ``(N,)``.

        Args:
            heat: ``(N, D, H, W)``; keys: per group ``(L,)`` or None; grids: the ``N`` patch grids.
        """
        heat = heat.float()
        pos, peak = decode_peaks(heat)
        pos, peak = pos.clone(), peak.clone()
        lam = float(self.config.slice_constraint)
        for idx, (_, axis), key in zip(self.group_index, self.groups, keys, strict=True):
            if key is None or lam == 0.0:
                continue
            a = axis_index(axis)
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

    def refine(self, image: PreparedImage, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``(N, 3)`` and scores ``(N,)`` from patches around ``centres`` ``(N, 3)`` (one batch)."""
        grids = self.patch_grids(centres)
        patches = image.sample(grids, self.pixdim)[:, 0][None].to(self.device)  # (1, N, D, H, W)
        with torch.no_grad(), autocast(self.device):
            heat, keys = self.forward(patches)
        return self.decode(heat[0], [None if k is None else k[0] for k in keys], grids)

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        centre = image.centre_ras()
        if previous is None:
            centres = np.repeat(centre[None], len(self.landmark_names), 0)
        else:
            centres = previous.reorder(self.landmark_names).xyz_mm_ras.copy()
            centres[~np.isfinite(centres).all(axis=1)] = centre
        xyz, scores = self.refine(image, centres)
        return LandmarkSet(self.landmark_names, xyz, scores, scores >= self.config.min_score)


__all__ = ["CoarseStage", "FineStage"]
