"""``prior_guided``: coarse ResNet regression, fine patch U-Nets and the correlated-landmark module.

Pang et al., "Prior Guided 3D Medical Image Landmark Localization", MIDL 2023
(``../shared/papers/prior_guided_pang_midl2023.txt``).

Stages (``stages()``; ``predict_all`` times each):

1. ``coarse`` (:class:`~lmk3d.detectors.prior_guided.stages.CoarseStage`): a 3D ResNet
   (:class:`lmk3d.networks.resnet_regressor.ResNetRegressor`) sees the whole image on an isotropic
   RAS-aligned grid (``coarse_roi_size`` voxels) and regresses all ``N`` landmark coordinates at once
   (normalised to the grid; L1 loss on present landmarks only).
2. ``fine`` (:class:`~lmk3d.detectors.prior_guided.stages.FineStage`): patches at ``pixdim`` mm
   (``roi_size`` voxels; by default the training images' native resolution) centred at the coarse
   estimates, sampled in one batched call. *Independent* landmarks: one
   :class:`~lmk3d.networks.patch_unet.PatchUNet` each predicts a Gaussian heatmap; the landmark is its
   sub-voxel peak. *Correlated* landmarks (groups annotated on one key slice, from ``config.groups`` or
   a dataset's ``groups.json``): one :class:`~lmk3d.networks.correlated_module.CorrelatedModule` per
   group; its patches share their extent along the group's axis, and the key-slice peak fixes the
   group's coordinate on that axis.

Both stages read the image through the request's one :class:`~lmk3d.preprocessing.PreparedImage`.

Training (:mod:`lmk3d.detectors.prior_guided.training`): the coarse network first (grid moved by
random rotation, scaling and translation; the landmarks stay in world space), then its errors on the
training cases are measured and the fine networks are trained on patches whose centres are jittered
like those errors (per landmark and axis RMS times ``jitter_scale``). Both keep their
best-on-validation weights (validation MRE in mm; the fine one through the whole chain, each error
capped at the patch half-size, since a coarse failure that leaves the landmark outside its patch is
beyond any fine epoch).

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
from typing import Any

from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Stage
from lmk3d.detectors.prior_guided import training as tr
from lmk3d.detectors.prior_guided.config import CPU, PAPER, TINY, PriorGuidedConfig, find_groups
from lmk3d.detectors.prior_guided.stages import CoarseStage, FineStage
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.preprocessing import PreparedImage
from lmk3d.training.loop import Trainer

#: What ``fit`` trains, by ``parts``: the stages' phases.
PARTS = ("coarse", "fine", "groups")


class PriorGuidedDetector(Detector):
    """Coarse-to-fine detector with a correlated-landmark module (see the module docstring).

    Attributes:
        coarse, fine: the two stages (:meth:`stages` returns them, in this order).
    """

    name = "prior_guided"
    config_class = PriorGuidedConfig
    profiles = {"paper": PAPER, "cpu": CPU, "tiny": TINY}

    def __init__(self, landmark_names: Sequence[str], config: PriorGuidedConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile, device)
        self.config: PriorGuidedConfig = config
        self.coarse = CoarseStage(self.landmark_names, config, self.device)
        self.fine = FineStage(self.landmark_names, config, self.device)

    def stages(self) -> list[Stage]:
        return [self.coarse, self.fine]

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints from before the shared preprocessing box-filtered in storage order.
        cfg.setdefault("canonical_blocks", False)
        return cfg

    @classmethod
    def upgrade_checkpoint(cls, payload: dict[str, Any]) -> dict[str, Any]:
        """Format 1 (``state_dicts`` coarse/fine/groups, one ``fitted`` dict) -> the stage layout."""
        sd = payload.get("state_dicts", {})
        fitted = dict(payload.get("fitted", {}))
        coarse_fitted = {k: fitted[k] for k in ("coarse_train_rms_mm", "coarse_val_mre_mm") if k in fitted}
        fine_fitted = {k: fitted[k] for k in ("groups", "pixdim", "jitter_sd_mm") if k in fitted}
        rest = {k: v for k, v in payload.items() if k not in ("state_dicts", "fitted")}
        return {**rest, "format": 2,
                "stages": {"coarse": {"networks": {"coarse": sd["coarse"]}, "fitted": coarse_fitted},
                           "fine": {"networks": {"fine": sd["fine"], "groups": sd["groups"]}, "fitted": fine_fitted}},
                "fitted": {"modality": fitted.get("modality")},
                "training": payload.get("training") or fitted.get("training") or {}}

    def _prepare_for_training(self, image: Volume) -> PreparedImage:
        """The request preprocessing, the modality fixed on the first training image."""
        self.resolve_modality(image.array)
        return self.prepare(image)

    def fit_with(self, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample], **options: Any
                 ) -> dict[str, Any]:
        """Train the coarse network, measure its errors, then train the fine networks.

        Options:
            init: ``"scratch"`` (default: new networks; groups from the config or ``groups.json``) or
                ``"current"`` (fine-tune the current weights).
            parts: which stages to train, default ``("coarse", "fine")``; ``("fine",)`` keeps the coarse
                network; ``("groups",)`` trains only the correlated modules (the ablation of the paper's
                Table 2), keeping the coarse network and the independent U-Nets.
            groups: correlated groups overriding the config and ``groups.json`` (``init="scratch"`` only).

        Raises:
            LandmarkError: an unknown option or value, or no training sample with any landmark.
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
        if not parts or set(parts) - set(PARTS):
            raise LandmarkError(f"prior_guided.fit: parts must be a non-empty subset of {PARTS}, got {parts!r}")
        t0, cpu0 = time.monotonic(), time.process_time()
        coarse, fine = self.coarse, self.fine
        if init == "scratch":
            coarse.build(trainer.device)
            fine.build(options.get("groups") or self.config.groups or find_groups(train), trainer.device)
            coarse.errors, fine.pixdim_fitted, fine.jitter_sd_mm = {}, None, None
            self.modality_fitted = None
        else:
            coarse.net.to(trainer.device)
            fine.fine_nets.to(trainer.device)
            fine.group_nets.to(trainer.device)
            coarse.device = fine.device = trainer.device
        if init == "scratch" or fine.pixdim_fitted is None:
            tr.fit_pixdim(fine, train)
        train_cases = tr.make_cases(train, coarse, fine, self._prepare_for_training)
        val_cases = tr.make_cases(val, coarse, fine, self._prepare_for_training)
        if not train_cases:
            raise LandmarkError("prior_guided.fit: no training sample has any of the landmarks "
                                f"{', '.join(self.landmark_names)}")
        report: dict[str, Any] = {"init": init, "parts": list(parts), "n_train": len(train_cases),
                                  "n_val": len(val_cases), "groups": [[list(n), a] for n, a in fine.groups]}
        if "coarse" in parts:
            deadline = trainer.deadline(self.config.coarse_share if len(parts) > 1 else 1.0)
            report["coarse"] = tr.fit_coarse(coarse, trainer, train_cases, val_cases, deadline).to_dict()
        tr.coarse_estimates(coarse, train_cases + val_cases)
        sd = tr.jitter_sd(coarse, fine, train_cases, val_cases)
        if "fine" in parts or "groups" in parts:
            report["fine"] = tr.fit_fine(fine, trainer, train_cases, val_cases, sd, trainer.remaining_deadline(),
                                         groups_only="fine" not in parts).to_dict()
        report["seconds"] = time.monotonic() - t0
        report["cpu_seconds"] = time.process_time() - cpu0
        for m in (coarse.net, fine.fine_nets, fine.group_nets):
            m.eval()
        return report


__all__ = ["PriorGuidedDetector"]
