"""DICOMweb over a local studies folder, so the bundled OHIF can show its NIfTI and NRRD images.

OHIF reads DICOM only. :class:`LocalDicomweb` offers the subset of QIDO-RS and WADO-RS that OHIF v3
uses, over the images the local datastore (:class:`lib.datastore.LandmarkDatastore`) lists:

- each image is one study holding one series (patient id, study and series description = the image
  id); its UIDs are derived from the image id and its file's size and modification time
  (:meth:`lmk3d.io.dicom_export.SeriesIds.derive`), so they are stable while the file is unchanged and
  new when it is replaced;
- the series is made on first use by :func:`lmk3d.io.dicom_export.series_from_volume` from the image
  as :func:`lmk3d.io.read_image` reads it, the reader the detectors use: one slice per instance, the
  same ijk -> world geometry; voxel values as 16-bit integers with rescale slope and intercept (exact
  for integer images, 65536 levels over the range otherwise);
- converted series are kept in memory, least recently used first out, up to :data:`CACHE_BYTES` (a
  larger one is kept alone); a series being converted is converted once, whoever asks meanwhile waits;
- read only: nothing is written to the studies folder. An id is looked up among the datastore's
  images (whose names the datastore keeps inside the studies folder); an unknown UID is 404.

Routes (relative to the DICOMweb root; see :mod:`lib.dicomweb_proxy`): ``studies``,
``studies/{study}/series``, ``series``, ``studies/{study}/series/{series}/instances``, ``instances``,
``.../metadata`` at study, series and instance level, ``.../instances/{sop}/frames/{n[,m]}`` (raw
little-endian frames, multipart/related), ``.../instances/{sop}`` (the instance as application/dicom).
QIDO matching: UIDs exactly (a list separated by ``,`` or ``\\``), ``PatientName``, ``PatientID``,
``StudyDescription``, ``SeriesDescription`` and ``Modality``/``ModalitiesInStudy`` with ``*`` and ``?``
wildcards, case-insensitive, as substrings when ``fuzzymatching=true``; ``limit`` and ``offset``.
Other filters are ignored. Storing (STOW-RS) is :mod:`lib.dicomweb_proxy`'s business.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lib.datastore import LandmarkDatastore
from lib.errors import NOT_FOUND, UNPROCESSABLE, bad_input, http_error
from lmk3d.io import read_image
from lmk3d.io.dicom_export import DicomSeries, SeriesIds, series_from_volume

logger = logging.getLogger(__name__)

#: Memory for converted series (bytes of stored voxels).
CACHE_BYTES = 512 * 2**20
#: How long a listing of the studies folder is reused (s): OHIF asks several times per page.
LISTING_TTL_S = 2.0

# Tags of the DICOM JSON model.
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_STUDY_TAGS = ("00080020", "00080030", "00080050", "00080090", "00081030", "00100010", "00100020", "00100030",
               "00100040", "00200010", STUDY_UID)
_SERIES_TAGS = ("00080060", "0008103E", "00200011", SERIES_UID, STUDY_UID)
_INSTANCE_TAGS = (SOP_CLASS, SOP_UID, "00200013", "00280010", "00280011", SERIES_UID, STUDY_UID)
#: QIDO attribute names and their tags (those a filter may name).
_KEYWORDS = {"StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID, "SOPInstanceUID": SOP_UID,
             "PatientName": "00100010", "PatientID": "00100020", "StudyDescription": "00081030",
             "SeriesDescription": "0008103E", "Modality": "00080060", "ModalitiesInStudy": "00080061"}
_UID_TAGS = {STUDY_UID, SERIES_UID, SOP_UID}


@dataclass(frozen=True)
class LocalStudy:
    """One image of the studies folder as a study with one series."""

    image_id: str
    path: str
    version: str
    ids: SeriesIds


class LocalDicomweb:
    """QIDO-RS / WADO-RS answers over the images of a local datastore (see the module docstring)."""

    def __init__(self, datastore: LandmarkDatastore, cache_bytes: int = CACHE_BYTES) -> None:
        self.datastore = datastore
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], DicomSeries] = OrderedDict()
        self._converting: dict[tuple[str, str], threading.Lock] = {}
        self._listing: tuple[float, dict[str, LocalStudy]] | None = None
        #: ``(first slice's header, number of slices)`` of every series converted so far (kept when evicted).
        self._summaries: dict[tuple[str, str], tuple[Any, int]] = {}

    # --- the images ----------------------------------------------------------------------------------
    def studies(self) -> dict[str, LocalStudy]:
        """``{StudyInstanceUID: study}`` of every image the datastore lists now (reused for a moment)."""
        with self._lock:
            if self._listing is not None and time.monotonic() - self._listing[0] < LISTING_TTL_S:
                return self._listing[1]
        found: dict[str, LocalStudy] = {}
        for image_id in sorted(self.datastore.list_images()):
            try:
                path = self.datastore.get_image_uri(image_id)
                st = os.stat(path)
            except Exception as e:  # a file removed meanwhile, or one the datastore refuses: leave it out
                logger.warning("OHIF listing: image %r left out (%s)", image_id, getattr(e, "detail", e))
                continue
            version = f"{st.st_size}-{st.st_mtime_ns}"
            study = LocalStudy(image_id, path, version, SeriesIds.derive(image_id, version))
            found[study.ids.study_uid] = study
        with self._lock:
            self._listing = (time.monotonic(), found)
        return found

    def study(self, study_uid: str) -> LocalStudy:
        study = self.studies().get(study_uid)
        if study is None:
            raise http_error(NOT_FOUND, f"no study {study_uid} in the studies folder (its images are listed by "
                                        "GET /proxy/dicom/qido/studies)")
        return study

    def by_series(self, series_uid: str) -> LocalStudy | None:
        """The image whose series has this SeriesInstanceUID, or None."""
        for study in self.studies().values():
            if study.ids.series_uid == series_uid:
                return study
        return None

    def image_id(self, series_uid: str) -> str | None:
        """The datastore image id of the series ``series_uid`` (what OHIF's panel sends as the image), or None."""
        study = self.by_series(series_uid)
        return study.image_id if study is not None else None

    def series(self, study: LocalStudy) -> DicomSeries:
        """The image of ``study`` as a DICOM series: converted once, then from memory."""
        key = (study.path, study.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            converting = self._converting.setdefault(key, threading.Lock())
        with converting:
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None:
                return cached
            t0 = time.perf_counter()
            with bad_input(UNPROCESSABLE, prefix=f"image {study.image_id!r} cannot be shown as DICOM: "):
                series = series_from_volume(read_image(study.path, dtype=None), study.ids)
            logger.info("OHIF: image %s converted to a DICOM series of %d slices in %.2f s", study.image_id,
                        len(series.headers), time.perf_counter() - t0)
            with self._lock:
                self._cache[key] = series
                self._summaries[key] = (series.headers[0], len(series.headers))
                self._converting.pop(key, None)
                total = sum(s.nbytes for s in self._cache.values())
                while total > self.cache_bytes and len(self._cache) > 1:
                    _, dropped = self._cache.popitem(last=False)
                    total -= dropped.nbytes
            return series

    def summary(self, study: LocalStudy) -> tuple[Any, int]:
        """``(first slice's header, number of slices)`` of the study's series (converted if never seen)."""
        summary = self._summaries.get((study.path, study.version))
        if summary is None:
            series = self.series(study)
            return series.headers[0], len(series.headers)
        return summary

    def _series_of(self, study_uid: str, series_uid: str) -> tuple[LocalStudy, DicomSeries]:
        study = self.study(study_uid)
        if series_uid != study.ids.series_uid:
            raise http_error(NOT_FOUND, f"study {study_uid} has no series {series_uid}")
        return study, self.series(study)

    # --- QIDO-RS ---------------------------------------------------------------------------------------
    def search_studies(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        out = []
        for study in self.studies().values():
            header, n_slices = self.summary(study)
            doc = _pick(header, _STUDY_TAGS)
            doc["00080061"] = {"vr": "CS", "Value": [str(header.Modality)]}
            doc["00201206"] = {"vr": "IS", "Value": [1]}
            doc["00201208"] = {"vr": "IS", "Value": [n_slices]}
            out.append(doc)
        return _filtered(out, query)

    def search_series(self, study_uid: str | None, query: Mapping[str, str]) -> list[dict[str, Any]]:
        studies = [self.study(study_uid)] if study_uid else list(self.studies().values())
        out = []
        for study in studies:
            header, n_slices = self.summary(study)
            doc = _pick(header, _SERIES_TAGS)
            doc["00201209"] = {"vr": "IS", "Value": [n_slices]}
            out.append(doc)
        return _filtered(out, query)

    def search_instances(self, study_uid: str | None, series_uid: str | None,
                         query: Mapping[str, str]) -> list[dict[str, Any]]:
        if study_uid and series_uid:
            headers = self._series_of(study_uid, series_uid)[1].headers
        else:
            studies = [self.study(study_uid)] if study_uid else list(self.studies().values())
            headers = tuple(h for s in studies for h in self.series(s).headers)
        return _filtered([_pick(h, _INSTANCE_TAGS) for h in headers], query)

    # --- WADO-RS ---------------------------------------------------------------------------------------
    def metadata(self, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None) -> list[dict[str, Any]]:
        """Instance metadata (DICOM JSON, no pixel data) of a study, a series or one instance."""
        study = self.study(study_uid)
        if series_uid is None:
            headers = self.series(study).headers
        else:
            headers = self._series_of(study_uid, series_uid)[1].headers
        if sop_uid is not None:
            headers = tuple(h for h in headers if str(h.SOPInstanceUID) == sop_uid)  # type: ignore[attr-defined]
            if not headers:
                raise http_error(NOT_FOUND, f"series {series_uid} has no instance {sop_uid}")
        return [h.to_json_dict() for h in headers]  # type: ignore[attr-defined]

    def _slice(self, study_uid: str, series_uid: str, sop_uid: str) -> tuple[DicomSeries, int]:
        series = self._series_of(study_uid, series_uid)[1]
        try:
            return series, series.sop_uids.index(sop_uid)
        except ValueError:
            raise http_error(NOT_FOUND, f"series {series_uid} has no instance {sop_uid}") from None

    def frames(self, study_uid: str, series_uid: str, sop_uid: str, numbers: str) -> list[bytes]:
        """The pixel data of frames ``numbers`` (``"1"``, or a comma list) of an instance; each has one frame."""
        series, k = self._slice(study_uid, series_uid, sop_uid)
        wanted = [n.strip() for n in numbers.split(",") if n.strip()]
        if not wanted or any(n != "1" for n in wanted):
            raise http_error(NOT_FOUND, f"instance {sop_uid} has one frame (frame 1); asked for {numbers!r}")
        return [series.frame_bytes(k) for _ in wanted]

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """The instance as a DICOM file (Part 10, explicit VR little endian)."""
        import io

        series, k = self._slice(study_uid, series_uid, sop_uid)
        buffer = io.BytesIO()
        series.dataset(k).save_as(buffer, write_like_original=False)  # type: ignore[attr-defined]
        return buffer.getvalue()


def _pick(header: Any, tags: tuple[str, ...]) -> dict[str, Any]:
    doc: dict[str, Any] = header.to_json_dict()
    return {t: doc[t] for t in tags if t in doc}


def _text(value: Any) -> str:
    if isinstance(value, dict):  # a person name
        return str(value.get("Alphabetic", ""))
    return str(value)


def _matches(doc: Mapping[str, Any], tag: str, pattern: str, fuzzy: bool) -> bool:
    values = [_text(v) for v in (doc.get(tag, {}).get("Value") or [""])]
    if tag in _UID_TAGS:
        wanted = {p.strip() for p in pattern.replace("\\", ",").split(",") if p.strip()}
        return any(v in wanted for v in values)
    pattern = pattern.lower()
    if fuzzy and not any(c in pattern for c in "*?"):
        return any(pattern in v.lower() for v in values)
    return any(fnmatch.fnmatchcase(v.lower(), pattern) for v in values)


def _filtered(docs: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    """QIDO matching, ``offset`` and ``limit`` (see the module docstring)."""
    fuzzy = str(query.get("fuzzymatching", "")).lower() == "true"
    for key, pattern in query.items():
        tag = _KEYWORDS.get(key, key.upper() if key.upper() in _KEYWORDS.values() else None)
        if tag is None or pattern in ("", "*"):
            continue
        docs = [d for d in docs if _matches(d, tag, pattern, fuzzy)]
    try:
        offset = max(int(query.get("offset") or 0), 0)
        limit = int(query.get("limit") or 0)
    except ValueError:
        raise http_error(400, f"offset {query.get('offset')!r} and limit {query.get('limit')!r} must be whole "
                              "numbers") from None
    docs = docs[offset:]
    return docs[:limit] if limit > 0 else docs
