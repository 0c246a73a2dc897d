"""Landmark labels as an annotator sends them back: a point list, a sphere label map, or a DICOM SR.

One function, :func:`read_label`, decodes every accepted format, so whoever checks a label before
storing it (the MONAI Label app's datastores) and whoever reads the stored labels (its train task)
cannot disagree about what a label means:

- ``.mrk.json`` (a Slicer point list), ``.fcsv`` (Slicer fiducials) or ``.json`` (a markups document
  or lmk3d landmark JSON): landmark names are the control point labels;
- a sphere label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``...), what stock Slicer's "Submit
  Label" sends: value ``k + 1`` is the model's landmark ``k``, unless the upload's parameters carry
  Slicer's ``label_info`` (``[{"name": ..., "idx": ...}]``) or MONAI Label's ``label_names``
  (``{name: value}``), which then say which value is which landmark;
- a DICOM SR (``.dcm``) as :func:`lmk3d.io.dicom_sr.write_sr` writes it (how a PACS keeps labels).

Partial annotation is fine (a landmark left out is "not annotated"); a landmark name the model does not
know, or a label with no placed landmark at all, is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lmk3d.errors import LandmarkFormatError
from lmk3d.io import read_landmarks
from lmk3d.io.dicom_sr import read_sr
from lmk3d.io.image import IMAGE_SUFFIXES
from lmk3d.io.label_map import label_values
from lmk3d.landmarks import LandmarkSet

__all__ = ["ACCEPTED", "LABEL_MAP_SUFFIXES", "POINT_SUFFIXES", "SR_SUFFIXES", "label_kind", "label_value_map",
           "read_label"]

POINT_SUFFIXES = (".mrk.json", ".fcsv", ".json")
LABEL_MAP_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")
SR_SUFFIXES = (".dcm",)
ACCEPTED = f"a point list ({', '.join(POINT_SUFFIXES)}) or a sphere label map ({', '.join(LABEL_MAP_SUFFIXES)})"


def label_kind(path: str | os.PathLike[str]) -> str:
    """``"points"``, ``"label_map"``, ``"sr"`` or ``""`` (not an accepted label type), from the file name."""
    name = str(path).lower()
    if name.endswith(SR_SUFFIXES):
        return "sr"
    if name.endswith(POINT_SUFFIXES):
        return "points"
    if name.endswith(LABEL_MAP_SUFFIXES):
        return "label_map"
    return ""


def label_value_map(names: Sequence[str], params: Mapping[str, Any] | None = None) -> dict[str, int]:
    """``{name: value}`` for decoding a label map: from the upload's parameters, else value k+1 = name k.

    Raises:
        LandmarkFormatError: ``label_info`` or ``label_names`` that are not a list of
            ``{"name", "idx"}`` / a ``{name: value}`` mapping with positive, distinct values.
    """
    params = params or {}
    entries = params.get("label_info")
    if entries:
        if not isinstance(entries, list):
            raise LandmarkFormatError("label_info must be a list of {\"name\": ..., \"idx\": ...}")
        pairs = []
        for e in entries:
            value = e.get("idx", e.get("id")) if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(value, int):
                raise LandmarkFormatError(f"label_info entry {e!r} is not {{\"name\": str, \"idx\": int}}")
            pairs.append((e["name"], value))
        return _checked(pairs, "label_info")
    by_name = params.get("label_names")
    if by_name:
        if not isinstance(by_name, dict) or not all(isinstance(v, int) for v in by_name.values()):
            raise LandmarkFormatError("label_names must map each landmark name to its label value")
        return _checked([(str(k), int(v)) for k, v in by_name.items()], "label_names")
    if not names:
        raise LandmarkFormatError("a sphere label map needs the landmark names (value k+1 = name k), and no "
                                  "model is served to give them; send label_info with the upload")
    return label_values(list(names))


def _checked(pairs: list[tuple[str, int]], what: str) -> dict[str, int]:
    mapping = dict(pairs)
    values = [v for _, v in pairs]
    if len(mapping) != len(pairs) or len(set(values)) != len(values) or min(values, default=1) < 1:
        raise LandmarkFormatError(f"{what} {pairs!r}: names and values must be distinct and values >= 1")
    return mapping


def read_label(
    path: str | os.PathLike[str],
    names: Sequence[str],
    params: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> LandmarkSet:
    """Read one final label in any accepted format, in ``names`` order (absent landmarks: not found).

    Args:
        path: the label file; its suffix says the format.
        names: the model's landmark names (empty: accept any names, for points and SRs only).
        params: the upload's parameters (``label_info`` / ``label_names`` for a label map).
        source: how to name the label in messages (default: the path).

    Raises:
        LandmarkFormatError: an unknown file type, a malformed file, landmark names or label values
            the model does not know, or no placed landmark at all.
    """
    where = source or str(path)
    kind = label_kind(path)
    try:
        if kind == "points":
            landmarks = read_landmarks(path)
        elif kind == "label_map":
            landmarks = read_landmarks(path, label_value_map(names, params))
        elif kind == "sr":
            landmarks = read_sr(path)
        else:
            raise LandmarkFormatError(f"unknown label type {os.path.basename(str(path))!r}; send {ACCEPTED}")
    except LandmarkFormatError as e:
        raise LandmarkFormatError(f"{where}: {_strip_path(str(e), path)}") from None
    except ValueError as e:  # the image reader's errors (a truncated or non-3D label map) are ValueErrors too
        raise LandmarkFormatError(f"{where}: {_strip_path(str(e), path)}") from None
    if names:
        unknown = [n for i, n in enumerate(landmarks.names) if n not in names and landmarks.found[i]]
        if unknown:
            raise LandmarkFormatError(f"{where}: unknown landmark(s) {', '.join(unknown)}; this model's landmarks "
                                      f"are {', '.join(names)}")
        landmarks = landmarks.reorder(names)
    if not landmarks.found.any():
        raise LandmarkFormatError(f"{where}: no placed landmark; place at least one of "
                                  f"{', '.join(names or landmarks.names) or 'the landmarks'}")
    return landmarks


def _strip_path(message: str, path: str | os.PathLike[str]) -> str:
    # The upload sits in a temporary file whose name means nothing to the client.
    p = str(path)
    if message.startswith(p + ": "):
        message = message[len(p) + 2:]
    return message.replace(p, os.path.basename(p))
