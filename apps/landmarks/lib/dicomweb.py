"""The DICOMweb datastore: image series from a PACS, landmark reports (DICOM SR) stored back to it.

:class:`LandmarkDICOMwebDatastore` subclasses MONAI Label's ``DICOMWebDatastore`` and changes what a
landmark server needs (docs/pacs.md):

- **Listing**: a QIDO-RS series query (``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, ``{}`` from ``lmk3d
  serve``) cached for ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` seconds (2 from ``lmk3d serve``), so a
  new series shows within seconds. Non-image series (SR, SEG, PR, KO...) are not listed.
- **Download**: WADO-RS with ``transfer-syntax=*`` (the stored encoding: Orthanc without GDCM cannot
  transcode JPEG 2000 and answers 500 otherwise) into the cache folder, written to a temporary folder
  and renamed, so concurrent requests never see half a series. The image is the DICOM folder itself,
  read by ``lmk3d.io.read_image`` (no NIfTI conversion: the geometry the detector sees is the one the
  SR is written in).
- **Geometry**: a series whose slices are not evenly spaced along their normal, that is tilted
  (gantry tilt: slice positions not along the normal), or whose slices differ in orientation is
  refused with a 422 naming the problem; it is never resampled silently. The check is the library's
  :func:`lmk3d.io.dicom_series.check_series_geometry`, which ``lmk3d.io.read_image`` (the CLI) applies
  too, so the CLI and the server refuse the same series with the same message.
- **Errors**: an unknown SeriesInstanceUID is a 404; a non-image series a 422; a PACS that refuses
  (HTTP 401/403, other 4xx/5xx) a 502, and one that cannot be reached a 503, each with a message.
  ``GET /info/`` keeps answering and reports the PACS error under ``datastore``.
- **Landmark reports**: :meth:`store_sr` builds a TID 1500 SR with ``lmk3d.io.dicom_sr.build_sr`` from
  the downloaded series and stores it by STOW-RS.
- **Corrections**: a final label (``PUT /datastore/label?tag=final``: a point list or sphere label map,
  checked by :func:`lmk3d.io.labels.read_label`) is stored to the PACS as an SR of series description
  :data:`FINAL_SERIES_DESCRIPTION`; the newest such SR per image series is the image's final label,
  which the train task reads back (``get_label_uri`` downloads it as a ``.dcm`` file). Other tags stay
  in the local cache, as MONAI Label does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from lib.errors import NOT_FOUND, UNPROCESSABLE, bad_input, http_error
from lib.label_names import LabelNames, as_label_names, read_saved_label
from lmk3d.io import read_image
from lmk3d.io.dicom_series import check_series_geometry
from lmk3d.io.dicom_sr import build_sr
from lmk3d.io.labels import ImageGrid, check_label_fits, label_kind, read_grid
from lmk3d.landmarks import LandmarkSet

logger = logging.getLogger(__name__)

BAD_GATEWAY = 502
UNAVAILABLE = 503
#: Series that hold no image the detectors can read (DICOM PS3.3 modality defined terms).
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC",
                                  "REG", "FID"})
#: Series description of the SRs that hold corrected (final) landmarks.
FINAL_SERIES_DESCRIPTION = "lmk3d final landmarks"
FINAL_SERIES_NUMBER = 9902
_CREDENTIALS_HELP = ("set MONAI_LABEL_DICOMWEB_USERNAME and MONAI_LABEL_DICOMWEB_PASSWORD (lmk3d serve takes "
                     "them from LMK3D_PACS_USER and LMK3D_PACS_PASSWORD)")

# QIDO-RS attribute tags (the JSON model keys attributes by tag).
_MODALITY, _SERIES_UID, _STUDY_UID, _SERIES_DESCRIPTION = "00080060", "0020000E", "0020000D", "0008103E"


def _first(attributes: dict[str, Any], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


class LandmarkDICOMwebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with the listing, download, errors and labels described above.

    Args:
        client: a ``DICOMwebClient`` (with its credentials).
        search_filter: QIDO-RS series filters (``{}``: every series).
        cache_path: the local cache folder (None: MONAI Label's default under ``~/.cache``).
        cache_expiry_s: how long a series listing is reused.
        landmark_names: returns the models' landmark names now (:class:`lib.label_names.LabelNames`, or
            one model's names), to check and decode a label.
    """

    def __init__(self, client: Any, search_filter: dict[str, Any], cache_path: str | None, cache_expiry_s: float,
                 landmark_names: Callable[[], LabelNames | Sequence[str]]) -> None:
        self._cache_expiry_s = float(cache_expiry_s)
        self._landmark_names = landmark_names
        self._listing: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._lock = threading.Lock()
        super().__init__(client, search_filter, cache_path, fetch_by_frame=False, convert_to_nifti=False)

    # --- talking to the PACS ----------------------------------------------------------------------------
    @contextmanager
    def _pacs(self, what: str) -> Iterator[None]:
        """Turn the PACS's refusals into 502 and an unreachable PACS into 503, with a message."""
        url = self._client.base_url
        try:
            yield
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if status in (401, 403):
                raise http_error(BAD_GATEWAY, f"the PACS at {url} refused the credentials (HTTP {status}) while "
                                              f"{what}; {_CREDENTIALS_HELP}") from None
            text = (e.response.text if e.response is not None else "").strip()[:200]
            raise http_error(BAD_GATEWAY, f"the PACS at {url} answered HTTP {status} while {what}"
                                          f"{': ' + text if text else ''}") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            raise http_error(UNAVAILABLE, f"cannot reach the PACS at {url} while {what} ({type(e).__name__}); "
                                          "is it running, and is the --studies URL right?") from None

    def _series(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """``{SeriesInstanceUID: QIDO attributes}`` of every series the filter matches (cached)."""
        with self._lock:
            now = time.monotonic()
            if refresh or self._listing is None or now - self._listing[0] > self._cache_expiry_s:
                with self._pacs("listing the series"):
                    found = self._client.search_for_series(search_filters=self._search_filter)
                self._listing = (now, {_first(s, _SERIES_UID): s for s in found})
            return self._listing[1]

    def list_images(self) -> list[str]:
        return sorted(uid for uid, attrs in self._series().items()
                      if _first(attrs, _MODALITY).upper() not in NON_IMAGE_MODALITIES)

    def json(self) -> dict[str, Any]:
        """``GET /datastore/?output=all``: the image series the PACS lists now (labels live in the PACS)."""
        series = self._series()
        return {"name": self.name(), "objects": {uid: {"image": {"id": uid, "info": self.get_image_info(uid)},
                                                        "labels": {}} for uid in self.list_images()
                                                  if uid in series}}

    def status(self) -> dict[str, Any]:
        try:
            return dict(super().status())
        except Exception as e:  # /info/ keeps answering and says why the PACS cannot be used
            detail = getattr(e, "detail", None) or f"{type(e).__name__}: {e}"
            return {"total": 0, "completed": 0, "label_tags": {}, "train": {}, "error": detail}

    # --- images -------------------------------------------------------------------------------------------
    def image_dir(self, image_id: str) -> Path:
        return Path(self._datastore.image_path()) / image_id

    def get_image_uri(self, image_id: str) -> str:
        folder = self.image_dir(image_id)
        if folder.is_dir() and any(folder.iterdir()):
            return str(folder)
        series = self._series()
        attrs = series.get(image_id) or self._series(refresh=True).get(image_id)
        if attrs is None:
            raise http_error(NOT_FOUND, f"unknown image {image_id!r}: the PACS has no series with this "
                                        f"SeriesInstanceUID ({len(self.list_images())} image series); list "
                                        "them with GET /datastore/?output=all")
        modality = _first(attrs, _MODALITY).upper()
        if modality in NON_IMAGE_MODALITIES:
            raise http_error(UNPROCESSABLE, f"series {image_id} is a {modality} object, not an image series; "
                                            "give the SeriesInstanceUID of an image series")
        self._download(_first(attrs, _STUDY_UID), image_id, folder)
        return str(folder)

    def _download(self, study_uid: str, series_uid: str, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
        try:
            with self._pacs(f"retrieving series {series_uid}"):
                instances = self._client.retrieve_series(study_uid, series_uid,
                                                         media_types=(("application/dicom", "*"),))
            for ds in instances:
                ds.save_as(staging / f"{ds.SOPInstanceUID}.dcm", write_like_original=False)
            with bad_input(UNPROCESSABLE, prefix=f"series {series_uid}: "):
                check_series_geometry(instances)
            try:
                os.rename(staging, folder)
            except OSError:  # another request stored it first (a non-empty folder): keep that one
                if not (folder.is_dir() and any(folder.iterdir())):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("series %s: %d instances downloaded to %s", series_uid, len(instances), folder)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        attrs = self._series().get(image_id)
        if attrs is None:
            return {}
        return {"SeriesInstanceUID": image_id, "StudyInstanceUID": _first(attrs, _STUDY_UID),
                "Modality": _first(attrs, _MODALITY)}

    # --- landmark reports ---------------------------------------------------------------------------------
    def store_sr(self, image_path: str, landmarks: LandmarkSet, parameters: Sequence[str] = (),
                 final: bool = False) -> dict[str, Any]:
        """Build the SR of ``landmarks`` on the downloaded series at ``image_path`` and STOW it.

        Returns:
            ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID`` of the stored SR and the
            ``latencies`` (s) ``sr_build`` and ``sr_store``.
        """
        folder = Path(image_path)
        if folder.parent.resolve() != Path(self._datastore.image_path()).resolve() or not folder.is_dir():
            raise http_error(UNPROCESSABLE, "store_sr needs a series of the PACS: give its SeriesInstanceUID as the "
                                            "image id (an uploaded file has no series to reference)")
        t0 = time.perf_counter()
        with bad_input(UNPROCESSABLE, prefix=f"cannot build the SR for series {folder.name}: "):
            sr = build_sr(landmarks, str(folder), algorithm_parameters=list(parameters),
                          **({"series_number": FINAL_SERIES_NUMBER, "series_description": FINAL_SERIES_DESCRIPTION}
                             if final else {}))
        t1 = time.perf_counter()
        with self._pacs(f"storing the SR of series {folder.name}"):
            response = self._client.store_instances([sr])
        failed = response.get("FailedSOPSequence", []) if response is not None else []
        if failed:
            reason = failed[0].get("FailureReason", "?") if hasattr(failed[0], "get") else "?"
            raise http_error(BAD_GATEWAY, f"the PACS did not store the SR of series {folder.name} "
                                          f"(failure reason {reason})")
        t2 = time.perf_counter()
        self._listing = None  # the new SR series is part of the next listing
        return {"StudyInstanceUID": str(sr.StudyInstanceUID), "SeriesInstanceUID": str(sr.SeriesInstanceUID),
                "SOPInstanceUID": str(sr.SOPInstanceUID),
                "latencies": {"sr_build": round(t1 - t0, 4), "sr_store": round(t2 - t1, 4)}}

    # --- final labels (corrections) as SR ------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL:
            self.get_image_uri(image_id)
            return str(LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info))
        image_path = self.get_image_uri(image_id)  # 404 / 422 / 502 / 503 as for an infer request
        with bad_input(prefix=f"label for image {image_id!r} rejected: "):
            landmarks = read_saved_label(label_filename, label_info, as_label_names(self._landmark_names()),
                                         source="the uploaded label")
            label_grid = (read_grid(label_filename, source="the uploaded label")
                          if label_kind(label_filename) == "label_map" else None)
            series = read_image(image_path)  # a DICOM folder: its geometry as the detectors see it
            check_label_fits(landmarks, ImageGrid(series.array.shape[:3], series.affine), label_grid,
                             image_name=f"image {image_id!r}")
        stored = self.store_sr(image_path, landmarks, ["label=final"], final=True)
        logger.info("final label for %s stored as SR %s (%d of %d landmarks placed)", image_id,
                    stored["SeriesInstanceUID"], int(landmarks.found.sum()), len(landmarks))
        return str(stored["SeriesInstanceUID"])

    def _final_srs(self) -> dict[str, tuple[str, str, str]]:
        """``{image SeriesInstanceUID: (study, SR series, sort key)}``, the newest final SR per image."""
        with self._pacs("listing the final labels"):
            # The description is matched here: not every PACS matches on it in QIDO-RS.
            found = self._client.search_for_series(search_filters={"Modality": "SR"}, fields=["SeriesDescription"])
            newest: dict[str, tuple[str, str, str]] = {}
            for s in found:
                if _first(s, _SERIES_DESCRIPTION) != FINAL_SERIES_DESCRIPTION:
                    continue
                study, sr_series = _first(s, _STUDY_UID), _first(s, _SERIES_UID)
                for meta in self._client.retrieve_series_metadata(study, sr_series):
                    ds = Dataset.from_json(meta)
                    key = f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
                    for ref in _referenced_series(ds):
                        if ref not in newest or key > newest[ref][2]:
                            newest[ref] = (study, sr_series, key)
        return newest

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        if label_tag not in (None, DefaultLabelTag.FINAL):
            return list(LocalDatastore.get_labeled_images(self, label_tag, labels))
        images = set(self.list_images())
        return sorted(uid for uid in self._final_srs() if uid in images)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return str(LocalDatastore.get_label_uri(self, label_id, label_tag))
        image = image_id or label_id
        entry = self._final_srs().get(image)
        if entry is None:
            return ""
        study, sr_series, _ = entry
        path = Path(self._datastore.label_path(DefaultLabelTag.FINAL)) / image / f"{sr_series}.dcm"
        if not path.is_file():
            with self._pacs(f"retrieving the final label SR {sr_series}"):
                (sr,) = self._client.retrieve_series(study, sr_series)[:1]
            path.parent.mkdir(parents=True, exist_ok=True)
            sr.save_as(path, write_like_original=False)
        return str(path)

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        if label_tag != DefaultLabelTag.FINAL:
            return dict(LocalDatastore.get_label_info(self, label_id, label_tag))
        entry = self._final_srs().get(label_id)
        return {"StudyInstanceUID": entry[0], "SeriesInstanceUID": entry[1]} if entry else {}

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        return [{"image": self.get_image_uri(i), "label": self.get_label_uri(i, DefaultLabelTag.FINAL)}
                for i in self.get_labeled_images()]


def _referenced_series(sr: Dataset) -> list[str]:
    out = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            out.append(str(series.SeriesInstanceUID))
    return out
