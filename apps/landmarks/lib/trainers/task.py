"""Train tasks: one class, :class:`LandmarkTrainTask`, fine-tunes or retrains every detector from the final labels.

``POST /train/<model>`` with JSON options (any other option is a 422)

- ``init``: ``current`` (default: fine-tune the served weights, at :data:`~lmk3d.training.loop.FINE_TUNE_LR_SCALE`
  times the profile's learning rates) or ``scratch`` (new weights, same detector and profile, its own
  learning rates); ``from_scratch: true`` is the same as ``init: scratch``;
- ``max_minutes``: the time budget of the training (default 10), counted from the start of the process
  MONAI Label runs it in: ``Detector.fit`` gets :data:`FIT_SHARE` of it, the presence network's training
  (below) starts no epoch that would end after :data:`PRESENCE_END_SHARE`, and the rest is left to the
  calibration and the gate (a declared model's baseline takes its seconds first); ``max_epochs``: a cap on
  every training phase's epochs (default: the profile's);
- ``val_fraction``: share of the *training* cases split off for early stopping (default 0.2);
- ``seed``: that split's and the training's seed (default 0).

Every training result is a new version in the model registry (:mod:`lmk3d.registry`, in the server's
workspace, never in the repository's ``models/``), and it is served only if the gate
(:func:`lmk3d.registry.gate`, docs/registry.md) finds it no worse than the served version on the
model's **validation cases**: labelled images set aside when the model first saw them
(:meth:`lmk3d.registry.ModelRecord.validation_cases`) and never trained on. A rejected version stays in
the registry as a candidate with its report; ``GET /train/`` (the last output lines), ``/info/``'s
``train_stats`` (``published``, ``decision``, ``version``, ``served_version``, ``calibrated`` and
``calibration``, the trust model's reason) and ``lmk3d models show`` say what was decided and why.
The infer task notices the new served version and loads it.

**Trust.** Before the gate decides, the new weights get their own trust model
(:func:`lmk3d.calibrate.calibrate_new_weights`, docs/trust.md): fitted on the same validation cases,
with the training cases for its shape and image models and the parent's tolerance (else 3 mm). Its
presence network (which tells landmarks the field of view cuts off) is the parent's (else the shipped
model's), or one trained on the training cases for :data:`~lmk3d.calibrate.PRESENCE_EPOCHS` epochs (at most
``max_epochs``), starting from that one, when it does strictly better on the validation cases' cut
variants: a declared model inherits none, and after a change of contrast the inherited one keeps few
landmarks found. ``trust.json`` (and
``presence.pt``) go into the version folder, so the version serves calibrated scores, ``radius_mm`` and
``score_meaning`` from its first answer, and the gate measures the version as it will serve. With fewer
than 5 validation cases, or when the fit fails, the version has no trust model and serves the
detector's raw scores; the output lines, the version's report and ``calibration`` in its record
(``lmk3d models show``) say why.

MONAI Label runs the task in a child process (``python -m monailabel.interfaces.utils.app -m train``)
and shows the last 20 lines of its output in ``GET /train/``: this task prints one line per step (labels
read, validation and training cases, the served version's scores, training, calibration, the new
weights' scores, the decision) and the detector's progress bar adds the loss and validation error per
epoch.
``GET /info/`` shows ``train_stats`` from ``app_train_stats.json`` in the model's registry folder
(``status``, ``phase``, ``val_mre_mm``, ``val_mre_mm_before``, ``best_metric`` = the share of validation
landmarks within 4 mm, which is what Slicer's accuracy bar shows...).

The labels are read through :func:`lmk3d.io.labels.read_label` (``.mrk.json``, ``.fcsv``, ``.json``, sphere
label maps with the ``label_info`` they were uploaded with); partial annotation is fine, and a label
that cannot be read, or an image that cannot be read (a truncated or corrupt file), is skipped with a
line saying why.

The training child lowers its own CPU priority first (:data:`TRAIN_NICE`), so the server it was
started from keeps answering annotators while it trains. A server that restarts while a training ran
finds ``status: RUNNING`` in ``app_train_stats.json`` from a process that no longer exists:
:func:`reset_stale_status`, called at start-up, rewrites it as stopped.

Bad requests are answered before the child process starts, with a 4xx: an unknown model (404), bad
options (422), no final label in the datastore (409): :meth:`LandmarkTrainTask.check`, which the app
runs through :mod:`lib.request_check` (MONAI Label 0.8.5 offers no hook for it).

**A model the user declared** (``lmk3d serve --new-model NAME=DETECTOR``) starts with no version and,
maybe, no landmark names. Its first training

1. fixes its landmark names, if it has none, from the final labels: every landmark name placed in
   them, in order of first appearance (labels read in sorted image-id order, the points of each in
   file order). A label whose placed names all belong to another model of the server was made for
   that model and is left out; a label map without ``label_info`` cannot say its names and is left
   out too (each with a line saying why). From then on a label with other names is skipped, saying why;
2. fits the ``mean_shape`` baseline (seconds) and adds it as the first version, which the gate
   accepts as the first one (rule 1): the server serves it from its next request. Where a declared
   detector follows, the baseline trains no presence network (minutes with many labels): the
   detector's version trains one;
3. then, if the declared detector is not ``mean_shape``, trains a new one from its ``cpu`` profile
   (:data:`NEW_MODEL_PROFILE`) within what is left of ``max_minutes`` (and ``max_epochs``), and adds
   it as the next version through the gate: served only if no worse on the validation cases than the
   baseline.

A later training of such a model trains its own detector again: fine-tuned (or from scratch) when it
is the one served, new from the profile while the baseline is still served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import DeclaredModel, LoadedModel
from lib.errors import CONFLICT, UNPROCESSABLE, http_error
from lib.json_values import jsonable
from lmk3d.calibrate import PRESENCE_EPOCHS, calibrate_new_weights
from lmk3d.checkpoint import CHECKPOINT_FILE, data_fingerprint
from lmk3d.data.samples import Sample
from lmk3d.data.split import holdout_split
from lmk3d.detectors import Detector, detector_class, load_detector
from lmk3d.errors import LandmarkError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.image import read_image
from lmk3d.io.labels import read_label
from lmk3d.metrics import evaluate_detector
from lmk3d.publish import STAGING_PREFIX
from lmk3d.registry import BASELINE_DETECTOR, gate
from lmk3d.training.loop import FINE_TUNE_LR_SCALE, Trainer
from lmk3d.training.loop import TrainOptions as TrainOptions_  # the library's; TrainOptions here is the request's
from lmk3d.trust import TrustModel, save_trust

logger = logging.getLogger(__name__)

INIT_CHOICES = ("current", "scratch")
STATS_FILE = "app_train_stats.json"
REPORT_FILE = "app_train_report.json"
SDR_RADIUS_MM = 4.0
#: How much the training child lowers its CPU priority (``nice``), so the server stays responsive.
TRAIN_NICE = 10
INTERRUPTED_NOTE = "interrupted (server restarted)"
#: The profile a declared model's detector is first trained with (DETECTOR_CONTRACT.md: minutes on a CPU).
NEW_MODEL_PROFILE = "cpu"
#: The least time budget (minutes) left to a declared model's detector after the baseline has been fitted.
MIN_MINUTES_LEFT = 0.05
#: The share of a version's time budget that ``Detector.fit`` gets; after it come the presence network's
#: training, the calibration on the validation cases and the gate (with 45 training cases a presence
#: network's 30 epochs took about two minutes, beyond a 10-minute ``max_minutes`` spent on ``fit`` alone).
FIT_SHARE = 0.75
#: The share of a version's time budget by which the presence network's epochs end; the rest is the
#: calibration's and the gate's (with 15 validation cases and their cut variants they took about 63 s).
PRESENCE_END_SHARE = 0.85


@dataclass(frozen=True)
class TrainOptions:
    """A checked training request (see the module docstring)."""

    init: str = "current"
    max_minutes: float = 10.0
    max_epochs: int | None = None
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
        scratch = request.get("from_scratch", False)
        if not isinstance(scratch, bool):
            raise http_error(UNPROCESSABLE, f"from_scratch {scratch!r} must be true or false")
        if scratch:
            init = "scratch"
        max_minutes = _number(request, "max_minutes", cls.max_minutes, lambda v: 0 < v <= 24 * 60, "in (0, 1440]")
        max_epochs = None
        if request.get("max_epochs") not in (None, ""):
            max_epochs = int(_number(request, "max_epochs", 1, lambda v: v == int(v) and 1 <= v <= 100_000,
                                     "a whole number in [1, 100000]"))
        val_fraction = _number(request, "val_fraction", cls.val_fraction, lambda v: 0 <= v < 1, "in [0, 1)")
        seed = _number(request, "seed", cls.seed, lambda v: v == int(v) and v >= 0, "a whole number >= 0")
        return cls(str(init), max_minutes, max_epochs, val_fraction, int(seed))


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
    """Fine-tune (or retrain) one model from the datastore's final labels; a declared model's first training too.

    Args:
        model: a served model (its detector and registry record), or a declared model with no version yet.
        device: where training runs (None: CUDA when present).
        other_names: returns the landmark names of the server's other models: a label made only of
            those was made for them, and does not give a declared model its names.
    """

    def __init__(self, model: LoadedModel | DeclaredModel, device: str | None = None,
                 other_names: Callable[[], Collection[str]] | None = None) -> None:
        if isinstance(model, DeclaredModel):
            what = (f"Train {model.config.name}, your own landmarks, from the final labels (.mrk.json or .fcsv point "
                    "lists, or sphere label maps with label_info): first the mean_shape baseline, served at once, "
                    f"then {model.config.detector}, served if it is no worse on the model's validation cases")
        else:
            what = (f"Fine-tune or retrain {model.config.name} from the final labels (.mrk.json, .fcsv or sphere "
                    "label maps); a new version is published only if it is no worse on the model's validation cases")
        super().__init__(what)
        self.name = model.config.name
        self.record = model.record
        #: Where this task's status and report files live: the model's registry folder, never models/.
        self.model_dir = Path(model.record.root)
        self.device = device
        self._other_names = other_names or frozenset

    @property
    def landmark_names(self) -> tuple[str, ...]:
        """The model's landmark names, in order; empty while a declared model has none yet."""
        return self.record.landmark_names or ()

    def config(self) -> dict[str, Any]:
        d = TrainOptions()
        return {"init": list(INIT_CHOICES), "from_scratch": False, "max_minutes": d.max_minutes, "max_epochs": "",
                "val_fraction": d.val_fraction, "seed": d.seed}

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
        # The budget runs from the request: the training child's start-up (imports, the app) counts.
        t0 = time.monotonic() - (_process_age_s() if is_training_child() else 0.0)
        stats: dict[str, Any] = {"model": self.name, "status": "RUNNING", "phase": "reading labels",
                                 "start_ts": _now(), "init": options.init, "max_minutes": options.max_minutes,
                                 "epoch": 0, "total_epochs": 1}
        self._stats(stats)
        try:
            report = self._train(options, datastore, stats, t0)
        except Exception as e:
            stats.update(status="FAILED", phase="failed", error=f"{type(e).__name__}: {e}", end_ts=_now(),
                         total_time=round(time.monotonic() - t0, 2))
            self._stats(stats)
            self._say(f"FAILED: {e}")
            if isinstance(e, LandmarkError):  # bad labels, not a bug: a 422 when run synchronously
                raise http_error(UNPROCESSABLE, f"training {self.name!r} failed: {e}") from None
            raise
        stats.update(report, status="DONE", phase="published" if report["published"] else "rejected",
                     end_ts=_now(), epoch=stats.get("total_epochs", 1),
                     total_time=round(time.monotonic() - t0, 2))
        self._stats(stats)
        return jsonable(stats)

    def _train(self, options: TrainOptions, datastore: Datastore, stats: dict[str, Any],
               t0: float) -> dict[str, Any]:
        """Fit, calibrate and gate the version(s) of one request, whose budget started at ``t0`` (monotonic)."""
        record = self.record
        if record.landmark_names is None:
            self._fix_landmark_names(datastore)
        samples = self._samples(datastore)
        val_ids = set(record.validation_cases([s.case for s in samples]))
        train = [s for s in samples if s.case not in val_ids]
        val = [s for s in samples if s.case in val_ids]
        if not train:
            raise LandmarkError(f"all {len(samples)} labelled image(s) are validation cases of {self.name!r}, which "
                                "are never trained on; label more images")
        self._say(f"validation cases (fixed for this model, never trained on): {len(val)}; training cases: "
                  f"{len(train)}")
        stats.update(n_train=len(train), n_val=len(val))

        first: dict[str, Any] | None = None
        if record.current() is None:
            # A declared model's first training: the baseline first (seconds), so something is served at once.
            self._say(f"model {self.name!r} has no version yet: fitting the {BASELINE_DETECTOR} baseline first")
            baseline = detector_class(BASELINE_DETECTOR).create(self.landmark_names, NEW_MODEL_PROFILE, self.device)
            # Where the declared detector follows, the baseline trains no presence network: that takes minutes
            # with many labels (over two with 45 training cases) and would hold back the first version; the
            # declared detector's version trains one.
            follows = record.detector != BASELINE_DETECTOR
            first = self._fit_and_decide(baseline, "scratch", options, _minutes_left(options, t0), train, val,
                                         stats, presence_epochs=0 if follows else None)
            if not follows:
                return first

        current = record.current()
        folder = record.current_dir()
        if folder is None:
            raise LandmarkError(f"model {self.name!r} has no version to start from")
        detector = load_detector(folder, self.device)
        if detector.name not in record.detectors:
            raise LandmarkError(f"{folder / CHECKPOINT_FILE} holds a {detector.name!r} detector")
        init = options.init
        if detector.name != record.detector:
            # The baseline is served: the model's own detector is trained new, from its profile.
            self._say(f"the served version {current} is the {BASELINE_DETECTOR} baseline: training a new "
                      f"{record.detector} detector ({NEW_MODEL_PROFILE} profile) to replace it")
            detector = detector_class(record.detector).create(self.landmark_names, NEW_MODEL_PROFILE, self.device)
            init = "scratch"
        report = self._fit_and_decide(detector, init, options, _minutes_left(options, t0), train, val, stats)
        if first is not None:
            report["first_version"] = {k: first[k] for k in ("version", "detector", "published", "decision",
                                                             "val_mre_mm", "calibrated")}
        return report

    def _fit_and_decide(self, detector: Detector, init: str, options: TrainOptions, max_minutes: float,
                        train: Sequence[Sample], val: Sequence[Sample], stats: dict[str, Any],
                        presence_epochs: int | None = None) -> dict[str, Any]:
        """Train ``detector`` on ``train``, add it as a version, and let the gate decide against the served one.

        ``max_minutes``: this version's budget, from now: :data:`FIT_SHARE` of it for ``fit``, the presence
        network's epochs end by :data:`PRESENCE_END_SHARE`. ``presence_epochs``: a presence network's training
        (see :meth:`_calibrate`); None: ``PRESENCE_EPOCHS``, at most ``max_epochs``; 0 trains none (the version
        inherits one or has none).
        """
        start = time.monotonic()
        record = self.record
        current = record.current()
        before: dict[str, float] | None = None
        if current is not None:
            folder = record.current_dir()
            assert folder is not None
            before = scores(load_detector(folder, self.device), val)
            self._say(f"served version {current}: {_described(before)}")
        stats.update(phase="training", val_mre_mm_before=before["val_mre_mm"] if before else None,
                     current_version=current, detector=detector.name)
        self._stats(stats)

        # Early stopping looks at cases split off the training cases: the validation cases decide publishing only.
        fit_train, fit_val = holdout_split(list(train), options.val_fraction, options.seed)
        # A fine-tune starts from weights trained on many more cases than the datastore may hold: smaller steps.
        lr_scale = FINE_TUNE_LR_SCALE if init == "current" else 1.0
        fit_minutes = max_minutes * FIT_SHARE
        self._say(f"training {self.name} ({detector.name}, init={init}, max_minutes={fit_minutes:.3g} (of "
                  f"{max_minutes:.3g}), "
                  f"max_epochs={options.max_epochs or 'profile'}, learning rate x{lr_scale:g}; early stopping on "
                  f"{len(fit_val)} of the training cases)")

        def progress(phase: str, done: int, total: int, row: dict[str, float]) -> None:
            # What the stock Slicer plugin draws: epoch / total_epochs of the phase running now.
            stats.update(phase=f"training: {phase}", epoch=done, total_epochs=total, loss=row.get("loss"))
            self._stats(stats)

        trainer = Trainer(TrainOptions_(seed=options.seed, max_minutes=fit_minutes,
                                        max_epochs=options.max_epochs, progress=True,
                                        device=str(detector.device), lr_scale=lr_scale), on_epoch=progress)
        # A fine-tuned detector comes with the served weights' trust model: it describes their errors, not the
        # new weights', and is never carried over (the new weights get their own in _calibrate).
        detector.trust = None
        fit_report = detector.fit(fit_train, fit_val or None, trainer=trainer, init=init)
        stats.update(phase="calibrating")
        self._stats(stats)
        if presence_epochs is None:
            presence_epochs = min(PRESENCE_EPOCHS, options.max_epochs or PRESENCE_EPOCHS)
        trust, calibration = self._calibrate(detector, train, val, options.seed,
                                             self.record.current_dir() if init == "current" else None,
                                             presence_epochs, start + 60.0 * max_minutes * PRESENCE_END_SHARE,
                                             fit_train)
        detector.trust = trust  # measured as it will serve: with its own trust model, or raw
        after = scores(detector, val)
        self._say(f"new weights: {_described(after)}")
        stats.update(phase="deciding", val_mre_mm=after["val_mre_mm"], val_sdr_4mm=after["val_sdr_4mm"],
                     best_metric=after["val_sdr_4mm"])
        self._stats(stats)

        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=record.root))
        try:
            detector.save(staging)
            if trust is not None:
                save_trust(staging, trust)
            atomic_write_text(staging / REPORT_FILE, json.dumps(jsonable(fit_report), indent=2))
            fingerprint = data_fingerprint([(s.case, s.landmarks) for s in train])
            atomic_write_text(staging / "MODEL_CARD.md", _model_card(
                self.name, detector, current, train, val, before, after, fingerprint,
                {"init": init, "max_minutes": round(max_minutes, 2), "max_epochs": options.max_epochs,
                 "seed": options.seed, "early_stopping_fraction": options.val_fraction, "lr_scale": lr_scale},
                fit_report, calibration))
            version = record.add_version(
                staging, parent=current, detector=detector.name, metrics=after,
                report={"options": dataclasses.asdict(options), "init": init, "max_minutes": max_minutes,
                        "lr_scale": lr_scale,
                        "train_cases": [s.case for s in train], "val_cases": [s.case for s in val],
                        "fit": jsonable(fit_report), "calibration": jsonable(calibration)},
                data_fingerprint=fingerprint, calibration=jsonable(calibration))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        accepted, reason = gate(before, after)
        record.decide(version.id, accepted, reason, {"current": current, "before": before, "after": after})
        self._say(f"version {version.id} {'PUBLISHED' if accepted else 'kept as a candidate, NOT published'} "
                  f"({detector.name}): {reason}")
        return {"n_train": len(train), "n_val": len(val),
                "val_mre_mm_before": before["val_mre_mm"] if before else None,
                "val_mre_mm": after["val_mre_mm"], "val_sdr_4mm": after["val_sdr_4mm"],
                "best_metric": after["val_sdr_4mm"], "version": version.id, "detector": detector.name, "init": init,
                "parent": current, "published": accepted, "decision": reason, "served_version": record.current(),
                "train_cases": [s.case for s in train], "val_cases": [s.case for s in val],
                "calibrated": trust is not None, "calibration": calibration["reason"]}

    def _calibrate(self, detector: Detector, train: Sequence[Sample], val: Sequence[Sample],
                   seed: int, fine_tuned_from: Path | None,
                   presence_epochs: int, presence_deadline: float,
                   fitted_on: Sequence[Sample]) -> tuple[TrustModel | None, dict[str, Any]]:
        """The new weights' own trust model (:func:`lmk3d.calibrate.calibrate_new_weights`), or None and why.

        Fitted on the validation cases (the gate's), with the parent version's tolerance, else the shipped
        model's. The presence network is the parent's (else the shipped model's), or one trained on the
        training cases for ``presence_epochs`` (from the inherited weights when there are some) when it
        tells the validation cases' cut-off landmarks strictly better. The parent's ``trust.json`` itself
        is never copied onto the new weights: it was fitted for other weights. Weights fine-tuned from a
        version (``fine_tuned_from``, its folder) keep that version's training images in their image check.
        ``fitted_on``: the training cases the weights were fitted on (the others stopped the training early): a
        model whose scores were also calibrated on its training cases answered without themselves (``mean_shape``)
        keeps that.
        A failed fit costs the trust model, never the trained weights: the version is added without one,
        saying why.
        """
        previous = [p for p in (self.record.current_dir(), self.record.shipped) if p is not None]
        try:
            trust, calibration = calibrate_new_weights(detector, train, val, previous, seed, log=self._say,
                                                       images_from=fine_tuned_from, presence_epochs=presence_epochs,
                                                       presence_deadline=presence_deadline, fitted_on=fitted_on)
        except Exception as e:
            logger.exception("model %r: the trust model of the new weights could not be fitted", self.name)
            trust, calibration = None, {"calibrated": False,
                                        "reason": f"calibration failed ({type(e).__name__}: {e})"}
        if trust is None:
            self._say(f"not calibrated: {calibration['reason']}; this version serves the detector's raw scores")
        else:
            self._say(f"calibrated: {calibration['reason']}")
        return trust, calibration

    def _fix_landmark_names(self, datastore: Datastore) -> tuple[str, ...]:
        """A declared model's first training: take its landmark names from the final labels and record them.

        Every name placed in a final label, in order of first appearance (labels in sorted image-id order,
        points in file order). A label whose placed names all belong to another model was made for that
        model and is left out; so is a label that cannot be read without names (a label map without
        ``label_info``), each with a line saying why.

        Raises:
            LandmarkError: no final label gives a name.
        """
        others = frozenset(self._other_names())
        names: dict[str, None] = {}
        for image_id in sorted(datastore.get_labeled_images()):
            label_path = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}
            try:
                landmarks = read_label(label_path, (), info, source=f"{image_id} (final)")
            except LandmarkError as e:
                self._say(f"not used for the landmark names: {e}")
                continue
            placed = [n for i, n in enumerate(landmarks.names) if landmarks.found[i]]
            if others and all(n in others for n in placed):
                self._say(f"not used for the landmark names: {image_id} (final) holds only landmarks of another "
                          f"model ({', '.join(placed)})")
                continue
            names.update(dict.fromkeys(placed))
        if not names:
            raise LandmarkError(f"model {self.name!r} has no landmark names yet and no final label gives any: save "
                                "point lists (.mrk.json, .fcsv) with your landmark names, or label maps with "
                                "label_info")
        self.record.set_landmark_names(list(names))
        self._say(f"landmark names of {self.name!r}, fixed from the final labels (first appearance, labels in "
                  f"image-id order): {', '.join(names)}")
        return tuple(names)

    def validation_samples(self, datastore: Datastore) -> list[Sample]:
        """The model's validation cases with their final labels (what the gate measures a new version on)."""
        return self.labelled_split(datastore)[1]

    def labelled_split(self, datastore: Datastore) -> tuple[list[Sample], list[Sample]]:
        """The final labels as ``(training cases, validation cases)`` by the model's fixed rule (none when
        the labels cannot be read)."""
        try:
            samples = self._samples(datastore)
        except LandmarkError:
            return [], []
        val = set(self.record.validation_cases([s.case for s in samples]))
        return [s for s in samples if s.case not in val], [s for s in samples if s.case in val]

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


