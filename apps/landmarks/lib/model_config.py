"""One detector as a MONAI Label model: :class:`LandmarkModelConfig`, and finding the configs.

The config modules live in ``lib/configs`` (one per detector, found by :func:`discover_configs`);
this module holds what they are made of. A config module is a few lines naming its detector, e.g.
``lib/configs/pin.py``::

    from lib.configs import LandmarkModelConfig

    CONFIG = LandmarkModelConfig(detector="pin", description="Patch-based iterative network")

The module name, the detector slug, the MONAI Label model name and the model folder
``models/<detector>-<dataset>/`` all use the same slug. A model is served only when its checkpoint
exists and loads (:meth:`LandmarkModelConfig.load`); otherwise the app logs why and leaves it out.
The served checkpoint is the model's current version in the registry (:mod:`lmk3d.registry`, in the
server's workspace), or the shipped one in ``models/`` until a first version is published.

A model the user declares (``lmk3d serve --new-model NAME=DETECTOR``) is the same config under its own
name (:meth:`LandmarkModelConfig.declared`): it has no shipped checkpoint, and until its first
training it is a :class:`DeclaredModel` (a record, no detector); once the registry has a version for
it, :meth:`LandmarkModelConfig.load_declared` loads it like any other model. Its served version may
hold its own detector or the ``mean_shape`` baseline that gave it a first version
(:attr:`lmk3d.registry.ModelRecord.detectors`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from lmk3d.detectors import Detector, load_detector
from lmk3d.detectors.base import CHECKPOINT_FILE
from lmk3d.errors import LandmarkError
from lmk3d.registry import ModelRecord, Registry

logger = logging.getLogger(__name__)

#: The result files an infer task can write (see ``lib/infers``): a sphere label map or a Slicer point list.
LANDMARK_OUTPUTS = ("label", "markups")
#: ``label``: the one result every stock client shows (OHIF cannot show points) and that Slicer's
#: "Submit Label" sends back unchanged, so detect -> correct -> submit -> retrain works out of the box.
DEFAULT_LANDMARK_OUTPUT = "label"
#: The package holding one config module per detector.
CONFIGS_PACKAGE = "lib.configs"


@dataclass(frozen=True)
class LandmarkModelConfig:
    """One detector as a MONAI Label model.

    Attributes:
        detector: the detector slug (``prior_guided``, ``pin``, ``cascade``); also the model name.
        description: one line shown to clients in ``/info/``.
        landmark_output: the default result file, ``label`` or ``markups`` (a request may ask for either).
        model: the model name when it is not the detector's: a model the user declared (see :meth:`declared`).
    """

    detector: str
    description: str = ""
    landmark_output: str = DEFAULT_LANDMARK_OUTPUT
    model: str = ""

    @property
    def name(self) -> str:
        return self.model or self.detector

    @property
    def is_declared(self) -> bool:
        """Whether this is a model the user declared (no shipped checkpoint; landmarks from the user's labels)."""
        return bool(self.model)

    def declared(self, name: str) -> LandmarkModelConfig:
        """This detector as the user's own model ``name`` (``lmk3d serve --new-model NAME=DETECTOR``)."""
        return dataclasses.replace(self, model=name, description=(
            f"{name}: your own landmarks, detected by {self.detector} (the mean_shape baseline until {self.detector} "
            "has trained and passed the gate)"))

    def model_dir(self, models_dir: Path, dataset: str) -> Path:
        """``models/<detector>-<dataset>``: where this detector's checkpoint for ``dataset`` lives."""
        return Path(models_dir) / f"{self.detector}-{dataset}"

    def load(self, registry: Registry, models_dir: Path, dataset: str, device: str | None = None) -> LoadedModel:
        """Load the served version of this model: the registry's current one, else the shipped checkpoint.

        The model's registry record is created on first use, based on the shipped folder
        ``models/<detector>-<dataset>`` when it has a checkpoint (read only, never written).

        Raises:
            LandmarkError: no version and no shipped checkpoint (never a silent fallback to random
                weights), a checkpoint that cannot be read or belongs to another detector, or a
                workspace whose record of this model is based on another shipped folder.
        """
        shipped = self.model_dir(models_dir, dataset)
        has_shipped = (shipped / CHECKPOINT_FILE).is_file()
        if not has_shipped and self.name not in registry.names():
            raise LandmarkError(
                f"no checkpoint at {shipped / CHECKPOINT_FILE}; train one with `lmk3d train --detector "
                f"{self.detector} --profile cpu --data SPEC --out {shipped}`, or serve another dataset (--conf "
                "dataset NAME)")
        record = registry.ensure(self.name, self.detector, shipped=shipped.resolve() if has_shipped else None)
        if has_shipped and record.shipped is not None and Path(record.shipped).resolve() != shipped.resolve():
            raise LandmarkError(f"the workspace {registry.root} keeps model {self.name!r} based on {record.shipped}, "
                                f"not {shipped}; serve that dataset, or give another --workspace")
        if record.current_dir() is None:
            raise LandmarkError(
                f"no checkpoint at {shipped / CHECKPOINT_FILE} and no trained version in {record.root}; train one "
                f"with `lmk3d train --detector {self.detector} --profile cpu --data SPEC --out {shipped}`, or "
                "serve another dataset (--conf dataset NAME)")
        return self._load_current(record, device)

    def declare(self, registry: Registry) -> DeclaredModel:
        """The registry record of this declared model, created (no shipped folder, no names yet) if missing.

        Raises:
            RegistryError: the workspace keeps a model of that name with another detector.
        """
        return DeclaredModel(self, registry.ensure(self.name, self.detector, shipped=None))

    def load_declared(self, record: ModelRecord, device: str | None = None) -> LoadedModel:
        """Load the served version of this declared model (see :meth:`declare`).

        Raises:
            LandmarkError: it has no version yet, or its checkpoint cannot be read or holds another detector.
        """
        if record.current_dir() is None:
            raise LandmarkError(f"model {self.name!r} is not trained yet")
        return self._load_current(record, device)

    def _load_current(self, record: ModelRecord, device: str | None) -> LoadedModel:
        folder = record.current_dir()
        assert folder is not None
        detector = load_detector(folder, device)
        if detector.name not in record.detectors:
            raise LandmarkError(f"{folder / CHECKPOINT_FILE} holds a {detector.name!r} detector, not "
                                f"{' or '.join(map(repr, record.detectors))}")
        if record.landmark_names is None:
            record.set_landmark_names(detector.landmark_names)
        return LoadedModel(self, detector, record)


@dataclass
class LoadedModel:
    """A config with its trained detector and its registry record, ready to be wrapped in tasks."""

    config: LandmarkModelConfig
    detector: Detector
    record: ModelRecord

    @property
    def model_dir(self) -> Path:
        """The folder of the served checkpoint (a registry version, or the shipped folder)."""
        folder = self.record.current_dir()
        if folder is None:
            raise LandmarkError(f"model {self.config.name!r} has no served version")
        return Path(folder)


@dataclass
class DeclaredModel:
    """A model the user declared that has no version yet: its config and registry record, no detector.

    Its landmark names are ``record.landmark_names``: None until its first training fixes them from the
    final labels.
    """

    config: LandmarkModelConfig
    record: ModelRecord


def discover_configs(package: str = CONFIGS_PACKAGE) -> dict[str, LandmarkModelConfig]:
    """Import every module of ``package`` (``lib.configs``) and collect its ``CONFIG``, keyed by model name.

    A module whose ``CONFIG`` is missing, of the wrong type, or named unlike its module is skipped
    with an error in the log (the module name must equal the detector slug).
    """
    configs: dict[str, LandmarkModelConfig] = {}
    path = importlib.import_module(package).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        cfg = getattr(module, "CONFIG", None)
        if not isinstance(cfg, LandmarkModelConfig):
            logger.error("lib/configs/%s.py: no CONFIG = LandmarkModelConfig(...); skipped", info.name)
            continue
        if cfg.detector != info.name:
            logger.error("lib/configs/%s.py declares detector %r; the module must be named after its "
                         "detector (%s.py); skipped", info.name, cfg.detector, cfg.detector)
            continue
        configs[cfg.name] = cfg
    return configs
