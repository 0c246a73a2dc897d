"""Adding an uploaded checkpoint as a new version of a served model, and rolling a model back.

An uploaded checkpoint is a file from the network: it becomes a version only after
:func:`replace_checkpoint` has

1. read it weights-only (:func:`lmk3d.detectors.load_detector`, which reads through
   :mod:`lmk3d.checkpoint`: a pickle that would import or call anything is refused, never run);
2. checked it holds the served detector and the served landmark names, in the same order;
3. run it on a probe image (a datastore image, else a synthetic volume) and checked it returns one
   finite point, or "not found", per landmark.

Any failure is a 422 naming it, and nothing is kept. A file that passes is added to the model
registry (:mod:`lmk3d.registry`) and served only if the gate finds it no worse than the served
version on the model's validation cases, as for a retrain; otherwise it is kept as a candidate
(409, saying why) unless an admin passes ``force``. :func:`rollback` serves the previous version
again; with none it refuses (409) rather than leave the model without weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lib.configs import LoadedModel
from lib.errors import CONFLICT, UNPROCESSABLE, http_error
from lib.trainers.task import scores
from lmk3d.calibrate import calibrate_new_weights
from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.data.samples import Sample
from lmk3d.detectors import Detector, load_detector
from lmk3d.io import read_image
from lmk3d.io.image import Volume
from lmk3d.publish import STAGING_PREFIX
from lmk3d.registry import RegistryError, gate
from lmk3d.trust import TrustModel, save_trust

__all__ = ["probe_volume", "replace_checkpoint", "rollback"]

logger = logging.getLogger(__name__)


def probe_volume(image_path: str | None) -> Volume:
    """The image an uploaded model must run on: ``image_path`` when given, else a synthetic 48^3 volume."""
    if image_path:
        return read_image(image_path)
    rng = np.random.default_rng(0)
    array = rng.normal(100.0, 20.0, size=(48, 48, 48)).astype(np.float32)
    return Volume(array, np.diag([1.0, 1.0, 1.0, 1.0]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _refuse(name: str, why: str) -> Exception:
    return http_error(UNPROCESSABLE, f"model file for {name!r} refused, the served model is unchanged: {why}")


def replace_checkpoint(model: LoadedModel, upload: str, probe_image: str | None, val: Sequence[Sample],
                       force: bool = False, train: Sequence[Sample] = ()) -> dict[str, Any]:
    """Check ``upload``, add it as a version of ``model`` and serve it if the gate (or ``force``) allows.

    Before the gate, the uploaded weights get their own trust model
    (:func:`lmk3d.calibrate.calibrate_new_weights`, as a version trained by the server does): fitted on
    ``val`` (the model's validation cases) with ``train`` (the other labelled cases) for its shape and
    image models; with fewer than 5 validation cases, or when the fit fails, the version has none and
    serves raw scores. A file that came with a ``trust.json`` elsewhere cannot bring it: the upload is
    the checkpoint alone, and its trust model describes the errors on this server's cases.

    Raises:
        HTTPException: 422 naming the check that failed (nothing is kept); 409 when the version is kept
            as a candidate because the gate found it worse (the message says why).
    """
    name = model.config.name
    record = model.record
    landmark_names = tuple(model.detector.landmark_names)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=record.root))
    try:
        staged = staging / CHECKPOINT_FILE
        shutil.copyfile(upload, staged)
        try:
            detector = load_detector(staging, "cpu")
        except Exception as e:  # every reading failure is the file's fault here
            raise _refuse(name, f"{type(e).__name__}: {e}".replace(str(staged), "the uploaded file")) from None
        if detector.name != record.detector:
            raise _refuse(name, f"it holds a {detector.name!r} detector, not {record.detector!r}")
        if tuple(detector.landmark_names) != landmark_names:
            raise _refuse(name, f"its landmarks {list(detector.landmark_names)} differ from the served model's "
                                f"{list(landmark_names)}")
        try:
            landmarks = detector.predict_all(probe_volume(probe_image)).landmarks
        except Exception as e:
            raise _refuse(name, f"it failed on a probe image ({type(e).__name__}: {e})") from None
        coords = np.asarray(landmarks.xyz_mm_ras, dtype=float)
        found = np.asarray(landmarks.found, dtype=bool)
        if coords.shape != (len(landmark_names), 3) or not np.isfinite(coords[found]).all():
            raise _refuse(name, "its prediction on a probe image is not one finite point per landmark")
        current = record.current()
        trust, calibration = _calibrate(name, detector, train, val,
                                        [p for p in (record.current_dir(), record.shipped) if p is not None])
        detector.trust = trust
        if trust is not None:
            save_trust(staging, trust)
        before = scores(load_detector(record.current_dir(), "cpu"), val) if current is not None else None
        after = scores(detector, val)
        version = record.add_version(staging, parent=current, detector=detector.name, metrics=after,
                                     report={"source": "uploaded by an admin (PUT /model)",
                                             "val_cases": [s.case for s in val], "calibration": calibration},
                                     data_fingerprint=str(getattr(detector, "data_fingerprint", "") or ""),
                                     calibration=calibration)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    accepted, reason = gate(before, after)
    if force and not accepted:
        accepted, reason = True, f"served on an admin's decision (force=true) although the gate said: {reason}"
    record.decide(version.id, accepted, reason, {"current": current, "before": before, "after": after})
    answer = {"model": name, "version": version.id, "published": accepted, "decision": reason,
              "served_version": record.current(), "sha256": _sha256(version.checkpoint),
              "detector": detector.name, "landmarks": list(detector.landmark_names),
              "calibrated": trust is not None, "calibration": calibration["reason"]}
    if not accepted:
        raise http_error(CONFLICT, f"model file for {name!r} kept as candidate version {version.id}, not served: "
                                   f"{reason} (an admin may serve it anyway with ?force=true)")
    return answer


def _calibrate(name: str, detector: Detector, train: Sequence[Sample], val: Sequence[Sample],
               previous: Sequence[Path]) -> tuple[TrustModel | None, dict[str, Any]]:
    """The uploaded weights' trust model, or None and why (a failed fit costs the trust model, not the upload)."""
    detector.trust = None
    try:
        return calibrate_new_weights(detector, train, val, previous, seed=0)
    except Exception as e:
        logger.exception("model %r: the trust model of the uploaded weights could not be fitted", name)
        return None, {"calibrated": False, "reason": f"calibration failed ({type(e).__name__}: {e})"}


def rollback(model: LoadedModel) -> dict[str, Any]:
    """Serve the version before the current one again (the registry's rollback).

    Raises:
        HTTPException: 409 when there is nothing to roll back to.
    """
    record = model.record
    before = record.current()
    try:
        served = record.rollback()
    except RegistryError as e:
        raise http_error(CONFLICT, f"model {model.config.name!r}: {e}") from None
    return {"model": model.config.name, "rolled_back_from": before, "served_version": served}
