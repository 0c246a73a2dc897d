"""The cascade's two stages: the heatmap U-Net on the whole image, the displacement CNNs on patches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmk3d.detectors.base import Stage, autocast
from lmk3d.detectors.cascade.config import CascadeConfig
from lmk3d.errors import LandmarkError
from lmk3d.geometry import world_bounds_ras
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.displacement_cnn import DisplacementCNN
from lmk3d.networks.heatmap_unet import HeatmapUNet
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pairwise import PairwisePrior
from lmk3d.transforms.grid import Grid
from lmk3d.transforms.heatmap import decode_peaks, local_peaks

DECODES = ("peak", "shape")


class HeatmapStage(Stage):
    """Stage 1 (``stage1_heatmap``): the whole image on the coarse grid -> one heatmap peak per landmark.

    Fitted state: ``coarse_shape`` (the stage-1 grid in voxels), ``decode`` (``"peak"``: each channel's
    maximum, the paper; ``"shape"``: the pairwise prior chooses among local maxima) and ``pair_prior``.
    """

    name = "stage1_heatmap"

    def __init__(self, landmark_names: Sequence[str], config: CascadeConfig, device: torch.device) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.device = device
        self.coarse_shape: tuple[int, int, int] = tuple(int(v) for v in config.coarse_size)  # type: ignore[assignment]
        self.decode = "peak"
        self.pair_prior: PairwisePrior | None = None
        self.unet = self.build()

    def build(self) -> HeatmapUNet:
        """A new U-Net (the same code for training and for loading a checkpoint), on the device."""
        c, n = self.config, len(self.landmark_names)
        unet = HeatmapUNet(c.spatial_dims, c.in_channels, n + 1, c.channels, c.norm, len(c.side_weights),
                           out_bias=[0.0] * n + [1.0])
        return unet.to(self.device).eval()

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def fitted(self) -> dict[str, Any]:
        return {"coarse_shape": list(self.coarse_shape), "decode": self.decode,
                "pair_prior": None if self.pair_prior is None else self.pair_prior.state()}

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        if "coarse_shape" in fitted:
            self.coarse_shape = tuple(int(v) for v in fitted["coarse_shape"])  # type: ignore[assignment]
        decode = str(fitted.get("decode", "peak"))
        if decode not in DECODES:
            raise LandmarkError(f"cascade checkpoint: unknown stage-1 decode {decode!r}; accepted: peak, shape")
        self.decode = decode
        prior = fitted.get("pair_prior")
        self.pair_prior = None if prior is None else PairwisePrior.from_state(prior)

    def fit_coarse_shape(self, images: Sequence[PreparedImage]) -> tuple[int, int, int]:
        """The smallest grid holding every training field of view at ``coarse_pixdim`` (see the config)."""
        c = self.config
        extent = max(float(np.max(np.subtract(*world_bounds_ras(im.affine, im.shape)[::-1]))) for im in images)
        multiple = 2 ** (len(c.channels) - 1)
        n = int(math.ceil(extent / c.coarse_pixdim / multiple) * multiple)
        return tuple(int(min(max(n, multiple), m)) for m in c.coarse_size)  # type: ignore[return-value]

    def coarse_grid(self, image: PreparedImage) -> Grid:
        """Stage 1's grid: the whole field of view, RAS-aligned and isotropic."""
        return Grid.covering(image.affine, image.shape, self.coarse_shape)

    def heatmaps(self, images: Sequence[PreparedImage], grids: Sequence[Grid]) -> torch.Tensor:
        """``(B, N + 1, D, H, W)`` stage-1 outputs for images on their (possibly moved) grids."""
        x = torch.cat([p.sample([g], float(g.spacing_mm.min())) for p, g in zip(images, grids, strict=True)])
        with autocast(self.device):
            return self.unet(x).float()

    def decode_heatmaps(self, heatmaps: torch.Tensor, grids: Sequence[Grid],
                        decode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Peaks -> ``(B, N, 3)`` world RAS mm and ``(B, N)`` stage-1 scores ``clip(peak / k, 0, 1)``.

        Args:
            heatmaps: ``(B, N + 1, D, H, W)`` (the last channel, the background, is not read).
            grids: the ``B`` grids the heatmaps lie on.
            decode: overrides the fitted one: ``"peak"`` (each channel's maximum) or ``"shape"`` (the
                pairwise prior chooses among each channel's local maxima).
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

    def estimate(self, images: Sequence[PreparedImage], decode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 on a batch of images: ``(B, N, 3)`` world RAS mm and ``(B, N)`` scores."""
        self.unet.eval()
        grids = [self.coarse_grid(p) for p in images]
        with torch.no_grad():
            return self.decode_heatmaps(self.heatmaps(images, grids), grids, decode)

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        xyz, score = self.estimate([image])
        return LandmarkSet(self.landmark_names, xyz[0], score[0], score[0] >= self.config.min_peak)


def lattice_offsets(spacing_mm: float, shape: str = "cube") -> np.ndarray:
    """Stage 2's patch centres relative to ``S0``, ``(K, 3)`` mm.

    ``"cube"``: the 27 points of ``{-a, 0, a}^3`` in C order; ``"cross"``: the 7 of them with at most one
    non-zero coordinate (``S0`` and its face neighbours), in the same order; ``"centre"``, or a spacing
    of 0: ``(0, 0, 0)`` alone.
    """
    a = float(spacing_mm)
    if a <= 0 or shape == "centre":
        return np.zeros((1, 3))
    cube = a * np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
    if shape == "cube":
        return cube
    if shape == "cross":
        return cube[np.count_nonzero(cube, axis=1) <= 1]
    raise LandmarkError(f"cascade: unknown lattice {shape!r}")


class DisplacementStage(Stage):
    """Stage 2 (``stage2_displacement``): per landmark, a patch around stage 1's answer -> a displacement.

    Fitted state: ``ranges_mm`` ``(N,)`` (the largest move allowed, also the network's output unit) and
    ``step_weights`` ``(N,)`` (the share of the displacement kept).
    """

    name = "stage2_displacement"

    def __init__(self, landmark_names: Sequence[str], config: CascadeConfig, device: torch.device) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.device = device
        n = len(self.landmark_names)
        self.ranges_mm = np.full(n, float(config.min_range_mm))
        self.step_weights = np.ones(n)
        self.cnn = self.build()

    def build(self) -> DisplacementCNN:
        """New displacement networks (the same code for training and loading), on the device."""
        c = self.config
        cnn = DisplacementCNN(c.spatial_dims, c.in_channels, c.spatial_dims, c.roi_size, c.cnn_channels,
                              c.cnn_hidden, len(self.landmark_names), c.cnn_norm)
        return cnn.to(self.device).eval()

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"cnn": self.cnn}

    def fitted(self) -> dict[str, Any]:
        return {"ranges_mm": self.ranges_mm.tolist(), "step_weights": self.step_weights.tolist()}

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        n = len(self.landmark_names)
        for key in ("ranges_mm", "step_weights"):
            if key not in fitted:
                continue
            value = np.asarray(fitted[key], dtype=np.float64)
            if value.shape != (n,):
                raise LandmarkError(f"cascade checkpoint: {key} of shape {value.shape} for {n} landmarks")
            setattr(self, key, value)

    def patch_grids(self, centres_ras: np.ndarray) -> list[Grid]:
        """Stage 2's grids: ``roi_size`` voxels at ``pixdim`` mm around each ``(N, 3)`` centre."""
        return [Grid.around(c, self.config.roi_size, self.config.pixdim) for c in centres_ras]

    def displacements(self, patches: torch.Tensor) -> torch.Tensor:
        """Raw displacements ``(B, N, 3)`` in mm along the patch axes, from ``(B, N, D, H, W)`` patches."""
        r = torch.as_tensor(self.ranges_mm, dtype=torch.float32, device=patches.device)
        with autocast(self.device):
            out = self.cnn(patches).float()
        # The network regresses the displacement in units of its landmark's range.
        return out * r[None, :, None]

    def sample_patches(self, images: Sequence[PreparedImage], grids: Sequence[Sequence[Grid]]) -> torch.Tensor:
        """``(B, N, D, H, W)`` patches: per image its ``N`` (possibly moved) grids, one sampling call each."""
        return torch.stack([p.sample(g, self.config.pixdim)[:, 0] for p, g in zip(images, grids, strict=True)])

    def clamped(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clamp ``(B, N, 3)`` displacements to the ranges; also return the raw lengths ``(B, N)``."""
        length = np.linalg.norm(d, axis=-1)
        factor = np.minimum(1.0, self.ranges_mm[None, :] / np.maximum(length, 1e-12))
        return d * factor[..., None], length

    def refine(self, image: PreparedImage, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2 around ``(N, 3)`` centres: the clamped displacement ``(N, 3)`` and the raw length ``(N,)``.

        Every patch (``N`` landmarks times the lattice's ``K`` points) is sampled, one call per landmark;
        the networks see them in one forward pass on a GPU, one lattice point's ``N`` patches per pass on
        the CPU.
        """
        self.cnn.eval()
        offsets = lattice_offsets(self.config.refine_lattice_mm, self.config.refine_lattice)
        starts = centres[None] + offsets[:, None, :]  # (K, N, 3): one patch per landmark and lattice point
        n = len(self.landmark_names)
        with torch.no_grad():
            # A landmark's K patches lie close together: sampled in one call, they read a small box of the image.
            patches = torch.stack([image.sample(self.patch_grids(starts[:, i]), self.config.pixdim)[:, 0]
                                   for i in range(n)], dim=1)  # (K, N, D, H, W)
            # On the CPU one lattice point at a time: the activations (N networks' feature maps) stay small
            # and in the cache, where all K at once would write and read hundreds of MB per layer.
            step = len(offsets) if patches.device.type == "cuda" else 1
            raw = torch.cat([self.displacements(patches[k:k + step]) for k in range(0, len(offsets), step)])
        raw_np = raw.detach().cpu().double().numpy()
        # Each lattice point's estimate is clamped to the range around its own patch centre; their mean,
        # taken from S0, is clamped again, so the result never leaves the ball of radius r_n around S0.
        d_each, _ = self.clamped(raw_np)
        d, _ = self.clamped(((starts + d_each).mean(axis=0) - centres)[None])
        return d[0], np.linalg.norm((starts + raw_np).mean(axis=0) - centres, axis=-1)

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        if previous is None:
            raise LandmarkError("cascade stage 2 needs stage 1's landmarks; run it after stage1_heatmap")
        prev = previous.reorder(self.landmark_names)
        centres = prev.xyz_mm_ras.copy()
        known = np.isfinite(centres).all(axis=1)
        # A landmark without any stage-1 position stays not found; its patch is taken at the image centre.
        centres[~known] = image.centre_ras()
        d, length = self.refine(image, centres)
        xyz = centres + self.step_weights[:, None] * d
        xyz[~known] = np.nan
        s2 = 1.0 - 0.5 * np.minimum(length / self.ranges_mm, 1.0)
        scores = np.where(known, prev.scores * s2, 0.0)
        return LandmarkSet(self.landmark_names, xyz, scores, prev.found & known)


__all__ = ["DECODES", "DisplacementStage", "HeatmapStage", "lattice_offsets"]
