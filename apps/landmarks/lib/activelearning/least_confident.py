"""Active learning: besides MONAI Label's ``random`` and ``first``, the image the model is least sure of.

``POST /activelearning/least_confident`` with optional JSON ``{"model": NAME, "reduce": "mean"|"min"}``
returns the unlabelled image (no final label) whose per-landmark scores from the current model have
the lowest mean (or minimum): the image a radiologist's correction teaches the model most about.
Scores come from the infer tasks' cache (every infer records them) or are computed on first use; an
entry is reused until the image file or the model's checkpoint changes. Images that cannot be read are
skipped and listed in the answer's ``skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.errors import NOT_FOUND, UNPROCESSABLE, http_error
from lib.infers.task import LandmarkInferTask
from lmk3d.errors import LandmarkError

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "min")


class LeastConfident(Strategy):
    """The unlabelled image with the lowest mean (or min) per-landmark score of the current model.

    Args:
        tasks: the served infer tasks by model name; the first is the default model.
    """

    def __init__(self, tasks: Mapping[str, LandmarkInferTask]) -> None:
        super().__init__("Unlabelled image the current model is least sure of (lowest mean per-landmark score)")
        self.tasks = dict(tasks)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": {"model": list(self.tasks), "reduce": list(REDUCTIONS)}}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        model = _choice(request, "model", list(self.tasks), NOT_FOUND)
        reduce = _choice(request, "reduce", list(REDUCTIONS), UNPROCESSABLE)
        task = self.tasks[model]
        confidence: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            try:
                scores = task.scores_for(datastore.get_image_uri(image_id))
            except LandmarkError as e:
                skipped[image_id] = str(e)
                logger.warning("least_confident: skipped %s: %s", image_id, e)
                continue
            if len(scores) == 0:
                confidence[image_id] = 0.0
            else:
                confidence[image_id] = float(np.mean(scores) if reduce == "mean" else np.min(scores))
        if not confidence:
            return {}
        # Ties (e.g. a baseline that scores every image alike) go to the first id, so answers are stable.
        image_id = min(confidence, key=lambda i: (confidence[i], i))
        return {"id": image_id, "model": model, "reduce": reduce, "confidence": confidence[image_id],
                "candidates": len(confidence), "skipped": skipped}


def _choice(request: Mapping[str, Any], key: str, choices: list[str], status: int) -> str:
    value = request.get(key) or choices[0]
    if isinstance(value, list):
        value = value[0] if value else choices[0]
    if value not in choices:
        raise http_error(status, f"{key} {value!r} is not one of {', '.join(choices)}")
    return str(value)
