"""``pin``: the Patch-based Iterative Network (Li et al., MICCAI 2018).

A point configuration is moved towards the landmarks by a CNN that looks at small patches around
its current position:

1. **Working frame** (:class:`~lmk3d.detectors.pin.sampling.PinImage`, built from the shared
   :class:`~lmk3d.preprocessing.PreparedImage` in training, validation and inference): RAS-aligned
   axes at ``pixdim`` mm with the origin at the centre of the field of view.
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

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.detectors.base import Detector, Stage
from lmk3d.detectors.pin.config import PROFILES, PinConfig
from lmk3d.detectors.pin.stages import NOT_TRAINED, PinIterate, PinStart, PinUnit, level_name
from lmk3d.detectors.pin.training import fit_levels, resolve_settings
from lmk3d.errors import LandmarkError
from lmk3d.training.cases import sample_truth
from lmk3d.training.loop import Trainer


class PinDetector(Detector):
    """PIN (see the module docstring). Build with ``PinDetector.create(names, profile)``.

    The stages are :class:`PinStart` and one :class:`PinIterate` per level (``pin``, ``pin_fine``,
    ``pin_fine2``...), made from the resolved config; each level owns its units.
    """

    name = "pin"
    config_class = PinConfig
    profiles = PROFILES

    def __init__(self, landmark_names: Sequence[str], config: PinConfig, profile: str = "custom",
                 device: str | None = None) -> None:
        super().__init__(landmark_names, config, profile, device)
        self._config: PinConfig = config
        self.levels: list[PinIterate] = []
        self._start: PinStart | None = None
        self._build_stages()

    # --- config and stages ------------------------------------------------------------------------
    @property
    def config(self) -> PinConfig:
        return self._config

    @config.setter
    def config(self, config: PinConfig) -> None:
        """A new config reaches every stage; the levels are rebuilt only when their pixel sizes change."""
        self._config = config
        if hasattr(self, "levels"):
            self._build_stages()

    def _build_stages(self) -> None:
        pixdims = self.level_pixdims if self._config.pixdim is not None else []
        if [lv.pixdim for lv in self.levels] == pixdims:
            for lv in self.levels:
                lv.config = self._config
            return
        self.levels = [PinIterate(self.landmark_names, self._config, k, px, self.device)
                       for k, px in enumerate(pixdims)]
        self._start = PinStart(self.levels[0]) if self.levels else None

    def stages(self) -> list[Stage]:
        if self._start is None:
            raise LandmarkError(NOT_TRAINED)
        return [self._start, *self.levels]

    @property
    def units(self) -> list[PinUnit]:
        """The first level's units."""
        return self.levels[0].units if self.levels else []

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

    # --- checkpoints ------------------------------------------------------------------------------
    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        # Checkpoints from before fine_variance_kept fitted both levels with variance_kept, and had one
        # fine level at most.
        cfg.setdefault("fine_variance_kept", cfg.get("variance_kept", PinConfig.variance_kept))
        cfg.setdefault("fine_levels", 1)
        cfg.setdefault("fine_variant", cfg.get("variant", PinConfig.variant))  # the fine level had the first's
        return cfg

    @classmethod
    def upgrade_checkpoint(cls, payload: dict[str, Any]) -> dict[str, Any]:
        """Format 1 (``state_dicts`` keyed ``cnn_<level>_<unit>``, ``fitted["levels"]``) -> one stage per level.

        The modality was (and is) part of the config.
        """
        sds = payload.get("state_dicts", {})
        stages: dict[str, Any] = {PinStart.name: {"networks": {}, "fitted": {}}}
        for lv, entries in enumerate(payload.get("fitted", {}).get("levels", [])):
            stages[level_name(lv)] = {"networks": {f"cnn_{u}": sds[f"cnn_{lv}_{u}"] for u in range(len(entries))},
                                      "fitted": {"units": entries}}
        rest = {k: v for k, v in payload.items() if k != "state_dicts"}
        return {**rest, "format": 2, "stages": stages, "fitted": {"modality": payload["config"].get("modality")}}

    # --- training -------------------------------------------------------------------------------
    def fit_with(self, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample], **options: Any
                 ) -> dict[str, Any]:
        """Fit the shape model(s) and train the CNN(s), level by level.

        Options:
            init: ``"scratch"`` (default: new shape models and networks) or ``"current"`` (fine-tune the
                current networks with the current shape models and settings).
            device: accepted for compatibility; the trainer's device is used.
            groups: accepted and ignored (the shape model learns how landmarks co-vary).
        """
        init = options.pop("init", "scratch")
        options.pop("device", None)  # the trainer chose the device (Detector.fit's trainer)
        options.pop("groups", None)  # landmark groups (the prior-guided detector's); PIN's PCA needs none
        if options:
            raise LandmarkError(f"pin.fit: unknown option(s) {', '.join(options)}; accepted: init, device, groups")
        if init not in ("scratch", "current"):
            raise LandmarkError(f"pin.fit: init must be 'scratch' or 'current', got {init!r}")
        if init == "current" and not self.units:
            raise LandmarkError(NOT_TRAINED)
        train = [s for s in train if s.landmarks is not None]
        if len(train) < 2:
            raise LandmarkError(f"pin.fit: need at least 2 labelled training cases, got {len(train)}")
        val = [s for s in val if s.landmarks is not None]
        self.device = trainer.device
        c = self.config

        def truth(s: Sample) -> tuple[np.ndarray, np.ndarray]:
            return sample_truth(s, self.landmark_names)

        if init == "scratch" and (c.pixdim is None or c.modality == "auto" or c.fine_pixdim is None
                                  or (c.fine_step != 1.0 and not c.fine_pixdims)):
            modality = c.modality if c.modality != "auto" else self.resolve_modality(train[0].load_image().array)
            self.config = resolve_settings(train, c, truth, modality)
        c = self.config
        if init == "scratch":
            self.levels = []  # fresh stages, units fitted level by level
            self._build_stages()
        for stage in self.levels:
            stage.to(self.device)
        reports = fit_levels(self, trainer, train, val, init, truth)
        n_last = len(self.levels[-1].units)
        return {
            "detector": self.name, "variant": c.variant, "fine_variant": c.fine_variant,
            "pixdim": self.level_pixdims, "modality": self.modality,
            "n_train": len(train), "n_val": len(val), "seed": trainer.options.seed,
            "modes": [u.shape.n_modes for u in self.units],
            "explained": [u.shape.explained for u in self.units],
            "units": reports, "val_statistic": c.val_statistic,
            "best_val_mre_mm" if c.val_statistic == "mean" else "best_val_median_mm":
                float(np.mean([r["best_val"] for r in reports[-n_last:]])),
        }


__all__ = ["PinDetector"]
