"""PIN's stages: the mean configuration (:class:`PinStart`) and one iterative search per level (:class:`PinIterate`).

Each :class:`PinIterate` owns its level's :class:`PinUnit` s (a shape model and a CNN each: one for
all landmarks, or one per landmark) as its networks and fitted state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lmk3d import geometry
from lmk3d.detectors.base import Stage
from lmk3d.detectors.pin.config import PinConfig
from lmk3d.detectors.pin.sampling import PinImage, canonical_frame, extract_patches, update_step
from lmk3d.errors import LandmarkError
from lmk3d.landmarks import LandmarkSet
from lmk3d.networks.pin_cnn import PinCNN
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pca import ShapeModel
from lmk3d.transforms.grid import random_world_transform

NOT_TRAINED = "pin: this detector has not been trained (fit it or load a checkpoint)"


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




def build_net(config: PinConfig, n_landmarks: int, shape: ShapeModel) -> PinCNN:
    """The CNN of one unit (the same code for training and for loading a checkpoint)."""
    c = config
    return PinCNN(in_channels=3 * n_landmarks, out_channels=shape.n_modes, roi_size=c.roi_size,
                  channels=c.channels, fc_channels=c.fc_channels, dropout=c.dropout, norm=c.norm,
                  output_scale=torch.tensor(shape.std), spatial_dims=c.spatial_dims)


def level_name(level: int) -> str:
    """The stage name of a level: ``pin``, ``pin_fine``, ``pin_fine2``, ..."""
    return "pin" if level == 0 else "pin_fine" if level == 1 else f"pin_fine{level}"


class PinIterate(Stage):
    """PIN's iterative search at one level, from the previous stage's configuration (plus random starts).

    Attributes:
        landmark_names: the detector's landmark names.
        config: the detector's (resolved) config.
        level: 0 for the first level, 1, 2... for the fine levels.
        pixdim: this level's frame unit in mm.
        units: this level's units (empty until fitted or loaded).
        device: where the networks live.
    """

    def __init__(self, landmark_names: Sequence[str], config: PinConfig, level: int, pixdim: float,
                 device: str | torch.device = "cpu") -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.level = level
        self.pixdim = float(pixdim)
        self.name = level_name(level)
        self.device = torch.device(device)
        self.units: list[PinUnit] = []

    # --- state ----------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {f"cnn_{u}": unit.net for u, unit in enumerate(self.units)}

    def fitted(self) -> dict[str, Any]:
        return {"units": [{"landmarks": list(unit.landmarks), "shape_model": unit.shape.state(),
                           "window": np.asarray(unit.window).tolist(), "centred": unit.centred}
                          for unit in self.units]}

    def load_fitted(self, fitted: dict[str, Any]) -> None:
        """Rebuild the units (shape models and fresh CNNs, on the stage's device) from :meth:`fitted`."""
        self.units = []
        for entry in fitted.get("units", []):
            model = ShapeModel.from_state(entry["shape_model"])
            net = build_net(self.config, len(entry["landmarks"]), model).to(self.device).eval()
            self.units.append(PinUnit([int(k) for k in entry["landmarks"]], model, net, np.asarray(entry["window"]),
                                      bool(entry["centred"])))

    def to(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        for unit in self.units:
            unit.to(self.device)

    def check_trained(self) -> None:
        if not self.units:
            raise LandmarkError(NOT_TRAINED)

    # --- inference ------------------------------------------------------------------------------
    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        self.check_trained()
        roi = None
        if self.level > 0 and previous is not None and previous.found.any():
            # A fine level only looks near the previous level's answer: prepare that box, not the
            # whole (possibly 512 x 512 x 300) image. Margin: a patch side plus the search window.
            c = self.config
            reach = max(float(np.max(np.asarray(u.window))) for u in self.units)
            margin = self.pixdim * (c.roi_size + c.sample_range * reach)
            pts = previous.xyz_mm_ras[previous.found]
            roi = (pts.min(axis=0) - margin, pts.max(axis=0) + margin)
        prep = PinImage.from_prepared(image, self.pixdim, roi)
        return self.refine([prep], None if previous is None else [previous])[0]

    def initial_params(self, unit: PinUnit, prep: PinImage, first: np.ndarray | None) -> torch.Tensor:
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
        return torch.as_tensor(rows, dtype=torch.float32, device=prep.tensor.device)

    @torch.no_grad()
    def iterate(self, unit: PinUnit, preps: Sequence[PinImage], b0: torch.Tensor, rule: str | None = None,
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
            torch.as_tensor(f, dtype=torch.float32, device=b.device) for f in frames]
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

    def views(self, preps: Sequence[PinImage]) -> list[np.ndarray]:
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

    def starts(self, unit: PinUnit, preps: Sequence[PinImage], previous: Sequence[LandmarkSet | None] | None,
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

    def refine(self, preps: Sequence[PinImage], previous: Sequence[LandmarkSet | None] | None = None,
               rule: str | None = None) -> list[LandmarkSet]:
        """Run this level on images at its ``pixdim`` (one batch per iteration for all of them).

        Args:
            previous: per image, the configuration to start from (landmarks not found are filled in
                by the shape model); None = the mean shape.
            rule: override the config's update rule.

        Returns:
            Per image, world RAS landmarks with the spread score and found flags.
        """
        self.check_trained()
        c = self.config
        n = len(self.landmark_names)
        out_xyz = np.full((len(preps), n, 3), np.nan)
        out_spread = np.full((len(preps), n), np.inf)
        views = self.views(preps)
        for unit in self.units:
            starts = self.starts(unit, preps, previous, views)
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

    def refine_batched(self, preps: Sequence[PinImage], starts: Sequence[LandmarkSet | None], chunk: int = 32
                       ) -> list[LandmarkSet | None]:
        """:meth:`refine` over many images, ``chunk`` at a time (training and validation sets)."""
        out: list[LandmarkSet | None] = []
        for i in range(0, len(preps), chunk):
            out.extend(self.refine(preps[i:i + chunk], starts[i:i + chunk]))
        return out


class PinStart(Stage):
    """Stage 1: the first level's mean configuration placed in the image's working frame (``b = 0``)."""

    name = "mean_shape"

    def __init__(self, first: PinIterate) -> None:
        self.first = first

    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        first = self.first
        first.check_trained()
        frame = canonical_frame(image.source_affine, image.source_shape, first.pixdim)
        xyz = np.full((len(first.landmark_names), 3), np.nan)
        for unit in first.units:
            xyz[unit.landmarks] = geometry.apply_affine(frame, unit.shape.mean)
        return LandmarkSet(first.landmark_names, xyz, np.zeros(len(xyz)), np.isfinite(xyz).all(axis=1))


__all__ = ["PinIterate", "PinStart", "PinUnit", "build_net", "level_name"]
