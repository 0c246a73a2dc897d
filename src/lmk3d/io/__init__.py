"""Readers and writers for images and landmark files, chosen by file suffix.

| suffix | landmarks |
|---|---|
| ``.mrk.json`` | Slicer markups point list (written LPS, read LPS or RAS) |
| ``.fcsv`` | Slicer fiducial CSV (written RAS, read RAS or LPS) |
| ``.json`` | lmk3d landmark JSON (one case) |
| ``.csv`` | one case: ``name,x_ras,y_ras,z_ras[,score,found]``; a table has a ``case`` column too |
| ``.nii.gz`` ``.nii`` ``.nrrd`` ... | sphere label map (needs the landmark names, value k+1 = name k) |
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lmk3d.errors import LandmarkFormatError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.fcsv import read_fcsv, write_fcsv
from lmk3d.io.image import IMAGE_SUFFIXES, Volume, case_id, image_suffix, read_image, write_image
from lmk3d.io.label_map import read_label_map, write_label_map
from lmk3d.io.markups import read_markups, write_markups
from lmk3d.io.table import parse_table, read_json, read_table, table_text, write_json, write_table
from lmk3d.landmarks import LandmarkSet

LANDMARK_SUFFIXES = (".mrk.json", ".fcsv", ".json", ".csv")

__all__ = [
    "LANDMARK_SUFFIXES", "IMAGE_SUFFIXES", "Volume", "case_id", "image_suffix", "landmark_suffix",
    "read_image", "write_image", "read_landmarks", "write_landmarks", "read_table", "write_table",
    "label_map_sidecar",
]


def landmark_suffix(path: str | os.PathLike[str]) -> str:
    """'.mrk.json', '.fcsv', '.json', '.csv', an image suffix (label map), or ''."""
    name = str(path).lower()
    for suf in LANDMARK_SUFFIXES:
        if name.endswith(suf):
            return suf
    return image_suffix(path)


def _read_case_csv(path: Path) -> LandmarkSet:
    text = path.read_text(encoding="utf-8-sig")
    header = next(csv.reader(io.StringIO(text)), [])
    if "case" in [h.strip() for h in header]:
        sets = read_table(path)
        if len(sets) != 1:
            raise LandmarkFormatError(f"{path}: a table of {len(sets)} cases where one case was expected")
        return next(iter(sets.values()))
    # One case: the table format without its case column; reuse the table parser and its checks.
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise LandmarkFormatError(f"{path}: empty file")
    sets = parse_table("\n".join(["case," + lines[0]] + [f"_,{line}" for line in lines[1:]]), str(path))
    return sets.get("_", LandmarkSet((), np.zeros((0, 3))))


def read_landmarks(
    path: str | os.PathLike[str], names: Sequence[str] | Mapping[str, int] | None = None
) -> LandmarkSet:
    """Read one case's landmarks from any supported file (see the module table).

    Args:
        names: landmark names in value order, needed for a sphere label map only.
    """
    p = Path(path)
    suf = landmark_suffix(p)
    if not p.is_file():
        raise LandmarkFormatError(f"{p}: no such file")
    if suf == ".mrk.json":
        return read_markups(p)
    if suf == ".fcsv":
        return read_fcsv(p)
    if suf == ".json":
        import json

        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LandmarkFormatError(f"{p}: not valid JSON ({e})") from None
        if isinstance(doc, dict) and "markups" in doc:
            return read_markups(p)
        return read_json(p)
    if suf == ".csv":
        return _read_case_csv(p)
    if suf in IMAGE_SUFFIXES:
        if names is None:
            raise LandmarkFormatError(f"{p}: a sphere label map needs the landmark names (value k+1 = name k)")
        return read_label_map(p, names)
    raise LandmarkFormatError(f"{p}: unknown landmark file type; use one of "
                              f"{', '.join(LANDMARK_SUFFIXES)} or a label map image ({', '.join(IMAGE_SUFFIXES)})")


def label_map_sidecar(path: str | os.PathLike[str]) -> Path:
    """The JSON written beside a sphere label map: ``case.nii.gz`` -> ``case.landmarks.json``.

    It names the label values (``label`` per landmark) and carries what a label map cannot: scores,
    found flags, and for calibrated predictions the 90 % radius and the tolerance (:mod:`lmk3d.trust`).
    """
    p = Path(path)
    stem = p.name[: -len(image_suffix(p))] if image_suffix(p) else p.stem
    return p.with_name(f"{stem}.landmarks.json")


def write_landmarks(
    path: str | os.PathLike[str], landmarks: LandmarkSet, reference: Volume | None = None
) -> Path:
    """Write one case's landmarks; the format follows the suffix. A label map needs ``reference``."""
    p = Path(path)
    suf = landmark_suffix(p)
    if suf == ".mrk.json":
        return write_markups(p, landmarks)
    if suf == ".fcsv":
        return write_fcsv(p, landmarks)
    if suf == ".json":
        return write_json(p, landmarks, None if reference is None else reference.affine)
    if suf == ".csv":
        text = table_text({"_": landmarks}, with_scores=True)
        return atomic_write_text(p, "\n".join(line.split(",", 1)[1] for line in text.splitlines()) + "\n")
    if suf in IMAGE_SUFFIXES:
        if reference is None:
            raise LandmarkFormatError(f"{p}: writing a sphere label map needs the reference image")
        out = write_label_map(p, landmarks, reference)
        write_json(label_map_sidecar(p), landmarks, reference.affine, label_values=True)
        return out
    raise LandmarkFormatError(f"{p}: unknown landmark file type; use one of "
                              f"{', '.join(LANDMARK_SUFFIXES)} or a label map image ({', '.join(IMAGE_SUFFIXES)})")


def read_collection(path: str | os.PathLike[str]) -> dict[str, LandmarkSet]:
    """Landmarks of many cases: ``{case: LandmarkSet}``.

    ``path`` is a landmark table CSV, a JSON table (``{"cases": ...}``), or a folder of per-case files
    (``<case>.mrk.json``, ``<case>.fcsv`` or ``<case>.json``; the case is the file name without its
    suffix). A folder with no per-case files but one CSV table is read as that table.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and landmark_suffix(f) in (".mrk.json", ".fcsv", ".json"))
        if files:
            out: dict[str, LandmarkSet] = {}
            for f in files:
                case = f.name[: -len(landmark_suffix(f))]
                if case in out:
                    raise LandmarkFormatError(f"{p}: two landmark files for case {case!r}")
                out[case] = read_landmarks(f)
            return out
        tables = sorted(p.glob("*.csv"))
        if len(tables) == 1:
            return read_table(tables[0])
        raise LandmarkFormatError(f"{p}: no per-case landmark files (.mrk.json, .fcsv, .json) and "
                                  f"{len(tables)} CSV tables; expected one")
    suf = landmark_suffix(p)
    if suf == ".csv":
        return read_table(p)
    if suf == ".json":
        from lmk3d.io.table import read_json_table

        return read_json_table(p)
    raise LandmarkFormatError(f"{p}: expected a landmark table (.csv), a JSON table, or a folder of per-case files")
