"""Training of the cascade: stage 1, its decode, the stage-2 ranges, stage 2, the step weights.

Each function takes the stage it trains or fits and the training cases (:class:`CascadeCase`: a
:class:`~lmk3d.preprocessing.PreparedImage` with its true landmarks); the networks go through
:meth:`lmk3d.training.loop.Trainer.phase`, and every random draw comes from ``trainer.rng``. The
gradient steps go over ``trainer.shard(train)`` (this rank's share under torchrun) and call the networks
through ``trainer.forward``; budgets and fitted state (ranges, priors) use every training case.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmk3d.data.samples import Sample
from lmk3d.detectors.cascade.config import LATTICES, CascadeConfig
from lmk3d.detectors.cascade.stages import DisplacementStage, HeatmapStage, lattice_offsets
from lmk3d.errors import LandmarkError
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pairwise import PairwisePrior
from lmk3d.training.cascade_losses import (
    deep_supervision_loss,
    displacement_loss,
    heatmap_channel_mask,
    heatmap_targets,
)
from lmk3d.training.cases import TrainingCase, case_mre, sample_truth
from lmk3d.training.loop import Trainer, cosine_lr, optimizer_step
from lmk3d.transforms.grid import Grid, random_world_transform

#: The phases of a fit, in order (names of the resume state: unique and stable).
PHASES = ("stage1_heatmap", "stage2_displacement")


@dataclass(eq=False)
class CascadeCase(TrainingCase):
    """A training case with its prepared image.

    Attributes:
        image: the prepared image.
        stage1: ``(N, 3)`` stage-1 estimates, once stage 1 has run on the case.
    """

    image: PreparedImage
    stage1: np.ndarray | None = None


def training_cases(samples: Sequence[Sample] | None, landmark_names: Sequence[str],
                   prepare: Callable[[Any], PreparedImage]) -> list[CascadeCase]:
    """The labelled samples, prepared with ``prepare`` (a detector's, which fixes the modality on the first)."""
    return [CascadeCase(s.case, *sample_truth(s, landmark_names), prepare(s.load_image()))
            for s in samples or [] if s.landmarks is not None]


def stage1_estimates(stage: HeatmapStage, cases: Sequence[CascadeCase], batch: int = 8,
                     decode: str | None = None) -> None:
    """Run stage 1 on every case (``decode`` overrides the stage's); sets ``case.stage1``."""
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        xyz, _ = stage.estimate([c.image for c in chunk], decode)
        for c, p in zip(chunk, xyz, strict=True):
            c.stage1 = p


def augment(config: CascadeConfig, rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A random world transform about ``centre`` (rotation, scaling, translation of the config)."""
    c = config
    return random_world_transform(rng, centre, c.rotation_deg, (float(c.scale_range[0]), float(c.scale_range[1])),
                                  c.translation_mm)


def fit_stage1(stage: HeatmapStage, trainer: Trainer, train: list[CascadeCase], val: list[CascadeCase],
               deadline: float | None) -> dict[str, Any]:
    """Train the U-Net on heatmap targets (deep supervision), validated by the stage-1 MRE."""
    c, device, rng = stage.config, stage.device, trainer.rng
    opt = torch.optim.Adam(stage.unet.parameters(), lr=trainer.lr(c.lr))
    epochs = max(c.max_epochs, math.ceil(c.min_iterations / math.ceil(len(train) / c.batch_size)))
    mine = trainer.shard(train)

    def epoch_fn(epoch: int) -> float:
        cosine_lr(opt, trainer.lr(c.lr), epoch, epochs)
        order = rng.permutation(len(mine))
        losses = []
        for i in range(0, len(order), c.batch_size):
            chunk = [mine[j] for j in order[i:i + c.batch_size]]
            grids = []
            for case in chunk:
                g = stage.coarse_grid(case.image)
                grids.append(g.moved(augment(c, rng, g.grid_to_world((np.asarray(g.shape) - 1) / 2.0))))
            x = torch.cat([case.image.sample([g], float(g.spacing_mm.min())) for case, g in zip(chunk, grids,
                                                                                                 strict=True)])
            pts = np.stack([g.world_to_grid(np.nan_to_num(case.xyz)) for case, g in zip(chunk, grids, strict=True)])
            present = torch.as_tensor(np.stack([case.present for case in chunk]), device=device)
            target = heatmap_targets(torch.as_tensor(pts, dtype=torch.float32, device=device), present,
                                     stage.coarse_shape, c.sigma, c.heatmap_height)
            main, sides = trainer.forward(stage.unet.forward_deep, x)
            loss = deep_supervision_loss(main, sides, target, heatmap_channel_mask(present), c.weight_gamma,
                                         c.side_weights, c.weight_target)
            losses.append(optimizer_step(opt, loss))
        return float(np.mean(losses))

    def validate() -> float:
        stage1_estimates(stage, val)
        return case_mre(val, [v.stage1 for v in val if v.stage1 is not None])

    rep = trainer.phase(PHASES[0], stage.unet, epoch_fn, validate if val else None, max_epochs=epochs,
                        optimizer=opt, deadline=deadline, patience=c.patience)
    return rep.to_dict()


def pair_prior_from(stage: HeatmapStage, train: Sequence[CascadeCase]) -> tuple[PairwisePrior, float]:
    """The pairwise prior of the training configurations, and its candidate noise: the coarsest stage-1 voxel."""
    noise = float(max(stage.coarse_grid(k.image).spacing_mm.max() for k in train))
    return PairwisePrior.fit(np.stack([k.xyz for k in train]), noise), noise


def fit_decode(stage: HeatmapStage, train: list[CascadeCase], val: list[CascadeCase]) -> dict[str, Any]:
    """Fit the pairwise prior on the training configurations; keep it if it beats the peaks on ``val``."""
    stage.decode, stage.pair_prior = "peak", None
    if not (stage.config.shape_decode and val and len(stage.landmark_names) > 1):
        return {"chosen": "peak"}
    try:
        stage.pair_prior, noise = pair_prior_from(stage, train)
    except LandmarkError as err:  # e.g. too few training cases for any pair
        return {"chosen": "peak", "why": str(err)}
    mre = {}
    for mode in ("peak", "shape"):
        stage1_estimates(stage, val, decode=mode)
        mre[mode] = case_mre(val, [v.stage1 for v in val if v.stage1 is not None])
    # Ties keep the paper's per-channel maximum.
    stage.decode = "shape" if mre["shape"] < mre["peak"] else "peak"
    if stage.decode == "peak":
        stage.pair_prior = None
    return {"chosen": stage.decode, "noise_mm": noise, "val_mre_peak_mm": mre["peak"],
            "val_mre_shape_mm": mre["shape"]}


def fit_ranges(stage: DisplacementStage, train: list[CascadeCase], val: list[CascadeCase]) -> dict[str, Any]:
    """``r_n`` from the real stage-1 errors (``case.stage1`` set) on the training and validation images."""
    c = stage.config
    half_patch = 0.5 * c.pixdim * (min(c.roi_size) - 1)
    info: dict[str, Any] = {}
    ranges = []
    for n, name in enumerate(stage.landmark_names):
        q = []
        for group in (train, val):
            e = [np.linalg.norm(k.stage1[n] - k.xyz[n]) for k in group if k.present[n] and k.stage1 is not None]
            if e:
                q.append(float(np.quantile(e, c.range_quantile)))
        r = c.range_scale * max(q) if q else c.min_range_mm
        ranges.append(float(np.clip(r, c.min_range_mm, 0.75 * half_patch)))
        info[name] = {"stage1_error_quantile_mm": q, "range_mm": ranges[-1]}
    stage.ranges_mm = np.asarray(ranges)
    return info


def fit_stage2(stage: DisplacementStage, trainer: Trainer, train: list[CascadeCase], val: list[CascadeCase],
               deadline: float | None) -> dict[str, Any]:
    """Train the displacement CNNs on patches centred uniformly in the ball of radius ``r_n`` around the truth."""
    c, device, rng = stage.config, stage.device, trainer.rng
    n = len(stage.landmark_names)
    opt = torch.optim.Adam(stage.cnn.parameters(), lr=trainer.lr(c.patch_lr))
    steps = math.ceil(len(train) * c.patches_per_case / c.patch_batch_size)
    epochs = max(c.patch_epochs, math.ceil(c.patch_min_iterations / steps))
    r = stage.ranges_mm
    centre_idx = (np.asarray(c.roi_size, dtype=np.float64) - 1) / 2.0
    mine = trainer.shard(train)

    def draw(case: CascadeCase) -> tuple[list[Grid], np.ndarray]:
        # Centres uniform in the ball of radius r_n around the truth (the range stage 1 really needs).
        u = rng.normal(size=(n, 3))
        u *= (r * rng.uniform(size=n) ** (1 / 3) / np.linalg.norm(u, axis=1))[:, None]
        assert case.stage1 is not None
        centres = np.where(case.present[:, None], np.nan_to_num(case.xyz) + u, case.stage1)
        grids = [g.moved(augment(c, rng, ct)) for g, ct in zip(stage.patch_grids(centres), centres, strict=True)]
        target = np.stack([(g.world_to_grid(np.nan_to_num(x)) - centre_idx) * c.pixdim
                           for g, x in zip(grids, case.xyz, strict=True)])
        return grids, target

    def epoch_fn(epoch: int) -> float:
        cosine_lr(opt, trainer.lr(c.patch_lr), epoch, epochs)
        order = np.concatenate([rng.permutation(len(mine)) for _ in range(c.patches_per_case)])
        losses = []
        for i in range(0, len(order), c.patch_batch_size):
            chunk = [mine[j] for j in order[i:i + c.patch_batch_size]]
            draws = [draw(case) for case in chunk]
            target = torch.as_tensor(np.stack([d[1] for d in draws]), dtype=torch.float32, device=device)
            present = torch.as_tensor(np.stack([case.present for case in chunk]), device=device)
            patches = stage.sample_patches([case.image for case in chunk], [d[0] for d in draws])
            losses.append(optimizer_step(opt, displacement_loss(trainer.forward(stage.displacements, patches), target,
                                                                present)))
        return float(np.mean(losses))

    def validate() -> float:
        preds = []
        for i in range(0, len(val), 8):
            chunk = val[i:i + 8]
            centres = np.stack([k.stage1 for k in chunk if k.stage1 is not None])
            patches = stage.sample_patches([k.image for k in chunk], [stage.patch_grids(ct) for ct in centres])
            d, _ = stage.clamped(stage.displacements(patches).cpu().double().numpy())
            preds.extend(centres + d)
        return case_mre(val, preds)

    rep = trainer.phase(PHASES[1], stage.cnn, epoch_fn, validate if val else None, max_epochs=epochs,
                        optimizer=opt, deadline=deadline, patience=c.patience)
    return rep.to_dict()


def fit_step_weights(stage: DisplacementStage, val: Sequence[CascadeCase]) -> dict[str, Any]:
    """Per landmark, the share ``w_n`` of stage 2's displacement that minimises the validation error.

    Needs ``case.stage1`` on every case; sets ``stage.step_weights`` and returns the per-landmark table
    (weight, validation MRE of stage 1 alone, of the full step, and of the chosen one).
    """
    n = len(stage.landmark_names)
    starts, moves, truths, present = [], [], [], []
    for k in val:
        assert k.stage1 is not None
        d, _ = stage.refine(k.image, k.stage1)
        starts.append(k.stage1)
        moves.append(d)
        truths.append(np.nan_to_num(k.xyz))
        present.append(k.present)
    s0, d, t, m = (np.stack(a) for a in (starts, moves, truths, present))
    grid = np.round(np.linspace(1.0, 0.0, 11), 2)  # from 1 down: ties keep the paper's full step
    weights, table = np.ones(n), {}
    for i, name in enumerate(stage.landmark_names):
        if not m[:, i].any():
            continue
        errs = [float(np.linalg.norm(s0[m[:, i], i] + w * d[m[:, i], i] - t[m[:, i], i], axis=1).mean())
                for w in grid]
        weights[i] = grid[int(np.argmin(errs))]
        table[name] = {"weight": float(weights[i]), "val_mre_stage1_mm": errs[-1], "val_mre_full_step_mm": errs[0],
                       "val_mre_mm": min(errs)}
    stage.step_weights = weights
    return table


#: Stage 2's lattice candidates: every shape ``CascadeConfig.refine_lattice`` takes, at the configured spacing.
LATTICE_CANDIDATES = LATTICES
#: A smaller lattice serves if its validation MRE is at most this share above the cube's ...
LATTICE_MRE_TOLERANCE = 0.02
#: ... and it has no more validation points farther than this (mm) from the truth.
LATTICE_ERROR_MM = 3.0


def lattice_candidates(config: CascadeConfig) -> dict[str, CascadeConfig]:
    """The configs of :data:`LATTICE_CANDIDATES` built from ``config`` (only the lattice differs)."""
    return {name: dataclasses.replace(config, refine_lattice=name) for name in LATTICE_CANDIDATES}


def choose_lattice(rows: dict[str, dict[str, Any]]) -> str:
    """The rule (docs/benchmarks.md, "Stage 2's lattice"): the candidate with the fewest patches whose
    ``val_mre_mm`` is at most :data:`LATTICE_MRE_TOLERANCE` above the cube's and whose ``val_over_mm``
    count is not larger; the cube when no other passes. ``rows``: per candidate name, ``patches``,
    ``val_mre_mm`` and ``val_over_mm``.
    """
    ref = rows["cube"]
    passing = [name for name, r in rows.items() if name == "cube" or (
        r["val_mre_mm"] <= ref["val_mre_mm"] * (1.0 + LATTICE_MRE_TOLERANCE)
        and r["val_over_mm"] <= ref["val_over_mm"])]
    return min(passing, key=lambda name: rows[name]["patches"])


def fit_lattice(stage: DisplacementStage, val: Sequence[CascadeCase]) -> tuple[CascadeConfig, dict[str, Any]]:
    """Stage 2's lattice chosen on held-out cases by :func:`choose_lattice` (what training does at its end).

    Needs ``case.stage1`` on every case and the fitted ranges and step weights (kept as they are). Each
    candidate moves every labelled point from its stage-1 estimate by ``w_n * d`` (found or not, as
    :func:`fit_step_weights` measures). Leaves ``stage.config`` as it was; returns the chosen config and
    the table (per candidate: patches, validation MRE, points over :data:`LATTICE_ERROR_MM`, ``chosen``).
    """
    base = stage.config
    rows: dict[str, dict[str, Any]] = {}
    configs = lattice_candidates(base)
    try:
        for name, config in configs.items():
            stage.config = config
            errors = []
            for k in val:
                assert k.stage1 is not None
                d, _ = stage.refine(k.image, k.stage1)
                moved = k.stage1 + stage.step_weights[:, None] * d
                errors.append(np.linalg.norm(moved - np.nan_to_num(k.xyz), axis=1)[k.present])
            e = np.concatenate(errors) if errors else np.zeros(0)
            rows[name] = {"patches": len(lattice_offsets(config.refine_lattice_mm, config.refine_lattice)),
                          "val_mre_mm": float(e.mean()) if len(e) else float("nan"),
                          "val_over_mm": int(np.count_nonzero(e > LATTICE_ERROR_MM))}
    finally:
        stage.config = base
    chosen = choose_lattice(rows)
    for name, row in rows.items():
        row["chosen"] = name == chosen
    return configs[chosen], {"candidates": rows, "chosen": chosen, "error_mm": LATTICE_ERROR_MM,
                             "mre_tolerance": LATTICE_MRE_TOLERANCE}


__all__ = ["LATTICE_CANDIDATES", "LATTICE_ERROR_MM", "LATTICE_MRE_TOLERANCE", "PHASES", "CascadeCase", "augment",
           "choose_lattice", "fit_decode", "fit_lattice", "fit_ranges", "fit_stage1", "fit_stage2",
           "fit_step_weights", "lattice_candidates", "pair_prior_from", "stage1_estimates", "training_cases"]
