"""PIN's training: settings resolved from the data, shape models, training shapes, one phase per unit.

Every level is trained in turn: its shape models are fitted on the training configurations in its
working frames, then each unit's CNN is trained in its own :meth:`~lmk3d.training.loop.Trainer.phase`
(named after the level and the unit, e.g. ``pin_unit0``, ``pin_fine_unit3``), and the level's answers
on the training and validation cases become the next level's starting points. A unit's batches are drawn
from ``trainer.shard`` of its usable cases (all of them in one process, this rank's share under torchrun)
and its CNN is called through ``trainer.forward``; shape models and windows use every training case.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.detectors.pin.config import PinConfig
from lmk3d.detectors.pin.sampling import PinImage, canonical_frame, extract_patches
from lmk3d.detectors.pin.stages import PinIterate, PinUnit, build_net
from lmk3d.errors import LandmarkError
from lmk3d.landmarks import LandmarkSet
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pca import ShapeModel
from lmk3d.training.loop import Trainer, cosine_lr, optimizer_step, radial_errors
from lmk3d.training.pin_loss import pin_loss
from lmk3d.transforms.grid import random_world_transform

if TYPE_CHECKING:
    from lmk3d.detectors.pin.detector import PinDetector

Data = list[tuple[PinImage, np.ndarray, np.ndarray]]  # per case: image, true world xyz (N, 3; NaN), found (N,)
Truth = Callable[[Sample], tuple[np.ndarray, np.ndarray]]


def resolve_settings(train: Sequence[Sample], config: PinConfig, truth: Truth, modality: str) -> PinConfig:
    """Choose ``pixdim``, ``fine_pixdim(s)`` and set ``modality`` from the training set (see :class:`PinConfig`).

    Args:
        truth: per sample, true world positions ``(N, 3)`` (NaN where missing) and found flags ``(N,)``.
        modality: the resolved modality (``"CT"`` or ``"MR"``), stored in the config.
    """
    from lmk3d.data.datasets import image_geometry

    c = config
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


def frame_truth(data: Data) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per case ``world -> frame`` matrices, true frame coordinates ``(M, N, 3)`` (NaN if missing), found."""
    inv = [np.linalg.inv(p.frame) for p, _, _ in data]
    gt = np.stack([geometry.apply_affine(m, np.nan_to_num(xyz)) for m, (_, xyz, _) in zip(inv, data, strict=True)])
    observed = np.stack([f for _, _, f in data])
    gt[~observed] = np.nan
    return inv, gt, observed


def new_units(stage: PinIterate, groups: list[list[int]], data: Data,
              held_out: tuple[Data, Sequence[LandmarkSet | None]], seed: int) -> list[PinUnit]:
    """Fit the shape models of one level (on ``data``) and build fresh CNNs (seeded per level and unit).

    At a fine level the starting window is the RMS (per mode, at least one frame unit) of the
    residuals ``b_true - b_previous`` the previous level leaves on the ``held_out`` cases, gross
    failures (residual norm over 3 x the median) left out.
    """
    c, level = stage.config, stage.level
    _, gt, _ = frame_truth(data)
    units: list[PinUnit] = []
    variant = c.variant if level == 0 else c.fine_variant
    for g in groups:
        kept = c.variance_kept if level == 0 else c.fine_variance_kept
        model = ShapeModel.fit(gt[:, g], kept) if variant == "multiple" else ShapeModel.coordinates(gt[:, g])
        window = None
        if level > 0:
            inv, hgt, hobs = frame_truth(held_out[0])
            prev = np.stack([geometry.apply_affine(m, np.nan_to_num(s.reorder(stage.landmark_names).xyz_mm_ras))
                             for m, s in zip(inv, held_out[1], strict=True) if s is not None])
            resid = model.project(hgt[:, g], hobs[:, g]) - model.project(prev[:, g])
            resid = resid[hobs[:, g].any(axis=1)]  # a case without these landmarks says nothing
            # Gross failures of the previous level (over 3 x the median residual) are left out: the
            # fine level cannot repair them, and one of them would widen its window many times over.
            norms = np.linalg.norm(resid, axis=1)
            resid = resid[norms <= 3.0 * np.median(norms)]
            window = np.maximum(np.sqrt(np.mean(resid**2, axis=0)), 1.0)
        torch.manual_seed(seed + 100 * level + len(units))
        units.append(PinUnit(g, model, build_net(c, len(g), model).to(stage.device), window, centred=level > 0))
    return units


