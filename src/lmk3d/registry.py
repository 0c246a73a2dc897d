"""The model registry: every trained or uploaded version of a model, kept outside the repository.

A *workspace* (``lmk3d serve --workspace DIR``; default :func:`default_workspace`) holds one folder per
model. The shipped models in the repository's ``models/`` are only read: a model based on one points
at it (``shipped``) and serves it until a first version of its own is published. Layout::

    <workspace>/<name>/
        model.json          the record: detector, landmark names, salt, validation and training cases,
                            the served version ("current"), each version's status and decision, history
        .lock               flock'ed around every read-modify-write of model.json and version numbering
        versions/v0001/     checkpoint.pt, the source folder's *.json (trust.json among them), presence.pt
                            and MODEL_CARD.md, and version.json (created, parent, detector, metrics, data
                            fingerprint, calibration) and report.json (the report of the run that made
                            it), never changed once written

Several processes use one workspace at once (the server, its training child, ``lmk3d models``), so a
:class:`ModelRecord` re-reads ``model.json`` whenever it answers (a cheap ``stat`` tells it whether the
file changed). Every write is atomic (:mod:`lmk3d.io.atomic`): a version folder is filled under a
staging name (``versions/.staging-<pid>-...``), flushed, then renamed; ``model.json`` is written to a
temporary file and renamed over the old one. A process killed mid-way leaves a staging folder or a
temporary file, removed when its process is gone (:meth:`Registry.ensure`, :meth:`ModelRecord.add_version`).

The rules (docs/registry.md, written before any retrain was run):

- **Validation cases** (:meth:`ModelRecord.validation_cases`) are chosen once per case, when the model
  first sees it labelled, and are never trained on.
- **The gate** (:func:`gate`) publishes a new version only if it is no worse than the served one on
  those cases.

Example:
    >>> reg = Registry(tmp / "ws")                                      # doctest: +SKIP
    >>> rec = reg.ensure("cascade", "cascade", shipped=Path("models/cascade-hippocampus"))  # doctest: +SKIP
    >>> rec.current()                                                   # doctest: +SKIP
    'shipped'
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmk3d.checkpoint import CHECKPOINT_FILE
from lmk3d.errors import LandmarkError
from lmk3d.io.atomic import atomic_write_text, fsync_dir, remove_stale_dirs, remove_stale_temps
from lmk3d.safe_names import plain_name_problem

__all__ = ["BASELINE_DETECTOR", "DEFAULT_VAL_FRACTION", "MODEL_FILE", "SHIPPED", "STATUSES", "WORKSPACE_DIR",
           "ModelRecord", "Registry", "RegistryError", "Version", "default_workspace", "gate"]

#: The share of a model's labelled cases set aside as validation cases (see :meth:`ModelRecord.validation_cases`).
DEFAULT_VAL_FRACTION = 0.2
#: The record of a model, in its folder.
MODEL_FILE = "model.json"
#: ``current`` when the served checkpoint is the shipped one (``models/<detector>-<dataset>``).
SHIPPED = "shipped"
#: A version's status: added and not decided yet; served (now or before); refused by the gate; withdrawn by a rollback.
STATUSES = ("candidate", "published", "rejected", "rolled_back")
#: The default workspace folder inside a local studies folder (hidden, so no datastore lists it).
WORKSPACE_DIR = ".lmk3d-workspace"
#: The detector a model's version may hold besides the model's own: the fast baseline that gives a newly
#: declared model its first version within a minute, before its own detector has trained.
BASELINE_DETECTOR = "mean_shape"

VERSION_FILE = "version.json"
REPORT_FILE = "report.json"
MODEL_CARD = "MODEL_CARD.md"
LOCK_FILE = ".lock"
VERSIONS_DIR = "versions"
STAGING_PREFIX = ".staging-"
FORMAT = 1
_VERSION_ID = re.compile(r"^v(\d{4,})$")

logger = logging.getLogger(__name__)

# Staging folders this process is filling now: another thread's add_version must not take them for
# the leftovers of a killed process that had the same pid.
_in_progress: set[str] = set()
_in_progress_lock = threading.Lock()


class RegistryError(LandmarkError):
    """A registry request that cannot be met: unknown model or version, nothing to roll back to..."""


# --- where the workspace is ------------------------------------------------------------------------
def _repo_models_dir() -> Path:
    from lmk3d.serve import DEFAULT_MODELS_DIR  # stdlib only: the one definition of the repository's models/

    return DEFAULT_MODELS_DIR.resolve()


def _check_outside_models(path: Path, what: str) -> Path:
    models = _repo_models_dir()
    resolved = path.expanduser().resolve()
    if resolved == models or models in resolved.parents:
        raise RegistryError(f"{what} {path}: inside the repository's models/ folder ({models}), which holds the "
                            "shipped models and is never written; choose a folder elsewhere")
    return resolved


def validation_salt(name: str) -> str:
    """The salt of model ``name``'s validation-case hash: fixed by the name, so a split is reproducible."""
    return hashlib.sha256(f"lmk3d validation cases of {name}".encode()).hexdigest()[:32]


