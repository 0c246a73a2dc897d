"""The logic of the Landmark Review Slicer module: plain Python (standard library only), no Slicer import.

Two classes:

- :class:`ServerClient` talks to an ``lmk3d serve`` server over HTTP (no proxy, an optional Bearer
  token): the served models (``GET /info/``), detection on a datastore image (``POST /infer/{model}``,
  JSON only), the image file (``GET /datastore/image``), the next image to review (``POST
  /activelearning/least_confident``), saving a label (``PUT /datastore/label``), starting a training
  (``POST /train/{model}``) and reading its progress (``GET /train/`` and ``/info/``'s
  ``train_stats``). A refusal (4xx, 5xx) or an unreachable server raises :class:`ServerError` with
  the server's own message.
- :class:`ReviewSession` holds one image's detected points in review order (not-found points first:
  they need placing; then the lowest score first), records the reviewer's decision on each (accept,
  move or place, not visible) and builds the Slicer markups document (``.mrk.json``, LPS, one control
  point per landmark) that :meth:`ReviewSession.submit` saves as the image's final label.

Example (a server on loopback)::

    client = ServerClient("http://127.0.0.1:8000")
    image = client.next_image()["id"]
    review = ReviewSession.from_detection(image, "cascade", client.detect("cascade", image))
    first = review.points[0]            # the point most in need of a look
    review.move(first.name, (12.0, -30.5, 8.25))  # world mm, RAS
    review.submit(client)              # the corrected markups become the final label

Kept compatible with the Python of 3D Slicer 5 (3.9): no ``match``, no ``StrEnum``.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: A detected point scoring below this is shown as a warning (unlocked, in the warning colour).
WARN_SCORE = 0.5
#: The Slicer markups JSON schema the documents follow (the one lmk3d.io.markups writes).
SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
#: How long a request may take before it is given up (a detection on a CPU takes seconds).
DEFAULT_TIMEOUT_S = 300.0
#: Train states in which a training is still under way (MONAI Label's names).
RUNNING_STATES = ("SUBMITTED", "RUNNING")

# The reviewer's decision on a point.
PENDING = "pending"
ACCEPTED = "accepted"
MOVED = "moved"
PLACED = "placed"  # a point the detector did not find, placed by the reviewer
NOT_VISIBLE = "not visible"
STATUSES = (PENDING, ACCEPTED, MOVED, PLACED, NOT_VISIBLE)

Xyz = tuple[float, float, float]  # world mm


class ServerError(Exception):
    """A refusal from the server (its status and message), or no answer at all (status 0)."""

    def __init__(self, status: int, message: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status} {message}" if status else f"{where}{message}")


# --- the server ---------------------------------------------------------------------------------------------------
class ServerClient:
    """An ``lmk3d serve`` server, over plain HTTP.

    Args:
        url: the server's address, e.g. ``http://127.0.0.1:8000`` (a trailing ``/`` is fine).
        token: sent as ``Authorization: Bearer <token>`` (a server started with ``LMK3D_API_TOKEN``).
        timeout_s: how long one request may take.
    """

    def __init__(self, url: str, token: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"server address {url!r} is not an http(s) URL such as http://127.0.0.1:8000")
        self.url = url.strip().rstrip("/")
        self.token = token.strip()
        self.timeout_s = timeout_s
        # The server is usually on this machine or the hospital network: never through a proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- HTTP ---------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[bytes, dict[str, str]]:
        """``(body, headers)`` of a 2xx answer to ``method path`` (path with its query string).

        Raises:
            ServerError: a 4xx or 5xx (with the server's ``detail``), or no answer.
        """
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as r:
                return r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            raise ServerError(e.code, _detail(e.read()) or str(e.reason), method, path) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(0, f"no answer from {self.url}: {reason}", method, path) from None

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path)[0])

    def post_json(self, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        body, _ = self.request("POST", path, json.dumps(dict(payload or {})).encode(), "application/json")
        return json.loads(body) if body else None

    # --- what the module does -----------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """``GET /info/``: models, trainers, strategies, ``train_stats``, the datastore's counts."""
        return dict(self.get_json("/info/"))

    def models(self) -> list[str]:
        """The names of the models served now (those a detection can run on), in the server's order."""
        return list(self.info().get("models", {}))

    def detect(self, model: str, image: str) -> dict[str, Any]:
        """``POST /infer/{model}?image=ID&output=json``: the detection as JSON (no result file made).

        The answer's ``landmarks`` = ``[{name, ras, lps, score, found, ...}]`` (world mm; ``ras`` is
        ``null`` for a point not found).
        """
        body, ctype = multipart({"params": (None, json.dumps({"result_write_to_file": False}).encode())})
        query = urllib.parse.urlencode({"image": image, "output": "json"})
        raw, _ = self.request("POST", f"/infer/{_segment(model)}?{query}", body, ctype)
        return dict(json.loads(raw))

    def download_image(self, image: str, folder: str) -> str:
        """Save the datastore image ``image`` (``GET /datastore/image``) in ``folder``; its path.

        The file is named ``<image><suffix>``, the suffix taken from the server's file name (default
        ``.nii.gz``), so Slicer's reader recognises the format.
        """
        raw, headers = self.request("GET", "/datastore/image?" + urllib.parse.urlencode({"image": image}))
        sent = re.search(r'filename="?([^";]+)"?', headers.get("content-disposition", ""))
        suffix = _image_suffix(sent.group(1) if sent else "") or ".nii.gz"
        path = os.path.join(folder, os.path.basename(image) + suffix)
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def next_image(self, strategy: str = "least_confident", params: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        """``POST /activelearning/{strategy}``: the next image to review (``id``, and why: ``confidence``...)."""
        return dict(self.post_json(f"/activelearning/{_segment(strategy)}", params))

    def save_label(self, image: str, document: Mapping[str, Any], tag: str = "final") -> dict[str, Any]:
        """``PUT /datastore/label?image=ID&tag=TAG`` with the markups ``document`` as ``<image>.mrk.json``.

        Returns the server's answer (``{"image": ..., "label": ...}``).

        Raises:
            ServerError: the server's refusal, e.g. 422 with the landmarks that lie outside the image.
        """
        body, ctype = multipart({"params": (None, b"{}"),
                                 "label": (f"{image}.mrk.json", json.dumps(document, indent=2).encode())})
        query = urllib.parse.urlencode({"image": image, "tag": tag})
        raw, _ = self.request("PUT", f"/datastore/label?{query}", body, ctype)
        return dict(json.loads(raw))

    def start_training(self, model: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``POST /train/{model}`` with ``options`` (``max_minutes``, ``max_epochs``, ``from_scratch``...).

        Returns the task (``id``, ``status``). Raises :class:`ServerError` (409: no final labels yet;
        422: a bad option; another training already running).
        """
        return dict(self.post_json(f"/train/{_segment(model)}", options))

    def training_progress(self, model: str) -> TrainingProgress:
        """The last training's state (``GET /train/``) with the model's ``train_stats`` (``GET /info/``)."""
        try:
            task = dict(self.get_json("/train/"))
        except ServerError as e:
            if e.status != 404:  # 404: no training since the server started
                raise
            task = {}
        stats = dict(self.info().get("train_stats", {}).get(model) or {})
        return TrainingProgress.from_answers(model, task, stats)


@dataclass(frozen=True)
class TrainingProgress:
    """One look at a training: MONAI Label's task state and the app's ``train_stats`` for the model.

    ``status`` is the task's (``RUNNING``, ``DONE``, ``FAILED``...; ``""`` when none ran since the server
    started, then the model's last recorded status is in ``stats``). ``epoch / total_epochs`` is the
    phase running now. ``published`` and ``decision`` say whether the new version is served, and why.
    """

    model: str
    status: str
    epoch: int
    total_epochs: int
    phase: str
    published: bool | None
    decision: str
    details: list[str]
    stats: dict[str, Any]

    @classmethod
    def from_answers(cls, model: str, task: Mapping[str, Any], stats: Mapping[str, Any]) -> TrainingProgress:
        status = str(task.get("status") or "")
        published = stats.get("published")
        return cls(model, status, _int(stats.get("epoch"), 0), max(_int(stats.get("total_epochs"), 1), 1),
                   str(stats.get("phase") or ""), published if isinstance(published, bool) else None,
                   str(stats.get("decision") or ""), [str(d) for d in task.get("details") or []], dict(stats))

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATES

    @property
    def fraction(self) -> float:
        """Progress in ``[0, 1]`` (1 once the training has ended)."""
        if self.status and not self.running:
            return 1.0
        return min(max(self.epoch / self.total_epochs, 0.0), 1.0)

    def text(self) -> str:
        """One line for the panel, e.g. ``RUNNING: training: heatmap (epoch 3/20)``."""
        if not self.status:
            return "no training since the server started"
        line = f"{self.status}: {self.phase or 'starting'}"
        if self.running:
            return f"{line} (epoch {self.epoch}/{self.total_epochs})"
        if self.published is not None:
            version = self.stats.get("version", "the new version")
            line += f"; {version} {'published' if self.published else 'kept as a candidate'}: {self.decision}"
        elif self.stats.get("error"):
            line += f"; {self.stats['error']}"
        return line


# --- one image's review -------------------------------------------------------------------------------------------
@dataclass
class ReviewPoint:
    """One landmark under review.

    ``detected_ras`` and ``score``/``found`` are the detector's; ``ras`` is the position the label
    will have (world mm, RAS; None while a not-found point is unplaced); ``status`` the reviewer's
    decision (one of :data:`STATUSES`).
    """

    name: str
    index: int  # the landmark's place in the model's order
    score: float
    found: bool
    detected_ras: Xyz | None
    ras: Xyz | None = None
    status: str = PENDING
    #: a radius (mm) holding the truth with 90 % probability, when the model is calibrated (lmk3d.trust)
    radius_mm: float | None = None

    @property
    def warning(self) -> bool:
        """Not found, or scored below :data:`WARN_SCORE`: needs a careful look."""
        return not self.found or self.score < WARN_SCORE

    @property
    def placed(self) -> bool:
        """Whether the label will hold a position for it (else the landmark is not annotated)."""
        return self.ras is not None and self.status != NOT_VISIBLE

    @property
    def lps(self) -> Xyz | None:
        return None if self.ras is None else (-self.ras[0], -self.ras[1], self.ras[2])

    def moved_mm(self) -> float:
        """How far the point is from where the detector put it (0 for a point it did not find)."""
        if self.ras is None or self.detected_ras is None:
            return 0.0
        return math.dist(self.ras, self.detected_ras)

    def score_text(self) -> str:
        """The detection, as Slicer shows it in the point's description (lmk3d's ``score=`` form)."""
        radius = f"; radius90={self.radius_mm:.1f} mm" if self.radius_mm is not None and self.found else ""
        return f"score={self.score:.3f}{radius}" + ("" if self.found else "; not found")

    def review_text(self) -> str:
        """The decision, as the submitted label's description holds it.

        Written ``detector score 0.412``, not ``score=0.412``: lmk3d reads ``score=`` back as the label's
        own confidence, and a reviewed point is the truth.
        """
        what = {PENDING: "not reviewed", ACCEPTED: "accepted", MOVED: f"moved {self.moved_mm():.1f} mm",
                PLACED: "placed by the reviewer", NOT_VISIBLE: "not visible"}[self.status]
        detector = f"detector score {self.score:.3f}" if self.found else "not found by the detector"
        return f"{what}; {detector}"


class ReviewSession:
    """One image's detected landmarks, in review order, and the reviewer's decisions.

    Args:
        image: the datastore image id.
        model: the model that detected the points.
        points: the points, in the model's landmark order.
    """

    def __init__(self, image: str, model: str, points: Sequence[ReviewPoint]) -> None:
        if not points:
            raise ValueError(f"no landmarks to review on image {image!r}")
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ValueError(f"landmark names repeat: {names}")
        self.image = image
        self.model = model
        #: the server's verdict on the image (``{in_distribution, score, reason}``), when it sent one
        self.image_check: dict[str, Any] = {}
        #: what a calibrated score means (e.g. "probability that the landmark is within 3 mm ..."), or ""
        self.score_meaning = ""
        self._by_name = {p.name: p for p in points}
        self._model_order = list(points)
        #: Review order: not-found points first (they need placing), then the lowest score first; ties
        #: in the model's order.
        self.points: list[ReviewPoint] = sorted(points, key=lambda p: (p.found, p.score, p.index))

    @classmethod
    def from_detection(cls, image: str, model: str, result: Mapping[str, Any]) -> ReviewSession:
        """From the JSON of :meth:`ServerClient.detect` (``landmarks`` = ``[{name, ras, score, found}]``)."""
        items = result.get("landmarks")
        if not isinstance(items, list) or not items:
            raise ValueError(f"the detection of {image!r} by {model!r} has no 'landmarks' list")
        points = []
        for k, item in enumerate(items):
            ras = item.get("ras")
            found = bool(item.get("found", ras is not None)) and ras is not None
            xyz = _xyz(ras, f"landmark {item.get('name')!r}") if found else None
            radius = item.get("radius_mm")
            points.append(ReviewPoint(str(item["name"]), k, float(item.get("score", 0.0)), found, xyz, xyz,
                                      radius_mm=float(radius) if isinstance(radius, (int, float)) else None))
        session = cls(image, model, points)
        check = result.get("image_check")
        session.image_check = dict(check) if isinstance(check, Mapping) else {}
        session.score_meaning = str(result.get("score_meaning") or "")
        return session

    @property
    def image_warning(self) -> str:
        """Why the model does not trust this image, or trusts none of its scores ("" when it does, or when the
        server did not say)."""
        if self.image_check.get("in_distribution") is False:
            return f"The model does not recognise this image: {self.image_check.get('reason', 'no reason given')}"
        if self.image_check.get("atypical") is True:
            return ("The model finds this image unusual; every score is capped, check each point: "
                    f"{self.image_check.get('reason', 'no reason given')}")
        return ""

    # --- looking up -----------------------------------------------------------------------------------------
    def point(self, name: str) -> ReviewPoint:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no landmark {name!r} on image {self.image!r}; landmarks: "
                           f"{', '.join(self._by_name)}") from None

    @property
    def names(self) -> list[str]:
        """The landmark names in the model's order."""
        return [p.name for p in self._model_order]

    def pending(self) -> list[ReviewPoint]:
        """The points not reviewed yet, in review order."""
        return [p for p in self.points if p.status == PENDING]

    def next_pending(self) -> ReviewPoint | None:
        """The next point to review (None when all are done)."""
        todo = self.pending()
        return todo[0] if todo else None

    # --- the reviewer's decisions ---------------------------------------------------------------------------
    def accept(self, name: str) -> ReviewPoint:
        """Accept the point where it is now (the detected position unless it was moved).

        Raises:
            ValueError: a point with no position (not found and not placed yet).
        """
        p = self.point(name)
        if p.ras is None:
            raise ValueError(f"{name} was not found by the detector: place it or mark it not visible")
        p.status = ACCEPTED if p.ras == p.detected_ras else (MOVED if p.found else PLACED)
        return p

    def move(self, name: str, ras: Iterable[float]) -> ReviewPoint:
        """Put the point at ``ras`` (world mm, RAS); for a point the detector did not find, place it."""
        p = self.point(name)
        p.ras = _xyz(ras, name)
        p.status = MOVED if p.found else PLACED
        return p

    def mark_not_visible(self, name: str) -> ReviewPoint:
        """The landmark cannot be seen on this image: the label leaves it unannotated."""
        p = self.point(name)
        p.status = NOT_VISIBLE
        return p

    def sync(self, positions: Mapping[str, Iterable[float] | None], tolerance_mm: float = 1e-3) -> list[str]:
        """Take the viewer's positions: each point more than ``tolerance_mm`` from its recorded position is moved.

        ``positions`` maps names to RAS positions (None: no position in the viewer, ignored). Returns the
        names moved, so a viewer can hand over all its points after every drag.
        """
        moved = []
        for name, xyz in positions.items():
            if xyz is None:
                continue
            p = self.point(name)
            new = _xyz(xyz, name)
            if p.ras is None or math.dist(new, p.ras) > tolerance_mm:
                self.move(name, new)
                moved.append(name)
        return moved

    # --- the label --------------------------------------------------------------------------------------------
    def markups(self) -> dict[str, Any]:
        """The Slicer markups document of the reviewed landmarks (LPS, one control point per landmark).

        Points not reviewed are written where the detector put them (a not-found one unannotated);
        a point marked not visible is written as ``positionStatus: undefined`` (not annotated).
        """
        control_points = []
        for k, p in enumerate(self._model_order):
            control_points.append({
                "id": str(k + 1),
                "label": p.name,
                "description": p.review_text(),
                "associatedNodeID": "",
                "position": list(p.lps) if p.placed and p.lps is not None else [0.0, 0.0, 0.0],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": p.warning,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined" if p.placed else "undefined",
            })
        return {
            "@schema": SCHEMA_URL,
            "markups": [{
                "type": "Fiducial",
                "name": f"{self.image} reviewed",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
                "measurements": [],
                "display": {"visibility": True, "glyphType": "Sphere3D", "glyphScale": 3.0, "textScale": 3.0,
                            "pointLabelsVisibility": True},
            }],
        }

    def submit(self, client: ServerClient, tag: str = "final") -> dict[str, Any]:
        """Save :meth:`markups` as the image's label ``tag``; the server's answer.

        Raises:
            ValueError: no landmark placed (the server would refuse the label).
            ServerError: the server's refusal, with its message (e.g. 422: a point outside the image).
        """
        if not any(p.placed for p in self.points):
            raise ValueError(f"no landmark placed on {self.image!r}: place or accept at least one")
        return client.save_label(self.image, self.markups(), tag)


# --- helpers ------------------------------------------------------------------------------------------------------
def multipart(fields: Mapping[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart form: ``{field: (file name or None, data)}``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (file_name, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{file_name}"' if file_name is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _detail(body: bytes) -> str:
    """The message of an error answer: FastAPI's ``detail`` (as text whatever its shape), else the body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
    return detail if isinstance(detail, str) else json.dumps(detail)


def _segment(value: str) -> str:
    """``value`` as one URL path segment."""
    return urllib.parse.quote(value, safe="")


def _image_suffix(file_name: str) -> str:
    name = file_name.lower()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if name.endswith(suffix):
            return suffix
    return ""


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _xyz(values: Any, what: str) -> Xyz:
    """Three finite numbers, or a ValueError naming ``what``."""
    try:
        xyz = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: position {values!r} is not 3 numbers") from None
    if len(xyz) != 3 or not all(math.isfinite(v) for v in xyz):
        raise ValueError(f"{what}: position {values!r} is not 3 finite numbers")
    return (xyz[0], xyz[1], xyz[2])


__all__ = ["ACCEPTED", "MOVED", "NOT_VISIBLE", "PENDING", "PLACED", "STATUSES", "WARN_SCORE", "ReviewPoint",
           "ReviewSession", "ServerClient", "ServerError", "TrainingProgress", "multipart"]
