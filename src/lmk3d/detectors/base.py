"""The detector framework (../shared/DETECTOR_CONTRACT.md): ``Stage``, ``Detector``, the pipeline runner.

A detector is a list of **stages** plus a config. A stage owns its networks and its fitted state,
takes the :class:`~lmk3d.preprocessing.PreparedImage` and the previous stage's ``LandmarkSet``, and
returns landmarks with scores. :meth:`Detector.predict_all` is the one pipeline runner: it prepares
the image once on the detector's device (chosen once, at construction or load), runs the stages in
order without leaving the device between them (mixed precision on CUDA, float32 on CPU), times each,
and returns world-mm RAS landmarks in the frame of the *original* image.

Training goes through :meth:`Detector.fit`, which builds a :class:`~lmk3d.training.loop.Trainer`
(seed, budgets, device, progress, resume state) and hands it to the detector's :meth:`Detector.fit_with`.

Checkpoints are written and read by :mod:`lmk3d.checkpoint` only: the detector contributes its
config, its detector-level fitted state (:meth:`Detector.fitted_state`) and each stage's
:meth:`Stage.state`; :func:`load_detector` reads the detector name from the file and builds the class
through the registry, with the same network-building code used for training.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lmk3d.checkpoint import CHECKPOINT_FILE, CheckpointError, data_fingerprint, read_checkpoint, write_checkpoint
from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.preprocessing import PreparedImage, resolve_modality

if TYPE_CHECKING:  # importing torch at module level would slow the CLI's start
    import torch

    from lmk3d.training.loop import Trainer
    from lmk3d.trust import ImageVerdict, TrustModel

__all__ = ["CHECKPOINT_FILE", "Detector", "Prediction", "Stage", "StageResult", "autocast", "default_device",
           "detector_class", "detector_names", "freeze_sequences", "load_detector", "mark_outside", "register"]


@dataclass
class StageResult:
    """One stage's output and how long it took."""

    name: str
    landmarks: LandmarkSet
    seconds: float


@dataclass
class Prediction:
    """``predict``'s full answer: the final landmarks plus every stage's result.

    With a trust model (:mod:`lmk3d.trust`), ``landmarks`` carry calibrated scores and radii, cut-off
    landmarks are not found, ``raw`` keeps the detector's own answer and ``verdict`` says whether the image
    is of the model's kind. Without one, ``raw`` is ``landmarks`` and ``verdict`` is None.
    """

    landmarks: LandmarkSet
    stages: list[StageResult] = field(default_factory=list)
    prepare_seconds: float = 0.0
    raw: LandmarkSet | None = None
    verdict: ImageVerdict | None = None
    trust_seconds: float = 0.0

    @property
    def latencies(self) -> dict[str, float]:
        trust = {"trust": self.trust_seconds} if self.verdict is not None else {}
        return {"prepare": self.prepare_seconds} | {s.name: s.seconds for s in self.stages} | trust

    def stages_json(self) -> list[dict[str, Any]]:
        """Each stage's landmarks and latency, JSON-able (how the first guess was refined)."""
        out = []
        for s in self.stages:
            lm = s.landmarks
            points = [{"name": n, "xyz_mm_ras": [float(v) for v in lm.xyz_mm_ras[i]] if lm.found[i] else None,
                       "score": float(lm.scores[i]), "found": bool(lm.found[i])} for i, n in enumerate(lm.names)]
            out.append({"name": s.name, "seconds": round(s.seconds, 4), "landmarks": points})
        return out