def default_workspace(studies: str) -> Path:
    """Where a server for ``studies`` keeps its model registry when no ``--workspace`` is given.

    Args:
        studies: the server's ``--studies``: a local folder, or a DICOMweb ``http(s)://`` URL.

    Returns:
        ``<studies>/.lmk3d-workspace`` for a folder; ``$XDG_DATA_HOME/lmk3d/<host>_<port>`` (else
        ``~/.local/share/lmk3d/<host>_<port>``) for a URL. Absolute; not created.

    Raises:
        RegistryError: another URL scheme, a URL without a host, or a workspace that would lie in the
            repository's ``models/``.

    Example:
        >>> default_workspace("http://127.0.0.1:8042/dicom-web").name
        '127.0.0.1_8042'
    """
    text = str(studies)
    if "://" in text:
        url = urllib.parse.urlsplit(text)
        if url.scheme.lower() not in ("http", "https") or not url.hostname:
            raise RegistryError(f"studies {text!r}: give a local folder or an http(s):// DICOMweb URL with a host")
        try:
            port = url.port or (443 if url.scheme.lower() == "https" else 80)
        except ValueError:
            raise RegistryError(f"studies {text!r}: the port is not a number in 0-65535") from None
        host = re.sub(r"[^A-Za-z0-9.-]", "_", url.hostname)
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
        path = base / "lmk3d" / f"{host}_{port}"
    else:
        path = Path(text) / WORKSPACE_DIR
    return _check_outside_models(path, "workspace")


# --- the gate --------------------------------------------------------------------------------------
def _number(metrics: Mapping[str, Any], key: str) -> float:
    """A metric as a float; absent, None (how NaN is stored) or not a number -> NaN."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _mm(v: float) -> str:
    return f"{v:.3f} mm" if math.isfinite(v) else "none found"


def _share(v: float) -> str:
    return f"{v:.1%}" if math.isfinite(v) else "n/a"


def gate(current: Mapping[str, Any] | None, new: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether ``new`` may replace the served version, and why (THE RULE, docs/registry.md).

    Both are metrics on the model's validation cases, measured on the same cases: ``val_mre_mm`` (mean
    radial error in mm, NaN when nothing was found), ``val_found`` (the share of the validation
    landmarks found, 0..1) and ``n_val`` (the number of validation cases).

    1. No served version (``current`` is None): accepted, as the first version.
    2. ``new["n_val"] == 0``: rejected and kept as a candidate: with no validation case nothing shows
       that it is no worse.
    3. ``current["n_val"]`` differs from ``new["n_val"]``: rejected (they were not measured on the same
       cases, so they cannot be compared).
    4. Otherwise accepted iff ``new val_found >= current val_found`` and ``new val_mre_mm <= current
       val_mre_mm``. A NaN (or missing) MRE counts as worse than any number, a NaN share found as lower
       than any share; two NaNs are equal. No tolerance: "no worse" means no worse.

    Returns:
        ``(accepted, reason)``; the reason names both versions' numbers.

    Example:
        >>> served = {"val_mre_mm": 0.68, "val_found": 1.0, "n_val": 3}
        >>> gate(served, {"val_mre_mm": 0.90, "val_found": 1.0, "n_val": 3})[0]
        False
        >>> gate(served, {"val_mre_mm": 0.61, "val_found": 1.0, "n_val": 3})[1]
        'no worse on 3 validation case(s): MRE 0.610 mm vs 0.680 mm served, found 100.0% vs 100.0% served'
    """
    new_mre, new_found = _number(new, "val_mre_mm"), _number(new, "val_found")
    n_new = int(_number(new, "n_val")) if math.isfinite(_number(new, "n_val")) else 0
    numbers = f"MRE {_mm(new_mre)}, {_share(new_found)} found"
    if current is None:
        return True, f"first version ({numbers} on {n_new} validation case(s)): nothing served to compare with"
    if n_new == 0:
        return False, ("no validation cases yet: cannot show it is no worse than the served version; kept as a "
                       "candidate (label more images)")
    cur_n = _number(current, "n_val")
    if math.isfinite(cur_n) and int(cur_n) != n_new:
        return False, (f"measured on {n_new} validation case(s) but the served version on {int(cur_n)}: not the "
                       "same cases, so not comparable; kept as a candidate")
    cur_mre, cur_found = _number(current, "val_mre_mm"), _number(current, "val_found")
    # NaN is the worst value: an MRE of +inf, a share found of -inf.
    mre_new = math.inf if math.isnan(new_mre) else new_mre
    mre_cur = math.inf if math.isnan(cur_mre) else cur_mre
    found_new = -math.inf if math.isnan(new_found) else new_found
    found_cur = -math.inf if math.isnan(cur_found) else cur_found
    found_ok = found_new >= found_cur
    mre_ok = mre_new <= mre_cur
    compared = (f"on {n_new} validation case(s): MRE {_mm(new_mre)} vs {_mm(cur_mre)} served, found "
                f"{_share(new_found)} vs {_share(cur_found)} served")
    if found_ok and mre_ok:
        return True, f"no worse {compared}"
    worse = [w for w, ok in (("finds fewer landmarks", found_ok), ("has a larger MRE", mre_ok)) if not ok]
    return False, f"{' and '.join(worse)} {compared}; kept as a candidate"


