"""``prior_guided``'s training: the coarse regressor, its measured errors, then the fine networks.

Every random draw comes from ``trainer.rng``; each network trains in one :meth:`Trainer.phase`
(``coarse``, then ``fine``), which keeps its best-on-validation weights. The gradient steps go over
``trainer.shard(train)`` (all the cases in one process, this rank's share under torchrun) and call the
networks through ``trainer.forward``; fitted state (mean position, jitter) uses every training case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmk3d import geometry
from lmk3d.data.datasets import image_geometry
from lmk3d.data.samples import Sample
from lmk3d.detectors.prior_guided.config import axis_index
from lmk3d.detectors.prior_guided.stages import CoarseStage, FineStage
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.networks.correlated_module import key_slice_heatmap
from lmk3d.networks.resnet_regressor import normalise_coordinates
from lmk3d.preprocessing import PreparedImage
from lmk3d.training.cases import TrainingCase, case_mre, sample_truth
from lmk3d.training.loop import LoopReport, Trainer, optimizer_step
from lmk3d.transforms.grid import Grid, random_world_transform
from lmk3d.transforms.heatmap import gaussian_heatmaps


@dataclass(eq=False)
class Case(TrainingCase):
    """A training case and what training keeps of it: the coarse grid and the cropped coarse and fine inputs."""

    coarse_grid: Grid
    coarse_src: PreparedImage
    fine_src: PreparedImage
    coarse: np.ndarray | None = None  # (N, 3) coarse estimates once the coarse stage is trained


def fit_pixdim(fine: FineStage, samples: Sequence[Sample]) -> None:
    """Resolve ``pixdim=None`` to the training images' native resolution (headers only)."""
    cfg = fine.config
    if cfg.pixdim is not None:
        return
    sizes = []
    for s in samples:
        _, affine = image_geometry(s.image_path)
        sizes.append(float(np.prod(geometry.spacing_from_affine(affine)) ** (1.0 / 3.0)))
    native = float(np.median(sizes)) if sizes else cfg.min_pixdim
    fine.pixdim_fitted = round(max(cfg.min_pixdim, native), 3)


def make_cases(samples: Sequence[Sample] | None, coarse: CoarseStage, fine: FineStage,
               prepare: Callable[[Volume], PreparedImage]) -> list[Case]:
    """The labelled samples as cases: coarse input (whole field of view) and fine input (around the landmarks)."""
    cfg = fine.config
    pixdim = fine.pixdim
    half = np.asarray(cfg.roi_size, dtype=np.float64) * pixdim / 2.0
    # Patches rotate and scale about a jittered centre: keep everything they can reach.
    margin = float(np.linalg.norm(half)) * max(cfg.scale_range) + cfg.max_jitter_fraction * float(half.max()) * 2
    out = []
    for s in samples or ():
        if s.landmarks is None:
            continue
        xyz, present = sample_truth(s, fine.landmark_names)
        if not present.any():
            continue
        img = s.load_image()
        prep = prepare(img)
        grid = coarse.grid(img.affine, img.shape)
        coarse_src = prep.cropped(float(grid.spacing_mm.max()), *geometry.world_bounds_ras(img.affine, img.shape))
        pts = xyz[present]
        fine_src = prep.cropped(pixdim, pts.min(axis=0) - margin, pts.max(axis=0) + margin)
        out.append(Case(s.case, xyz, present, grid, coarse_src, fine_src))
    return out


def coarse_estimates(coarse: CoarseStage, cases: Sequence[Case], batch: int = 16) -> None:
    """Store the coarse stage's estimates on every case."""
    coarse.net.eval()
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        for c, p in zip(chunk, coarse.estimate([c.coarse_src for c in chunk], [c.coarse_grid for c in chunk]),
                        strict=True):
            c.coarse = p