class Stage(abc.ABC):
    """One step of a detector's chain: owns its networks and fitted state.

    Subclasses set ``name``, build their networks in ``__init__`` (the same code for training and
    loading), list them in :meth:`networks`, keep fitted plain data in :meth:`fitted` /
    :meth:`load_fitted`, and implement :meth:`__call__`.
    """

    name: str = "stage"

    def networks(self) -> dict[str, torch.nn.Module]:
        """The stage's networks by name (saved and loaded by state dict)."""
        return {}

    def fitted(self) -> dict[str, Any]:
        """Fitted state other than weights (plain types only)."""
        return {}

    def load_fitted(self, fitted: dict[str, Any]) -> None:  # noqa: B027
        """Restore :meth:`fitted` (called before the weights are loaded, so it may rebuild networks)."""

    def state(self) -> dict[str, Any]:
        return {"networks": {k: m.state_dict() for k, m in self.networks().items()}, "fitted": self.fitted()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_fitted(dict(state.get("fitted", {})))
        saved = state.get("networks", {})
        for key, net in self.networks().items():
            if key not in saved:
                raise CheckpointError(f"stage {self.name!r}: the checkpoint has no weights for network {key!r}")
            net.load_state_dict(saved[key])
            net.eval()

    @abc.abstractmethod
    def __call__(self, image: PreparedImage, previous: LandmarkSet | None) -> LandmarkSet:
        """Landmarks (world RAS mm, frame of the original image) given the previous stage's."""


class Detector(abc.ABC):
    """Base class of every detector.

    Subclasses set ``name``, ``config_class`` (a frozen dataclass) and ``profiles`` (profile name ->
    config instance: ``paper``, ``cpu``, ``tiny``...), and implement :meth:`stages` and :meth:`fit_with`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    profiles: ClassVar[dict[str, Any]] = {}

    def __init__(self, landmark_names: Sequence[str], config: Any, profile: str = "custom",
                 device: str | None = None) -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.profile = profile
        self.device = _torch_device(device)
        self.modality_fitted: str | None = None
        self.data_fingerprint: str | None = None
        self.training: dict[str, Any] = {}
        #: calibrated scores, not-found and image verdict (:mod:`lmk3d.trust`), read from the model folder
        self.trust: TrustModel | None = None

    @classmethod
    def resolve_config(cls, profile: str = "cpu", **overrides: Any) -> Any:
        """The config ``create`` would use: a profile with overrides (unknown field: a clear error)."""
        if profile not in cls.profiles:
            choices = ", ".join(cls.profiles) or "(none)"
            raise LandmarkError(f"unknown profile {profile!r} for detector {cls.name!r}; choose one of {choices}")
        config = cls.profiles[profile]
        if overrides:
            known = {f.name for f in dataclasses.fields(config)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise LandmarkError(f"{cls.name}: unknown config field(s) {', '.join(unknown)}; the fields are "
                                    f"{', '.join(sorted(known))}")
            checked = {k: checked_value(cls.name, k, getattr(config, k), v) for k, v in overrides.items()}
            try:
                config = dataclasses.replace(config, **checked)
            except (TypeError, ValueError) as e:
                raise LandmarkError(f"{cls.name}: bad config value ({e})") from None
        return config

    @classmethod
    def create(cls, landmark_names: Sequence[str], profile: str = "cpu", device: str | None = None,
               **overrides: Any) -> Detector:
        """A new, untrained detector from a named profile, with optional config overrides."""
        config = cls.resolve_config(profile, **overrides)
        return cls(landmark_names, config, profile if not overrides else f"{profile}+overrides", device)

    # --- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def stages(self) -> list[Stage]:
        """The inference chain, in order (the same stage objects every call)."""

    @abc.abstractmethod
    def fit_with(self, trainer: Trainer, train: Sequence[Sample], val: Sequence[Sample], **options: Any
                 ) -> dict[str, Any]:
        """Train every stage through ``trainer``; return a JSON-able report."""

    def leave_one_out(self, train: Sequence[Sample]) -> list[Detector]:
        """One copy of this fitted detector per case of ``train`` (the cases it was fitted on), each fitted
        without that case: cross-fitted calibration points (``lmk3d calibrate --cross-fit``).

        Only a detector whose fit is a closed form can give them without training again per case; the others
        refuse (fold models give them: ``lmk3d train --fold``, ``lmk3d calibrate --cross-fit-models``).

        Raises:
            LandmarkError: always, here; :class:`~lmk3d.detectors.mean_shape.MeanShapeDetector` overrides it.
        """
        raise LandmarkError(f"{self.name}: cross-fitted calibration needs the detector fitted without each training "
                            "case, one training per case; only mean_shape (whose fit is a mean) gives it here (for the "
                            "others: fold models, lmk3d train --fold, then lmk3d calibrate --cross-fit-models)")

    def fitted_state(self) -> dict[str, Any]:
        """Detector-level fitted state (plain types), beside the stages'."""
        return {"modality": self.modality_fitted}

    def load_fitted_state(self, fitted: dict[str, Any]) -> None:
        """Restore :meth:`fitted_state` (before the stages load theirs)."""
        self.modality_fitted = fitted.get("modality")

    @classmethod
    def upgrade_checkpoint(cls, payload: dict[str, Any]) -> dict[str, Any]:
        """A format-1 checkpoint (``state_dicts``/``fitted`` per detector) mapped onto format 2."""
        raise CheckpointError(f"{cls.name}: this checkpoint predates the stage layout and cannot be converted")

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's config with the fields added since it was written set to what it was trained with.

        Without this, a field added later would take today's default and misdescribe the older model.
        """
        return cfg

    # --- training -------------------------------------------------------------------------------
    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample] | None = None,
        *,
        seed: int = 0,
        max_minutes: float | None = None,
        progress: bool = True,
        trainer: Trainer | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Train (seeded, within ``max_minutes``); ``trainer`` carries more (epochs, device, resume).

        Returns a JSON-able training report (epochs, losses, best validation MRE in mm, seconds...).
        """
        from lmk3d.training.loop import Trainer, TrainOptions

        if trainer is None:
            trainer = Trainer(TrainOptions(seed=seed, max_minutes=max_minutes, progress=progress,
                                           device=str(self.device)))
        self.device = trainer.device
        labelled = [s for s in train if s.landmarks is not None]
        self.data_fingerprint = data_fingerprint([(s.case, s.landmarks) for s in labelled])
        t0 = time.monotonic()
        report = self.fit_with(trainer, train, list(val or []), **options)
        report.setdefault("seconds", time.monotonic() - t0)
        report["seed"] = trainer.options.seed
        report["device"] = str(trainer.device)
        self.training = {k: v for k, v in report.items() if not isinstance(v, dict) or "history" not in v}
        return report

    def resolve_modality(self, array: np.ndarray | None) -> str:
        """The config's modality, else the one fixed in training, else (first training image) a guess."""
        configured = str(getattr(self.config, "modality", "auto"))
        modality = resolve_modality(configured, self.modality_fitted, array)
        if configured == "auto" and self.modality_fitted is None:
            self.modality_fitted = modality
        return modality

    # --- inference -------------------------------------------------------------------------------
    def prepare(self, image: Volume) -> PreparedImage:
        """The one preprocessing of a request: every stage reads this object."""
        configured = str(getattr(self.config, "modality", "auto"))
        modality = resolve_modality(configured, self.modality_fitted, image.array)
        # A config field ``canonical_blocks`` False keeps a pre-framework model's storage-order box filter.
        return PreparedImage.from_volume(image, modality, self.device, bool(getattr(self.config, "canonical_blocks",
                                                                                    True)))

    def autocast(self) -> Any:
        """Mixed precision on CUDA; float32 elsewhere (:func:`autocast`)."""
        return autocast(self.device)

    def predict_all(self, image: Volume, prepared: PreparedImage | None = None, trust: bool = True,
                    cap_atypical: bool = True) -> Prediction:
        """Run every stage on one prepared image; keep each stage's landmarks and latency.

        ``trust`` False gives the detector's own answer even when the model has a trust model.
        ``cap_atypical`` False leaves the calibrated scores of an atypical image uncapped
        (:func:`lmk3d.trust.apply_trust`; a consensus asks its members so).
        """
        import torch

        verdict = None
        if trust and self.trust is not None:
            # An image not of the model's kind is refused before any stage runs (lmk3d.trust).
            from lmk3d.trust import check_image, refused

            t0 = time.perf_counter()
            verdict = check_image(self.trust, image)
            if not verdict.in_distribution:
                out = refused(self.trust, verdict)
                return Prediction(out, [], 0.0, out, verdict, time.perf_counter() - t0)
        t0 = time.perf_counter()
        prep = prepared if prepared is not None else self.prepare(image)
        t_prep = time.perf_counter() - t0
        previous: LandmarkSet | None = None
        results = []
        with torch.no_grad(), self.autocast():
            for stage in self.stages():
                t0 = time.perf_counter()
                previous = stage(prep, previous)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                results.append(StageResult(stage.name, previous, time.perf_counter() - t0))
        if previous is None:
            raise RuntimeError(f"detector {self.name!r} has no stages")
        raw = mark_outside(previous, image)
        if not trust or self.trust is None:
            return Prediction(raw, results, t_prep, raw)
        from lmk3d.trust import apply_trust

        t0 = time.perf_counter()
        trusted = apply_trust(self.trust, raw, results[0].landmarks if len(results) > 1 else None, image, verdict,
                              cap_atypical)
        return Prediction(trusted.landmarks, results, t_prep, raw, trusted.verdict, time.perf_counter() - t0)

    def predict(self, image: Volume) -> LandmarkSet:
        return self.predict_all(image).landmarks

    # --- checkpoints -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        is_config = dataclasses.is_dataclass(self.config) and not isinstance(self.config, type)
        return dataclasses.asdict(self.config) if is_config else dict(self.config or {})

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``checkpoint.pt`` atomically (see :mod:`lmk3d.checkpoint`)."""
        payload = {
            "detector": self.name,
            "profile": self.profile,
            "config": self.config_dict(),
            "landmark_names": list(self.landmark_names),
            "stages": {s.name: s.state() for s in self.stages()},
            "fitted": self.fitted_state(),
            "data_fingerprint": self.data_fingerprint,
            "training": self.training,
        }
        return write_checkpoint(directory, payload)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], device: str | None = None) -> Detector:
        """Build from a read checkpoint dict, with the same network-building code as training."""
        if payload.get("format", 1) == 1:
            payload = cls.upgrade_checkpoint(dict(payload))
        cfg: Any = payload["config"]
        if cls.config_class is not None:
            try:
                cfg = cls.config_class(**cls.upgrade_config(dict(cfg)))
            except TypeError as e:
                raise CheckpointError(f"{cls.name}: checkpoint config does not fit this version ({e})") from None
        det = cls(payload["landmark_names"], cfg, payload.get("profile", "custom"), device)
        det.load_fitted_state(dict(payload.get("fitted", {})))
        det.data_fingerprint = payload.get("data_fingerprint")
        det.training = dict(payload.get("training") or {})
        stages = payload["stages"]
        for stage in det.stages():
            if stage.name not in stages:
                raise CheckpointError(f"{cls.name}: the checkpoint has no state for stage {stage.name!r}")
            stage.load_state(stages[stage.name])
        return det


def autocast(device: torch.device) -> Any:
    """The one mixed-precision rule: float16 autocast on CUDA, nothing (float32) elsewhere.

    The runner wraps every stage in it; stages wrap their network calls too, so validation during
    training (outside the runner) computes as inference does. Decoding stays in float32.
    """
    import torch

    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()


def _torch_device(device: Any) -> torch.device:
    import torch

    return torch.device(device if device is not None else default_device())


def freeze_sequences(config: Any, names: Sequence[str]) -> None:
    """Turn the named fields of a frozen config back into tuples (checkpoints and JSON hand back lists).

    Keeps the config hashable and comparable; a scalar becomes a 1-tuple. Call from ``__post_init__``.
    """
    for name in names:
        value = getattr(config, name)
        object.__setattr__(config, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))


def checked_value(detector: str, key: str, current: Any, value: Any) -> Any:
    """``value`` for config field ``key`` if it has the type of the field's ``current`` value, else a clear error.

    Integers are accepted for float fields; lists for tuple fields; a field whose profile value is None
    takes a number, a string or None.
    """
    def bad(expected: str) -> LandmarkError:
        return LandmarkError(f"{detector}: config field {key!r} takes {expected}, got {value!r}")

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (tuple, list)):
            raise bad("a tuple, e.g. (1, 2, 3)")
        return tuple(value)
    if current is None and not (value is None or isinstance(value, (int, float, str)) and not isinstance(value, bool)):
        raise bad("a number, a string or None")
    return value


def mark_outside(landmarks: LandmarkSet, image: Volume) -> LandmarkSet:
    """Mark landmarks outside the image's field of view as not found (the contract's rule)."""
    finite = np.isfinite(landmarks.xyz_mm_ras).all(axis=1)
    inside = np.zeros(len(landmarks), dtype=bool)
    if finite.any():
        inside[finite] = image.contains_ras(landmarks.xyz_mm_ras[finite])
    return landmarks.with_found(landmarks.found & inside)


# --- registry --------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[[], type[Detector]]] = {}
#: detectors built from trained models (``consensus``), not trained themselves: loadable, not in detector_names()
_BUILT: set[str] = set()


def register(name: str, loader: Callable[[], type[Detector]], trainable: bool = True) -> None:
    """Register a detector class lazily (``loader`` imports it), so the CLI starts fast."""
    _REGISTRY[name] = loader
    if not trainable:
        _BUILT.add(name)


def detector_names() -> list[str]:
    """The detectors that can be trained (``lmk3d train --detector``)."""
    return [n for n in _REGISTRY if n not in _BUILT]


def detector_class(name: str) -> type[Detector]:
    if name not in _REGISTRY:
        raise LandmarkError(f"unknown detector {name!r}; choose one of {', '.join(detector_names())}")
    return _REGISTRY[name]()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_detector(directory: str | os.PathLike[str], device: str | None = None) -> Detector:
    """Load a model folder (or a ``checkpoint.pt`` path) onto ``device`` (default: CUDA if present).

    The file is read weights-only (:func:`lmk3d.checkpoint.read_checkpoint`): a checkpoint holding
    anything but tensors and plain data is refused, never executed.
    """
    dev = device or default_device()
    payload = read_checkpoint(directory, dev)
    det = detector_class(payload["detector"]).from_checkpoint(payload, dev)
    from lmk3d.trust import load_trust

    det.trust = load_trust(directory)
    if det.trust is not None and det.trust.landmark_names != det.landmark_names:
        raise CheckpointError(f"{directory}: trust.json is for landmarks {', '.join(det.trust.landmark_names)}, "
                              f"the checkpoint has {', '.join(det.landmark_names)}")
    return det