# --- versions --------------------------------------------------------------------------------------
@dataclass
class Version:
    """One stored version of a model (``<model>/versions/<id>/``).

    ``metrics`` hold the validation scores it was added with (``val_mre_mm``, ``val_found``, ``n_val``...;
    a NaN is stored as None). ``decision`` is what :meth:`ModelRecord.decide` recorded: ``accepted``,
    ``reason``, ``compared`` and ``time``; None until decided. ``calibration`` is what the run that made
    it said of its trust model (``calibrated``, ``reason``...; empty when it said nothing, e.g. an upload).
    """

    id: str
    path: Path
    created: str
    parent: str | None
    detector: str
    status: str
    metrics: dict[str, Any]
    decision: dict[str, Any] | None
    data_fingerprint: str
    files: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def calibrated(self) -> bool:
        """Whether it has a trust model (``trust.json``): its scores are calibrated probabilities, not raw."""
        from lmk3d.trust import TRUST_FILE

        return TRUST_FILE in self.files

    def calibration_reason(self) -> str:
        """One line: what its trust model was fitted on, or why it has none."""
        reason = self.calibration.get("reason")
        if isinstance(reason, str) and reason:
            return reason
        return "has a trust.json" if self.calibrated else "no trust.json: scores are the detector's raw ones"

    def report(self) -> dict[str, Any]:
        """The report of the run that made this version (``report.json``)."""
        return dict(_read_json(self.path / REPORT_FILE))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "created": self.created, "parent": self.parent,
                "detector": self.detector, "status": self.status, "metrics": _strict(self.metrics),
                "decision": _strict(self.decision), "data_fingerprint": self.data_fingerprint,
                "files": list(self.files), "calibrated": self.calibrated,
                "calibration": _strict({**self.calibration, "calibrated": self.calibrated,
                                        "reason": self.calibration_reason()})}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _strict(value: Any) -> Any:
    """``value`` as strict JSON data: NaN and infinities become None, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _strict(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _dumps(doc: Any) -> str:
    return json.dumps(_strict(doc), indent=2, allow_nan=False) + "\n"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _version_number(vid: str) -> int | None:
    m = _VERSION_ID.match(vid)
    return int(m.group(1)) if m else None


def _remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` that killed :meth:`ModelRecord.add_version` calls left."""

    def busy(path: str) -> bool:
        with _in_progress_lock:
            return path in _in_progress

    return remove_stale_dirs(folder, STAGING_PREFIX, busy, "an interrupted add_version")


