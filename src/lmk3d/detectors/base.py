"""The detector contract (../shared/DETECTOR_CONTRACT.md): ``Detector``, ``Stage``, checkpoints, registry.

A detector is a list of stages; each stage takes the (preprocessed) image and the previous stage's
``LandmarkSet`` and returns a new one. ``Detector.predict`` runs them in order, timing each, and
returns world-mm RAS landmarks in the frame of the *original* image.

Checkpoints are one self-describing file, ``checkpoint.pt`` in a model folder::

    {"detector": "cascade", "version": "0.1.0", "profile": "cpu", "config": {...resolved...},
     "landmark_names": [...], "state_dicts": {"stage1": {...}, ...}, "fitted": {...}}

``load_detector(dir)`` reads the detector name from the file and builds the right class through the
registry, with the same network-building code used for training.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lmk3d.data.samples import Sample
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class StageResult:
    """One stage's output and how long it took."""

    name: str
    landmarks: LandmarkSet
    seconds: float


@dataclass
class Prediction:
    """``predict``'s full answer: the final landmarks plus every stage's result."""

    landmarks: LandmarkSet
    stages: list[StageResult] = field(default_factory=list)

    @property
    def latencies(self) -> dict[str, float]:
        return {s.name: s.seconds for s in self.stages}


class Stage(abc.ABC):
    """One step of a detector chain."""

    name: str = "stage"

    @abc.abstractmethod
    def __call__(self, image: Volume, previous: LandmarkSet | None) -> LandmarkSet:
        """Return landmarks (world RAS mm, frame of ``image``) given the previous stage's."""


class Detector(abc.ABC):
    """Base class of every detector.

    Subclasses set ``name``, ``config_class`` (a frozen dataclass) and ``profiles`` (profile name ->
    config instance: ``paper``, ``cpu``, ``tiny``...), and implement the abstract methods.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    profiles: ClassVar[dict[str, Any]] = {}

    def __init__(self, landmark_names: Sequence[str], config: Any, profile: str = "custom") -> None:
        self.landmark_names = tuple(landmark_names)
        self.config = config
        self.profile = profile

    @classmethod
    def create(cls, landmark_names: Sequence[str], profile: str = "cpu", **overrides: Any) -> Detector:
        """A new, untrained detector from a named profile, with optional config overrides."""
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
            config = dataclasses.replace(config, **overrides)
        return cls(landmark_names, config, profile if not overrides else f"{profile}+overrides")

    # --- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def stages(self) -> list[Stage]:
        """The inference chain, in order."""

    @abc.abstractmethod
    def fit(
        self,
        train: Sequence[Sample],
        val: Sequence[Sample] | None = None,
        *,
        seed: int = 0,
        max_minutes: float | None = None,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Train (seeded, resumable where the detector supports it, within ``max_minutes``).

        Returns a JSON-able training report (epochs, losses, best validation MRE in mm, seconds...).
        """

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(state_dicts, fitted)`` to store in the checkpoint; detectors with networks override."""
        return {}, {}

    def load_state(self, state_dicts: dict[str, Any], fitted: dict[str, Any], device: str) -> None:  # noqa: B027
        """Restore what :meth:`state` returned (nothing, for detectors without learned parts)."""

    # --- shared ---------------------------------------------------------------------------------
    def prepare(self, image: Volume) -> Any:
        """Preprocess ``image`` now, for the stages of the next :meth:`predict_all` on it to share.

        Detectors whose stages share one preprocessing (``cascade``, ``prior_guided``) override it, so
        callers (benchmarks, servers) can time or overlap it; the default does nothing and returns None.
        """
        return None

    def predict_all(self, image: Volume) -> Prediction:
        """Run every stage; keep each stage's landmarks and latency."""
        previous: LandmarkSet | None = None
        results = []
        for stage in self.stages():
            t0 = time.perf_counter()
            previous = stage(image, previous)
            results.append(StageResult(stage.name, previous, time.perf_counter() - t0))
        if previous is None:
            raise RuntimeError(f"detector {self.name!r} has no stages")
        return Prediction(mark_outside(previous, image), results)

    def predict(self, image: Volume) -> LandmarkSet:
        return self.predict_all(image).landmarks

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``checkpoint.pt`` atomically (temporary file, then rename)."""
        import torch

        from lmk3d import __version__

        state_dicts, fitted = self.state()
        is_config = dataclasses.is_dataclass(self.config) and not isinstance(self.config, type)
        cfg = dataclasses.asdict(self.config) if is_config else dict(self.config or {})
        payload = {
            "detector": self.name,
            "version": __version__,
            "profile": self.profile,
            "config": cfg,
            "landmark_names": list(self.landmark_names),
            "state_dicts": state_dicts,
            "fitted": fitted,
        }
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, d / CHECKPOINT_FILE)
        return d / CHECKPOINT_FILE

    @staticmethod
    def upgrade_config(cfg: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's config with the fields added since it was written set to what it was trained with.

        Without this, a field added later would take today's default and misdescribe the older model.
        """
        return cfg

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], device: str) -> Detector:
        """Build from a loaded checkpoint dict, with the same network-building code as training."""
        cfg = payload["config"]
        if cls.config_class is not None:
            cfg = cls.config_class(**cls.upgrade_config(dict(cfg)))
        det = cls(payload["landmark_names"], cfg, payload.get("profile", "custom"))
        det.load_state(payload["state_dicts"], payload["fitted"], device)
        return det


def freeze_sequences(config: Any, names: Sequence[str]) -> None:
    """Turn the named fields of a frozen config back into tuples (checkpoints and JSON hand back lists).

    Keeps the config hashable and comparable; a scalar becomes a 1-tuple. Call from ``__post_init__``.
    """
    for name in names:
        value = getattr(config, name)
        object.__setattr__(config, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))


def mark_outside(landmarks: LandmarkSet, image: Volume) -> LandmarkSet:
    """Mark landmarks outside the image's field of view as not found (the contract's rule)."""
    finite = np.isfinite(landmarks.xyz_mm_ras).all(axis=1)
    inside = np.zeros(len(landmarks), dtype=bool)
    if finite.any():
        inside[finite] = image.contains_ras(landmarks.xyz_mm_ras[finite])
    return landmarks.with_found(landmarks.found & inside)


# --- registry --------------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[[], type[Detector]]] = {}


def register(name: str, loader: Callable[[], type[Detector]]) -> None:
    """Register a detector class lazily (``loader`` imports it), so the CLI starts fast."""
    _REGISTRY[name] = loader


def detector_names() -> list[str]:
    return list(_REGISTRY)


def detector_class(name: str) -> type[Detector]:
    if name not in _REGISTRY:
        raise LandmarkError(f"unknown detector {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_detector(directory: str | os.PathLike[str], device: str | None = None) -> Detector:
    """Load a model folder (or a ``checkpoint.pt`` path) onto ``device`` (default: CUDA if present)."""
    import torch

    p = Path(directory)
    ckpt = p / CHECKPOINT_FILE if p.is_dir() else p
    if not ckpt.is_file():
        raise LandmarkError(f"{p}: no {CHECKPOINT_FILE}; this model has not been trained or was not shipped")
    dev = device or default_device()
    try:
        payload = torch.load(ckpt, map_location=dev, weights_only=False)
    except Exception as e:
        raise LandmarkError(f"{ckpt}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "detector" not in payload:
        raise LandmarkError(f"{ckpt}: not an lmk3d checkpoint (no 'detector' entry)")
    return detector_class(payload["detector"]).from_checkpoint(payload, dev)
