"""Train tasks: one class, :class:`LandmarkTrainTask`, fine-tunes or retrains every detector from the final labels.

``POST /train/<model>`` with JSON options

- ``init``: ``current`` (default: fine-tune the served weights) or ``scratch`` (new weights, same
  detector and profile);
- ``max_minutes``: the time budget of ``Detector.fit`` (default 10);
- ``val_fraction``: share of the labelled images held out to measure the mean radial error (default
  0.2; with a single labelled image there is no hold-out and the error is measured on it);
- ``seed``: the split's and the training's seed (default 0).

MONAI Label runs the task in a child process (``python -m monailabel.interfaces.utils.app -m train``)
and shows the last 20 lines of its output in ``GET /train/``: this task prints one line per step (labels
read, split, error before, training, error after, published) and the detector's progress bar adds the
loss and validation error per epoch. ``GET /info/`` shows ``train_stats`` from ``app_train_stats.json``
in the model folder (``status``, ``phase``, ``val_mre_mm``, ``val_mre_mm_before``, ``best_metric`` =
the share of held-out landmarks within 4 mm, which is what Slicer's accuracy bar shows...); the
detector's own training report goes to ``app_train_report.json`` beside it. (The ``app_`` prefix keeps
them apart from what ``lmk3d train`` wrote there: ``MODEL_CARD.md``, ``train_report.json`` and
``metrics.json`` keep describing the shipped weights, which stay as ``checkpoint.previous.pt`` after
the first retrain.)

The labels are read through :func:`lmk3d.io.labels.read_label` (``.mrk.json``, ``.fcsv``, ``.json``, sphere
label maps with the ``label_info`` they were uploaded with); partial annotation is fine, and a label
that cannot be read, or an image that cannot be read (a truncated or corrupt file), is skipped with a
line saying why.

The training child lowers its own CPU priority first (:data:`TRAIN_NICE`), so the server it was
started from keeps answering annotators while it trains. A server that restarts while a training ran
finds ``status: RUNNING`` in ``app_train_stats.json`` from a process that no longer exists:
:func:`reset_stale_status`, called at start-up, rewrites it as stopped.

The split (:func:`lmk3d.data.split.holdout_split`), the scoring (:func:`lmk3d.metrics.evaluate_detector`)
and the publishing (:func:`lmk3d.publish.publish`: a staging folder inside the model folder, loaded back
as a check, then renamed over ``checkpoint.pt``, the previous one kept as ``checkpoint.previous.pt``) are
the library's; the infer task notices the new file and reloads it.

Bad requests are answered before the child process starts, with a 4xx: an unknown model (404), bad
options (422), no final label in the datastore (409): :meth:`LandmarkTrainTask.check`, which the app
runs through :mod:`lib.request_check` (MONAI Label 0.8.5 offers no hook for it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import LoadedModel
from lib.errors import CONFLICT, UNPROCESSABLE, http_error
from lib.json_values import jsonable
from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.data.samples import Sample
from lmk3d.data.split import holdout_split
from lmk3d.detectors import Detector, load_detector
from lmk3d.errors import LandmarkError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.image import read_image
from lmk3d.io.labels import read_label
from lmk3d.metrics import evaluate_detector
from lmk3d.publish import publish

logger = logging.getLogger(__name__)

INIT_CHOICES = ("current", "scratch")
STATS_FILE = "app_train_stats.json"
REPORT_FILE = "app_train_report.json"
SDR_RADIUS_MM = 4.0
#: How much the training child lowers its CPU priority (``nice``), so the server stays responsive.
TRAIN_NICE = 10
INTERRUPTED_NOTE = "interrupted (server restarted)"


@dataclass(frozen=True)
class TrainOptions:
    """A checked training request (see the module docstring)."""

    init: str = "current"
    max_minutes: float = 10.0
    val_fraction: float = 0.2
    seed: int = 0

    @classmethod
    def parse(cls, request: Mapping[str, Any]) -> TrainOptions:
        """Raises: HTTPException 422 naming the bad option and what it accepts."""
        init = request.get("init", cls.init)
        if isinstance(init, list):  # the option list sent back as the client got it from /info/
            init = init[0] if init else cls.init
        if init not in INIT_CHOICES:
            raise http_error(UNPROCESSABLE, f"init {init!r} is not one of {', '.join(INIT_CHOICES)}")
        max_minutes = _number(request, "max_minutes", cls.max_minutes, lambda v: 0 < v <= 24 * 60, "in (0, 1440]")
        val_fraction = _number(request, "val_fraction", cls.val_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
        seed = _number(request, "seed", cls.seed, lambda v: v == int(v) and v >= 0, "a whole number >= 0")
        return cls(str(init), max_minutes, val_fraction, int(seed))


def _number(request: Mapping[str, Any], key: str, default: float, ok: Callable[[float], bool], rule: str) -> float:
    raw = request.get(key, default)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(raw, bool) or not math.isfinite(value) or not ok(value):
        raise http_error(UNPROCESSABLE, f"{key} {raw!r} must be a number {rule}")
    return value


class LandmarkTrainTask(TrainTask):
    """Fine-tune (or retrain) one served detector from the datastore's final labels.

    Args:
        model: the loaded detector and its model folder (where the new checkpoint is published).
        device: where training runs (None: CUDA when present).
    """

    def __init__(self, model: LoadedModel, device: str | None = None) -> None:
        super().__init__(f"Fine-tune or retrain {model.config.name} from the final labels (.mrk.json, .fcsv "
                         "or sphere label maps)")
        self.name = model.config.name
        self.model_dir = Path(model.model_dir)
        self.landmark_names = tuple(model.detector.landmark_names)
        self.device = device

    def config(self) -> dict[str, Any]:
        d = TrainOptions()
        return {"init": list(INIT_CHOICES), "max_minutes": d.max_minutes, "val_fraction": d.val_fraction,
                "seed": d.seed}

    def stats(self) -> dict[str, Any]:
        path = self.model_dir / STATS_FILE
        try:
            stats = dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not _training_running():
            # The process was stopped (DELETE /train/) or killed before it could say so.
            stats.update(status="STOPPED", phase="stopped")
        return stats

    def check(self, request: Mapping[str, Any], datastore: Datastore) -> TrainOptions:
        """Check a request before any work: its options, and that there is something to learn from.

        Raises:
            HTTPException: 422 for a bad option, 409 when the datastore has no final label.
        """
        options = TrainOptions.parse(request)
        if not datastore.get_labeled_images():
            raise http_error(CONFLICT, f"cannot train {self.name!r}: the datastore has no final labels yet; submit "
                                       "corrected landmarks first (PUT /datastore/label?image=ID&tag=final with a "
                                       ".mrk.json, a .fcsv or a sphere label map)")
        return options

    # --- the training run (in MONAI Label's child process) --------------------------------------------
    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if is_training_child():
            _lower_priority(TRAIN_NICE)
        options = self.check(request, datastore)
        t0 = time.monotonic()
        stats: dict[str, Any] = {"model": self.name, "status": "RUNNING", "phase": "reading labels",
                                 "start_ts": _now(), "init": options.init, "max_minutes": options.max_minutes,
                                 "epoch": 0, "total_epochs": 1}
        self._stats(stats)
        try:
            report = self._train(options, datastore, stats)
        except Exception as e:
            stats.update(status="FAILED", phase="failed", error=f"{type(e).__name__}: {e}", end_ts=_now(),
                         total_time=round(time.monotonic() - t0, 2))
            self._stats(stats)
            self._say(f"FAILED: {e}")
            if isinstance(e, LandmarkError):  # bad labels, not a bug: a 422 when run synchronously
                raise http_error(UNPROCESSABLE, f"training {self.name!r} failed: {e}") from None
            raise
        stats.update(report, status="DONE", phase="published", end_ts=_now(), epoch=1,
                     total_time=round(time.monotonic() - t0, 2))
        self._stats(stats)
        return jsonable(stats)

    def _train(self, options: TrainOptions, datastore: Datastore, stats: dict[str, Any]) -> dict[str, Any]:
        samples = self._samples(datastore)
        train, val = holdout_split(samples, options.val_fraction, options.seed)
        held_out = bool(val)
        measure = val if held_out else train
        where = (f"{len(val)} held-out image(s)" if held_out
                 else "the training image(s) (none held out)")
        self._say(f"split (seed {options.seed}): {len(train)} for training, {len(val)} held out")

        detector = load_detector(self.model_dir, self.device)
        if detector.name != self.name:
            raise LandmarkError(f"{self.model_dir / CHECKPOINT_FILE} holds a {detector.name!r} detector")
        before = _scores(detector, measure)
        self._say(f"MRE of the current weights on {where}: {_mm(before['mre_mm'])}")
        stats.update(phase="training", n_train=len(train), n_val=len(val), val_mre_mm_before=before["mre_mm"])
        self._stats(stats)

        self._say(f"training {self.name} (init={options.init}, max_minutes={options.max_minutes:g})")
        fit_report = detector.fit(train, val or None, seed=options.seed, max_minutes=options.max_minutes,
                                  progress=True, init=options.init)
        after = _scores(detector, measure)
        self._say(f"MRE after training on {where}: {_mm(after['mre_mm'])} (before: {_mm(before['mre_mm'])}); "
                  f"within {SDR_RADIUS_MM:g} mm: {after['sdr']:.0%}")
        stats.update(phase="publishing", val_mre_mm=after["mre_mm"], val_sdr_4mm=after["sdr"],
                     best_metric=after["sdr"], measured_on="held-out" if held_out else "training")
        self._stats(stats)

        path = publish(detector, self.model_dir)
        self._say(f"published {path}")
        # The detector's own report (per-epoch history...) is long: beside the stats, not in /info/.
        atomic_write_text(self.model_dir / REPORT_FILE, json.dumps(jsonable(fit_report), indent=2))
        return {"n_train": len(train), "n_val": len(val), "val_mre_mm_before": before["mre_mm"],
                "val_mre_mm": after["mre_mm"], "val_sdr_4mm": after["sdr"], "best_metric": after["sdr"],
                "checkpoint": str(path), "train_cases": [s.case for s in train], "val_cases": [s.case for s in val]}

    def _samples(self, datastore: Datastore) -> list[Sample]:
        """Every image with a readable final label, as Samples in the model's landmark order."""
        samples, skipped = [], []
        for image_id in sorted(datastore.get_labeled_images()):
            label_path = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
            try:
                landmarks = read_label(label_path, self.landmark_names, info, source=f"{image_id} (final)")
            except LandmarkError as e:
                skipped.append(image_id)
                self._say(f"skipped: {e}")
                continue
            image_path = datastore.get_image_uri(image_id)
            try:
                # Read in full: a truncated .nii.gz has a good header and fails only at its end.
                read_image(image_path, dtype=None)
            except LandmarkError as e:
                skipped.append(image_id)
                self._say(f"skipped {image_id}: its image cannot be read ({_without_folder(str(e), image_path)})")
                continue
            samples.append(Sample(image_id, Path(image_path), landmarks))
        placed = sum(int(s.landmarks.found.sum()) for s in samples if s.landmarks is not None)
        self._say(f"read {len(samples)} final label(s) ({placed} landmarks placed); skipped {len(skipped)}")
        if not samples:
            raise LandmarkError(f"no readable final label for {self.name!r} (skipped: {', '.join(skipped)})")
        return samples

    def _say(self, message: str) -> None:
        # One line per step on stdout: MONAI Label shows the child's last lines in GET /train/.
        print(f"[lmk3d train {self.name}] {message}", flush=True)

    def _stats(self, stats: dict[str, Any]) -> None:
        atomic_write_text(self.model_dir / STATS_FILE, json.dumps(jsonable(stats), indent=2))