# --- one model -------------------------------------------------------------------------------------
class ModelRecord:
    """One model of a registry: its record (``model.json``) and its versions.

    Every answer re-reads ``model.json`` when it changed on disk, since the server, its training child
    and ``lmk3d models`` may each write it; every change takes the model's lock (``.lock``) around the
    read-modify-write and writes atomically.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.name = self.root.name
        self._cache: tuple[bytes, dict[str, Any]] | None = None
        self._cache_lock = threading.Lock()
        # version.json and the file list of a version folder never change once the folder is renamed in.
        self._meta: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self.detector = str(self._doc()["detector"])

    # --- reading and writing model.json -----------------------------------------------------------
    @property
    def _file(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def _versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    def _doc(self) -> dict[str, Any]:
        """The record as on disk now (a copy the caller may change).

        The file is read every time (a few kB; another process may have replaced it), parsed only when
        its bytes changed: file times are too coarse to tell two quick writes apart.
        """
        try:
            data = self._file.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{self._file}: missing; the model {self.name!r} is not in the registry "
                                f"{self.root.parent}") from None
        except OSError as e:
            raise RegistryError(f"{self._file}: cannot read it ({e})") from None
        with self._cache_lock:
            if self._cache is None or self._cache[0] != data:
                try:
                    doc = json.loads(data)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise RegistryError(f"{self._file}: cannot read it ({type(e).__name__}: {e})") from None
                if not isinstance(doc, dict) or "detector" not in doc:
                    raise RegistryError(f"{self._file}: not a model record (no 'detector')")
                self._cache = (data, doc)
            return copy.deepcopy(self._cache[1])

    def _write(self, doc: Mapping[str, Any]) -> None:
        """Write the record atomically; call with the lock held."""
        atomic_write_text(self._file, _dumps(doc))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the model's lock and yield the record as it is now; not reentrant."""
        with _flock(self.root / LOCK_FILE):
            yield self._doc()

    # --- what the record says --------------------------------------------------------------------
    @property
    def shipped(self) -> Path | None:
        """The shipped model folder this model started from (read only, never written), or None."""
        s = self._doc().get("shipped")
        return Path(s) if s else None

    @property
    def landmark_names(self) -> tuple[str, ...] | None:
        names = self._doc().get("landmark_names")
        return tuple(names) if names is not None else None

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors a version of this model may hold: its own, and the :data:`BASELINE_DETECTOR`."""
        return tuple(dict.fromkeys((self.detector, BASELINE_DETECTOR)))

    @property
    def val_fraction(self) -> float:
        return float(self._doc().get("val_fraction", DEFAULT_VAL_FRACTION))

    def set_landmark_names(self, names: Sequence[str]) -> None:
        """Record the model's landmark names (in order).

        Setting the same names again does nothing. Other names replace the recorded ones only while the
        model has no version of its own (its versions were trained on the recorded ones).

        Raises:
            RegistryError: empty, repeated or non-string names, or other names once a version exists.
        """
        new = _check_landmark_names(names)
        with self._locked() as doc:
            old = doc.get("landmark_names")
            if old is not None and tuple(old) == new:
                return
            if old is not None and self._version_ids():
                raise RegistryError(f"model {self.name!r} has versions trained on the landmarks {list(old)}; it "
                                    f"cannot take {list(new)} (declare a new model for other landmarks)")
            doc["landmark_names"] = list(new)
            self._write(doc)

    def current(self) -> str | None:
        """The served version: ``"v0003"``, ``"shipped"``, or None (nothing trained yet)."""
        cur = self._doc().get("current")
        return str(cur) if cur else None

    def current_dir(self) -> Path | None:
        """The folder holding the served ``checkpoint.pt`` (a version folder or the shipped folder), or None."""
        doc = self._doc()
        cur = doc.get("current")
        if not cur:
            return None
        if cur == SHIPPED:
            return Path(doc["shipped"]) if doc.get("shipped") else None
        return self._versions_dir / str(cur)

    # --- versions --------------------------------------------------------------------------------
    def _version_ids(self) -> list[str]:
        try:
            names = [e.name for e in os.scandir(self._versions_dir) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        ids = [n for n in names if _version_number(n) is not None and (self._versions_dir / n / VERSION_FILE).is_file()]
        return sorted(ids, key=lambda n: _version_number(n) or 0)

    def _version(self, vid: str, doc: Mapping[str, Any]) -> Version:
        path = self._versions_dir / vid
        with self._cache_lock:
            cached = self._meta.get(vid)
        if cached is None:
            meta = _read_json(path / VERSION_FILE)
            if not isinstance(meta, dict):
                raise RegistryError(f"{path / VERSION_FILE}: not a version record")
            cached = (meta, sorted(p.name for p in path.iterdir() if p.is_file()))
            with self._cache_lock:
                self._meta[vid] = cached
        meta, files = copy.deepcopy(cached)
        state = doc.get("versions", {}).get(vid, {})
        return Version(id=vid, path=path, created=str(meta.get("created", "")), parent=meta.get("parent"),
                       detector=str(meta.get("detector", "")), status=str(state.get("status", "candidate")),
                       metrics=dict(meta.get("metrics") or {}), decision=state.get("decision"),
                       data_fingerprint=str(meta.get("data_fingerprint", "")), files=files,
                       calibration=dict(meta.get("calibration") or {}))

    def versions(self) -> list[Version]:
        """Every version, oldest first (the shipped checkpoint is not one)."""
        doc = self._doc()
        return [self._version(v, doc) for v in self._version_ids()]

    def version(self, vid: str) -> Version:
        """One version by id (``"v0002"``).

        Raises:
            RegistryError: no such version (the message lists the known ones).
        """
        ids = self._version_ids()
        if vid not in ids:
            raise RegistryError(f"model {self.name!r} has no version {vid!r}; it has "
                                f"{', '.join(ids) if ids else 'none yet'}")
        return self._version(vid, self._doc())

    def add_version(self, source_dir: Path, *, parent: str | None, detector: str, metrics: Mapping[str, Any],
                    report: Mapping[str, Any], data_fingerprint: str, status: str = "candidate",
                    calibration: Mapping[str, Any] | None = None) -> Version:
        """Store the checkpoint in ``source_dir`` as the next version (``versions/vNNNN``).

        ``source_dir/checkpoint.pt`` (required) and the ``*.json`` (``trust.json`` among them),
        ``presence.pt`` and ``MODEL_CARD.md`` files beside it are copied into a staging folder, flushed
        to disk, and the folder renamed to its number; the number is taken under the model's lock, so
        two processes never get the same one. ``version.json`` and ``report.json`` are the registry's
        own names there. The version is not served: :meth:`decide` does that.

        Args:
            source_dir: a folder with ``checkpoint.pt`` (it is only read).
            parent: the version served when this one was made (``"shipped"``, ``"v0002"``, or None).
            detector: the detector slug in the checkpoint; the model's own or the baseline (:attr:`detectors`).
            metrics: its scores on the validation cases (see :func:`gate`).
            report: what made it (options, cases, training report...), stored as ``report.json``.
            data_fingerprint: the training data's fingerprint (:func:`lmk3d.checkpoint.data_fingerprint`).
            status: ``candidate`` (default) or another of :data:`STATUSES`.
            calibration: what was said of its trust model (``calibrated``, ``reason``...), kept in
                ``version.json`` (:attr:`Version.calibration`).

        Raises:
            RegistryError: no checkpoint, another detector, a reserved file name in ``source_dir``, or a
                bad status.
        """
        source = Path(source_dir)
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if detector not in self.detectors:
            raise RegistryError(f"model {self.name!r} is a {self.detector!r} model; a {detector!r} checkpoint "
                                f"cannot be one of its versions (only {' or '.join(map(repr, self.detectors))})")
        if not (source / CHECKPOINT_FILE).is_file():
            raise RegistryError(f"{source}: no {CHECKPOINT_FILE} to add as a version of {self.name!r}")
        if parent is not None and parent != SHIPPED and _version_number(parent) is None:
            raise RegistryError(f"parent {parent!r}: not a version id (v0001...) nor {SHIPPED!r}")
        from lmk3d.trust.presence import PRESENCE_FILE

        copied = [CHECKPOINT_FILE] + sorted(p.name for p in source.iterdir() if p.is_file() and (
            p.suffix == ".json" or p.name in (MODEL_CARD, PRESENCE_FILE)))
        for reserved in (VERSION_FILE, REPORT_FILE):
            if reserved in copied:
                raise RegistryError(f"{source / reserved}: {reserved} is the registry's own file in a version "
                                    "folder; rename it")
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(self._versions_dir)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self._versions_dir))
        busy = os.path.realpath(staging)
        with _in_progress_lock:
            _in_progress.add(busy)
        try:
            for name in copied:
                shutil.copyfile(source / name, staging / name)
                _fsync_file(staging / name)
            meta = {"created": _now(), "parent": parent, "detector": detector, "metrics": dict(metrics),
                    "data_fingerprint": data_fingerprint}
            if calibration is not None:
                meta["calibration"] = dict(calibration)
            for name, doc in ((REPORT_FILE, report), (VERSION_FILE, meta)):
                (staging / name).write_text(_dumps(doc), encoding="utf-8")
                _fsync_file(staging / name)
            fsync_dir(staging)
            with self._locked() as state:
                numbers = [_version_number(v) or 0 for v in state.get("versions", {})]
                numbers += [n for n in (_version_number(e) for e in _listdir(self._versions_dir)) if n is not None]
                vid = f"v{max(numbers, default=0) + 1:04d}"
                final = self._versions_dir / vid
                if os.path.lexists(final):  # os.rename would replace an empty folder: never
                    raise RegistryError(f"{final}: exists although no record names it; remove it by hand")
                os.rename(staging, final)
                fsync_dir(self._versions_dir)
                state.setdefault("versions", {})[vid] = {"status": status, "decision": None}
                state.setdefault("history", []).append({"time": meta["created"], "event": "added", "version": vid,
                                                        "parent": parent})
                self._write(state)
                return self._version(vid, state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with _in_progress_lock:
                _in_progress.discard(busy)

    def decide(self, vid: str, accepted: bool, reason: str, compared: Mapping[str, Any]) -> Version:
        """Record the publishing decision on version ``vid``; an accepted version becomes the served one.

        Args:
            vid: the version decided on.
            accepted: serve it (status ``published``, ``current`` = ``vid``) or not (status ``rejected``:
                kept, with its report, never served).
            reason: why (the :func:`gate`'s reason, or an admin's decision).
            compared: what was compared (the served version, both sets of metrics...).

        Raises:
            RegistryError: no such version.
        """
        self.version(vid)
        with self._locked() as doc:
            entry = doc.setdefault("versions", {}).setdefault(vid, {"status": "candidate", "decision": None})
            entry["decision"] = {"accepted": bool(accepted), "reason": reason, "compared": dict(compared),
                                 "time": _now()}
            event: dict[str, Any] = {"time": entry["decision"]["time"], "version": vid}
            if accepted:
                entry["status"] = "published"
                event.update(event="published", replaced=doc.get("current"))
                doc["current"] = vid
            else:
                entry["status"] = "rejected"
                event.update(event="rejected")
            event["reason"] = reason
            doc.setdefault("history", []).append(event)
            self._write(doc)
            return self._version(vid, doc)

    def rollback(self) -> str:
        """Serve the current version's parent again; the current one becomes ``rolled_back``.

        The parent must be a version that was published (status ``published``), or ``"shipped"`` when
        the model has a shipped folder.

        Returns:
            The version served now.

        Raises:
            RegistryError: nothing to roll back to (the shipped checkpoint or nothing is served, the
                current version has no parent, or its parent was never published).
        """
        with self._locked() as doc:
            cur = doc.get("current")
            if not cur:
                raise RegistryError(f"model {self.name!r} has no served version to roll back")
            if cur == SHIPPED:
                raise RegistryError(f"model {self.name!r} serves its shipped checkpoint, the first one; there is "
                                    "nothing before it to roll back to")
            parent = self._version(str(cur), doc).parent
            versions = doc.setdefault("versions", {})
            if parent is None:
                raise RegistryError(f"model {self.name!r}: the served version {cur} is its first; there is nothing "
                                    "to roll back to")
            if parent == SHIPPED:
                if not doc.get("shipped"):
                    raise RegistryError(f"model {self.name!r}: {cur} was made from a shipped checkpoint the model "
                                        "does not have; nothing to roll back to")
            elif versions.get(parent, {}).get("status") != "published":
                status = versions.get(parent, {}).get("status", "missing")
                raise RegistryError(f"model {self.name!r}: the served version {cur}'s parent {parent} is "
                                    f"{status}, not published; nothing to roll back to")
            versions.setdefault(cur, {"status": "published", "decision": None})["status"] = "rolled_back"
            doc["current"] = parent
            doc.setdefault("history", []).append({"time": _now(), "event": "rolled_back", "version": cur,
                                                  "served": parent})
            self._write(doc)
            return str(parent)

    # --- validation cases ------------------------------------------------------------------------
    def _hash(self, salt: str, case: str) -> str:
        return hashlib.sha256((salt + case).encode("utf-8")).hexdigest()

    def validation_cases(self, labelled: Iterable[str]) -> list[str]:
        """The model's fixed validation cases among the labelled image ids ``labelled``.

        THE RULE (docs/registry.md): each case is assigned once, the first time it is seen here, and the
        assignment is stored in ``model.json`` and never changed (a validation case is never trained on,
        a training case never becomes a validation case). A new case is a validation case iff
        ``sha256(salt + id)``, read as a number in [0, 1), is below the model's ``val_fraction``, or, when
        the model has no validation case yet and at least 2 cases have been seen (with these), the new
        case with the smallest hash; but when that would leave the model with no training case, the
        chosen new case with the largest hash is a training case instead. So once 2 cases are labelled
        there is at least one validation case and at least one training case. The salt is derived from
        the model's name (:func:`validation_salt`), so the same ids split the same way wherever the
        model is created.

        Returns:
            The validation case ids among ``labelled``, sorted.
        """
        wanted = sorted(set(map(str, labelled)))
        doc = self._doc()
        cases = doc.get("cases", {})
        known = set(cases.get("validation", [])) | set(cases.get("training", []))
        if any(c not in known for c in wanted):
            with self._locked() as doc:
                cases = doc.setdefault("cases", {})
                val, train = cases.setdefault("validation", []), cases.setdefault("training", [])
                seen = set(val) | set(train)
                new = [c for c in wanted if c not in seen]
                if new:
                    salt, fraction = str(doc["salt"]), float(doc.get("val_fraction", DEFAULT_VAL_FRACTION))
                    hashes = {c: self._hash(salt, c) for c in new}
                    chosen = [c for c in new if int(hashes[c][:16], 16) / 2.0 ** 64 < fraction]
                    if not val and not chosen and len(seen) + len(new) >= 2:
                        chosen = [min(new, key=lambda c: hashes[c])]
                    if not train and len(chosen) == len(new):
                        # Never leave the model without a training case: the new case with the largest hash trains.
                        chosen.remove(max(chosen, key=lambda c: hashes[c]))
                    val.extend(sorted(chosen, key=lambda c: hashes[c]))
                    train.extend(sorted((c for c in new if c not in chosen), key=lambda c: hashes[c]))
                    self._write(doc)
                cases = doc["cases"]
        validation = set(cases.get("validation", []))
        return [c for c in wanted if c in validation]

    # --- for /info/ and `lmk3d models show` --------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The record as strict JSON data (no NaN): what ``GET /models/NAME`` and ``lmk3d models show`` give."""
        doc = self._doc()
        cases = doc.get("cases", {})
        cur_dir = self.current_dir()
        return _strict({
            "name": self.name, "detector": self.detector, "root": str(self.root), "created": doc.get("created"),
            "shipped": doc.get("shipped"), "landmark_names": doc.get("landmark_names"),
            "current": doc.get("current"), "current_dir": str(cur_dir) if cur_dir else None,
            "val_fraction": doc.get("val_fraction"), "validation_cases": list(cases.get("validation", [])),
            "n_training_cases_seen": len(cases.get("training", [])),
            "versions": [v.to_json() for v in (self._version(vid, doc) for vid in self._version_ids())],
            "history": list(doc.get("history", [])),
        })

    def __repr__(self) -> str:
        return f"ModelRecord({str(self.root)!r})"


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _check_landmark_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise RegistryError(f"landmark names {names!r}: give a list of names, not one string")
    out = tuple(names)
    if not out or not all(isinstance(n, str) and n.strip() for n in out):
        raise RegistryError(f"landmark names {list(out)!r}: give one or more non-empty strings")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise RegistryError(f"landmark names repeat {', '.join(dupes)}; each landmark needs its own name")
    return out


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed); other processes and threads wait for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --- the registry ----------------------------------------------------------------------------------
class Registry:
    """A workspace folder of models (created if missing); never the repository's ``models/``.

    Raises:
        RegistryError: ``root`` is inside the repository's ``models/``, or cannot be made a folder.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = _check_outside_models(Path(root), "workspace")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RegistryError(f"workspace {root}: exists and is not a folder") from None

    def names(self) -> list[str]:
        """The models in the registry, sorted."""
        return sorted(n for n in _listdir(self.root)
                      if not plain_name_problem(n) and (self.root / n / MODEL_FILE).is_file())

    def ensure(self, name: str, detector: str, *, shipped: Path | None = None,
               landmark_names: Sequence[str] | None = None,
               val_fraction: float = DEFAULT_VAL_FRACTION) -> ModelRecord:
        """The record of model ``name``, created (with its creation time and its validation salt) if missing.

        A new record serves ``shipped`` (``current`` = ``"shipped"``) when given, else nothing. An existing
        record is returned as it is, except that one without a shipped folder or versions adopts
        ``shipped``, and one without landmark names takes ``landmark_names``. Leftovers of killed
        writers (temporary files, staging folders) are removed.

        Args:
            name: the model's name: a plain name (:mod:`lmk3d.safe_names`), e.g. ``cascade`` or ``my_skull``.
            detector: its detector slug (``mean_shape``, ``prior_guided``, ``pin``, ``cascade``).
            shipped: the shipped model folder in the repository (read only), if the model has one;
                recorded as an absolute path.
            landmark_names: its landmark names, when known.
            val_fraction: the share of labelled cases set aside as validation cases, in [0, 1).

        Raises:
            RegistryError: a name that is not plain, a bad fraction, or a record of another detector.
        """
        problem = plain_name_problem(name)
        if problem:
            raise RegistryError(f"model name {name!r} is not a plain name: {problem}")
        if not isinstance(detector, str) or plain_name_problem(detector):
            raise RegistryError(f"detector {detector!r}: give a detector slug (e.g. cascade)")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise RegistryError(f"val_fraction {val_fraction}: give a fraction in [0, 1)")
        names = _check_landmark_names(landmark_names) if landmark_names is not None else None
        shipped = Path(shipped).resolve() if shipped is not None else None
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        remove_stale_temps(folder)
        _remove_stale_staging(folder / VERSIONS_DIR)
        with _flock(folder / LOCK_FILE):
            path = folder / MODEL_FILE
            if not path.is_file():
                created = _now()
                doc: dict[str, Any] = {
                    "format": FORMAT, "name": name, "detector": detector, "created": created,
                    "salt": validation_salt(name), "val_fraction": float(val_fraction),
                    "shipped": str(shipped) if shipped is not None else None,
                    "landmark_names": list(names) if names is not None else None,
                    "current": SHIPPED if shipped is not None else None,
                    "cases": {"validation": [], "training": []}, "versions": {},
                    "history": [{"time": created, "event": "created", "served": SHIPPED if shipped else None}],
                }
                atomic_write_text(path, _dumps(doc))
            else:
                doc = _read_json(path)
                if not isinstance(doc, dict) or doc.get("detector") != detector:
                    had = doc.get("detector") if isinstance(doc, dict) else None
                    raise RegistryError(f"model {name!r} in {self.root} is a {had!r} model, not {detector!r}; "
                                        "choose another name, or another workspace")
                changed = False
                if shipped is not None and not doc.get("shipped") and not doc.get("current") \
                        and not doc.get("versions"):
                    doc.update(shipped=str(shipped), current=SHIPPED)
                    changed = True
                if names is not None and doc.get("landmark_names") is None:
                    doc["landmark_names"] = list(names)
                    changed = True
                if changed:
                    atomic_write_text(path, _dumps(doc))
        return ModelRecord(folder)

    def get(self, name: str) -> ModelRecord:
        """The record of model ``name``.

        Raises:
            RegistryError: no such model (the message names the known ones).
        """
        if plain_name_problem(name) or not (self.root / name / MODEL_FILE).is_file():
            known = self.names()
            raise RegistryError(f"no model {name!r} in the registry {self.root}; it has "
                                f"{', '.join(known) if known else 'no model yet'}")
        return ModelRecord(self.root / name)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"
