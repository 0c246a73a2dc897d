"""PIN's configuration: :class:`PinConfig` and the named profiles (``paper``, ``cpu``, ``tiny``)."""

from __future__ import annotations

from dataclasses import dataclass

from lmk3d.errors import LandmarkError

RULES = ("A", "B", "C")
VARIANTS = ("multiple", "single")
INIT_LAYOUTS = ("random", "grid19")
MODALITIES = ("auto", "CT", "MR")


@dataclass(frozen=True)
class PinConfig:
    """PIN's hyper-parameters (MONAI names where one exists).

    Attributes:
        spatial_dims: 2 (the CNN convolves the 2.5D plane stack).
        roi_size: patch side ``s`` in pixels (paper: 101).
        pixdim: patch pixel size = working-frame unit in mm (paper: 0.5); ``None`` = chosen at fit
            time (the median finest image spacing, enlarged if needed so a patch spans 1.25 x the
            +-3 SD range of every landmark coordinate); the resolved value is stored.
        modality: ``"CT"``, ``"MR"`` or ``"auto"`` (CT when the training images hold air at about -1000).
        variant: ``"multiple"`` (one CNN, PCA shape space) or ``"single"`` (one CNN per landmark, ``W = I``).
        fine_variant: the same for the fine levels (an extension, like the fine levels themselves):
            ``"single"`` refines each landmark on its own from the first level's configuration, so
            the shape model keeps the search among plausible configurations (the twin on the other
            side is not one) while each landmark's last millimetres depend only on its own patches.
        variance_kept: PCA variance kept (paper: 99.5 %).
        fine_variance_kept: the same for the fine level's shape model (an extension, like the fine level
            itself). 1.0 keeps every mode (at most ``3N`` and one fewer than the training cases): on
            whole CT the variance is dominated by where the head lies in the field of view, so the 0.5 %
            that 99.5 % leaves out is millimetres (the phantoms' true test configurations lie 2.9 mm
            on average from a 7-mode space, a floor no search can go below), while the fine level
            exists to resolve millimetres.
        channels: the five conv layers' filters (paper: 32, 64, 128, 256, 512).
        fc_channels: hidden FC widths per head (three FC layers per head = two hidden plus the output).
        dropout: after each hidden FC layer.
        norm: conv normalisation: ``"batch"`` (trains several times faster here) or None (the paper).
        alpha: classification weight in the loss (paper: 0.5).
        sample_range: training ``b`` drawn uniformly within ``+-sample_range * sqrt(lambda)``.
        batch_size, learning_rate: Adam, as in the paper (64, 1e-3); cosine-annealed over ``max_epochs``
            (or over the time budget, whichever ends first).
        cases_per_batch: images per batch (each gives ``batch_size / cases_per_batch`` shapes), so that
            patch sampling costs one call per image.
        steps_per_epoch, max_epochs, patience: ``max_epochs * steps_per_epoch`` iterations at most
            (paper: 100,000); validation MRE after every epoch, early stop after ``patience`` epochs
            without improvement.
        val_statistic: ``"mean"`` or ``"median"`` of the validation errors, the number that picks the
            best epoch and stops early. With few validation cases, one the search cannot reach (a
            truncated field of view, a pose far outside the training ones) carries the mean and makes
            the choice noise; the median follows the cases the network can improve. The fine levels
            leave such cases out of their validation either way (:meth:`PinDetector.reachable`).
        max_rotation_deg, scale_range, intensity_jitter: augmentation (the frame is rotated/scaled about
            the field-of-view centre; intensities are scaled and shifted by up to ``intensity_jitter``).
        rule: inference update rule ``"A"``, ``"B"`` or ``"C"``.
        iterations: ``T`` for rules B and C (paper: 10); ``iterations_rule_a`` for A (paper: 350).
        tolerance_mm: early stop once no landmark of any initialisation moves more than this.
        fine_factor, fine_pixdim: a second, finer PIN level (an extension of the paper, see the module
            docstring). ``fine_pixdim`` None = chosen at fit time: ``max(median finest image spacing,
            pixdim / fine_factor)``; 0 = no fine level; ``fine_factor`` 0 = never.
        fine_levels: how many fine levels; each starts from the previous one's answer and is trained on
            the narrower window of that level's validation residuals.
        fine_step: each fine level after the first works at pixels ``fine_step`` times finer than the one
            before, never finer than the median finest image spacing (1 = all at ``fine_pixdim``).
        fine_pixdims: the fine levels' pixel sizes, resolved at fit time from the three settings above
            (empty = ``fine_levels`` times ``fine_pixdim``, as checkpoints from before ``fine_step`` had).
        n_random_inits: random initialisations besides the previous stage's (paper: 5).
        init_range: random initialisations uniform within ``+-init_range * sqrt(lambda)`` of the first.
        init_layout: ``"random"`` or ``"grid19"`` (the paper's 19 points: the centre and 18 shifts of a
            quarter of the field of view, applied to the mean shape).
        b_limit: ``b`` is kept within ``+-b_limit * sqrt(lambda)`` (the plausible shapes the CNN was trained on).
        spread_scale_mm, min_score: the score (see the module docstring) and the "not found" threshold.
        tta: test-time augmentation (an extension; 0 = off, as in the paper): every level also runs
            in this many extra views of the image, each a frame rotated and scaled about the
            field-of-view centre within the training augmentation (``max_rotation_deg``,
            ``scale_range``), drawn once from ``seed``; the answer and the spread are taken over all
            views' initialisations, mapped back to world coordinates. Meant to average out the part of
            the CNN's error that depends on how the patches happen to be sampled; on the phantoms'
            validation cases 8 views made two multiple-landmark models worse (2.04 to 2.15 mm, 1.90
            to 2.37 mm), so no profile uses it.
        seed: of the random initialisations and views (inference is deterministic).
    """

    spatial_dims: int = 2
    roi_size: int = 33
    pixdim: float | None = None
    modality: str = "auto"
    variant: str = "multiple"
    fine_variant: str = "multiple"
    variance_kept: float = 0.995
    fine_variance_kept: float = 1.0
    channels: tuple[int, ...] = (16, 32, 64, 128, 128)
    fc_channels: tuple[int, ...] = (256, 256)
    dropout: float = 0.2
    norm: str | None = "batch"
    alpha: float = 0.5
    sample_range: float = 3.0
    batch_size: int = 64
    cases_per_batch: int = 16
    learning_rate: float = 1e-3
    steps_per_epoch: int = 100
    max_epochs: int = 60
    patience: int = 20
    val_statistic: str = "mean"
    max_rotation_deg: float = 5.0
    scale_range: tuple[float, float] = (0.95, 1.05)
    intensity_jitter: float = 0.1
    rule: str = "C"
    iterations: int = 10
    iterations_rule_a: int = 100
    tolerance_mm: float = 0.05
    fine_factor: float = 4.0
    fine_pixdim: float | None = None
    fine_levels: int = 1
    fine_step: float = 1.0
    fine_pixdims: tuple[float, ...] = ()
    n_random_inits: int = 5
    init_range: float = 1.0
    init_layout: str = "random"
    b_limit: float = 3.0
    spread_scale_mm: float = 3.0
    min_score: float = 0.05
    tta: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.rule in RULES, f"rule {self.rule!r}; choose one of {', '.join(RULES)}"),
            (self.variant in VARIANTS, f"variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"),
            (self.fine_variant in VARIANTS, f"fine_variant {self.fine_variant!r}; choose one of {', '.join(VARIANTS)}"),
            (self.init_layout in INIT_LAYOUTS, f"init_layout {self.init_layout!r}; choose one of "
             f"{', '.join(INIT_LAYOUTS)}"),
            (self.modality in MODALITIES, f"modality {self.modality!r}; choose one of {', '.join(MODALITIES)}"),
            (self.spatial_dims == 2, f"spatial_dims {self.spatial_dims}; PIN's CNN is 2D (2.5D input): use 2"),
            (self.roi_size >= 1 and len(self.channels) >= 1, "roi_size must be >= 1 with at least one conv layer"),
            (self.pixdim is None or self.pixdim > 0, f"pixdim {self.pixdim}; use a positive mm value or None"),
            (self.val_statistic in ("mean", "median"), f"val_statistic {self.val_statistic!r}; choose mean or median"),
            (self.fine_levels >= 1, f"fine_levels {self.fine_levels}; use 1 or more"),
            (self.fine_step >= 1.0, f"fine_step {self.fine_step}; use 1 or more"),
            (self.fine_pixdim is None or self.fine_pixdim >= 0,
             f"fine_pixdim {self.fine_pixdim}; use a positive mm value, 0 (no fine level) or None"),
            (0.0 <= self.alpha <= 1.0, f"alpha {self.alpha}; use a value in [0, 1]"),
            (self.iterations >= 0 and self.iterations_rule_a >= 0 and self.n_random_inits >= 0 and self.tta >= 0,
             "iterations, iterations_rule_a, n_random_inits and tta must be >= 0"),
        ]
        for ok, what in checks:
            if not ok:
                raise LandmarkError(f"pin config: unknown or invalid {what}")
        # Checkpoints store tuples as lists (JSON-like); keep the dataclass hashable and comparable.
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "fc_channels", tuple(int(c) for c in self.fc_channels))
        object.__setattr__(self, "fine_pixdims", tuple(float(p) for p in self.fine_pixdims))
        object.__setattr__(self, "scale_range", (float(self.scale_range[0]), float(self.scale_range[1])))


