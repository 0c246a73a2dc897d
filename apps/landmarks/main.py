"""The lmk3d landmarks app for MONAI Label: one model per detector (``prior_guided``, ``pin``, ``cascade``).

Start it with ``lmk3d serve --studies DIR_OR_DICOMWEB_URL`` (or ``make demo``). App settings, given as
``--conf KEY VALUE``:

- ``models``: folder of ``<detector>-<dataset>/checkpoint.pt`` (default: this checkout's ``models/``);
- ``dataset``: which trained models to serve (default ``hippocampus``);
- ``device``: ``cpu`` or ``cuda`` (default: CUDA when present);
- ``workspace``: the model registry's folder, where every trained or uploaded version is kept
  (default: :func:`lmk3d.registry.default_workspace`; never the repository's ``models/``, which is
  only read);
- ``landmark_output``: the infer tasks' default result file, ``label`` (a sphere label map, the
  default) or ``markups`` (a Slicer point list); each request may still ask for either;
- ``new_models``: models of the user's own landmarks, ``NAME=DETECTOR,NAME2=DETECTOR2`` (``lmk3d serve
  --new-model NAME=DETECTOR``), see below.

**Declared models.** A model in ``new_models`` gets a registry record with no shipped checkpoint and
no landmark names. Until it has a version it is listed in ``/info/`` under ``untrained_models`` (why,
and how to train it), has a train task (``POST /train/NAME``: :mod:`lib.trainers.task` fixes its
landmark names from the final labels, publishes the ``mean_shape`` baseline as its first version,
then trains its detector) and answers inference with 409 "not trained yet". The datastore accepts
labels with new landmark names while such a model has no names (:mod:`lib.label_names`). As soon as
its record has a served version (the training child published one) the server serves it, with no
restart: :meth:`LandmarksApp.serve_trained` runs on every ``/info/``, inference, train and model
request. After a restart a declared model with a version is served like any other (declare it again
with the same ``--new-model``).

Each module in ``lib/configs`` declares one detector and is found automatically. A detector whose
checkpoint is missing or unreadable is not served: the log says why and how to make one, and
``/info/`` lists it under ``unavailable_models``. The app never serves random weights and never
downloads anything (no weights, no SAM2, no dcmqi: ``lmk3d serve`` puts the venv's ``bin`` with
dcmqi from PyPI on ``PATH``).

Each served model gets the shared infer task (``lib/infers``) and train task (``lib/trainers``); the
``least_confident`` strategy (``lib/activelearning``) joins MONAI Label's ``random`` and ``first``.
The library does the work (reading images and labels, label maps, splitting, scoring, publishing);
``lib`` holds MONAI Label adapters only, and ``lib/request_check`` is the one shim on MONAI Label.
Bad input is answered with a 4xx and a message, never a bare 500 (``lib/errors``): an unknown model,
image or strategy (404), an unreadable image, label or option (422), training with no final label
(409). A local studies folder is a :class:`lib.datastore.LandmarkDatastore`, which checks each
label before storing it; a DICOMweb URL is a :class:`lib.dicomweb.LandmarkDICOMwebDatastore` (image
series from the PACS, ``store_sr`` infer option, final labels stored to the PACS as DICOM SR; the PACS's
refusals are 502 and an unreachable PACS 503; see docs/pacs.md).

The HTTP layer in front of the app is ``lib/server.py`` (roles, allowed origins, checked ids, upload
size, inference off the event loop; docs/security.md). The app resolves an image only through its
datastore, replaces a model only after :mod:`lib.model_files` has checked the upload, and at start
removes what a killed server left in the model folders (staging folders, a RUNNING training status).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from dicomweb_client.session_utils import create_session_from_user_pass
from lib.activelearning import LeastConfident
from lib.configs import LANDMARK_OUTPUTS, DeclaredModel, LandmarkModelConfig, LoadedModel, discover_configs
from lib.datastore import LandmarkDatastore
from lib.dicomweb import LandmarkDICOMwebDatastore
from lib.errors import BAD_REQUEST, CONFLICT, NOT_FOUND, UNPROCESSABLE, http_error, unknown_image
from lib.infers import LandmarkInferTask, make_infer_task
from lib.label_names import LabelNames
from lib.model_files import replace_checkpoint, rollback
from lib.request_check import install_request_check
from lib.scores import SCORES_FILE, ScoreCache
from lib.trainers import LandmarkTrainTask
from lib.trainers.task import is_training_child, reset_stale_status
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import lmk3d
from lmk3d.detectors import detector_names
from lmk3d.errors import LandmarkError
from lmk3d.publish import remove_stale_staging
from lmk3d.registry import ModelRecord, Registry, default_workspace
from lmk3d.safe_names import plain_name_problem
from lmk3d.serve import NEW_MODELS_CONF, parse_new_models

logger = logging.getLogger(__name__)

#: What MONAI Label and its clients put in a train request besides the train task's options.
TRAIN_REQUEST_KEYS = frozenset({"model", "gpus", "multi_gpu", "name"})
#: Attempts of one DICOMweb request, and the wait before the second (ms). The client library's default (5
#: attempts, waits of 2, 4, 8 and 16 s) retries a refused connection too: a PACS that is down kept an inference
#: waiting 90 s and ``/info/`` 60 s before their 503 (docs/pacs.md). One retry after a second still rides out a
#: PACS that restarts or answers 429/503 once.
PACS_ATTEMPTS = 2
PACS_RETRY_WAIT_MS = 500


class LandmarksApp(MONAILabelApp):
    """MONAI Label app serving the trained lmk3d detectors found in ``models/``, and the declared models."""

    # MONAI Label's, typed here: serve_trained replaces them with larger dicts.
    _infers: dict[str, InferTask]
    _trainers: dict[str, TrainTask]
    _strategies: dict[str, Strategy]

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = dict(conf or {})
        self.models_dir = Path(conf.get("models") or Path(app_dir).resolve().parents[1] / "models")
        self.dataset = conf.get("dataset") or "hippocampus"
        self.device = conf.get("device") or None
        self.landmark_output = conf.get("landmark_output") or None
        if self.landmark_output not in (None, *LANDMARK_OUTPUTS):
            raise LandmarkError(f"--conf landmark_output {self.landmark_output!r}: choose one of "
                                f"{', '.join(LANDMARK_OUTPUTS)}")
        self._model_lock = threading.Lock()
        self.configs: dict[str, LandmarkModelConfig] = discover_configs()
        self.models: dict[str, LoadedModel] = {}
        self.unavailable: dict[str, str] = {}
        #: Declared models with no version yet; replaced (never changed in place) as they get one.
        self.untrained: dict[str, DeclaredModel] = {}
        self._declared_lock = threading.Lock()
        self._unloadable: dict[str, str | None] = {}  # declared model -> the version that failed to load
        logger.info("lmk3d %s: detectors %s; dataset %r; models from %s", lmk3d.__version__,
                    ", ".join(self.configs) or "(none)", self.dataset, self.models_dir)
        workspace = Path(conf.get("workspace") or default_workspace(studies)).resolve()
        if workspace == self.models_dir.resolve() or self.models_dir.resolve() in workspace.parents:
            raise LandmarkError(f"--conf workspace {workspace}: inside the models folder {self.models_dir}, which "
                                "holds the shipped models and is never written; choose a folder elsewhere")
        self.registry = Registry(workspace)
        self.scores = ScoreCache(workspace / SCORES_FILE)  # least_confident ranks by known scores after a restart
        logger.info("model registry (every trained version): %s", self.registry.root)
        for name, cfg in self.configs.items():
            self._clean_after_kill(self.registry.root / name)
            try:
                self.models[name] = cfg.load(self.registry, self.models_dir, self.dataset, self.device)
            except LandmarkError as e:
                self._unavailable(name, str(e))
            except Exception as e:  # a broken checkpoint must not take the other models down
                logger.exception("model %r: loading failed", name)
                self._unavailable(name, f"loading failed ({type(e).__name__}: {e})")
        self._declare(conf.get(NEW_MODELS_CONF) or "")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="lmk3d landmarks",
            description="3D anatomical landmark detection: prior_guided, pin and cascade detectors",
            version=lmk3d.__version__,
        )
        install_request_check(self._check_request)

    def _declare(self, value: str) -> None:
        """Create the records of the declared models (``--conf new_models NAME=DETECTOR,...``); load those trained.

        Raises:
            LandmarkError: a bad declaration (the message says what is accepted), or a workspace that keeps
                a model of that name with another detector.
        """
        items = [item for item in value.split(",") if item.strip()]
        detectors = [d for d in self.configs if d in detector_names()]
        for name, detector in parse_new_models(items, detectors, f"--conf {NEW_MODELS_CONF}").items():
            self._clean_after_kill(self.registry.root / name)
            declared = self.configs[detector].declared(name).declare(self.registry)
            if declared.record.current() is None:
                self.untrained[name] = declared
                logger.info("model %r (%s): declared, not trained yet; its landmark names come from the final "
                            "labels: save some, then POST /train/%s", name, detector, name)
                continue
            try:
                self.models[name] = declared.config.load_declared(declared.record, self.device)
            except Exception as e:  # a broken version must not take the other models down
                logger.exception("model %r: loading failed", name)
                self._unavailable(name, f"loading failed ({type(e).__name__}: {e})")

    @staticmethod
    def _clean_after_kill(model_dir: Path) -> None:
        """What a killed server or training left in a model's registry folder: staging folders, a RUNNING status.

        Only the server does this: MONAI Label's training child builds the app too, and must not mark its
        own run as interrupted. Each removal is logged where it happens.
        """
        if is_training_child():
            return
        remove_stale_staging(model_dir)
        reset_stale_status(model_dir)

    def on_init_complete(self) -> None:
        super().on_init_complete()
        # Score the unlabelled images in the background from the start, so least_confident answers at once.
        strategy = self._strategies.get("least_confident")
        if isinstance(strategy, LeastConfident):
            strategy.start(self.datastore())

    def _unavailable(self, name: str, reason: str) -> None:
        self.unavailable[name] = reason
        logger.warning("model %r unavailable: %s", name, reason)

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, model in self.models.items():
            task = make_infer_task(model, self.landmark_output, self.device, self.scores)
            if task is None:
                self._unavailable(name, f"checkpoint {model.model_dir} loaded, but this app version has no "
                                        "infer task for it yet")
                continue
            if isinstance(task, LandmarkInferTask) and isinstance(self._datastore, LandmarkDICOMwebDatastore):
                task.sr_store = self._datastore.store_sr
            infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        # A served model is fine-tuned from its checkpoint; a declared one is trained from its labels.
        trainers: dict[str, TrainTask] = {name: self._train_task(self.models[name]) for name in self._infers
                                          if self.models[name].config.detector in detector_names()}
        trainers.update((name, self._train_task(model)) for name, model in self.untrained.items())
        return trainers

    def _train_task(self, model: LoadedModel | DeclaredModel) -> LandmarkTrainTask:
        name = model.config.name
        return LandmarkTrainTask(model, self.device, lambda: self._names_of_others(name))

    def _names_of_others(self, name: str) -> frozenset[str]:
        """The landmark names of every model but ``name`` (served, or declared with names)."""
        names: set[str] = set()
        for other, record in self._records().items():
            if other != name:
                names.update(record.landmark_names or ())
        return frozenset(names)

    def _records(self) -> dict[str, ModelRecord]:
        """Every served or declared model's registry record, by name."""
        return {**{n: m.record for n, m in self.models.items()}, **{n: d.record for n, d in self.untrained.items()}}

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        tasks = {k: v for k, v in self._infers.items() if isinstance(v, LandmarkInferTask)}
        if tasks:
            strategies["least_confident"] = LeastConfident(tasks)
        return strategies

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return self._init_pacs_datastore()
        return LandmarkDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            landmark_names=self.label_names,
        )

    def _init_pacs_datastore(self) -> LandmarkDICOMwebDatastore:
        """The DICOMweb datastore (``lib/dicomweb``), with MONAI Label's client settings."""
        self.studies: str = str(self.studies).rstrip("/").strip()
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=self.studies, session=session,
                                 qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        # the wait before attempt k + 1 is PACS_RETRY_WAIT_MS * 2^k ms: one second
        client.set_http_retry_params(retry=True, max_attempts=PACS_ATTEMPTS,
                                     wait_exponential_multiplier=PACS_RETRY_WAIT_MS)
        self._download_dcmqi_tools()
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        logger.info("DICOMweb studies %s (%s); series listing cached for %s s", self.studies,
                    "with credentials" if session else "no credentials", settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY)
        return LandmarkDICOMwebDatastore(client, dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER), cache_path,
                                         settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY, self.label_names)

    def landmark_names(self) -> tuple[str, ...]:
        """The served models' landmark names (value k+1 of a sphere label map = name k)."""
        for model in self.models.values():
            return tuple(model.detector.landmark_names)
        return ()

    def label_names(self) -> LabelNames:
        """What landmark names a saved label may carry now (:mod:`lib.label_names`)."""
        self.serve_trained()
        default = self.landmark_names()
        known: set[str] = set(default)
        open_models = []
        for name, record in self._records().items():
            names = record.landmark_names
            if names is None:
                open_models.append(name)
            else:
                known.update(names)
                default = default or tuple(names)
        return LabelNames(default=default, known=frozenset(known), open_models=tuple(open_models))

    # --- declared models: served as soon as they have a version ------------------------------------------
    def serve_trained(self) -> list[str]:
        """Serve each declared model whose record has got a served version since (its training published one).

        Builds its infer and train tasks and adds them to the app's (new dicts, swapped in, so a request
        reading the old ones is unaffected); once per model, under a lock. A version that cannot be loaded
        leaves the model untrained, with the reason in the log and in ``/info/``.

        Returns:
            The models served from now on.
        """
        def ready(name: str, declared: DeclaredModel) -> bool:
            current = declared.record.current()
            return current is not None and self._unloadable.get(name) != current

        if not any(ready(n, d) for n, d in self.untrained.items()):
            return []
        served = []
        with self._declared_lock:
            for name, declared in list(self.untrained.items()):
                if not ready(name, declared):
                    continue
                try:
                    model = declared.config.load_declared(declared.record, self.device)
                    task = make_infer_task(model, self.landmark_output, self.device, self.scores)
                    if not isinstance(task, LandmarkInferTask):
                        raise LandmarkError("this app version has no infer task for it")
                except Exception as e:
                    version = declared.record.current()
                    logger.exception("model %r: its version %s cannot be served", name, version)
                    self._unloadable[name] = version
                    self._unavailable(name, f"its version {version} cannot be loaded ({type(e).__name__}: {e})")
                    continue
                if isinstance(self._datastore, LandmarkDICOMwebDatastore):
                    task.sr_store = self._datastore.store_sr
                self.unavailable.pop(name, None)
                self.models = {**self.models, name: model}
                self._infers = {**self._infers, name: task}
                self._trainers = {**self._trainers, name: self._train_task(model)}
                self.untrained = {n: d for n, d in self.untrained.items() if n != name}
                self._add_to_strategies(name, task)
                served.append(name)
                logger.info("model %r: trained, now served: version %s (%s, landmarks %s)", name,
                            model.record.current(), model.detector.name, ", ".join(model.detector.landmark_names))
        return served

    def _add_to_strategies(self, name: str, task: LandmarkInferTask) -> None:
        strategy = self._strategies.get("least_confident")
        if isinstance(strategy, LeastConfident):
            strategy.add_task(name, task)
            return
        if "least_confident" in self._strategies or is_training_child():
            return
        strategy = LeastConfident({name: task})
        self._strategies = {**self._strategies, "least_confident": strategy}
        strategy.start(self.datastore())

    def _not_trained(self, name: str) -> Exception:
        return http_error(CONFLICT, f"model {name} is not trained yet: save final labels (PUT "
                                    "/datastore/label?image=ID&tag=final with a .mrk.json or .fcsv point list "
                                    "naming your landmarks, or a sphere label map with label_info) and POST "
                                    f"/train/{name}")

    def untrained_json(self) -> dict[str, Any]:
        """``/info/``'s ``untrained_models``: each declared model with no version yet, why, and how to train it."""
        out = {}
        for name, declared in self.untrained.items():
            names = declared.record.landmark_names
            out[name] = {
                "detector": declared.config.detector,
                "landmark_names": list(names) if names is not None else None,
                "reason": "not trained yet: it has no version",
                "how_to_train": (f"save final labels naming your landmarks (PUT /datastore/label?image=ID&tag=final "
                                 "with a .mrk.json or .fcsv point list, or a sphere label map with label_info), then "
                                 f"POST /train/{name}: the mean_shape baseline is served within a minute, then "
                                 f"{declared.config.detector} if it is no worse on the validation cases"),
                "train_stats": self._trainers[name].stats() if name in self._trainers else {},
            }
        return out

    def info(self) -> dict[str, Any]:
        self.serve_trained()
        meta: dict[str, Any] = super().info()
        meta["unavailable_models"] = dict(self.unavailable)
        meta["untrained_models"] = self.untrained_json()
        meta["model_versions"] = {name: self.models_json(name, brief=True) for name in self._records()}
        return meta

    def models_json(self, name: str | None = None, brief: bool = False) -> dict[str, Any]:
        """The registry's record of one model (``GET /models/{name}``), or of every one (``GET /models/``).

        Declared models with no version yet are included (no versions, ``current`` null).
        """
        self.serve_trained()
        records = self._records()
        if name is None:
            return {n: self.models_json(n, brief=True) for n in records}
        if name not in records:
            raise self._unknown_model(name, records)
        record = records[name].to_json()
        if brief:
            versions = record.get("versions") or []
            return {"current": record.get("current"), "versions": len(versions),
                    "latest": versions[-1] if versions else None}
        return dict(record)

    def _unknown_model(self, model: Any, served: Any) -> Exception:
        reason = self.unavailable.get(model) if isinstance(model, str) else None
        if reason:
            return http_error(NOT_FOUND, f"model {model!r} is not served: {reason}")
        if isinstance(model, str) and model in self.untrained:
            return self._not_trained(model)
        return http_error(NOT_FOUND, f"unknown model {model!r}; served models: {', '.join(served) or '(none)'}")

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Run a model on a datastore image (``image`` is its id) or on an upload the server saved.

        ``uploaded_image`` is set only by the server's own infer endpoint (``lib.server``): the path of
        the client's uploaded file in the server's upload folder, or a session's image. Any other image
        is a datastore id, resolved by the datastore only (a path sent as an id is not an id: 400/404).
        """
        model = request.get("model")
        self.serve_trained()
        if model not in self._infers:
            raise self._unknown_model(model, self._infers)
        ds = datastore or self.datastore()
        uploaded = request.pop("uploaded_image", None)
        t_download = None
        if uploaded:
            request["image"] = uploaded
        else:
            image = request.get("image")
            if not isinstance(image, str) or not image:
                raise http_error(UNPROCESSABLE, "no image: give ?image=ID of a datastore image or upload a file")
            problem = plain_name_problem(image)
            if problem:
                raise http_error(BAD_REQUEST, f"image {image!r} refused: {problem}")
            t0 = time.perf_counter()
            uri = ds.get_image_uri(image)  # a DICOMweb series downloads here (404/422/502/503)
            if not uri or not os.path.exists(uri):
                raise unknown_image(image, len(ds.list_images()))
            if isinstance(ds, LandmarkDICOMwebDatastore):
                t_download = round(time.perf_counter() - t0, 4)
            request["image"] = uri
        result = dict(super().infer(request, datastore))
        latencies = (result.get("params") or {}).get("latencies")
        if t_download is not None and isinstance(latencies, dict):
            latencies["download"] = t_download
        return result

    # --- models: replace after a check, roll back -----------------------------------------------------
    def _served(self, name: str) -> LandmarkInferTask:
        self.serve_trained()
        task = self._infers.get(name)
        if not isinstance(task, LandmarkInferTask):
            raise self._unknown_model(name, self._infers)
        return task

    def replace_model(self, name: str, upload: str, force: bool = False) -> dict[str, Any]:
        """Add the uploaded checkpoint ``upload`` as a new version of ``name``, served if it passes the gate.

        The file is read weights-only (:mod:`lmk3d.checkpoint`: a pickle that would run code is refused,
        never run), must hold the served detector with the served landmark names, and must predict
        finite points on a probe image (:func:`lib.model_files.probe_volume`): else 422, nothing kept.
        Its trust model is fitted on the model's validation cases like a trained version's (with the
        other labelled cases as its training cases). It then becomes a registry version; it is served
        only if the gate finds it no worse than the served version on the model's validation cases
        (``force``: an admin's decision to serve it anyway, recorded as such), else it stays a candidate
        (409 saying why).
        """
        self._served(name)
        trainer = self._trainers.get(name)
        train, val = trainer.labelled_split(self.datastore()) if isinstance(trainer, LandmarkTrainTask) else ([], [])
        with self._model_lock:
            return replace_checkpoint(self.models[name], upload, self._probe(), val, force, train=train)

    def rollback_model(self, name: str) -> dict[str, Any]:
        """Serve the version before the current one again (``DELETE /model/{name}``, ``POST /models/{name}/rollback``).

        409 when there is nothing to roll back to.
        """
        self._served(name)
        with self._model_lock:
            return rollback(self.models[name])

    def _probe(self) -> str | None:
        """A local datastore image to probe an uploaded model with (None: a synthetic volume is used)."""
        ds = self.datastore()
        if not isinstance(ds, LandmarkDatastore):
            return None
        for image_id in sorted(ds.list_images()):
            uri = ds.get_image_uri(image_id)
            if uri and os.path.isfile(uri):
                return str(uri)
        return None

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise http_error(NOT_FOUND, f"unknown strategy {strategy!r}; choose one of {', '.join(self._strategies)}")
        return dict(super().next_sample(request))

    def _check_request(self, method: str, request: dict[str, Any]) -> None:
        """Refuse a bad background-task request with a 4xx before MONAI Label starts a process for it."""
        self.serve_trained()
        if method == "batch_infer":
            if request.get("model") not in self._infers:
                raise self._unknown_model(request.get("model"), self._infers)
            return
        if method == "scoring":
            name = request.get("method")
            if name not in self._scoring_methods:
                raise http_error(NOT_FOUND, f"unknown scoring method {name!r}; choose one of "
                                            f"{', '.join(self._scoring_methods) or '(none)'}")
            return
        if method != "train":
            return
        model = request.get("model")
        task = self._trainers.get(model) if isinstance(model, str) else None
        if task is None and model in self.models:
            raise http_error(CONFLICT, f"model {model!r} is built from trained models, not trained: it combines the "
                                       "shipped prior_guided, pin and cascade; train those instead (POST /train/"
                                       "prior_guided, ...)")
        if not isinstance(task, LandmarkTrainTask):
            raise self._unknown_model(model, self._trainers)
        unknown = sorted(set(request) - set(task.config()) - TRAIN_REQUEST_KEYS)
        if unknown:
            raise http_error(UNPROCESSABLE, f"unknown training option(s) {', '.join(map(repr, unknown))}; the "
                                            f"options are {', '.join(task.config())}")
        task.check(request, self.datastore())

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label downloads dcmqi when a DICOMweb datastore starts; this server must start
        # offline, so it only reports whether the tool is there.
        tool = "itkimage2segimage"
        if shutil.which(tool) or (Path(self.app_dir) / "bin" / tool).exists():
            return
        logger.warning("dcmqi's %s is not on PATH: labels cannot be stored to DICOMweb as DICOM SEG; put "
                       "dcmqi's bin folder on PATH to enable it (nothing is downloaded)", tool)
