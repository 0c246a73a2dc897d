"""The landmark table (CSV) and landmark JSON, per case and for many cases.

CSV columns: ``case,name,x_ras,y_ras,z_ras`` then optionally ``score,found`` -- exactly the format of
``../shared/data/hippocampus/landmarks.csv``. A landmark absent for a case simply has no row (partial
annotation). With the optional columns, a not-found prediction has a row with ``found = 0`` and its
best-guess position (or empty coordinates).

JSON (one case)::

    {"coordinate_system": "RAS", "units": "mm",
     "landmarks": [{"name": "AC", "ras": [x, y, z], "lps": [-x, -y, z], "score": 1.0, "found": true}]}

JSON (many cases): ``{"cases": {"<case>": <one-case document>, ...}}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d.errors import LandmarkFormatError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.landmarks import LandmarkSet

REQUIRED_COLUMNS = ("case", "name", "x_ras", "y_ras", "z_ras")
OPTIONAL_COLUMNS = ("score", "found", "radius_mm", "tolerance_mm")
#: written only for calibrated predictions (:mod:`lmk3d.trust`): ``score`` is then the probability that the
#: error is within ``tolerance_mm``, ``radius_mm`` a radius holding the truth with 90 % probability
CALIBRATED_COLUMNS = ("radius_mm", "tolerance_mm")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def _parse_bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise LandmarkFormatError(f"{where}: found = {value!r} is not a boolean (use 1/0 or true/false)")


def read_table(path: str | os.PathLike[str]) -> dict[str, LandmarkSet]:
    """Read a landmark table CSV into ``{case: LandmarkSet}`` (cases and names in file order)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise LandmarkFormatError(f"{p}: not a text file ({e})") from None
    return parse_table(text, str(p))


def parse_table(text: str, p: str = "<table>") -> dict[str, LandmarkSet]:
    """Parse landmark table CSV text; ``p`` names the source in error messages."""
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise LandmarkFormatError(f"{p}: missing column(s) {', '.join(missing)}; a landmark table has "
                                  f"{','.join(REQUIRED_COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}]")
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise LandmarkFormatError(f"{p}: unknown column(s) {', '.join(unknown)}; a landmark table has "
                                  f"{','.join(REQUIRED_COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}]")
    rows: dict[str, list[tuple[str, list[float], float, bool, float, float]]] = {}
    for line, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            raise LandmarkFormatError(f"{p}:{line}: more fields than columns")
        where = f"{p}:{line}"
        case, name = row["case"], row["name"]
        if not case or not name:
            raise LandmarkFormatError(f"{where}: empty case or name")
        found = _parse_bool(row["found"], where) if row.get("found") else True
        coords = [row[c] for c in ("x_ras", "y_ras", "z_ras")]
        if all(c == "" for c in coords) and not found:
            xyz = [math.nan] * 3
        else:
            try:
                xyz = [float(c) for c in coords]
            except ValueError:
                raise LandmarkFormatError(f"{where}: coordinates {coords} are not numbers") from None
            if not all(math.isfinite(v) for v in xyz):
                raise LandmarkFormatError(f"{where}: non-finite coordinates {coords}")
        try:
            score = float(row["score"]) if row.get("score") else 1.0
        except ValueError:
            raise LandmarkFormatError(f"{where}: score {row['score']!r} is not a number") from None
        if not 0.0 <= score <= 1.0:
            raise LandmarkFormatError(f"{where}: score {score} outside [0, 1]")
        extra = []
        for col in CALIBRATED_COLUMNS:
            try:
                v = float(row[col]) if row.get(col) else math.nan
            except ValueError:
                raise LandmarkFormatError(f"{where}: {col} {row[col]!r} is not a number") from None
            if v < 0 or math.isinf(v):
                raise LandmarkFormatError(f"{where}: {col} {v} is not a distance in mm >= 0")
            extra.append(v)
        case_rows = rows.setdefault(case, [])
        if any(r[0] == name for r in case_rows):
            raise LandmarkFormatError(f"{where}: duplicate landmark {name!r} for case {case!r}")
        case_rows.append((name, xyz, score, found, extra[0], extra[1]))
    out: dict[str, LandmarkSet] = {}
    for case, rs in rows.items():
        out[case] = LandmarkSet(tuple(r[0] for r in rs), np.array([r[1] for r in rs]),
                                np.array([r[2] for r in rs]), np.array([r[3] for r in rs], dtype=bool),
                                np.array([r[4] for r in rs]), next((r[5] for r in rs if math.isfinite(r[5])), math.nan))
    return out


def table_text(sets: Mapping[str, LandmarkSet], with_scores: bool = True) -> str:
    """CSV text of a landmark table. Without scores, not-found landmarks are left out (truth style)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    calibrated = with_scores and any(s.calibrated for s in sets.values())
    optional = (OPTIONAL_COLUMNS if calibrated else ("score", "found")) if with_scores else ()
    w.writerow(REQUIRED_COLUMNS + optional)
    for case, s in sets.items():
        for i, name in enumerate(s.names):
            found = bool(s.found[i])
            if not with_scores and not found:
                continue
            xyz = s.xyz_mm_ras[i]
            coords = [f"{v:.4f}" for v in xyz] if np.all(np.isfinite(xyz)) else ["", "", ""]
            extra: list[Any] = [f"{s.scores[i]:.4f}", int(found)] if with_scores else []
            if calibrated:
                r, tol = s.radius_mm[i], s.tolerance_mm
                extra += [f"{r:.3f}" if np.isfinite(r) else "", f"{tol:g}" if np.isfinite(tol) else ""]
            w.writerow([case, name, *coords, *extra])
    return buf.getvalue()


def write_table(path: str | os.PathLike[str], sets: Mapping[str, LandmarkSet], with_scores: bool = True) -> Path:
    """Write ``{case: LandmarkSet}`` as a landmark table CSV (atomically)."""
    return atomic_write_text(path, table_text(sets, with_scores))


#: Columns of ``image_checks.csv`` (:func:`write_image_checks`): one row per image a trust model judged.
IMAGE_CHECK_COLUMNS = ("case", "in_distribution", "atypical", "score", "reason")


def write_image_checks(path: str | os.PathLike[str], verdicts: Mapping[str, Any]) -> Path:
    """Write ``{case: ImageVerdict}`` (:class:`lmk3d.trust.ImageVerdict`) as a CSV (atomically).

    The per-landmark table cannot say why an image has no landmark: refused as not of the model's kind
    (``in_distribution`` 0, the ``reason`` in words) or every landmark cut off; nor that its scores are
    capped (``atypical`` 1). ``score``: the share of calibration images at least as far from the training
    images.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(IMAGE_CHECK_COLUMNS)
    for case, v in verdicts.items():
        w.writerow([case, int(bool(v.in_distribution)), int(bool(v.atypical)), f"{float(v.score):.4f}", v.reason])
    return atomic_write_text(path, buf.getvalue())