PROFILES: dict[str, PinConfig] = {
    # The paper's sizes (Li et al. 2018, Sec. 3): 101-pixel patches at 0.5 mm, 32..512 filters,
    # 100,000 Adam iterations of 64, 350 rule-A steps. Not trained here.
    "paper": PinConfig(roi_size=101, pixdim=0.5, channels=(32, 64, 128, 256, 512), fc_channels=(1024, 1024),
                       dropout=0.5, norm=None, steps_per_epoch=1000, max_epochs=100, patience=100,
                       iterations_rule_a=350, fine_factor=0.0, fine_pixdim=0.0),
    # 33-pixel patches, 16..128 filters, two levels of at most 60 epochs x 100 batches of 64: about
    # 25 minutes on the 140 hippocampus training cases on one idle CPU thread (use --max-minutes on a
    # busy machine: the learning rate then anneals over the time budget). The fine level refines each
    # landmark on its own: on validation 1.35 against 1.80 mm (hippocampus) and 0.65 against 2.04 mm
    # (phantoms, cases within the first level's reach) for one multiple-landmark fine level.
    "cpu": PinConfig(fine_variant="single"),
    # For tests: seconds.
    "tiny": PinConfig(roi_size=15, channels=(8, 8, 16, 16, 16), fc_channels=(32,), dropout=0.0, norm="batch",
                      batch_size=32, learning_rate=3e-3, steps_per_epoch=30, max_epochs=10, patience=10,
                      iterations=6, iterations_rule_a=20, n_random_inits=3, fine_factor=0.0),
}



__all__ = ["INIT_LAYOUTS", "MODALITIES", "PROFILES", "RULES", "VARIANTS", "PinConfig"]
