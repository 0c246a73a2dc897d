"""One detector as a MONAI Label model: :class:`LandmarkModelConfig`, and finding the configs.

The config modules live in ``lib/configs`` (one per detector, found by :func:`discover_configs`);
this module holds what they are made of. A config module is a few lines naming its detector, e.g.
``lib/configs/pin.py``::

    from lib.configs import LandmarkModelConfig

    CONFIG = LandmarkModelConfig(detector="pin", description="Patch-based iterative network")

The module name, the detector slug, the MONAI Label model name and the model folder
``models/<detector>-<dataset>/`` all use the same slug. A model is served only when its checkpoint
exists and loads (:meth:`LandmarkModelConfig.load`); otherwise the app logs why and leaves it out.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from lmk3d.detectors import Detector, load_detector
from lmk3d.detectors.base import CHECKPOINT_FILE
from lmk3d.errors import LandmarkError

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
    """

    detector: str
    description: str = ""
    landmark_output: str = DEFAULT_LANDMARK_OUTPUT

    @property
    def name(self) -> str:
        return self.detector

    def model_dir(self, models_dir: Path, dataset: str) -> Path:
        """``models/<detector>-<dataset>``: where this detector's checkpoint for ``dataset`` lives."""
        return Path(models_dir) / f"{self.detector}-{dataset}"

    def load(self, models_dir: Path, dataset: str, device: str | None = None) -> LoadedModel:
        """Load the trained detector for ``dataset``.

        Raises:
            LandmarkError: no checkpoint (never a silent fallback to random weights), or one that
                cannot be read or belongs to another detector.
        """
        folder = self.model_dir(models_dir, dataset)
        ckpt = folder / CHECKPOINT_FILE
        if not ckpt.is_file():
            raise LandmarkError(
                f"no checkpoint at {ckpt}; train one with `lmk3d train --detector {self.detector} "
                f"--profile cpu --data SPEC --out {folder}`, or serve another dataset (--conf dataset NAME)")
        detector = load_detector(folder, device)
        if detector.name != self.detector:
            raise LandmarkError(f"{ckpt} holds a {detector.name!r} detector, not {self.detector!r}")
        return LoadedModel(self, detector, folder)


@dataclass
class LoadedModel:
    """A config with its trained detector, ready to be wrapped in an infer task."""

    config: LandmarkModelConfig
    detector: Detector
    model_dir: Path


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
