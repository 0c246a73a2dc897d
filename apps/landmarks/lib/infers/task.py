"""Infer tasks: one class, :class:`LandmarkInferTask`, serves every detector (../shared/DETECTOR_CONTRACT.md).

A request runs ``Detector.predict_all`` on the image read by ``lmk3d.io.read_image`` (the library's
one reader, so the app and the library agree on geometry) and answers with

- JSON: ``landmarks`` = ``[{name, label, ras, lps, ijk, score, found}]`` (world mm RAS and LPS,
  continuous voxel indices of the input image; positions ``null`` where unknown), ``label_names``
  ``{name: 1..N}``, ``centroids`` in the convention of MONAI Label's vertebra pipeline (a list of
  ``{"label_<value>": [i, j, k]}``, integer voxel indices of the input image, found landmarks only),
  ``latencies`` in seconds (``load``, then each detector stage by name, ``trust``, ``write``, ``total``), the
  ``checkpoint`` that answered, and ``stages``: each detector stage's own landmarks, in order
  (``[{name, seconds, landmarks: [{name, xyz_mm_ras, score, found}]}]``, from
  ``Prediction.stages_json``), which shows how the first guess was refined. With a model that has a trust
  model (:mod:`lmk3d.trust`), each landmark's ``score`` is the probability that it lies within
  ``tolerance_mm`` of the truth, ``radius_mm`` holds the truth with 90 % probability, a cut-off landmark is
  not found, ``image_check`` = ``{in_distribution, score, atypical, reason, distance}`` (plus
  ``anatomy_distance`` where the model has that check) says whether the image is of the model's kind (when
  not, no landmark is found and the reason says why; when ``atypical``, every score is capped at 0.2 and the
  reason says why), and ``raw_scores`` keeps the detector's own scores. A client that only wants
  the JSON can send ``result_write_to_file: false`` (MONAI Label's own option name): MONAI Label gives
  the task no way to see ``output=json``, so otherwise the result file is made and then thrown away;
- a result file chosen by the option ``landmark_output``:

  - ``label`` (default): a sphere label map on the input grid, landmark ``k`` drawn with value
    ``k + 1`` (not-found landmarks not drawn). The stock 3D Slicer and OHIF plugins show it as one
    named segment per landmark, Slicer's "Submit Label" sends it back as it is, and OHIF can show
    nothing else. Written as the client's ``result_extension`` (``.nrrd`` from both plugins;
    ``.nii.gz`` otherwise), uncompressed when ``result_compress`` is false (OHIF's reader needs that).
    OHIF's MONAI Label panel (known by the ``restore_label_idx`` option only its client sends) copies
    the file's voxels into its own volume without reading the file's geometry, so for it the map is
    drawn on the grid OHIF stacks the series on (:func:`lmk3d.io.dicom_export.viewer_grid`: the slice
    order reversed when the image's voxel grid is left-handed), and unless the request gives
    ``sphere_radius_mm`` the spheres are made visible at the image's scale (:func:`viewer_radius_mm`).
  - ``markups``: a Slicer ``.mrk.json`` point list (LPS); the stock Slicer plugin loads any ``.json``
    result with ``slicer.util.loadMarkups``, which gives named points the radiologist can drag.
    Landmarks not found are points still to be placed.

With a DICOMweb datastore, the option ``store_sr: true`` also stores the detection in the PACS as a
TID 1500 DICOM SR (built by ``lmk3d.io.dicom_sr.build_sr`` from the downloaded series, stored by
STOW-RS; the image verdict goes with the algorithm's parameters, ``image_check=...``) and adds ``sr`` =
``{StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID}`` to the JSON, with ``sr_build`` and ``sr_store`` in
``latencies``. With a local studies folder the option is refused
(422): there is no source DICOM series to reference; ``lmk3d predict --format sr`` writes SR files.

The label map is written by :func:`lmk3d.io.label_map.write_label_map` (the library's writer); this
module only adapts requests and answers to MONAI Label.

The task's type is ``segmentation`` because that is the type both stock plugins list under
"auto segmentation" (a ``detection`` model makes Slicer's "Submit Label" send ROI boxes instead).

The task checks the served checkpoint (the model's current registry version, :mod:`lmk3d.registry`) on
every request and reloads it when a new version has been published or rolled back to, so retrained
weights are used without restarting the server; a checkpoint that fails to load
leaves the previous weights in service (and says so in the log). The new version may hold another
detector than the old one only as a model the user declared allows it: the ``mean_shape`` baseline
first, then the model's own detector (:attr:`lmk3d.registry.ModelRecord.detectors`).

It does not subclass MONAI Label's ``BasicInferTask``: that class runs MONAI transforms and the MONAI
reader, and overwrites ``result["centroids"]`` with a dict of strings.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs import DEFAULT_LANDMARK_OUTPUT, LANDMARK_OUTPUTS, LoadedModel
from lib.errors import NOT_FOUND, UNPROCESSABLE, bad_input, http_error
from lib.json_values import jsonable
from lib.scores import FileSignature, ScoreCache, file_signature
from lmk3d.detectors import Detector, Prediction, load_detector
from lmk3d.detectors.base import CHECKPOINT_FILE
from lmk3d.errors import LandmarkError
from lmk3d.io import case_id, read_image
from lmk3d.io.dicom_export import viewer_grid
from lmk3d.io.image import Volume
from lmk3d.io.label_map import DEFAULT_RADIUS_MM, label_values, write_label_map
from lmk3d.io.markups import write_markups
from lmk3d.io.table import landmarks_to_json
from lmk3d.landmarks import LandmarkSet

logger = logging.getLogger(__name__)

LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
DEFAULT_LABEL_EXTENSION = ".nii.gz"
MAX_RADIUS_MM = 50.0
#: The option only OHIF's MONAI Label client sends (``false``): its requests get the viewer's grid.
OHIF_CLIENT_KEY = "restore_label_idx"
#: A marker for OHIF is this fraction of the image's largest extent in radius (a 256 mm head: 6.4 mm) ...
VIEWER_MARKER_FRACTION = 0.025
#: ... but at most this fraction of the distance to the nearest other landmark, so markers stay apart.
VIEWER_MARKER_GAP_FRACTION = 0.45

#: ``store(image_path, landmarks, algorithm_parameters) -> {UIDs, "latencies": {...}}``: stores an SR.
SrStore = Callable[[str, LandmarkSet, Sequence[str]], dict[str, Any]]


class LandmarkInferTask(InferTask):
    """Detect the landmarks of one image with one trained detector.

    Args:
        model: the loaded detector and the folder its checkpoint lives in.
        landmark_output: the default result file, ``label`` or ``markups`` (a request overrides it).
        device: where a reloaded checkpoint goes (None: CUDA when present, as the detector decides).
        scores: where to record each image's per-landmark scores for active learning.
    """

    def __init__(
        self,
        model: LoadedModel,
        landmark_output: str = DEFAULT_LANDMARK_OUTPUT,
        device: str | None = None,
        scores: ScoreCache | None = None,
    ) -> None:
        if landmark_output not in LANDMARK_OUTPUTS:
            raise LandmarkError(f"landmark_output {landmark_output!r} is not one of {', '.join(LANDMARK_OUTPUTS)}")
        detector = model.detector
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=label_values(detector.landmark_names),
            dimension=3,
            description=model.config.description or f"{model.config.name} landmark detector",
            # A list is a choice in the Slicer plugin's options table; its first item is the default.
            config={
                "landmark_output": [landmark_output, *[o for o in LANDMARK_OUTPUTS if o != landmark_output]],
                "sphere_radius_mm": DEFAULT_RADIUS_MM,
            },
        )
        self.name = model.config.name
        self.record = model.record
        self.device = device
        self.scores = scores
        self._lock = threading.Lock()
        self._detector: Detector = detector
        self._signature = file_signature(self.checkpoint)
        #: Set by the app when its datastore can store SRs (DICOMweb); None refuses ``store_sr``.
        self.sr_store: SrStore | None = None

    # --- the model ----------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        """The served version's folder (the registry's current version, or the shipped model folder)."""
        folder = self.record.current_dir()
        return Path(folder) if folder is not None else Path(self.record.root) / "no-version"

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / CHECKPOINT_FILE

    def is_valid(self) -> bool:
        return self.checkpoint.is_file()

    def get_path(self, validate: bool = True) -> str | None:
        return str(self.checkpoint) if self.checkpoint.is_file() or not validate else None

    @property
    def landmark_names(self) -> tuple[str, ...]:
        return self._detector.landmark_names

    def detector(self) -> tuple[Detector, FileSignature | None]:
        """The current detector, reloaded first if the checkpoint file changed; and its file signature."""
        signature = file_signature(self.checkpoint)
        with self._lock:
            if signature is not None and signature != self._signature:
                try:
                    det = load_detector(self.model_dir, self.device)
                    if det.name not in self.record.detectors:  # a declared model goes from the baseline to its own
                        raise LandmarkError(f"it holds a {det.name!r} detector, not "
                                            f"{' or '.join(map(repr, self.record.detectors))}")
                except Exception as e:  # a bad new file must not take the model down: keep the old weights
                    logger.error("model %r: %s changed but cannot be loaded (%s); still serving the previous "
                                 "weights", self.name, self.checkpoint, e)
                else:
                    logger.info("model %r: loaded the new weights in %s", self.name, self.checkpoint)
                    self._detector = det
                    self.labels = label_values(det.landmark_names)
                self._signature = signature
            return self._detector, self._signature

    def predict(self, volume: Volume) -> tuple[Prediction, FileSignature | None]:
        """Run the current detector on ``volume``; record its scores for active learning."""
        detector, signature = self.detector()
        with self.scores.inferring() if self.scores is not None else nullcontext():  # holds background scoring back
            prediction = detector.predict_all(volume)
        if self.scores is not None and volume.path:
            self.scores.put(self.name, volume.path, signature, prediction.landmarks.scores, refused=refusal(prediction))
        return prediction, signature

    # --- a request ----------------------------------------------------------------------------------
    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        t0 = time.perf_counter()
        options = self._options(request)
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise http_error(NOT_FOUND, "no image: give the id of a datastore image (?image=ID) or upload a file")
        with bad_input(UNPROCESSABLE, prefix=f"cannot detect landmarks in image {case_id(image)!r}: "):
            volume = read_image(image)
        t_load = time.perf_counter() - t0

        prediction, signature = self.predict(volume)
        landmarks = prediction.landmarks
        t1 = time.perf_counter()
        result_file = None
        if options["write"]:
            result_file = self._write_result(landmarks, volume, options, case_id(image))
        t_write = time.perf_counter() - t1
        sr = None
        if options["store_sr"] and self.sr_store is not None:
            verdict = [f"image_check={prediction.verdict.summary()}"] if prediction.verdict is not None else []
            sr = self.sr_store(image, landmarks, [f"detector={self._detector.name}", f"model={self.name}", *verdict])

        latencies: dict[str, float] = {"load": round(t_load, 4)}
        for stage, seconds in prediction.latencies.items():
            key = stage if stage not in ("load", "write", "total", "sr_build", "sr_store") else f"stage_{stage}"
            latencies[key] = round(seconds, 4)
        latencies["write"] = round(t_write, 4)
        if sr is not None:
            latencies.update(sr.pop("latencies", {}))
        latencies["total"] = round(time.perf_counter() - t0, 4)
        result = self._result_json(landmarks, volume, options["landmark_output"], latencies, signature)
        result["stages"] = jsonable(prediction.stages_json())
        result["image_check"] = (prediction.verdict.to_json() if prediction.verdict is not None else
                                 {"in_distribution": None, "score": None,
                                  "reason": "not checked: this model has no trust model (trust.json)"})
        if prediction.raw is not None and prediction.raw is not landmarks:
            result["raw_scores"] = {n: round(float(s), 4) for n, s in zip(prediction.raw.names, prediction.raw.scores,
                                                                          strict=True)}
        if sr is not None:
            result["sr"] = sr
        logger.info("model %r on %s: %d of %d landmarks found; latencies %s", self.name, case_id(image),
                    int(landmarks.found.sum()), len(landmarks), latencies)
        return result_file, result

    def _options(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The request's options, checked (a 422 names the bad one and what is accepted)."""
        default = self._config["landmark_output"][0]
        output = request.get("landmark_output", default)
        if isinstance(output, list):  # a client that sends the option list back as it got it
            output = output[0] if output else default
        if output not in LANDMARK_OUTPUTS:
            raise http_error(UNPROCESSABLE, f"landmark_output {output!r} is not one of {', '.join(LANDMARK_OUTPUTS)}")
        viewer = OHIF_CLIENT_KEY in request
        radius: float | None = None  # None: chosen for the viewer (viewer_radius_mm)
        if "sphere_radius_mm" in request or not viewer:
            try:
                radius = float(request.get("sphere_radius_mm", DEFAULT_RADIUS_MM))
            except (TypeError, ValueError):
                radius = float("nan")
            if not 0.0 < radius <= MAX_RADIUS_MM:
                raise http_error(UNPROCESSABLE, f"sphere_radius_mm {request.get('sphere_radius_mm')!r} must be a "
                                                f"number in (0, {MAX_RADIUS_MM:g}]")
        extension = str(request.get("result_extension") or DEFAULT_LABEL_EXTENSION).lower()
        if output == "label" and extension not in LABEL_EXTENSIONS:
            raise http_error(UNPROCESSABLE, f"result_extension {extension!r} cannot hold a label map; use one of "
                                            f"{', '.join(LABEL_EXTENSIONS)}")
        dtype = str(request.get("result_dtype") or "uint8")
        if dtype not in ("uint8", "uint16"):
            raise http_error(UNPROCESSABLE, f"result_dtype {dtype!r} is not one of uint8, uint16")
        store_sr = _flag(request.get("store_sr", False))
        if store_sr and self.sr_store is None:
            raise http_error(UNPROCESSABLE, "store_sr needs a DICOMweb datastore (lmk3d serve --studies "
                                            "http://.../dicom-web); with a studies folder there is no DICOM series "
                                            "to reference: use `lmk3d predict --format sr` on the DICOM folder")
        return {"store_sr": store_sr, "landmark_output": output, "radius_mm": radius, "viewer": viewer,
                "extension": extension,
                "dtype": dtype,
                "compress": _flag(request.get("result_compress", True)),
                "write": _flag(request.get("result_write_to_file", True))}

    def _write_result(self, landmarks: LandmarkSet, volume: Volume, options: Mapping[str, Any], case: str) -> str:
        output = options["landmark_output"]
        suffix = ".mrk.json" if output == "markups" else options["extension"]
        fd, path = tempfile.mkstemp(prefix=f"{case}-{self.name}-", suffix=suffix)
        os.close(fd)
        if output == "markups":
            write_markups(path, landmarks, name=f"{case} {self.name}")
            return path
        reference = volume
        if options["viewer"]:  # only the grid is used: a zero-stride array stands for the voxels
            reference = Volume(np.broadcast_to(np.uint8(0), volume.shape), viewer_grid(volume.affine, volume.shape))
        radius = options["radius_mm"]
        if radius is None:
            radius = viewer_radius_mm(landmarks, volume)
        write_label_map(path, landmarks, reference, radius, dtype=options["dtype"], compress=options["compress"])
        return path

    def _result_json(self, landmarks: LandmarkSet, volume: Volume, output: str, latencies: dict[str, float],
                     signature: FileSignature | None) -> dict[str, Any]:
        values = label_values(landmarks.names)
        doc = landmarks_to_json(landmarks, volume.affine)
        items = doc["landmarks"]
        for item in items:
            item["label"] = values[item["name"]]
        centroids = []
        ijk = landmarks.to_ijk(volume.affine)
        for k, name in enumerate(landmarks.names):
            if landmarks.found[k] and np.all(np.isfinite(ijk[k])):
                centroids.append({f"label_{values[name]}": [int(v) for v in np.rint(ijk[k])]})
        return {
            "model": self.name,
            "landmarks": items,
            "label_names": values,
            "centroids": centroids,
            "landmark_output": output,
            **{k: doc[k] for k in ("tolerance_mm", "score_meaning") if k in doc},
            "latencies": latencies,
            "checkpoint": {"path": str(self.checkpoint), "mtime_ns": signature[1] if signature else None},
        }


