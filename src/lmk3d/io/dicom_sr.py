"""Landmarks as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), written with highdicom.

The document (see ``docs/pacs.md`` for the full content tree):

- inherits the patient and study attributes of the source series and starts a new SR series in
  the same study;
- lists every SOP instance of the source series in a TID 1600 Image Library (one group with the
  modality and the Frame of Reference UID), so that they are all in the Current Requested
  Procedure Evidence Sequence;
- holds one measurement group per landmark, named by its tracking identifier (the landmark name)
  and a tracking UID, with a finding code (:data:`LANDMARK_CODES`), a finding site where one is
  known, the algorithm (``lmk3d`` and its version, plus optional parameters such as the detector)
  and the detection score;
- a *found* landmark is a TID 1410 group whose image region is an SCOORD3D ``POINT`` in the source
  series' frame of reference, in DICOM patient coordinates (LPS mm);
- a *not found* landmark is kept, as a TID 1501 group without coordinates whose qualitative
  evaluation "Landmark detection status" is "Not found" (``99LMK3D``). Keeping it (rather than
  omitting it) lets a reader tell "the detector looked and failed" from "not asked for", which the
  metrics score differently; its best-guess position, if any, is not written.

Landmark names map to codes through :data:`LANDMARK_CODES`. SNOMED CT (``SCT``) codes are used
where the landmark *is* a named structure (anterior commissure, pineal gland...) or, as the finding
site, where it is a derived point of a named structure (hippocampus centroids, organ centroids);
every SNOMED code here is one that DICOM PS3.16 uses, as listed in pydicom's code dictionary (a
test checks this). Everything else uses the project-local scheme ``99LMK3D``; a name not in the
table gets ``N`` + the first 15 hex digits of the SHA-1 of its UTF-8 bytes (stable across runs).

Example:
    >>> from lmk3d import LandmarkSet
    >>> from lmk3d.io.dicom_sr import read_sr, write_sr
    >>> lm = LandmarkSet.from_dict({"AC": (0.0, 2.9, -4.8)})              # doctest: +SKIP
    >>> write_sr("ac.dcm", lm, "/data/dicom/series_folder")               # doctest: +SKIP
    >>> read_sr("ac.dcm").position("AC")                                  # doctest: +SKIP
    array([ 0. ,  2.9, -4.8])
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from lmk3d.errors import ImageReadError, LandmarkFormatError
from lmk3d.io.atomic import atomic_write_bytes
from lmk3d.landmarks import LandmarkSet

if TYPE_CHECKING:
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.coding import Code

#: Private coding scheme designator of this project ("99" prefix: DICOM PS3.16 8.2, private schemes).
SCHEME = "99LMK3D"
#: Algorithm name written in every measurement group (TID 4019).
ALGORITHM_NAME = "lmk3d"
DEFAULT_SERIES_NUMBER = 9901
DEFAULT_SERIES_DESCRIPTION = "lmk3d landmarks"

# Source objects that cannot hold the landmarks' image: skipped when a folder is scanned.
_NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "DOC", "REG", "FID"})
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# Type 2 attributes highdicom copies from the first source instance; absent ones are written empty.
_PATIENT_STUDY_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                        "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")

#: A source series: a folder of DICOM files, or pydicom datasets.
Source: TypeAlias = "str | os.PathLike[str] | Sequence[Dataset]"


def _code(value: str, meaning: str, scheme: str = SCHEME) -> Code:
    from pydicom.sr.coding import Code

    return Code(value=value, scheme_designator=scheme, meaning=meaning)


@dataclass(frozen=True)
class LandmarkCoding:
    """How one landmark is coded in the SR.

    Attributes:
        finding: the "Finding" (DCM 121071) of the measurement group: what the point is.
        site: the "Finding Site" (SCT 363698007) anatomic location, when the finding is a derived
            point of a named structure (e.g. a centroid); None when the finding names the structure.
        laterality: laterality modifier of the site (SCT Left/Right), if any.
    """

    finding: Code
    site: Code | None = None
    laterality: Code | None = None


def _sct(value: str, meaning: str) -> Code:
    return _code(value, meaning, "SCT")


_HIPPOCAMPUS = _sct("5366008", "Hippocampus")
_CERVICAL_SPINE = _sct("122494005", "Cervical spine")
_THORACIC_SPINE = _sct("122495006", "Thoracic spine")
_KIDNEY = _sct("64033007", "Kidney")
_MANDIBLE = _sct("91609006", "Mandible")
_LEFT, _RIGHT = _sct("7771000", "Left"), _sct("24028007", "Right")

#: Landmark name -> coding. Keys are the names used by ../shared/data and by the head-and-neck
#: phantoms (AFIDs names as in its .fcsv files; the ``AFIDnn_`` prefix of its tables is stripped
#: before the look-up). Only AFIDs with a SNOMED structure of their own are listed; the others get
#: derived local codes like any unknown name.
LANDMARK_CODES: dict[str, LandmarkCoding] = {
    # AFIDs fiducials that are themselves named brain structures (SNOMED CT, DICOM CID 7710).
    "AC": LandmarkCoding(_sct("62872008", "anterior commissure")),
    "PC": LandmarkCoding(_sct("279336005", "posterior commissure")),
    "pineal gland": LandmarkCoding(_sct("45793000", "Pineal Gland")),
    "genu of CC": LandmarkCoding(_sct("70215001", "genu of corpus callosum")),
    "splenium of CC": LandmarkCoding(_sct("23347006", "splenium of corpus callosum")),
    # Hippocampus points derived from the Decathlon label maps: local finding, SNOMED site.
    "HIPPO_ANTERIOR_CENTROID": LandmarkCoding(_code("HIPPO_ANT_CENT", "Hippocampus anterior centroid"), _HIPPOCAMPUS),
    "HIPPO_POSTERIOR_CENTROID": LandmarkCoding(_code("HIPPO_POST_CENT", "Hippocampus posterior centroid"),
                                               _HIPPOCAMPUS),
    "HIPPO_ANTERIOR_TIP": LandmarkCoding(_code("HIPPO_ANT_TIP", "Hippocampus anterior tip"), _HIPPOCAMPUS),
    "HIPPO_POSTERIOR_TIP": LandmarkCoding(_code("HIPPO_POST_TIP", "Hippocampus posterior tip"), _HIPPOCAMPUS),
    # Head-and-neck phantom landmarks (lmk3d.data.phantoms): local finding, SNOMED site.
    "chin": LandmarkCoding(_code("POGONION", "Pogonion"), _MANDIBLE),
    "mand_l": LandmarkCoding(_code("GONION_L", "Left gonion (mandible angle)"), _MANDIBLE, _LEFT),
    "mand_r": LandmarkCoding(_code("GONION_R", "Right gonion (mandible angle)"), _MANDIBLE, _RIGHT),
    "odont_p": LandmarkCoding(_code("DENS_TIP", "Tip of the odontoid process of C2"), _CERVICAL_SPINE),
    "occ_bone": LandmarkCoding(_code("OPISTHION", "Opisthion"), _sct("31640002", "Occipital bone")),
    # Cervical-spine levels (spine_t2) and abdominal CT centroids (ct_abdomen_examples).
    "vertebral_level_3_C3": LandmarkCoding(_code("LEVEL_C3", "Vertebral level C3"), _CERVICAL_SPINE),
    "vertebral_level_4_C4": LandmarkCoding(_code("LEVEL_C4", "Vertebral level C4"), _CERVICAL_SPINE),
    "vertebral_level_5_C5": LandmarkCoding(_code("LEVEL_C5", "Vertebral level C5"), _CERVICAL_SPINE),
    "vertebrae_T11_centroid": LandmarkCoding(_code("T11_CENT", "T11 vertebra centroid"), _THORACIC_SPINE),
    "vertebrae_T12_centroid": LandmarkCoding(_code("T12_CENT", "T12 vertebra centroid"), _THORACIC_SPINE),
    "spleen_centroid": LandmarkCoding(_code("SPLEEN_CENT", "Spleen centroid"), _sct("78961009", "Spleen")),
    "liver_centroid": LandmarkCoding(_code("LIVER_CENT", "Liver centroid"), _sct("10200004", "Liver")),
    "kidney_left_centroid": LandmarkCoding(_code("KIDNEY_L_CENT", "Left kidney centroid"), _KIDNEY, _LEFT),
    "kidney_right_centroid": LandmarkCoding(_code("KIDNEY_R_CENT", "Right kidney centroid"), _KIDNEY, _RIGHT),
}

_AFIDS_PREFIX = re.compile(r"^AFID\d\d_")

# Concepts of the project-local scheme used in the document structure.
_SCORE = ("SCORE", "Landmark detection score")
_STATUS = ("STATUS", "Landmark detection status")
_NOT_FOUND = ("NOT_FOUND", "Not found")

# Standard concepts, spelled out (pydicom's ``codes`` lookups are untyped); a test checks them.
_DCM_MODALITY = ("121139", "Modality", "DCM")
_DCM_FRAME_OF_REFERENCE_UID = ("112227", "Frame of Reference UID", "DCM")
_DCM_IMAGE_LIBRARY = ("111028", "Image Library", "DCM")
_DCM_IMAGE_LIBRARY_GROUP = ("126200", "Image Library Group", "DCM")
_DCM_DEVICE = ("121007", "Device", "DCM")
_SCT_SOURCE = ("260753009", "Source", "SCT")
_UCUM_NO_UNITS = ("1", "no units", "UCUM")
_UCUM_MM = ("mm", "millimeter", "UCUM")
_TOLERANCE = ("TOLERANCE", "Landmark error tolerance")
_RADIUS90 = ("RADIUS_90", "Radius holding the true landmark with 90 % probability")
# Procedure Reported (CID 100) by source modality.
_PROCEDURES = {"CT": ("25045-6", "CT unspecified body region", "LN"),
               "MR": ("25056-3", "MRI unspecified body region", "LN")}
_SCT_IMAGING_PROCEDURE = ("363679005", "Imaging procedure", "SCT")
# Modality codes (CID 29) of the Image Library; other modalities leave that optional descriptor out.
_MODALITIES = {"CT": ("CT", "Computed Tomography", "DCM"), "MR": ("MR", "Magnetic Resonance", "DCM"),
               "PT": ("PT", "Positron emission tomography", "DCM")}


def landmark_coding(name: str) -> LandmarkCoding:
    """The coding of ``name``: its :data:`LANDMARK_CODES` entry, or a local code derived from the name.

    Example:
        >>> landmark_coding("AC").finding.value
        '62872008'
        >>> c = landmark_coding("my point")
        >>> (c.finding.scheme_designator, c.finding.value, c.finding.meaning)
        ('99LMK3D', 'NCED4183781AD8DD', 'my point')
    """
    key = _AFIDS_PREFIX.sub("", name)
    if key in LANDMARK_CODES:
        return LANDMARK_CODES[key]
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:15].upper()
    # Code Meaning is LO (64 characters); the full name is in the tracking identifier anyway.
    return LandmarkCoding(_code("N" + digest, name[:64]))


# ----------------------------------------------------------------------------------------------
# source series


def _has_value(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds.get(keyword) not in (None, "")


def load_source_series(source: Source, series_uid: str | None = None) -> list[Dataset]:
    """The image instances of one DICOM series, sorted by Instance Number.

    Args:
        source: a folder of DICOM files (read without pixel data; non-DICOM files such as a
            licence text and non-image objects such as SR or SEG are skipped), or pydicom datasets.
        series_uid: which series to take when the source holds several.

    Raises:
        ImageReadError: no image series, several series and none named, the named series absent,
            or instances that lack a UID the SR needs (SOP Class/Instance, Study, Series, Frame of
            Reference) or that do not share one study and one frame of reference.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        folder = Path(source)
        if not folder.is_dir():
            raise ImageReadError(f"{where}: not a folder; the source series is a folder of DICOM files "
                                 "or a list of pydicom datasets")
        datasets: list[Dataset] = []
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            try:
                datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
            except InvalidDicomError:
                continue  # not a DICOM file (e.g. LICENSE.txt beside the slices)
            except (EOFError, OSError, ValueError) as e:
                raise ImageReadError(f"{f}: cannot read this DICOM file ({type(e).__name__}: {e})") from None
    else:
        where = "source datasets"
        datasets = list(source)
        if not all(isinstance(d, pydicom.Dataset) for d in datasets):
            raise ImageReadError(f"{where}: expected pydicom datasets, got "
                                 f"{sorted({type(d).__name__ for d in datasets})}")
    images = [d for d in datasets if "Rows" in d and str(d.get("Modality", "")).upper() not in _NON_IMAGE_MODALITIES]
    if not images:
        raise ImageReadError(f"{where}: holds no DICOM image instances ({len(datasets)} DICOM objects found)")
    by_series: dict[str, list[Dataset]] = {}
    for d in images:
        by_series.setdefault(str(d.get("SeriesInstanceUID", "")), []).append(d)
    if series_uid is None:
        if len(by_series) > 1:
            raise ImageReadError(f"{where}: holds {len(by_series)} image series ({', '.join(sorted(by_series))}); "
                                 "name one with series_uid")
        series = next(iter(by_series.values()))
    elif series_uid in by_series:
        series = by_series[series_uid]
    else:
        raise ImageReadError(f"{where}: no image series {series_uid}; found {', '.join(sorted(by_series))}")
    missing = sorted({k for d in series for k in _REQUIRED_UIDS if not _has_value(d, k)})
    if missing:
        raise ImageReadError(f"{where}: the series' instances have empty or missing {', '.join(missing)}; an SR "
                             "references its source by these UIDs, so a series with all of them is needed")
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        values = sorted({str(d.get(keyword)) for d in series})
        if len(values) > 1:
            raise ImageReadError(f"{where}: the series spans {len(values)} {keyword}s ({', '.join(values)}); "
                                 "the landmarks need one")
    return sorted(series, key=lambda d: (int(d.get("InstanceNumber") or 0), str(d.SOPInstanceUID)))