def _process_age_s() -> float:
    """Seconds since this process started (Linux's ``/proc/self/stat``; 0.0 where that cannot be read)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the fields after the command's name, from the 3rd
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # the 22nd: clock ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _minutes_left(options: TrainOptions, t0: float) -> float:
    """What is left of ``max_minutes`` since ``t0`` (monotonic), at least :data:`MIN_MINUTES_LEFT`."""
    return max(options.max_minutes - (time.monotonic() - t0) / 60.0, MIN_MINUTES_LEFT)


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


def scores(detector: Detector, samples: Sequence[Sample]) -> dict[str, float]:
    """What the gate compares (:func:`lmk3d.registry.gate`): MRE (mm), share found, share within 4 mm, cases."""
    if not samples:
        return {"val_mre_mm": math.nan, "val_found": math.nan, "val_sdr_4mm": math.nan, "n_val": 0}
    overall = evaluate_detector(detector, samples, radii=(SDR_RADIUS_MM,)).overall
    found = overall.n_scored / overall.n_truth if overall.n_truth else math.nan
    return {"val_mre_mm": overall.mre, "val_found": found, "val_sdr_4mm": overall.sdr[f"{SDR_RADIUS_MM:g}"],
            "n_val": len(samples)}


def _model_card(name: str, detector: Detector, parent: str | None, train: Sequence[Sample], val: Sequence[Sample],
                before: Mapping[str, float] | None, after: Mapping[str, float], fingerprint: str,
                options: Mapping[str, Any], fit_report: Mapping[str, Any], calibration: Mapping[str, Any]) -> str:
    """The version's model card: what it was trained from, how, and how it measured before the gate decided."""
    def row(label: str, m: Mapping[str, float] | None) -> str:
        if not m or not m.get("n_val"):
            return f"| {label} | - | - | - | 0 |"
        return (f"| {label} | {_mm(m['val_mre_mm'])} | {m['val_found']:.0%} | {m['val_sdr_4mm']:.0%} | "
                f"{m['n_val']} |")

    return "\n".join([
        f"# Model card: {name}, a version trained by the server",
        "",
        f"- Detector: `{detector.name}`; landmarks: {', '.join(detector.landmark_names)}.",
        f"- Parent (the version served when it was trained): `{parent}`.",
        f"- Trained on {len(train)} final labels from the datastore (data fingerprint `{fingerprint}`); options: "
        + ", ".join(f"`{k}={v}`" for k, v in options.items()) + f"; {float(fit_report.get('seconds', 0.0)):.0f} s on "
        f"{fit_report.get('device', 'cpu')}.",
        f"- Measured on the model's {len(val)} validation case(s), fixed when the model first saw them and never "
        f"trained on: {', '.join(s.case for s in val) or '(none yet)'}.",
        ("- Scores: calibrated probabilities (`trust.json`), " if calibration.get("calibrated") else
         "- Scores: the detector's raw ones, not calibrated: ") + f"{calibration.get('reason', '')}.",
        "",
        "| weights | MRE | found | within 4 mm | cases |",
        "|---|---|---|---|---|",
        row(f"served before (`{parent}`)", before),
        row("this version", after),
        "",
        "Whether it was served is the gate's decision (docs/registry.md), recorded in the model's `model.json`: "
        "`lmk3d models show NAME` or `GET /models/NAME`.",
        "",
    ])


def _described(metrics: Mapping[str, float]) -> str:
    if not metrics["n_val"]:
        return "no validation case yet"
    return (f"MRE {_mm(metrics['val_mre_mm'])}, {metrics['val_found']:.0%} found, "
            f"{metrics['val_sdr_4mm']:.0%} within {SDR_RADIUS_MM:g} mm on {metrics['n_val']} validation case(s)")


def _mm(value: float) -> str:
    return f"{value:.2f} mm" if math.isfinite(value) else "n/a (no landmark found)"


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")