def reset_stale_status(model_dir: str | os.PathLike[str]) -> bool:
    """At server start-up: a training recorded as running was interrupted; record it as stopped.

    ``app_train_stats.json`` in ``model_dir`` with ``status: RUNNING`` was written by a training
    process that died with the server (no training runs before the server has started one), so it is
    rewritten with ``status: STOPPED``, ``phase: stopped`` and ``note:`` :data:`INTERRUPTED_NOTE`.
    Call it in the server process only, before it can start a training.

    Returns:
        Whether the file was rewritten (False when it is missing, unreadable or not RUNNING).
    """
    path = Path(model_dir) / STATS_FILE
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(stats, dict) or stats.get("status") != "RUNNING":
        return False
    stats.update(status="STOPPED", phase="stopped", note=INTERRUPTED_NOTE)
    atomic_write_text(path, json.dumps(stats, indent=2))
    logger.warning("%s: the training recorded as running was %s; marked STOPPED", path, INTERRUPTED_NOTE)
    return True


def is_training_child() -> bool:
    """Whether this process is MONAI Label's training child (``python -m monailabel.interfaces.utils.app``).

    ``POST /train/...?run_sync=true`` calls the task in the server process, whose priority must stay.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monailabel.interfaces.utils.app"


def _lower_priority(increment: int) -> None:
    """Lower the CPU priority of every thread of this process by ``increment`` (errors ignored).

    On Linux the nice value belongs to each thread and ``os.nice`` changes only the caller's, while
    thread pools (OpenMP, PyTorch) may have started when the app loaded: each thread is set.
    """
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    if not tids:
        try:
            os.nice(increment)
        except OSError:
            pass
        return
    for tid in tids:
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))
        except OSError:
            pass  # a thread that has just ended, or a platform without per-thread priorities


def _without_folder(message: str, path: str) -> str:
    return message.replace(path, os.path.basename(path))


def _training_running() -> bool:
    """Whether MONAI Label has a training process running (always False outside the server process)."""
    from monailabel.utils.async_tasks.utils import processes

    return bool(processes("train"))


def _scores(detector: Detector, samples: Sequence[Sample]) -> dict[str, float]:
    """The mean radial error (mm) and the share within :data:`SDR_RADIUS_MM` of ``detector`` on ``samples``."""
    overall = evaluate_detector(detector, samples, radii=(SDR_RADIUS_MM,)).overall
    return {"mre_mm": overall.mre, "sdr": overall.sdr[f"{SDR_RADIUS_MM:g}"]}


def _mm(value: float) -> str:
    return f"{value:.2f} mm" if math.isfinite(value) else "n/a (no landmark found)"


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")
