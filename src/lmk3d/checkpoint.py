"""The one place checkpoints are written and read: self-describing, tensors and plain types only.

A checkpoint is untrusted input (a file uploaded to the server, a model folder from elsewhere). It
is read with ``torch.load(..., weights_only=True)`` and nothing else: a file that holds anything but
tensors, numbers, strings, lists, tuples and dicts (for example a pickled object, whose loading
would run code) is refused with :class:`CheckpointError` and never executed.

Layout (``FORMAT`` 2)::

    {"format": 2, "detector": "cascade", "profile": "cpu", "config": {...resolved...},
     "landmark_names": [...],
     "stages": {"stage1_heatmap": {"networks": {"unet": state_dict}, "fitted": {...}}, ...},
     "fitted": {...detector-level fitted state (modality, spacing...)...},
     "versions": {"lmk3d": "0.1.0", "torch": "2.13.0", "monai": "1.5.2"},
     "data_fingerprint": "sha256 of the training cases' ids and landmarks" | None,
     "training": {...JSON-able report of the run that made it...}}

Format 1 (before the framework) kept ``state_dicts`` and ``fitted`` per detector; each detector's
``upgrade_checkpoint`` maps it onto format 2 (``scripts/convert_checkpoints.py`` converted the shipped
models once).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmk3d.errors import LandmarkError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 2
REQUIRED = ("detector", "config", "landmark_names")


class CheckpointError(LandmarkError):
    """A checkpoint that cannot be used: unreadable, not ours, or holding more than plain data."""


def versions() -> dict[str, str]:
    """The versions that made a checkpoint (recorded, not enforced). MONAI's comes from its package
    metadata: importing it takes seconds and the networks no longer need it."""
    from importlib import metadata

    import torch

    from lmk3d import __version__

    try:
        monai_version = metadata.version("monai")
    except metadata.PackageNotFoundError:
        monai_version = "not installed"
    return {"lmk3d": __version__, "torch": str(torch.__version__), "monai": monai_version}


def data_fingerprint(cases: Sequence[tuple[str, Any]]) -> str:
    """A short hash of the training data: the case ids and their landmark tables (names, positions, found).

    Args:
        cases: ``(case id, LandmarkSet or None)`` per training case.
    """
    h = hashlib.sha256()
    for case, lm in sorted(cases, key=lambda c: c[0]):
        h.update(case.encode())
        if lm is not None:
            h.update(json.dumps(list(lm.names)).encode())
            h.update(lm.xyz_mm_ras.round(4).tobytes())
            h.update(lm.found.tobytes())
    return "sha256:" + h.hexdigest()[:32]


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A model folder's ``checkpoint.pt``, or the file itself."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() else p


def write_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (format 2, plain data) atomically: temporary file, fsync, rename.

    ``path`` is a model folder (created if needed) or a file path. Fails before writing if the payload
    would not read back weights-only.
    """
    import torch

    from lmk3d.io.atomic import atomic_write_bytes

    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks {', '.join(missing)}")
    doc = {"format": FORMAT, "versions": versions(), **payload}
    buf = io.BytesIO()
    torch.save(doc, buf)
    data = buf.getvalue()
    # What is written must be readable by the only reader there is.
    _load_bytes(data, "cpu", "<new checkpoint>")
    p = Path(path)
    target = p / CHECKPOINT_FILE if (p.is_dir() or not p.suffix) else p
    return atomic_write_bytes(target, data)


def _load_bytes(data: bytes | os.PathLike[str] | str, device: str, where: str) -> Any:
    import torch

    src: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    if not zipfile.is_zipfile(src):
        raise CheckpointError(f"{where}: cannot read checkpoint (not a file written by torch.save)")
    if isinstance(src, io.BytesIO):
        src.seek(0)
    try:
        return torch.load(src, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refused: the file holds objects other than tensors and plain data "
                              f"(loading them could run code), so it was not loaded ({_first_line(e)})") from None
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The informative line of torch's message (it names the refused global), else its first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if "unsupported" in ln.lower() and "GLOBAL" in ln.upper() and "load failed" not in ln]
    text = named or lines
    return text[0][:300] if text else type(e).__name__


def read_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint weights-only and check its shape; format 1 files come back as they are.

    Raises:
        CheckpointError: missing file, unreadable file, pickled objects, or not an lmk3d checkpoint.
    """
    ckpt = checkpoint_path(path)
    if not ckpt.is_file():
        raise CheckpointError(f"{path}: no {CHECKPOINT_FILE}; this model has not been trained or was not shipped")
    payload = _load_bytes(ckpt, device, str(ckpt))
    if not isinstance(payload, dict) or "detector" not in payload:
        raise CheckpointError(f"{ckpt}: not an lmk3d checkpoint (no 'detector' entry)")
    if not isinstance(payload["detector"], str):
        raise CheckpointError(f"{ckpt}: 'detector' must be a name, got {type(payload['detector']).__name__}")
    names = payload.get("landmark_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{ckpt}: 'landmark_names' must be a list of names")
    if not isinstance(payload.get("config", {}), dict):
        raise CheckpointError(f"{ckpt}: 'config' must be a dict")
    fmt = payload.get("format", 1)
    if fmt not in (1, FORMAT):
        raise CheckpointError(f"{ckpt}: checkpoint format {fmt!r} is not one this version reads (1 or {FORMAT})")
    if fmt == FORMAT and not isinstance(payload.get("stages"), dict):
        raise CheckpointError(f"{ckpt}: format {FORMAT} checkpoint without a 'stages' dict")
    return payload


__all__ = ["CHECKPOINT_FILE", "FORMAT", "CheckpointError", "checkpoint_path", "data_fingerprint", "read_checkpoint",
           "versions", "write_checkpoint"]
