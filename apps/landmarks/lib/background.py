"""Scores for active learning, computed ahead of time: every unlabelled image, every served model.

``least_confident`` must answer at once; computing the scores on its request path took 55 s on a
fresh server. A :class:`BackgroundScorer` thread (a daemon named ``lmk3d-scorer``, OS priority nice
19 on Linux) predicts every unlabelled datastore image with each served infer task's current
weights and records the per-landmark scores in the shared :class:`lib.scores.ScoreCache`, keyed by
model, image file and checkpoint signature. What a new checkpoint or a replaced image invalidates is
scored again on the next pass; a new image or a removed label is picked up the same way.

It gives way to interactive inference: it scores one image at a time, and before each waits until no
interactive inference has run for ``quiet_s`` seconds (:meth:`ScoreCache.quiet_s`). The served models
are scored in the order given (the default model first). When nothing is left to score it looks again
every ``poll_s`` seconds, or at once when woken (each ``least_confident`` request wakes it). An image
or model that fails (an unreadable file, a checkpoint that cannot be loaded) is logged and not tried
again until the image file or the checkpoint changes.

``LMK3D_BACKGROUND_SCORES=off`` (or ``0``, ``false``, ``no``) in the server's environment turns it
off; ``least_confident`` then ranks by the scores that interactive inferences recorded.

One scorer runs per process: starting one stops the one before it (MONAI Label's ``/reload`` builds a
new app and a new strategy), and the running one is stopped at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from monailabel.interfaces.datastore import Datastore

from lib.infers.task import LandmarkInferTask, refusal
from lib.scores import FileSignature, ScoreCache, file_signature
from lmk3d.io import read_image

logger = logging.getLogger(__name__)

ENV = "LMK3D_BACKGROUND_SCORES"
QUIET_S = 1.0
POLL_S = 5.0
THREAD_NAME = "lmk3d-scorer"


def enabled_from_env() -> bool:
    """Whether ``LMK3D_BACKGROUND_SCORES`` leaves background scoring on (the default)."""
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false", "no")


class BackgroundScorer:
    """Score every unlabelled image with every task in ``tasks``, one at a time, when inference is quiet.

    Args:
        tasks: the served infer tasks by model name, in the order to score them.
        scores: the cache the infer tasks and ``least_confident`` share.
        enabled: False makes :meth:`start` do nothing.
        quiet_s: seconds without interactive inference before each image is scored.
        poll_s: seconds between looks for new work when everything is scored.
    """

    def __init__(self, tasks: Mapping[str, LandmarkInferTask], scores: ScoreCache, enabled: bool = True,
                 quiet_s: float = QUIET_S, poll_s: float = POLL_S) -> None:
        self.tasks = dict(tasks)
        self.scores = scores
        self.enabled = enabled
        self.quiet_s = quiet_s
        self.poll_s = poll_s
        self._paths: dict[str, str] = {}  # image id -> local file, as the datastore resolved it
        # (model, image id) -> (image file, checkpoint) signatures of a failed attempt, and why it failed
        self._failed: dict[tuple[str, str], tuple[FileSignature | None, FileSignature | None, str]] = {}
        self._unresolved: dict[str, str] = {}  # image id -> why the datastore could not give its file
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inferences = 0

    # --- control ------------------------------------------------------------------------------------
    def start(self, datastore: Datastore) -> None:
        """Start the thread on ``datastore`` (once; later calls do nothing), stopping any other scorer."""
        global _running
        if not self.enabled:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, args=(datastore,), name=THREAD_NAME, daemon=True)
        with _running_lock:
            previous, _running = _running, self
        if previous is not None and previous is not self:
            previous.stop()
        self._thread.start()
        logger.info("background scores: started for model(s) %s (waits %g s after each interactive inference)",
                    ", ".join(self.tasks) or "(none)", self.quiet_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; an image being scored is finished first (up to ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        """``{"enabled", "running", "inferences"}``: inferences = images scored since the start."""
        return {"enabled": self.enabled, "running": self.running, "inferences": self._inferences}

    # --- what it knows --------------------------------------------------------------------------------
    def path_of(self, image_id: str) -> str | None:
        """The local file of ``image_id`` once the scorer has resolved it (None before)."""
        return self._paths.get(image_id)

    def problem(self, model: str, image_id: str, path: str | None) -> str | None:
        """Why ``image_id`` (file ``path``) has no score from ``model``, while the image and the model are unchanged.

        None when nothing failed (it may simply not be scored yet).
        """
        if path is None:
            return self._unresolved.get(image_id)
        failed = self._failed.get((model, image_id))
        task = self.tasks.get(model)
        if failed is None or task is None:
            return None
        image_sig, checkpoint, reason = failed
        return reason if (image_sig, checkpoint) == (file_signature(path), file_signature(task.checkpoint)) else None

    # --- the thread -----------------------------------------------------------------------------------
    def _run(self, datastore: Datastore) -> None:
        if sys.platform.startswith("linux"):
            try:  # on Linux a thread has its own nice value; torch's worker threads started from here inherit it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError as e:
                logger.info("background scores: cannot lower this thread's priority (%s)", e)
        while not self._stop.is_set():
            self._wake.clear()
            try:
                done = self._pass(datastore)
            except Exception:  # a datastore changing under the listing, say: log it, try again later
                logger.exception("background scores: a pass failed; trying again in %g s", self.poll_s)
                done = 0
            if not done:
                self._wake.wait(self.poll_s)

    def _pass(self, datastore: Datastore) -> int:
        """Score what is missing, model by model; the number of images scored."""
        image_ids = sorted(datastore.get_unlabeled_images())
        t0, done = time.perf_counter(), 0
        for name, task in self.tasks.items():
            for image_id in image_ids:
                if self._stop.is_set():
                    return done
                if not task.is_valid():  # not trained yet, or its checkpoint removed
                    break
                path = self._resolve(datastore, image_id)
                if path is None:
                    continue
                checkpoint = file_signature(task.checkpoint)
                if self.scores.get(name, path, checkpoint) is not None or self.problem(name, image_id, path):
                    continue
                if not self._wait_quiet():
                    return done
                done += self._score(name, task, image_id, path)
        if done:
            logger.info("background scores: %d image(s) scored in %.1f s", done, time.perf_counter() - t0)
        return done

    def _resolve(self, datastore: Datastore, image_id: str) -> str | None:
        path = self._paths.get(image_id)
        if path and os.path.isfile(path):
            return path
        try:
            path = datastore.get_image_uri(image_id)  # a DICOMweb series is downloaded here, once
        except Exception as e:
            reason = f"cannot get the image: {e}"
            if self._unresolved.get(image_id) != reason:  # logged once, not at every pass
                logger.warning("background scores: image %s: %s", image_id, reason)
            self._unresolved[image_id] = reason
            return None
        self._unresolved.pop(image_id, None)
        if not path or not os.path.exists(path):
            return None  # removed since the listing
        self._paths[image_id] = path
        return path

    def _wait_quiet(self) -> bool:
        """Wait until no interactive inference ran for ``quiet_s``; False when stopped meanwhile."""
        while not self._stop.is_set():
            quiet = self.scores.quiet_s()
            if quiet >= self.quiet_s:
                return True
            self._stop.wait(self.quiet_s - quiet)
        return False

    def _score(self, name: str, task: LandmarkInferTask, image_id: str, path: str) -> int:
        image_sig = file_signature(path)
        checkpoint = file_signature(task.checkpoint)
        try:
            detector, checkpoint = task.detector()  # loads new weights first, as an interactive inference would
            prediction = detector.predict_all(read_image(path))
        except Exception as e:  # any failure: the thread must go on with the other images
            self._fail(name, image_id, image_sig, checkpoint, f"{type(e).__name__}: {e}")
            return 0
        # Not ``interactive``: the scorer's own inferences must not hold it back.
        self.scores.put(name, path, checkpoint, prediction.landmarks.scores, interactive=False,
                        refused=refusal(prediction))
        self._inferences += 1
        logger.debug("background scores: model %r, image %s scored", name, image_id)
        return 1

    def _fail(self, model: str, image_id: str, image_sig: FileSignature | None, checkpoint: FileSignature | None,
              reason: str) -> None:
        self._failed[(model, image_id)] = (image_sig, checkpoint, reason)
        logger.warning("background scores: model %r, image %s: %s; not tried again until the image or the "
                       "model changes", model, image_id, reason)


_running: BackgroundScorer | None = None
_running_lock = threading.Lock()


@atexit.register
def _stop_running() -> None:
    if _running is not None:
        _running.stop(timeout_s=5.0)
