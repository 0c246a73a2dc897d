"""What a viewer that shows only the label map should tell the radiologist about an answer.

OHIF's MONAI Label panel asks for the label map alone (``output=image``): the spheres carry no score, a
landmark not found is simply absent, and an image the model refused looks like one where it found
nothing. So the server sends, with every label-map answer, a header :data:`HEADER` holding
:func:`review_notice` of the answer's JSON, and the served viewer (:mod:`lib.ohif`) shows it in place of
the panel's "Running Segmentation - Successful": why the image was refused, that it is unusual and every
score is capped, which landmarks were not found and which points to check (score below
:data:`lmk3d.io.markups.REVIEW_BELOW`, the rule Slicer's markups colour by).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lmk3d.io.markups import REVIEW_BELOW

#: The response header of a label-map answer that holds :func:`review_notice` as JSON (ASCII only).
HEADER = "X-Lmk3d-Review"
#: Longest message a header carries; a longer one is cut with "..." (a model with very many landmarks).
MAX_MESSAGE = 3000


def review_notice(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{level, message, not_found, check}`` for the infer answer ``answer``; None if it has no landmarks.

    ``level`` is OHIF's notification type: ``error`` (the image was refused, nothing found), ``warning``
    (something to check) or ``success``; ``not_found`` and ``check`` list landmark names (``check``: found,
    with a score below :data:`REVIEW_BELOW`, lowest first).

    Example:
        >>> review_notice({"tolerance_mm": 3.0, "image_check": {"in_distribution": True, "atypical": False},
        ...                "landmarks": [{"name": "a", "found": True, "score": 0.9},
        ...                              {"name": "b", "found": True, "score": 0.31},
        ...                              {"name": "c", "found": False, "score": 0.0}]})["message"]
        'Not found: c. Check b (score 0.31). A score is the probability that the point lies within 3 mm of the truth.'
    """
    items = answer.get("landmarks")
    if not isinstance(items, list):
        return None
    verdict = answer.get("image_check") or {}
    tolerance = answer.get("tolerance_mm")
    names = [str(item.get("name")) for item in items]
    not_found = [str(item.get("name")) for item in items if not item.get("found")]
    low = sorted((float(item.get("score") or 0.0), str(item.get("name"))) for item in items
                  if item.get("found") and float(item.get("score") or 0.0) < REVIEW_BELOW)
    check = [name for _, name in low]
    if verdict.get("in_distribution") is False:
        level = "error"
        message = (f"The model does not recognise this image, so no landmark is shown: "
                   f"{verdict.get('reason') or 'no reason given'}")
        not_found, check = names, []
    elif verdict.get("in_distribution") is None:  # no trust model: raw scores, no verdict
        level = "warning"
        found = len(names) - len(not_found)
        message = (f"{found} of {len(names)} landmarks found. This model has no calibrated scores (no trust "
                   f"model): check each point.")
    else:
        parts = []
        if verdict.get("atypical"):
            parts.append("The model finds this image unusual; every score is capped, check each point.")
        if not_found:
            parts.append(f"Not found: {', '.join(not_found)}.")
        if check:
            parts.append("Check " + ", ".join(f"{name} (score {score:.2f})" for score, name in low) + ".")
        meaning = (f" A score is the probability that the point lies within {float(tolerance):g} mm of the truth."
                   if tolerance is not None else "")
        if parts:
            level, message = "warning", " ".join(parts) + meaning
        else:
            level = "success"
            message = f"All {len(names)} landmarks found, each with a score of at least {REVIEW_BELOW:g}." + meaning
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 3] + "..."
    return {"level": level, "message": message, "not_found": not_found, "check": check}


def header_value(answer: Mapping[str, Any]) -> str | None:
    """:func:`review_notice` as the ASCII JSON a header can carry; None when there is nothing to say."""
    notice = review_notice(answer)
    return json.dumps(notice, ensure_ascii=True, separators=(",", ":")) if notice is not None else None