def _evidence_header(first: Dataset) -> Dataset:
    """A copy of the first instance with absent type 2 patient/study attributes set empty."""
    header = deepcopy(first)
    for keyword in _PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


# ----------------------------------------------------------------------------------------------
# writing


def _image_library(series: Sequence[Dataset]) -> list[Dataset]:
    """TID 1600 Image Library: one group (modality and frame of reference shared) listing every instance.

    highdicom's own ImageLibrary adds ~15 per-image descriptors that need attributes many series
    lack (Spacing Between Slices); the descriptors are optional (TID 1601), the references are what
    matter here.
    """
    import highdicom as hd
    from highdicom.sr.enum import RelationshipTypeValues as Rel

    images = [
        hd.sr.ImageContentItem(name=_code(*_SCT_SOURCE), referenced_sop_class_uid=d.SOPClassUID,
                               referenced_sop_instance_uid=d.SOPInstanceUID, relationship_type=Rel.CONTAINS)
        for d in series
    ]
    modality = _MODALITIES.get(str(series[0].get("Modality", "")).upper())
    descriptors: list[Any] = []
    if modality is not None:
        descriptors.append(hd.sr.CodeContentItem(name=_code(*_DCM_MODALITY), value=_code(*modality),
                                                 relationship_type=Rel.HAS_ACQ_CONTEXT))
    descriptors.append(hd.sr.UIDRefContentItem(name=_code(*_DCM_FRAME_OF_REFERENCE_UID),
                                               value=series[0].FrameOfReferenceUID,
                                               relationship_type=Rel.HAS_ACQ_CONTEXT))
    group = hd.sr.ContainerContentItem(name=_code(*_DCM_IMAGE_LIBRARY_GROUP), relationship_type=Rel.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([*descriptors, *images])
    library = hd.sr.ContainerContentItem(name=_code(*_DCM_IMAGE_LIBRARY), relationship_type=Rel.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return [library]


def _procedure(series: Sequence[Dataset]) -> Code:
    modality = str(series[0].get("Modality", "")).upper()
    return _code(*_PROCEDURES.get(modality, _SCT_IMAGING_PROCEDURE))


def _tracking_uid(series: Sequence[Dataset], name: str) -> str:
    """Same study, frame of reference and landmark name -> same tracking UID (re-runs, corrections)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(series[0].StudyInstanceUID), str(series[0].FrameOfReferenceUID),
                                          name]))


def build_sr(
    landmarks: LandmarkSet,
    source: Source,
    *,
    series_uid: str | None = None,
    algorithm_parameters: Sequence[str] = (),
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    sr_series_instance_uid: str | None = None,
    sr_sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR document of ``landmarks`` on the source series, in memory (e.g. for STOW-RS).

    Args:
        landmarks: positions in world RAS mm (converted to LPS here); one measurement group each.
        source: the series the landmarks were detected on: a folder of DICOM files or pydicom
            datasets (see :func:`load_source_series`).
        series_uid: which series of ``source`` to use when it holds several.
        algorithm_parameters: free-text parameters recorded with the algorithm, e.g.
            ``["detector=pin", "model=pin-hippocampus"]``.
        series_number, series_description: of the new SR series.
        sr_series_instance_uid, sr_sop_instance_uid: UIDs of the SR (new ones by default).

    Returns:
        A highdicom ``Comprehensive3DSR`` (a pydicom ``Dataset``).

    Raises:
        ImageReadError: the source is not a usable series (see :func:`load_source_series`).
        LandmarkFormatError: an empty landmark set.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    import lmk3d

    if len(landmarks) == 0:
        raise LandmarkFormatError("no landmarks to write; an SR needs at least one landmark")
    series = load_source_series(source, series_uid)
    frame_uid = str(series[0].FrameOfReferenceUID)
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=lmk3d.__version__,
                                              parameters=list(algorithm_parameters) or None)
    xyz_lps = landmarks.xyz_mm_lps
    groups: list[Any] = []
    for i, name in enumerate(landmarks.names):
        coding = landmark_coding(name)
        common: dict[str, Any] = {
            "tracking_identifier": hd.sr.TrackingIdentifier(uid=_tracking_uid(series, name), identifier=name),
            "finding_type": coding.finding,
            "algorithm_id": algorithm,
            "finding_sites": None if coding.site is None else [hd.sr.FindingSite(coding.site, coding.laterality)],
        }
        score = float(landmarks.scores[i])
        if np.isfinite(score):
            common["measurements"] = [
                hd.sr.Measurement(name=_code(*_SCORE), value=score, unit=_code(*_UCUM_NO_UNITS))]
            if landmarks.calibrated:  # what the score means, and the 90 % radius (lmk3d.trust)
                common["measurements"].append(hd.sr.Measurement(name=_code(*_TOLERANCE),
                                                                value=float(landmarks.tolerance_mm),
                                                                unit=_code(*_UCUM_MM)))
                if np.isfinite(landmarks.radius_mm[i]):
                    common["measurements"].append(hd.sr.Measurement(name=_code(*_RADIUS90),
                                                                    value=float(landmarks.radius_mm[i]),
                                                                    unit=_code(*_UCUM_MM)))
        if landmarks.found[i]:
            point = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                        graphic_data=np.asarray(xyz_lps[i : i + 1], dtype=np.float64),
                                        frame_of_reference_uid=frame_uid)
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=point, **common))
        else:
            status = hd.sr.QualitativeEvaluation(name=_code(*_STATUS), value=_code(*_NOT_FOUND))
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(qualitative_evaluations=[status], **common))
    # The observer is this software: one stable UID per version.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[ALGORITHM_NAME, lmk3d.__version__]), name=ALGORITHM_NAME,
        manufacturer_name=ALGORITHM_NAME, model_name=lmk3d.__version__)
    observation = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(_code(*_DCM_DEVICE)), observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=observation, procedure_reported=_procedure(series),
                                     imaging_measurements=groups)
    # TID 1500 puts the Image Library after Procedure Reported, before Imaging Measurements.
    content = report[0].ContentSequence
    at = next(k for k, item in enumerate(content) if item.ValueType == "CONTAINER")
    for k, item in enumerate(_image_library(series)):
        content.insert(at + k, item)
    with warnings.catch_warnings():
        # highdicom questions single-component patient names ("anonymized"); they are copied
        # verbatim from the source, not ours to change.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.sr.Comprehensive3DSR(
            evidence=[_evidence_header(series[0]), *series[1:]],
            content=report[0],
            series_instance_uid=sr_series_instance_uid or hd.UID(),
            series_number=series_number,
            sop_instance_uid=sr_sop_instance_uid or hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            is_complete=True,
            series_description=series_description,
        )


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta), e.g. for STOW-RS or a file."""
    buf = io.BytesIO()
    sr.save_as(buf, write_like_original=False)
    return buf.getvalue()


def write_sr(
    path: str | os.PathLike[str],
    landmarks: LandmarkSet,
    source: Source,
    **options: Any,
) -> Path:
    """Write ``landmarks`` as a Comprehensive 3D SR file (atomically: temporary file, then rename).

    Args:
        path: the SR file to write (``.dcm`` by convention).
        landmarks: positions in world RAS mm.
        source: the series the landmarks belong to: a folder of DICOM files or pydicom datasets.
        **options: passed to :func:`build_sr` (``series_uid``, ``algorithm_parameters``,
            ``series_number``, ``series_description``, ``sr_series_instance_uid``,
            ``sr_sop_instance_uid``).

    Returns:
        ``path``.
    """
    return atomic_write_bytes(path, sr_bytes(build_sr(landmarks, source, **options)))


# ----------------------------------------------------------------------------------------------
# reading


def _group_name(group: Any, where: str) -> str:
    name = group.tracking_identifier
    if not name:
        raise LandmarkFormatError(f"{where}: a measurement group has no tracking identifier (the landmark name)")
    return str(name)


def _score(group: Any) -> float:
    return _measurement(group, _SCORE[0], 1.0)


def _measurement(group: Any, value: str, default: float) -> float:
    for m in group.get_measurements():
        if (m.name.value, m.name.scheme_designator) == (value, SCHEME):
            return float(m.value)
    return default


def _is_not_found(group: Any) -> bool:
    for q in group.get_qualitative_evaluations():
        if (q.name.value, q.name.scheme_designator) == (_STATUS[0], SCHEME):
            return bool((q.value.value, q.value.scheme_designator) == (_NOT_FOUND[0], SCHEME))
    return False


def read_sr(source: str | os.PathLike[str] | Dataset, frame_of_reference_uid: str | None = None) -> LandmarkSet:
    """Read the landmarks of an SR written by :func:`write_sr` (positions back in RAS mm).

    Found landmarks come from the SCOORD3D ``POINT`` of the TID 1410 groups; groups whose "Landmark
    detection status" is "Not found" come back with ``found=False`` and a NaN position. Other
    measurement groups (e.g. TID 1501 groups of other tools) are ignored.

    Args:
        source: an SR file, or the SR as a pydicom dataset (e.g. retrieved by WADO-RS).
        frame_of_reference_uid: if given, every point must be in this frame of reference
            (the image the landmarks are used with).

    Raises:
        LandmarkFormatError: not a TID 1500 SR, a landmark region that is not a single 3D point,
            points in another (or in several) frames of reference, or duplicate landmark names.
    """
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(source, pydicom.Dataset):
        where, ds = "SR dataset", source
    else:
        where = str(source)
        if not Path(source).is_file():
            raise LandmarkFormatError(f"{where}: no such file")
        try:
            ds = pydicom.dcmread(source)
        except (InvalidDicomError, EOFError) as e:
            raise LandmarkFormatError(f"{where}: not a DICOM file ({e})") from None
    if str(ds.get("Modality", "")) != "SR" or "ContentSequence" not in ds:
        raise LandmarkFormatError(f"{where}: not a DICOM SR document (Modality {ds.get('Modality', 'missing')!r})")
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)
        report = sr.content
        if not isinstance(report, hd.sr.MeasurementReport):
            raise ValueError("the root template is not TID 1500 (Measurement Report)")
        planar = report.get_planar_roi_measurement_groups()
        other = report.get_image_measurement_groups()
    except (ValueError, AttributeError, TypeError) as e:
        raise LandmarkFormatError(f"{where}: not a landmark SR that lmk3d can read ({e})") from None

    names: list[str] = []
    xyz: list[np.ndarray] = []
    scores: list[float] = []
    radius: list[float] = []
    tolerance = math.nan
    found: list[bool] = []
    frames: set[str] = set()
    for g in planar:
        name = _group_name(g, where)
        roi = g.roi
        if not isinstance(roi, hd.sr.ImageRegion3D) or roi.graphic_type != hd.sr.GraphicTypeValues3D.POINT:
            kind = type(roi).__name__ if roi is None else getattr(roi.graphic_type, "value", roi.graphic_type)
            raise LandmarkFormatError(f"{where}: landmark {name!r} is a {kind} region; an SCOORD3D POINT is needed")
        frames.add(str(roi.frame_of_reference_uid))
        names.append(name)
        xyz.append(np.asarray(roi.value, dtype=np.float64).reshape(3))
        scores.append(_score(g))
        radius.append(_measurement(g, _RADIUS90[0], math.nan))
        tolerance = _measurement(g, _TOLERANCE[0], tolerance)
        found.append(True)
    for g in other:  # type: ignore[assignment]  # TID 1501 groups: same accessors used below
        if not _is_not_found(g):
            continue
        names.append(_group_name(g, where))
        xyz.append(np.full(3, np.nan))
        scores.append(_score(g))
        radius.append(math.nan)
        tolerance = _measurement(g, _TOLERANCE[0], tolerance)
        found.append(False)
    if len(frames) > 1:
        raise LandmarkFormatError(f"{where}: points in {len(frames)} frames of reference ({', '.join(sorted(frames))})")
    if frame_of_reference_uid is not None and frames and frames != {frame_of_reference_uid}:
        raise LandmarkFormatError(f"{where}: points are in frame of reference {frames.pop()}, "
                                  f"not in the image's {frame_of_reference_uid}")
    if not names:
        return LandmarkSet((), np.zeros((0, 3)))
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise LandmarkFormatError(f"{where}: several measurement groups for landmark(s) {', '.join(dups)}")
    lps = np.array(xyz).reshape(-1, 3)
    ras = lps * np.array([-1.0, -1.0, 1.0])  # LPS -> RAS (NaN rows stay NaN)
    out = LandmarkSet(tuple(names), ras, np.array(scores), np.array(found), np.array(radius), tolerance)
    # highdicom returns TID 1410 and TID 1501 groups separately; give them back in document order.
    return out.reorder([n for n in _document_order(ds) if n in out.names])


def _document_order(ds: Dataset) -> list[str]:
    """Tracking identifiers of the measurement groups, in document order."""
    order: list[str] = []

    def walk(items: Iterable[Dataset]) -> None:
        for item in items:
            concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if concept is not None and (concept.CodeValue, concept.CodingSchemeDesignator) == ("112039", "DCM"):
                order.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return order


def sr_frame_of_reference_uids(sr: Dataset) -> set[str]:
    """The frame of reference UIDs of all SCOORD3D items in an SR dataset (searched recursively)."""
    out: set[str] = set()

    def walk(items: Iterable[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD3D":
                out.add(str(item.ReferencedFrameOfReferenceUID))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out