def reachable(landmark_names: Sequence[str], data: Sequence[tuple[Any, np.ndarray, np.ndarray]],
              starts: Sequence[LandmarkSet | None]) -> list[bool]:
    """Per case, whether the previous level's answer is not a gross failure: its mean landmark error
    at most 3 x the median over the cases (the rule the fine level's window uses). Cases without a
    previous answer or without annotated landmarks count as reachable.

    Args:
        data: per case ``(image, true world xyz (N, 3), found (N,))`` (the image is not read).
    """
    errors = np.full(len(data), np.nan)
    for i, ((_, xyz, found), st) in enumerate(zip(data, starts, strict=True)):
        if st is not None and found.any():
            err = np.linalg.norm(st.reorder(landmark_names).xyz_mm_ras - xyz, axis=1)[found]
            if np.isfinite(err).any():
                errors[i] = np.nanmean(err)
    if not np.isfinite(errors).any():
        return [True] * len(data)
    limit = 3.0 * float(np.nanmedian(errors))
    return [not (np.isfinite(e) and e > limit) for e in errors]


def training_params(config: PinConfig, unit: PinUnit, b_true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training shapes ``(B, n_b)`` for true parameters ``b_true`` ``(B, n_b)``: uniform within
    ``+-sample_range`` windows per mode, about 0 at the first level (the paper) and about the truth
    at the fine levels, there clipped to the plausible range."""
    c = config
    b = rng.uniform(-c.sample_range, c.sample_range, size=b_true.shape) * np.asarray(unit.window)
    if not unit.centred:
        return b
    std = unit.shape.std
    return np.clip(b + b_true, -c.b_limit * std, c.b_limit * std)


def load_level_data(samples: Sequence[Sample], modality: str, pixdim: float, device: torch.device,
                    truth: Truth) -> Data:
    """Every case prepared once (the shared preprocessing) and sampled at ``pixdim``, with its truth."""
    out = []
    for s in samples:
        image = PreparedImage.from_volume(s.load_image(), modality, device)
        out.append((PinImage.from_prepared(image, pixdim), *truth(s)))
    return out


def train_unit(trainer: Trainer, stage: PinIterate, unit: PinUnit, phase: str, train_data: Data, val_data: Data,
               val_starts: Sequence[LandmarkSet | None], deadline: float | None,
               case_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Train one unit's CNN in the trainer's phase ``phase``; returns its JSON-able report.

    Args:
        case_ids: the ids of the ``train_data`` cases (recorded in the trainer's shards).
    """
    c, rng, device = stage.config, trainer.rng, trainer.device
    lm = unit.landmarks
    usable = [i for i, (_, _, f) in enumerate(train_data) if f[lm].any()]
    if not usable:
        names = ", ".join(stage.landmark_names[k] for k in lm)
        raise LandmarkError(f"pin.fit: no training case annotates {names}")
    usable = trainer.shard(usable, None if case_ids is None else [case_ids[i] for i in usable])
    opt = torch.optim.Adam(unit.net.parameters(), lr=trainer.lr(c.learning_rate), betas=(0.9, 0.999))
    max_epochs = trainer.epochs(c.max_epochs)
    t0 = time.monotonic()

    def set_lr(epoch: int) -> None:
        # Cosine annealing over the epochs, or over the time budget when that ends first, so a run
        # cut by --max-minutes still finishes at a small learning rate.
        if deadline is None:
            cosine_lr(opt, trainer.lr(c.learning_rate), epoch, max_epochs, floor=0.0)
            return
        # Rank 0's clock: every rank of a distributed run must step with the same learning rate.
        done = max(epoch / max(max_epochs, 1), trainer.agree((time.monotonic() - t0) / max(deadline - t0, 1e-9)))
        resolution = 1_000_000
        cosine_lr(opt, trainer.lr(c.learning_rate), int(round(min(done, 1.0) * resolution)), resolution, floor=0.0)

    amp = device.type == "cuda"

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
        b = training_params(c, unit, b_gt, rng)
        centres = torch.as_tensor(unit.shape.from_params(b), dtype=torch.float32, device=device)
        frames_t = torch.as_tensor(frames, dtype=torch.float32, device=device)
        patches = torch.empty(c.batch_size, 3 * len(lm), c.roi_size, c.roi_size, device=device)
        for i in np.unique(idx):
            sel = np.flatnonzero(idx == i)
            patches[sel] = extract_patches(train_data[i][0], centres[sel], frames_t[sel], c.roi_size)
        if c.intensity_jitter > 0:
            size = (c.batch_size, 1, 1, 1)
            gain = rng.uniform(1 - c.intensity_jitter, 1 + c.intensity_jitter, size=size)
            shift = rng.uniform(-c.intensity_jitter, c.intensity_jitter, size=size)
            patches = patches * torch.as_tensor(gain, dtype=torch.float32, device=device) + torch.as_tensor(
                shift, dtype=torch.float32, device=device)
        d_gt = torch.as_tensor(b_gt - b, dtype=torch.float32, device=device)
        mask = torch.as_tensor(np.repeat(obs, 3, axis=1), dtype=torch.float32, device=device)
        return patches, d_gt, mask

    def train_epoch(epoch: int) -> float:
        total = 0.0
        set_lr(epoch)
        for _ in range(c.steps_per_epoch):
            patches, d_gt, mask = batch()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                d, logits = trainer.forward(unit.net, patches)
            partial = not bool(mask.bool().all())
            loss, _ = pin_loss(d.float(), logits.float(), d_gt, c.alpha, mask if partial else None,
                               unit.w_t if partial else None)
            total += optimizer_step(opt, loss)
        return total / max(c.steps_per_epoch, 1)

    validate = None
    if val_data:
        def validate() -> float:
            preps = [p for p, _, _ in val_data]
            b, _ = stage.iterate(unit, preps, stage.starts(unit, preps, val_starts))
            x = unit.shapes(b).double().cpu().numpy()
            preds = [geometry.apply_affine(p.frame, x[i].reshape(-1, 3)).reshape(x.shape[1], -1, 3).mean(axis=0)
                     for i, (p, _, _) in enumerate(val_data)]
            flat = radial_errors(preds, [w[lm] for _, w, _ in val_data], [f[lm] for _, _, f in val_data])
            if not flat.size:
                return float("nan")
            return float(np.median(flat)) if c.val_statistic == "median" else float(flat.mean())

    report = trainer.phase(phase, unit.net, train_epoch, validate, max_epochs=c.max_epochs, optimizer=opt,
                           deadline=deadline, patience=c.patience,
                           metric_name="val_mre_mm" if c.val_statistic == "mean" else "val_median_mm")
    return report.to_dict()


def fit_levels(det: PinDetector, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample],
               init: str, truth: Truth) -> list[dict[str, Any]]:
    """Train every level of ``det`` in turn (its config already resolved); the units' reports."""
    c = det.config
    n = len(det.landmark_names)
    levels = det.levels
    groups = [[list(range(n))] if (c.variant if lv == 0 else c.fine_variant) == "multiple"
              else [[k] for k in range(n)] for lv in range(len(levels))]
    n_units, trained = sum(len(g) for g in groups), 0
    reports: list[dict[str, Any]] = []
    starts_train: list[LandmarkSet | None] = [None] * len(train)
    starts_val: list[LandmarkSet | None] = [None] * len(val)
    prepared_at: float | None = None
    train_data: Data = []
    val_data: Data = []
    for stage in levels:
        level, pixdim = stage.level, stage.pixdim
        if pixdim != prepared_at:  # fine levels share one spacing: prepare the images once
            train_data = load_level_data(train, c.modality, pixdim, trainer.device, truth)
            val_data = load_level_data(val, c.modality, pixdim, trainer.device, truth)
            prepared_at = pixdim
        if init == "scratch":
            # The fine level's window comes from the previous level's residuals on the validation
            # cases when there are enough of them: on the training cases they are optimistic.
            held_out = (val_data, starts_val) if len(val_data) >= 5 else (train_data, starts_train)
            stage.units = new_units(stage, groups[level], train_data, held_out, trainer.options.seed)
        # A fine level is validated on the cases its predecessor brought within reach (see
        # reachable()): a case the first level put centimetres off would carry the mean and pick
        # the epochs by noise, and no fine level can repair it.
        keep = reachable(det.landmark_names, val_data, starts_val) if level > 0 else [True] * len(val_data)
        val_used = [v for v, k in zip(val_data, keep, strict=True) if k]
        starts_used = [st for st, k in zip(starts_val, keep, strict=True) if k]
        for u, unit in enumerate(stage.units):
            unit.to(trainer.device)
            left = trainer.minutes_left()
            deadline = None if left is None else time.monotonic() + 60.0 * left / (n_units - trained)
            rep = train_unit(trainer, stage, unit, f"{stage.name}_unit{u}", train_data, val_used, starts_used,
                             deadline, [s.case for s in train])
            reports.append({"level": level, "pixdim": pixdim, "val_cases": len(val_used),
                            "val_left_out": [i for i, k in enumerate(keep) if not k], **rep})
            trained += 1
        if level + 1 < len(levels):
            # The next level starts where this one ends, on training and validation cases alike.
            starts_train = stage.refine_batched([p for p, _, _ in train_data], starts_train)
            starts_val = stage.refine_batched([p for p, _, _ in val_data], starts_val)
    return reports


__all__ = ["Data", "fit_levels", "frame_truth", "load_level_data", "new_units", "reachable", "resolve_settings",
           "train_unit", "training_params"]
