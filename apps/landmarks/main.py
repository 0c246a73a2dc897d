"""The lmk3d landmarks app for MONAI Label: one model per detector (``prior_guided``, ``pin``, ``cascade``).

Start it with ``lmk3d serve --studies DIR_OR_DICOMWEB_URL`` (or ``make demo``). App settings, given as
``--conf KEY VALUE``:

- ``models``: folder of ``<detector>-<dataset>/checkpoint.pt`` (default: this checkout's ``models/``);
- ``dataset``: which trained models to serve (default ``hippocampus``);
- ``device``: ``cpu`` or ``cuda`` (default: CUDA when present).

Each module in ``lib/configs`` declares one detector and is found automatically. A detector whose
checkpoint is missing or unreadable is not served: the log says why and how to make one, and
``/info/`` lists it under ``unavailable_models``. The app never serves random weights and never
downloads anything (no weights, no SAM2, no dcmqi).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from lib.configs import LandmarkModelConfig, LoadedModel, discover_configs
from lib.infers import make_infer_task
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import lmk3d
from lmk3d.errors import LandmarkError

logger = logging.getLogger(__name__)


class LandmarksApp(MONAILabelApp):
    """MONAI Label app serving the trained lmk3d detectors found in ``models/``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.models_dir = Path(conf.get("models") or Path(app_dir).resolve().parents[1] / "models")
        self.dataset = conf.get("dataset") or "hippocampus"
        self.device = conf.get("device") or None
        self.configs: dict[str, LandmarkModelConfig] = discover_configs()
        self.models: dict[str, LoadedModel] = {}
        self.unavailable: dict[str, str] = {}
        logger.info("lmk3d %s: detectors %s; dataset %r; models from %s", lmk3d.__version__,
                    ", ".join(self.configs) or "(none)", self.dataset, self.models_dir)
        for name, cfg in self.configs.items():
            try:
                self.models[name] = cfg.load(self.models_dir, self.dataset, self.device)
            except LandmarkError as e:
                self._unavailable(name, str(e))
            except Exception as e:  # a broken checkpoint must not take the other models down
                logger.exception("model %r: loading failed", name)
                self._unavailable(name, f"loading failed ({type(e).__name__}: {e})")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="lmk3d landmarks",
            description="3D anatomical landmark detection: prior_guided, pin and cascade detectors",
            version=lmk3d.__version__,
        )

    def _unavailable(self, name: str, reason: str) -> None:
        self.unavailable[name] = reason
        logger.warning("model %r unavailable: %s", name, reason)

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, model in self.models.items():
            task = make_infer_task(model)
            if task is None:
                self._unavailable(name, f"checkpoint {model.model_dir} loaded, but this app version has no "
                                        "infer task for it yet")
                continue
            infers[name] = task
        return infers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def info(self) -> dict[str, Any]:
        meta: dict[str, Any] = super().info()
        meta["unavailable_models"] = dict(self.unavailable)
        return meta

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label downloads dcmqi when a DICOMweb datastore starts; this server must start
        # offline, so it only reports whether the tool is there.
        tool = "itkimage2segimage"
        if shutil.which(tool) or (Path(self.app_dir) / "bin" / tool).exists():
            return
        logger.warning("dcmqi's %s is not on PATH: labels cannot be stored to DICOMweb as DICOM SEG; put "
                       "dcmqi's bin folder on PATH to enable it (nothing is downloaded)", tool)
