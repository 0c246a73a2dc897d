"""3D Slicer markups JSON (``.mrk.json``) point lists.

Written in LPS (Slicer's default for files), one control point per landmark: ``label`` = landmark
name, ``description`` = ``"score=0.930"`` (plus ``"; not found"``), ``positionStatus`` = ``defined``
for found landmarks and ``undefined`` for those not found (Slicer shows them as points still to be
placed, so the radiologist can place them). Read back in either coordinate system.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkFormatError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.landmarks import LandmarkSet

SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
_SCORE_RE = re.compile(r"score\s*=\s*([0-9.eE+-]+)")
_RADIUS_RE = re.compile(r"radius90\s*=\s*([0-9.eE+]+)\s*mm")
_TOLERANCE_RE = re.compile(r"p error <=\s*([0-9.eE+]+)\s*mm")


#: a calibrated point scored below this (probability of an error within the tolerance) is one to check
REVIEW_BELOW = 0.5
WARNING_COLOR = (1.0, 0.5, 0.0)
CONFIDENT_COLOR = (0.2, 0.8, 0.3)
_REVIEW_COLOURS = {"color": list(CONFIDENT_COLOR), "selectedColor": list(WARNING_COLOR)}


def point_description(landmarks: LandmarkSet, i: int) -> str:
    """``score=0.930`` (+ what a calibrated score means and the 90 % radius; + ``not found``)."""
    desc = f"score={landmarks.scores[i]:.3f}"
    if landmarks.calibrated:
        desc += f" (p error <= {landmarks.tolerance_mm:g} mm)"
        if np.isfinite(landmarks.radius_mm[i]):
            desc += f"; radius90={landmarks.radius_mm[i]:.1f} mm"
    return desc + ("" if landmarks.found[i] else "; not found")


def markups_dict(landmarks: LandmarkSet, name: str = "landmarks", coordinate_system: str = "LPS") -> dict[str, Any]:
    """The markups JSON document (a dict) for one landmark set."""
    if coordinate_system not in ("LPS", "RAS"):
        raise LandmarkFormatError(f"unknown coordinate system {coordinate_system!r}; use LPS or RAS")
    xyz = landmarks.xyz_mm_lps if coordinate_system == "LPS" else landmarks.xyz_mm_ras
    points = []
    calibrated = landmarks.calibrated
    for i, label in enumerate(landmarks.names):
        found = bool(landmarks.found[i])
        pos = xyz[i] if np.all(np.isfinite(xyz[i])) else np.zeros(3)
        desc = point_description(landmarks, i)
        # Calibrated points to check (low score, not found) are selected: Slicer draws them in the warning
        # colour (``selectedColor``) and leaves them free to move; confident ones are green and locked.
        check = not calibrated or not found or float(landmarks.scores[i]) < REVIEW_BELOW
        points.append({
            "id": str(i + 1),
            "label": label,
            "description": desc,
            "associatedNodeID": "",
            "position": [float(v) for v in pos],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": check,
            "locked": not check,
            "visibility": True,
            "positionStatus": "defined" if found else "undefined",
        })
    return {
        "@schema": SCHEMA_URL,
        "markups": [{
            "type": "Fiducial",
            "name": name,
            "coordinateSystem": coordinate_system,
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(points),
            "controlPoints": points,
            "measurements": [],
            "display": {"visibility": True, "glyphType": "Sphere3D", "glyphScale": 3.0,
                        "textScale": 3.0, "pointLabelsVisibility": True,
                        **(_REVIEW_COLOURS if calibrated else {})},
        }],
    }


def write_markups(path: str | os.PathLike[str], landmarks: LandmarkSet, name: str | None = None,
                  coordinate_system: str = "LPS") -> Path:
    """Write a ``.mrk.json`` point list (LPS by default, as Slicer writes)."""
    p = Path(path)
    doc = markups_dict(landmarks, name or p.name.split(".")[0], coordinate_system)
    return atomic_write_text(p, json.dumps(doc, indent=2))


def parse_markups(doc: Any, source: str = "<markups>") -> LandmarkSet:
    """Read the control points of a markups document (dict) into a LandmarkSet (RAS)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise LandmarkFormatError(f"{source}: not a Slicer markups document (no 'markups' list)")
    fiducials = [m for m in doc["markups"] if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if not fiducials:
        types = [m.get("type") if isinstance(m, dict) else type(m).__name__ for m in doc["markups"]]
        raise LandmarkFormatError(f"{source}: no point list (type 'Fiducial') among markups {types}")
    names: list[str] = []
    xyz: list[list[float]] = []
    scores: list[float] = []
    radius: list[float] = []
    tolerance = math.nan
    found: list[bool] = []
    for m_index, m in enumerate(fiducials):
        cs = m.get("coordinateSystem", "LPS")
        if cs not in ("LPS", "RAS"):
            raise LandmarkFormatError(f"{source}: markup {m_index}: unknown coordinateSystem {cs!r}; "
                                      "expected LPS or RAS")
        units = m.get("coordinateUnits", "mm")
        unit = units[0] if isinstance(units, list) and units else units
        if unit not in ("mm", "um"):
            raise LandmarkFormatError(f"{source}: markup {m_index}: unknown coordinateUnits {units!r}")
        scale = 1e-3 if unit == "um" else 1.0
        cps = m.get("controlPoints", [])
        if not isinstance(cps, list):
            raise LandmarkFormatError(f"{source}: markup {m_index}: 'controlPoints' is not a list")
        for c_index, cp in enumerate(cps):
            where = f"{source}: markup {m_index} control point {c_index}"
            if not isinstance(cp, dict):
                raise LandmarkFormatError(f"{where}: not an object")
            label = cp.get("label")
            if not isinstance(label, str) or not label.strip():
                raise LandmarkFormatError(f"{where}: missing 'label' (the landmark name)")
            status = cp.get("positionStatus", "defined")
            if status not in ("defined", "preview", "undefined", "missing"):
                raise LandmarkFormatError(f"{where} ({label}): unknown positionStatus {status!r}")
            pos = cp.get("position")
            is_found = status == "defined"
            if pos is None and is_found:
                raise LandmarkFormatError(f"{where} ({label}): missing 'position'")
            if pos is None:
                pos = [math.nan] * 3
            try:
                p = [float(v) * scale for v in pos]
            except (TypeError, ValueError):
                raise LandmarkFormatError(f"{where} ({label}): position {pos!r} is not 3 numbers") from None
            if len(p) != 3 or (is_found and not all(math.isfinite(v) for v in p)):
                raise LandmarkFormatError(f"{where} ({label}): position {pos!r} is not 3 finite numbers")
            if cs == "LPS":
                p = [-p[0], -p[1], p[2]]
            desc = str(cp.get("description", ""))
            match = _SCORE_RE.search(desc)
            score = float(match.group(1)) if match else 1.0
            r = _RADIUS_RE.search(desc)
            radius.append(float(r.group(1)) if r else math.nan)
            tol = _TOLERANCE_RE.search(desc)
            if tol:
                tolerance = float(tol.group(1))
            names.append(label)
            xyz.append(p)
            scores.append(min(max(score, 0.0), 1.0))
            found.append(is_found)
    if not names:
        return LandmarkSet((), np.zeros((0, 3)))
    try:
        return LandmarkSet(tuple(names), np.array(xyz), np.array(scores), np.array(found), np.array(radius), tolerance)
    except LandmarkFormatError as e:
        raise LandmarkFormatError(f"{source}: {e}") from None


def read_markups(path: str | os.PathLike[str]) -> LandmarkSet:
    """Read a Slicer ``.mrk.json`` (LPS or RAS) into a LandmarkSet (RAS)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LandmarkFormatError(f"{p}: not valid JSON ({e})") from None
    return parse_markups(doc, str(p))


def validate_markups(doc: dict[str, Any], schema_path: str | os.PathLike[str]) -> None:
    """Validate a markups document against Slicer's JSON schema (raises jsonschema.ValidationError)."""
    import jsonschema

    schema = json.loads(Path(schema_path).read_text(encoding="utf-8"))
    jsonschema.validate(doc, schema)


__all__ = ["markups_dict", "parse_markups", "read_markups", "write_markups", "validate_markups"]
