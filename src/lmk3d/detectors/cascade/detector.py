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
  (``refine_lattice_mm``, ``refine_lattice``);
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

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Stage
from lmk3d.detectors.cascade import training as tr
from lmk3d.detectors.cascade.config import PROFILES, CascadeConfig
from lmk3d.detectors.cascade.stages import DisplacementStage, HeatmapStage
from lmk3d.errors import LandmarkError
from lmk3d.training.cases import case_mre
from lmk3d.training.loop import Trainer

INITS = ("scratch", "current")
STAGE_CHOICES = ("all", "stage2")


class CascadeDetector(Detector):
    """The two-stage cascade (see the module docstring).

    Attributes:
        stage1: :class:`HeatmapStage` (``stage1_heatmap``): the U-Net, the coarse grid, the decode.
        stage2: :class:`DisplacementStage` (``stage2_displacement``): the CNNs, the ranges, the step weights.

    Example:
        >>> det = CascadeDetector.create(["a", "b"], profile="tiny")
        >>> [s.name for s in det.stages()]
        ['stage1_heatmap', 'stage2_displacement']
    """

    name = "cascade"
    config_class = CascadeConfig
    profiles = PROFILES

    def __init__(self, landmark_names: Sequence[str], config: CascadeConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile, device)
        if not self.landmark_names:
            raise LandmarkError("cascade: at least one landmark name is needed")
        self.stage1 = HeatmapStage(self.landmark_names, config, self.device)
        self.stage2 = DisplacementStage(self.landmark_names, config, self.device)

    def stages(self) -> list[Stage]:
        return [self.stage1, self.stage2]

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints from before shape_decode always took each channel's maximum.
        cfg.setdefault("shape_decode", False)
        return cfg

    @classmethod
    def upgrade_checkpoint(cls, payload: dict[str, Any]) -> dict[str, Any]:
        """Format 1 (``state_dicts`` ``stage1``/``stage2``, one ``fitted`` dict) mapped onto the stages."""
        sd, fitted = payload.pop("state_dicts"), dict(payload.pop("fitted", {}))
        one = {k: fitted[k] for k in ("coarse_shape", "decode", "pair_prior") if k in fitted}
        two = {k: fitted[k] for k in ("ranges_mm", "step_weights") if k in fitted}
        training = payload.get("training") or fitted.get("training") or {}
        return {**payload, "format": 2, "training": training, "fitted": {"modality": fitted.get("modality")},
                "stages": {HeatmapStage.name: {"networks": {"unet": sd["stage1"]}, "fitted": one},
                           DisplacementStage.name: {"networks": {"cnn": sd["stage2"]}, "fitted": two}}}

    # --- training -------------------------------------------------------------------------------
    def training_cases(self, samples: Sequence[Sample] | None) -> list[tr.CascadeCase]:
        """The labelled samples prepared for training (the first fixes an ``auto`` modality)."""
        def prepare(image: Any) -> Any:
            self.resolve_modality(image.array)
            return self.prepare(image)

        return tr.training_cases(samples, self.landmark_names, prepare)

    def fit_step_weights(self, val: Sequence[Sample]) -> dict[str, Any]:
        """Choose the stage-2 step weights ``w_n`` on held-out samples (what :meth:`fit` does at its end).

        Lets a model trained before the weights existed get them without retraining; returns the
        per-landmark table (weight, validation MRE of stage 1 alone, of the full step, and of the chosen one).
        """
        cases = self.training_cases(val)
        if not cases:
            raise LandmarkError("cascade: fit_step_weights needs labelled validation samples")
        tr.stage1_estimates(self.stage1, cases)
        table = tr.fit_step_weights(self.stage2, cases)
        self.training["step_weights"] = table
        return table

    def fit_with(self, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample], **options: Any
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
        if init not in INITS:
            raise LandmarkError(f"cascade.fit: init must be 'scratch' or 'current', got {init!r}")
        if which not in STAGE_CHOICES:
            raise LandmarkError(f"cascade.fit: stages must be 'all' or 'stage2', got {which!r}")
        t0 = time.monotonic()
        end = trainer.remaining_deadline()
        for stage in (self.stage1, self.stage2):  # the trainer's device (the base fit set self.device to it)
            stage.device = self.device
            for net in stage.networks().values():
                net.to(self.device)
        if init == "scratch" and which == "all":
            self.modality_fitted = None
        train_cases, val_cases = self.training_cases(train), self.training_cases(val)
        if not train_cases:
            raise LandmarkError("cascade.fit: no training sample has landmarks")
        s1, s2 = self.stage1, self.stage2
        if init == "scratch":
            unet, cnn = s1.build(), s2.build()  # in this order: the seeded initial weights of the old layout
            if which == "all":
                s1.unet = unet
                s1.coarse_shape = s1.fit_coarse_shape([k.image for k in train_cases])
            s2.cnn = cnn
        report: dict[str, Any] = {"detector": self.name, "profile": self.profile, "init": init,
                                  "n_train": len(train_cases), "n_val": len(val_cases),
                                  "modality": self.resolve_modality(None), "coarse_shape": list(s1.coarse_shape)}
        if which == "all":
            s1.decode, s1.pair_prior = "peak", None  # stage 1's validation during training: the paper's
            report["stage1"] = tr.fit_stage1(s1, trainer, train_cases, val_cases,
                                             trainer.deadline(self.config.stage1_share))
            report["decode"] = tr.fit_decode(s1, train_cases, val_cases)
        tr.stage1_estimates(s1, train_cases + val_cases)
        report["ranges"] = tr.fit_ranges(s2, train_cases, val_cases)
        if val_cases:
            report["stage1_val_mre_mm"] = case_mre(val_cases, [v.stage1 for v in val_cases if v.stage1 is not None])
        report["stage2"] = tr.fit_stage2(s2, trainer, train_cases, val_cases, end)
        s2.step_weights = np.ones(len(self.landmark_names))
        if val_cases and self.config.fit_step_weights:
            report["step_weights"] = tr.fit_step_weights(s2, val_cases)
        if val_cases and self.config.fit_lattice and self.config.refine_lattice_mm > 0:
            chosen, report["lattice"] = tr.fit_lattice(s2, val_cases)
            self.config = s1.config = s2.config = chosen
        report["seconds"] = time.monotonic() - t0
        return report


__all__ = ["CascadeDetector"]