def fit_coarse(coarse: CoarseStage, trainer: Trainer, train: list[Case], val: list[Case],
               deadline: float | None) -> LoopReport:
    """Train the regressor on randomly moved grids (the landmarks stay in world space)."""
    cfg = coarse.config
    net = coarse.net
    size = cfg.coarse_roi_size
    rng = trainer.rng
    opt = torch.optim.Adam(net.parameters(), lr=trainer.lr(cfg.coarse_lr))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, cfg.patience // 3))
    dev = coarse.device
    mine = trainer.shard(train)
    # Start at the mean position: the untrained regressor then already equals the mean-shape guess.
    targets = [normalise_coordinates(torch.as_tensor(c.coarse_grid.world_to_grid(c.xyz), dtype=torch.float32), size)
               for c in train]
    net.set_mean_position(torch.nan_to_num(torch.nanmean(torch.stack(targets), dim=0), nan=0.0))

    def epoch_fn(epoch: int) -> float:
        losses = []
        order = rng.permutation(len(mine))
        for start in range(0, len(order), cfg.coarse_batch_size):
            xs, ys = [], []
            for c in (mine[i] for i in order[start:start + cfg.coarse_batch_size]):
                centre = c.coarse_grid.grid_to_world((np.asarray(size) - 1) / 2.0)
                shift = cfg.translation_fraction * float(np.max(c.coarse_grid.spacing_mm)) * max(size)
                g = c.coarse_grid.moved(random_world_transform(rng, centre, cfg.rotation_deg, cfg.scale_range, shift))
                xs.append(c.coarse_src.sample([g], float(g.spacing_mm.max())))
                ys.append(normalise_coordinates(torch.as_tensor(g.world_to_grid(c.xyz), dtype=torch.float32), size))
            x = torch.cat(xs).to(dev)
            y = torch.stack(ys).to(dev)
            mask = torch.isfinite(y).all(dim=-1)
            losses.append(optimizer_step(opt, (trainer.forward(net, x) - torch.nan_to_num(y))[mask].abs().mean()))
        return float(np.mean(losses))

    def validate() -> float:
        cases = val or train
        coarse_estimates(coarse, cases)
        # Rank 0's number steps every rank's scheduler: the learning rates must not differ between ranks.
        mre = float(trainer.agree(case_mre(cases, [c.coarse for c in cases])))  # type: ignore[misc]
        sched.step(mre)
        return mre

    return trainer.phase("coarse", net, epoch_fn, validate, max_epochs=cfg.coarse_epochs, optimizer=opt,
                         scheduler=sched, deadline=deadline, patience=cfg.patience)


def jitter_sd(coarse: CoarseStage, fine: FineStage, train: Sequence[Case], val: Sequence[Case]) -> np.ndarray:
    """Per landmark and axis jitter SD ``(N, 3)`` in mm, from the coarse stage's RMS errors on ``train``.

    Records the errors on the coarse stage and the jitter on the fine stage (fitted state).
    """
    cfg = fine.config
    n = len(fine.landmark_names)
    err = np.full((len(train), n, 3), np.nan)
    for k, c in enumerate(train):
        err[k] = np.where(c.present[:, None], c.coarse - c.xyz, np.nan)  # type: ignore[operator]
    rms = np.sqrt(np.nanmean(err**2, axis=0)) if len(train) else np.zeros((n, 3))
    rms = np.nan_to_num(rms, nan=float(np.nanmean(rms)) if np.isfinite(rms).any() else fine.pixdim)
    half = np.asarray(cfg.roi_size, dtype=np.float64) * fine.pixdim / 2.0
    sd = np.clip(cfg.jitter_scale * rms, fine.pixdim, cfg.max_jitter_fraction * half)
    val_err = [np.linalg.norm(c.coarse[c.present] - c.xyz[c.present], axis=1) for c in val]  # type: ignore[index]
    coarse.errors = {"coarse_train_rms_mm": rms.tolist(),
                     "coarse_val_mre_mm": float(np.concatenate(val_err).mean()) if val_err else None}
    fine.jitter_sd_mm = sd.tolist()
    return sd


