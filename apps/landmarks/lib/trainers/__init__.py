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

The labels are read through :func:`lib.labels.read_label` (``.mrk.json``, ``.fcsv``, ``.json``, sphere
label maps with the ``label_info`` they were uploaded with); partial annotation is fine, and a label
that cannot be read is skipped with a line saying why.

The new checkpoint is written to a staging folder inside the model folder, loaded back as a check, and
only then renamed over ``checkpoint.pt`` (the previous one is kept as ``checkpoint.previous.pt``); the
infer task notices the new file and reloads it.

Bad requests are answered before the child process starts, with a 4xx: an unknown model (404), bad
options (422), no final label in the datastore (409). MONAI Label 0.8.5 offers no hook for that, so
:func:`install_request_check` wraps its ``AsyncTask.run`` (the function every train request goes
through) with the app's check.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import LoadedModel
from lib.errors import CONFLICT, UNPROCESSABLE, http_error
from lib.labels import read_label
from lmk3d.data.samples import Sample
from lmk3d.detectors import Detector, load_detector
from lmk3d.detectors.base import CHECKPOINT_FILE
from lmk3d.errors import LandmarkError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate

logger = logging.getLogger(__name__)

INIT_CHOICES = ("current", "scratch")
STATS_FILE = "app_train_stats.json"
REPORT_FILE = "app_train_report.json"
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"
SDR_RADIUS_MM = 4.0


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
        return _jsonable(stats)

    def _train(self, options: TrainOptions, datastore: Datastore, stats: dict[str, Any]) -> dict[str, Any]:
        samples = self._samples(datastore)
        train, val = _split(samples, options.val_fraction, options.seed)
        held_out = bool(val)
        measure = val if held_out else train
        where = (f"{len(val)} held-out image(s)" if held_out
                 else "the training image(s) (none held out)")
        self._say(f"split (seed {options.seed}): {len(train)} for training, {len(val)} held out")

        detector = load_detector(self.model_dir, self.device)
        if detector.name != self.name:
            raise LandmarkError(f"{self.model_dir / CHECKPOINT_FILE} holds a {detector.name!r} detector")
        before = _evaluate(detector, measure)
        self._say(f"MRE of the current weights on {where}: {_mm(before['mre_mm'])}")
        stats.update(phase="training", n_train=len(train), n_val=len(val), val_mre_mm_before=before["mre_mm"])
        self._stats(stats)

        self._say(f"training {self.name} (init={options.init}, max_minutes={options.max_minutes:g})")
        fit_report = detector.fit(train, val or None, seed=options.seed, max_minutes=options.max_minutes,
                                  progress=True, init=options.init)
        after = _evaluate(detector, measure)
        self._say(f"MRE after training on {where}: {_mm(after['mre_mm'])} (before: {_mm(before['mre_mm'])}); "
                  f"within {SDR_RADIUS_MM:g} mm: {after['sdr']:.0%}")
        stats.update(phase="publishing", val_mre_mm=after["mre_mm"], val_sdr_4mm=after["sdr"],
                     best_metric=after["sdr"], measured_on="held-out" if held_out else "training")
        self._stats(stats)

        path = publish(detector, self.model_dir)
        self._say(f"published {path}")
        # The detector's own report (per-epoch history...) is long: beside the stats, not in /info/.
        atomic_write_text(self.model_dir / REPORT_FILE, json.dumps(_jsonable(fit_report), indent=2))
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
            samples.append(Sample(image_id, Path(datastore.get_image_uri(image_id)), landmarks))
        placed = sum(int(s.landmarks.found.sum()) for s in samples if s.landmarks is not None)
        self._say(f"read {len(samples)} final label(s) ({placed} landmarks placed); skipped {len(skipped)}")
        if not samples:
            raise LandmarkError(f"no readable final label for {self.name!r} (skipped: {', '.join(skipped)})")
        return samples

    def _say(self, message: str) -> None:
        # One line per step on stdout: MONAI Label shows the child's last lines in GET /train/.
        print(f"[lmk3d train {self.name}] {message}", flush=True)

    def _stats(self, stats: dict[str, Any]) -> None:
        atomic_write_text(self.model_dir / STATS_FILE, json.dumps(_jsonable(stats), indent=2))


def _training_running() -> bool:
    """Whether MONAI Label has a training process running (always False outside the server process)."""
    from monailabel.utils.async_tasks.utils import processes

    return bool(processes("train"))


def publish(detector: Detector, model_dir: Path) -> Path:
    """Replace ``model_dir/checkpoint.pt`` by ``detector``'s, atomically; keep the old one as a backup.

    The new file is written and loaded back in a staging folder on the same file system, then renamed
    over the old one: a reader sees the old file or the new one, never a partial one, and a failure at
    any step leaves the old checkpoint in place.
    """
    final = model_dir / CHECKPOINT_FILE
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        detector.save(staging)
        load_detector(staging, "cpu")  # what is published must load
        if final.is_file():
            backup = staging / PREVIOUS_CHECKPOINT
            try:
                os.link(final, backup)
            except OSError:
                shutil.copy2(final, backup)
            os.replace(backup, model_dir / PREVIOUS_CHECKPOINT)
        os.replace(staging / CHECKPOINT_FILE, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split by image; at least one image for training, none held out with fewer than two."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = 0
    if len(samples) >= 2 and val_fraction > 0:
        n_val = min(len(samples) - 1, max(1, round(len(samples) * val_fraction)))
    val = [samples[i] for i in order[:n_val]]
    train = [samples[i] for i in order[n_val:]]
    return train, val


def _evaluate(detector: Detector, samples: Sequence[Sample]) -> dict[str, float]:
    truths: dict[str, LandmarkSet] = {s.case: s.landmarks for s in samples if s.landmarks is not None}
    preds = {s.case: detector.predict(s.load_image()) for s in samples}
    overall = evaluate(preds, truths, radii=(SDR_RADIUS_MM,)).overall
    return {"mre_mm": overall.mre, "sdr": overall.sdr[f"{SDR_RADIUS_MM:g}"]}


def _mm(value: float) -> str:
    return f"{value:.2f} mm" if math.isfinite(value) else "n/a (no landmark found)"


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _jsonable(obj: Any) -> Any:
    """Plain JSON values (the server answers with strict JSON: no NaN or infinity, no numpy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


# --- answering bad train requests before MONAI Label starts the child process -------------------------
_request_check: Callable[[dict[str, Any]], None] | None = None


def install_request_check(check: Callable[[dict[str, Any]], None]) -> None:
    """Run ``check(request)`` on every train request before MONAI Label starts a training process.

    ``check`` raises an ``HTTPException`` (a 4xx) to refuse the request. Installed once per process;
    a later call replaces the check.
    """
    global _request_check
    _request_check = check
    from monailabel.utils.async_tasks.task import AsyncTask

    if getattr(AsyncTask.run, "_lmk3d_checked", False):
        return
    original = AsyncTask.run

    def run(method: str, request: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
            force_sync: bool = False, enqueue: bool = False) -> Any:
        if method == "train" and _request_check is not None:
            _request_check({**(request or {}), **(params or {})})
        return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run._lmk3d_checked = True  # type: ignore[attr-defined]
    AsyncTask.run = staticmethod(run)  # type: ignore[method-assign,assignment]
