"""3D Slicer fiducial CSV (``.fcsv``, format 4.x/5.x).

Read: ``# CoordinateSystem = 0``/``RAS`` or ``1``/``LPS`` (absent means RAS, as Slicer < 4.11 wrote).
The landmark name is the ``label`` column, except in files that number their points in ``label``
and name them in ``desc`` (the AFIDs convention: ``label = 1``, ``desc = AC``): when every label is
an integer and every description is a distinct non-empty name, the description is the name.
Write: RAS (``CoordinateSystem = 0``), ``label`` = landmark name, ``desc`` = score; an unplaced
landmark is written with ``vis = 0`` and ``desc`` ending in ``not found``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import numpy as np

from lmk3d.errors import LandmarkFormatError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.markups import point_description
from lmk3d.landmarks import LandmarkSet

_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]
_SCORE_RE = re.compile(r"score\s*=\s*([0-9.eE+-]+)")


def read_fcsv(path: str | os.PathLike[str]) -> LandmarkSet:
    """Read a ``.fcsv`` into a LandmarkSet (RAS)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LandmarkFormatError(f"{p}: no such file") from None
    except UnicodeDecodeError as e:
        raise LandmarkFormatError(f"{p}: not a text file ({e})") from None
    system = "RAS"
    columns = list(_COLUMNS)
    rows: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                if value in ("0", "RAS"):
                    system = "RAS"
                elif value in ("1", "LPS"):
                    system = "LPS"
                else:
                    raise LandmarkFormatError(f"{p}: unknown CoordinateSystem {value!r}; expected 0/RAS or 1/LPS")
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    for need in ("x", "y", "z", "label"):
        if need not in columns:
            raise LandmarkFormatError(f"{p}: column {need!r} missing from '# columns = {','.join(columns)}'")
    names, descs, xyz, scores, found = [], [], [], [], []
    for n, rec in enumerate(csv.reader(rows)):
        if len(rec) < len(columns) - 2:  # trailing empty desc/associatedNodeID may be dropped
            raise LandmarkFormatError(f"{p}: point {n + 1} has {len(rec)} fields, expected {len(columns)}")
        rec = rec + [""] * (len(columns) - len(rec))
        field = dict(zip(columns, rec, strict=False))
        label = field["label"].strip()
        if not label:
            raise LandmarkFormatError(f"{p}: point {n + 1} has an empty label (the landmark name)")
        try:
            x, y, z = (float(field[k]) for k in ("x", "y", "z"))
        except ValueError:
            raise LandmarkFormatError(f"{p}: point {n + 1} ({label}): coordinates are not numbers") from None
        if not all(math.isfinite(v) for v in (x, y, z)):
            raise LandmarkFormatError(f"{p}: point {n + 1} ({label}): non-finite coordinates")
        if system == "LPS":
            x, y = -x, -y
        desc = field.get("desc", "")
        m = _SCORE_RE.search(desc)
        descs.append(desc.strip())
        names.append(label)
        xyz.append((x, y, z))
        scores.append(min(max(float(m.group(1)), 0.0), 1.0) if m else 1.0)
        found.append("not found" not in desc)
    numbered = all(n.isdigit() for n in names) and all(descs) and len(set(descs)) == len(descs)
    if names and numbered and not any(_SCORE_RE.search(d) for d in descs):
        names = descs
    try:
        return LandmarkSet(tuple(names), np.array(xyz).reshape(-1, 3), np.array(scores), np.array(found, dtype=bool))
    except LandmarkFormatError as e:
        raise LandmarkFormatError(f"{p}: {e}") from None


def write_fcsv(path: str | os.PathLike[str], landmarks: LandmarkSet) -> Path:
    """Write a ``.fcsv`` in RAS (``CoordinateSystem = 0``)."""
    buf = io.StringIO()
    buf.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = 0\n")
    buf.write("# columns = " + ",".join(_COLUMNS) + "\n")
    w = csv.writer(buf, lineterminator="\n")
    for i, name in enumerate(landmarks.names):
        found = bool(landmarks.found[i])
        pos = landmarks.xyz_mm_ras[i] if np.all(np.isfinite(landmarks.xyz_mm_ras[i])) else np.zeros(3)
        desc = point_description(landmarks, i)
        w.writerow([f"vtkMRMLMarkupsFiducialNode_{i + 1}", *(repr(float(v)) for v in pos), 0, 0, 0, 1,
                    int(found), 1, 0, name, desc, ""])
    return atomic_write_text(path, buf.getvalue())