def axis_rotation(rng: np.random.Generator, axis: int, max_deg: float, scale_range: tuple[float, float]
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


def about(linear: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` world transform applying ``linear`` ``(3, 3)`` about ``pivot`` ``(3,)``."""
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = pivot - linear @ pivot
    return m


def draw_patches(fine: FineStage, c: Case, rng: np.random.Generator, sd: np.ndarray) -> tuple[list[Grid], np.ndarray]:
    """Training patch grids for one case (jittered, augmented) and the truth on each grid ``(N, 3)``."""
    cfg = fine.config
    half = np.asarray(cfg.roi_size, dtype=np.float64) * fine.pixdim / 2.0
    lim = cfg.max_jitter_fraction * half
    jitter = np.clip(rng.normal(size=sd.shape) * sd, -lim, lim)
    centres = np.where(c.present[:, None], c.xyz, c.coarse) + jitter  # type: ignore[arg-type]
    grids = fine.patch_grids(centres)
    moved: list[Grid] = list(grids)
    for i in fine.independent:
        moved[i] = grids[i].moved(random_world_transform(rng, centres[i], cfg.rotation_deg, cfg.scale_range, 0.0))
    for idx, (_, axis) in zip(fine.group_index, fine.groups, strict=True):
        # One rotation about the axis and one scaling per group, each about its own patch centre:
        # the axis coordinate of a world point is then the same in every patch of the group.
        m = axis_rotation(rng, axis_index(axis), cfg.rotation_deg, cfg.scale_range)
        for i in idx:
            moved[i] = grids[i].moved(about(m, centres[i]))
    truth = np.stack([g.world_to_grid(p) for g, p in zip(moved, c.xyz, strict=True)])
    return moved, truth


def _slice_loss(fine: FineStage, keys: Sequence[torch.Tensor | None], truth: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor | float:
    """The key-slice loss of every group: the key slice is where its present members lie (their mean)."""
    cfg = fine.config
    loss: torch.Tensor | float = 0.0
    for idx, (_, axis), key in zip(fine.group_index, fine.groups, keys, strict=True):
        if key is None:
            continue
        a = axis_index(axis)
        sub = truth[:, list(idx), a]
        m = mask[:, list(idx)]
        s = torch.where(m, sub, torch.zeros_like(sub)).sum(1) / m.sum(1).clamp(min=1)
        ok = m.any(1)
        if ok.any():
            target = key_slice_heatmap(s, cfg.roi_size[a], cfg.slice_sigma)
            loss = loss + cfg.slice_loss_weight * ((key - target) ** 2).mean(-1)[ok].mean()
    return loss


def fit_fine(fine: FineStage, trainer: Trainer, train: list[Case], val: list[Case], sd: np.ndarray,
             deadline: float | None, groups_only: bool = False) -> LoopReport:
    """Train the fine networks on jittered patches (``groups_only``: the correlated modules only)."""
    cfg = fine.config
    dev = fine.device
    rng = trainer.rng
    # Groups only (the ablation): the independent U-Nets keep their weights and stay in eval mode.
    module = fine.group_nets if groups_only else nn.ModuleList([fine.fine_nets, fine.group_nets])
    params = list(module.parameters())
    if not params:
        raise LandmarkError("prior_guided: no fine networks to train (no landmarks, or parts=('groups',) "
                            "without a correlated group)")
    opt = torch.optim.Adam(params, lr=trainer.lr(cfg.fine_lr))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, cfg.patience // 3))
    shape = cfg.roi_size
    mine = trainer.shard(train)

    def epoch_fn(epoch: int) -> float:
        losses = []
        order = rng.permutation(len(mine))
        for start in range(0, len(order), cfg.fine_batch_size):
            xs, ms, truths = [], [], []
            for c in (mine[i] for i in order[start:start + cfg.fine_batch_size]):
                grids, truth = draw_patches(fine, c, rng, sd)
                xs.append(c.fine_src.sample(grids, fine.pixdim)[:, 0])
                truths.append(torch.as_tensor(truth, dtype=torch.float32))
                ms.append(torch.as_tensor(c.present))
            x = torch.stack(xs).to(dev)  # (B, N, D, H, W)
            truth_t = torch.stack(truths).to(dev)  # (B, N, 3)
            mask = torch.stack(ms).to(dev)  # (B, N)
            heat, keys = trainer.forward(fine.forward, x)
            per = ((heat - gaussian_heatmaps(truth_t, shape, cfg.sigma)) ** 2).flatten(2).mean(-1)  # (B, N)
            loss = per[mask].sum() / mask.sum().clamp(min=1) + _slice_loss(fine, keys, truth_t, mask)
            losses.append(optimizer_step(opt, loss))
        return float(np.mean(losses)) if losses else float("nan")

    # Errors beyond the patch are coarse failures no fine epoch can fix: capped, they do not drive the choice.
    cap = float(np.min(shape)) * fine.pixdim / 2.0

    def validate() -> float:
        cases = val or train
        mre = float(trainer.agree(case_mre(cases, [fine.refine(c.fine_src, c.coarse)[0] for c in cases],  # type: ignore[arg-type]
                                           cap)))
        sched.step(mre)
        return mre

    frozen = list(fine.fine_nets.parameters()) if groups_only else []
    for q in frozen:
        q.requires_grad_(False)
    try:
        return trainer.phase("fine", module, epoch_fn, validate, max_epochs=cfg.fine_epochs, optimizer=opt,
                             scheduler=sched, deadline=deadline, patience=cfg.patience,
                             metric_name="val_mre_capped_mm")
    finally:
        for q in frozen:
            q.requires_grad_(True)


__all__ = ["Case", "coarse_estimates", "draw_patches", "fit_coarse", "fit_fine", "fit_pixdim", "jitter_sd",
           "make_cases"]