# JSON -------------------------------------------------------------------------------------------
def landmarks_to_json(s: LandmarkSet, affine: np.ndarray | None = None) -> dict[str, Any]:
    """One case as a JSON-able dict; with the image ``affine``, each landmark also gets ``ijk``."""
    ijk = s.to_ijk(affine) if affine is not None else None
    items = []
    for i, name in enumerate(s.names):
        fin = bool(np.all(np.isfinite(s.xyz_mm_ras[i])))
        item: dict[str, Any] = {
            "name": name,
            "ras": [float(v) for v in s.xyz_mm_ras[i]] if fin else None,
            "lps": [float(v) for v in s.xyz_mm_lps[i]] if fin else None,
            "score": float(s.scores[i]),
            "found": bool(s.found[i]),
        }
        if s.calibrated:
            item["radius_mm"] = float(s.radius_mm[i]) if np.isfinite(s.radius_mm[i]) else None
        if ijk is not None:
            item["ijk"] = [float(v) for v in ijk[i]] if fin else None
        items.append(item)
    doc: dict[str, Any] = {"coordinate_system": "RAS", "units": "mm", "landmarks": items}
    if s.calibrated:
        doc["tolerance_mm"] = s.tolerance_mm
        doc["score_meaning"] = (f"probability that the landmark is within {s.tolerance_mm:g} mm of the truth; "
                                "radius_mm holds the truth with 90 % probability")
    return doc


def landmarks_from_json(doc: Any, source: str = "<json>") -> LandmarkSet:
    """Inverse of :func:`landmarks_to_json` (``ras`` is used; ``lps`` only when ``ras`` is absent)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("landmarks"), list):
        raise LandmarkFormatError(f"{source}: expected an object with a 'landmarks' list")
    names, xyz, scores, found, radius = [], [], [], [], []
    for k, item in enumerate(doc["landmarks"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise LandmarkFormatError(f"{source}: landmark {k} has no 'name'")
        is_found = bool(item.get("found", True))
        pos = item.get("ras")
        if pos is None and item.get("lps") is not None:
            lps = item["lps"]
            pos = [-lps[0], -lps[1], lps[2]] if isinstance(lps, list) and len(lps) == 3 else lps
        if pos is None:
            if is_found:
                raise LandmarkFormatError(f"{source}: landmark {item['name']!r} is found but has no 'ras' position")
            pos = [math.nan] * 3
        try:
            p = [float(v) for v in pos]
        except (TypeError, ValueError):
            raise LandmarkFormatError(f"{source}: landmark {item['name']!r}: position {pos!r} is not numbers") from None
        if len(p) != 3:
            raise LandmarkFormatError(f"{source}: landmark {item['name']!r}: position needs 3 numbers")
        names.append(item["name"])
        xyz.append(p)
        scores.append(float(item.get("score", 1.0)))
        found.append(is_found)
        r = item.get("radius_mm")
        radius.append(float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else math.nan)
    tol = doc.get("tolerance_mm")
    try:
        return LandmarkSet(tuple(names), np.array(xyz).reshape(-1, 3), np.array(scores), np.array(found, dtype=bool),
                           np.array(radius), float(tol) if isinstance(tol, (int, float)) else math.nan)
    except LandmarkFormatError as e:
        raise LandmarkFormatError(f"{source}: {e}") from None


def write_json(path: str | os.PathLike[str], s: LandmarkSet, affine: np.ndarray | None = None,
               label_values: bool = False) -> Path:
    """Write one case as JSON; ``label_values`` adds each landmark's value in a sphere label map (``k + 1``)."""
    doc = landmarks_to_json(s, affine)
    if label_values:
        for k, item in enumerate(doc["landmarks"]):
            item["label"] = k + 1
    return atomic_write_text(path, json.dumps(doc, indent=2))


def _load_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LandmarkFormatError(f"{p}: not valid JSON ({e})") from None


def read_json(path: str | os.PathLike[str]) -> LandmarkSet:
    return landmarks_from_json(_load_json(path), str(path))


def write_json_table(path: str | os.PathLike[str], sets: Mapping[str, LandmarkSet]) -> Path:
    doc = {"cases": {case: landmarks_to_json(s) for case, s in sets.items()}}
    return atomic_write_text(path, json.dumps(doc, indent=2))


def read_json_table(path: str | os.PathLike[str]) -> dict[str, LandmarkSet]:
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise LandmarkFormatError(f"{path}: expected an object with a 'cases' mapping")
    return {case: landmarks_from_json(d, f"{path} case {case}") for case, d in doc["cases"].items()}
