"""Active learning: besides MONAI Label's ``random`` and ``first``, the image the model is least sure of.

``POST /activelearning/least_confident`` with optional JSON ``{"model": NAME, "reduce": "mean"|"min"}``
returns the unlabelled image (no final label) whose per-landmark scores from the current model have
the lowest mean (or minimum): the image a radiologist's correction teaches the model most about.

The request never runs a model: it ranks by the scores already in the shared cache, which a
background thread fills for every unlabelled image and served model (:mod:`lib.background`; started
by :meth:`LeastConfident.start` once the server is up, else by the first request) and every
interactive inference adds to. Images scored with the served checkpoint come first; when none is, the
scores of an earlier checkpoint are used; when there are none either, an unscored image is picked at
random. The answer says which (``basis``: ``scores``, ``earlier_scores`` or ``unscored``) and how far
scoring has got:

- ``id``, ``model``, ``reduce``, ``confidence`` (the reduced score; null for an unscored pick);
- ``candidates``: unlabelled images that can be ranked; ``scored``: how many of them have scores from
  the served checkpoint (``scored == candidates`` once the background pass is done);
- ``skipped``: ``{id: reason}`` of images that could not be scored (an unreadable file), left out
  until the file or the model changes;
- ``not_of_kind``: ``{id: reason}`` of images the model refused as not of its kind (a spine series in a
  hippocampus folder: every score 0, so it would always come first, yet its landmarks cannot be placed),
  left out of the ranking until the file or the model's answer changes;
- ``background``: ``{enabled, running, inferences}`` of the background scorer.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.background import BackgroundScorer, enabled_from_env
from lib.errors import NOT_FOUND, UNPROCESSABLE, http_error
from lib.infers.task import LandmarkInferTask
from lib.scores import ScoreCache, file_signature

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "min")


class LeastConfident(Strategy):
    """The unlabelled image with the lowest mean (or min) per-landmark score of the current model.

    Args:
        tasks: the served infer tasks by model name; the first is the default model (and is scored first).
        scores: the cache the tasks record their scores in (default: the tasks' own).
        background: whether to score in the background (default: ``LMK3D_BACKGROUND_SCORES``, on).
    """

    def __init__(self, tasks: Mapping[str, LandmarkInferTask], scores: ScoreCache | None = None,
                 background: bool | None = None) -> None:
        super().__init__("Unlabelled image the current model is least sure of (lowest mean per-landmark score)")
        self.tasks = dict(tasks)
        shared = next((t.scores for t in self.tasks.values() if t.scores is not None), None)
        self.scores = scores or shared or ScoreCache()
        self.scorer = BackgroundScorer(self.tasks, self.scores,
                                       enabled=enabled_from_env() if background is None else background)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": {"model": list(self.tasks), "reduce": list(REDUCTIONS)}}

    def add_task(self, name: str, task: LandmarkInferTask) -> None:
        """Offer one more model (a declared model that has just got its first version); scored from now on."""
        # New dicts swapped in: the background thread may be iterating over the old ones.
        self.tasks = {**self.tasks, name: task}
        self.scorer.tasks = {**self.scorer.tasks, name: task}
        self.scorer.wake()

    def start(self, datastore: Datastore) -> None:
        """Start scoring ``datastore``'s unlabelled images in the background (once; later calls do nothing)."""
        self.scorer.start(datastore)

    def stop(self) -> None:
        self.scorer.stop()

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        model = _choice(request, "model", list(self.tasks), NOT_FOUND)
        reduce = _choice(request, "reduce", list(REDUCTIONS), UNPROCESSABLE)
        self.scorer.start(datastore)
        self.scorer.wake()  # a new image or checkpoint is looked at now, not at the next poll
        served = file_signature(self.tasks[model].checkpoint)
        pacs = isinstance(datastore, DICOMWebDatastore)
        current: dict[str, float] = {}
        earlier: dict[str, float] = {}
        unscored: list[str] = []
        skipped: dict[str, str] = {}
        not_of_kind: dict[str, str] = {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            # A local file is found at once; a DICOMweb series is known only once the scorer has downloaded it.
            path = self.scorer.path_of(image_id) if pacs else datastore.get_image_uri(image_id)
            problem = self.scorer.problem(model, image_id, path)
            if problem:
                skipped[image_id] = problem
                continue
            found = self.scores.latest(model, path) if path else None
            if found is None:
                unscored.append(image_id)
                continue
            scores, checkpoint = found
            refused = self.scores.refusal(model, path)
            if refused:  # every score 0, yet no correction of these landmarks can teach the model anything
                not_of_kind[image_id] = refused
                continue
            value = 0.0 if len(scores) == 0 else float(np.mean(scores) if reduce == "mean" else np.min(scores))
            (current if checkpoint == served else earlier)[image_id] = value
        candidates = len(current) + len(earlier) + len(unscored)
        if candidates == 0:
            return {}
        ranked = current or earlier
        confidence: float | None = None
        if ranked:
            # Ties (e.g. a baseline that scores every image alike) go to the first id, so answers are stable.
            image_id = min(ranked, key=lambda i: (ranked[i], i))
            confidence = ranked[image_id]
            basis = "scores" if current else "earlier_scores"
        else:
            image_id = random.choice(unscored)
            basis = "unscored"
        logger.info("least_confident: %s (%s) of %d candidates, %d scored with the served checkpoint",
                    image_id, basis, candidates, len(current))
        return {"id": image_id, "model": model, "reduce": reduce, "confidence": confidence, "basis": basis,
                "candidates": candidates, "scored": len(current), "skipped": skipped, "not_of_kind": not_of_kind,
                "background": self.scorer.status()}


def _choice(request: Mapping[str, Any], key: str, choices: list[str], status: int) -> str:
    value = request.get(key) or choices[0]
    if isinstance(value, list):
        value = value[0] if value else choices[0]
    if value not in choices:
        raise http_error(status, f"{key} {value!r} is not one of {', '.join(choices)}")
    return str(value)