def refusal(prediction: Prediction) -> str | None:
    """Why the model refused the image (not of its kind), or None: what active learning leaves out."""
    verdict = prediction.verdict
    return verdict.reason if verdict is not None and not verdict.in_distribution else None


def viewer_radius_mm(landmarks: LandmarkSet, volume: Volume) -> float:
    """The sphere radius that shows ``landmarks`` as clearly visible markers on ``volume`` in a viewer.

    :data:`VIEWER_MARKER_FRACTION` of the image's largest extent, capped at
    :data:`VIEWER_MARKER_GAP_FRACTION` of the distance between the two nearest found landmarks (so
    markers neither touch nor merge), never under the default radius nor over the largest accepted one.
    """
    extent = float(np.max(np.array(volume.shape) * volume.spacing_mm))
    radius = VIEWER_MARKER_FRACTION * extent
    found = landmarks.xyz_mm_ras[landmarks.found]
    if len(found) > 1:
        gaps = np.linalg.norm(found[:, None, :] - found[None, :, :], axis=-1)
        radius = min(radius, VIEWER_MARKER_GAP_FRACTION * float(gaps[~np.eye(len(found), dtype=bool)].min()))
    return float(np.clip(radius, DEFAULT_RADIUS_MM, MAX_RADIUS_MM))


def _flag(value: Any) -> bool:
    """A boolean option sent as JSON (``false``) or as text (``"false"``, ``"0"``, ``"no"``)."""
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no", "off")


def make_infer_task(
    model: LoadedModel,
    landmark_output: str | None = None,
    device: str | None = None,
    scores: ScoreCache | None = None,
) -> InferTask | None:
    """The infer task serving ``model`` (``landmark_output`` None: the model config's default)."""
    return LandmarkInferTask(model, landmark_output or model.config.landmark_output, device, scores)
