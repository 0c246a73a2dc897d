"""The HTTP server: MONAI Label's endpoints, with roles, checked input and no blocking.

``lmk3d serve`` starts MONAI Label with ``--uvicorn_app lib.server:app``, so uvicorn serves
:data:`app` from this module instead of ``monailabel.app:app``. It is built from MONAI Label's own
routers and lifespan (the same endpoints, the same app instance), changed in four ways:

**A guard in front of every request** (:class:`Guard`, an ASGI middleware):

- roles: the admin routes (:data:`ADMIN_ROUTES`: model upload, delete and download, logs, the dataset
  archive, deleting images and labels, ``/reload``) need ``Authorization: Bearer <LMK3D_ADMIN_TOKEN>``;
  with no admin token configured they are refused (403), with a missing or wrong token 401. The
  annotator actions (infer, save labels, train, next sample) are open, unless ``LMK3D_API_TOKEN`` is
  set: then every route but the public ones (:data:`PUBLIC_PREFIXES`) needs it or the admin token.
  With MONAI Label's own authentication on (``MONAI_LABEL_AUTH_ENABLE``, Keycloak) the guard leaves
  roles to it: every endpoint here carries MONAI Label's role check, admin routes the admin role.
- origins: a request whose ``Origin`` is not one of the allowed origins (the server's own and
  ``lmk3d serve --cors-origin``) is refused, 403, so a web page on another site cannot make the
  radiologist's browser act on the server; a CORS preflight from it gets 400 and no CORS headers.
- host: on a loopback address, a ``Host`` other than a loopback name is refused, 400 (DNS rebinding).
- ids: query and path parameters naming an image, label, tag, model, session or strategy must be
  plain names (:func:`lmk3d.safe_names.plain_name_problem`), else 400; so must every path segment.
- size: a body over ``LMK3D_MAX_UPLOAD_MB`` is refused, 413, whether it announces its length or not.

**No work on the event loop.** Every MONAI Label endpoint runs in a worker thread. ``POST /infer``
runs in a bounded pool (:class:`InferencePool`: ``LMK3D_INFER_WORKERS`` at a time, at most
``LMK3D_INFER_QUEUE`` waiting); when it is full the answer is 503 with ``Retry-After``. Training runs
in MONAI Label's child process, which lowers its own priority; ``run_sync=true`` waits for that
process in a worker thread (:mod:`lib.request_check`).

**Uploads are the server's files.** Uploaded images and labels are written to one folder per server
(:func:`upload_dir`; those of killed servers are removed at start) and removed on every path, refused or not.

**Models are replaced only after a check** (``PUT /model/{name}``, admin): see
:meth:`LandmarksApp.replace_model`; ``DELETE /model/{name}`` rolls back to the previous version.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import (
    activelearning,
    batch_infer,
    datastore,
    infer,
    info,
    login,
    logs,
    model,
    scoring,
    session,
    train,
)
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lib import dicomweb_proxy, ohif, review_notice
from lib.errors import NOT_FOUND, UNPROCESSABLE, http_error
from lmk3d.io.atomic import stale_owner
from lmk3d.safe_names import plain_name_problem

logger = logging.getLogger(__name__)

ROLE_ADMIN = settings.MONAI_LABEL_AUTH_ROLE_ADMIN
ROLE_ANNOTATOR = settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR
DEFAULT_MAX_UPLOAD_MB = 512
DEFAULT_INFER_WORKERS = 2
DEFAULT_INFER_QUEUE = 32
#: Query parameters that name something inside the server (an image, a label, a model...).
ID_PARAMS = ("image", "id", "label", "tag", "model", "session_id", "strategy", "method")
#: ``(methods, path pattern)`` of the admin actions; ``*`` is every method.
ADMIN_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("*", re.compile(r"^/model(/.*)?$")),
    ("*", re.compile(r"^/logs(/.*)?$")),
    ("GET", re.compile(r"^/datastore/dataset/?$")),
    ("DELETE", re.compile(r"^/datastore/?(image|label)?/?$")),
    ("POST", re.compile(r"^/reload/?$")),
    ("POST", re.compile(r"^/models/[^/]+/rollback/?$")),
)
#: Paths anyone may read, even with an annotator token configured (the viewer's files, the API page).
PUBLIC_PREFIXES = ("/info", "/static/", "/ohif", "/favicon.ico", "/docs", "/openapi.json")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: not a whole number") from None
    if value < minimum:
        raise SystemExit(f"{name}={value}: must be at least {minimum}")
    return value


@dataclass(frozen=True)
class GuardSettings:
    """What the guard enforces; :meth:`from_env` reads what ``lmk3d serve`` passed the server."""

    admin_token: str = ""
    api_token: str = ""
    origins: tuple[str, ...] = ()
    loopback: bool = True
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20
    keycloak: bool = False
    infer_workers: int = DEFAULT_INFER_WORKERS
    infer_queue: int = DEFAULT_INFER_QUEUE

    @classmethod
    def from_env(cls) -> GuardSettings:
        port = int(settings.MONAI_LABEL_SERVER_PORT)
        own = tuple(f"http://{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]"))
        extra = json.loads(os.environ.get("LMK3D_CORS_ORIGINS") or "[]")
        host = os.environ.get("LMK3D_BIND_HOST", "127.0.0.1")
        return cls(
            admin_token=os.environ.get("LMK3D_ADMIN_TOKEN", ""),
            api_token=os.environ.get("LMK3D_API_TOKEN", ""),
            origins=tuple(dict.fromkeys((*own, *(str(o).rstrip("/") for o in extra)))),
            loopback=host in LOOPBACK_HOSTS,
            max_upload_bytes=_env_int("LMK3D_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB, 1) * 2**20,
            keycloak=bool(settings.MONAI_LABEL_AUTH_ENABLE),
            infer_workers=_env_int("LMK3D_INFER_WORKERS", DEFAULT_INFER_WORKERS, 1),
            infer_queue=_env_int("LMK3D_INFER_QUEUE", DEFAULT_INFER_QUEUE, 0),
        )


# --- the guard ------------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


def is_admin_route(method: str, path: str) -> bool:
    """Whether ``method path`` is an admin action (:data:`ADMIN_ROUTES`)."""
    return any((m == "*" or m == method) and rx.match(path) for m, rx in ADMIN_ROUTES)


def _is_public(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path == "/" or path.startswith(PUBLIC_PREFIXES))


class Guard:
    """ASGI middleware that refuses a request before any endpoint sees it (see the module docstring)."""

    def __init__(self, app: ASGIApp, config: GuardSettings) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is not None:
            status, message, headers = refusal
            logger.warning("refused %s %s: %d %s", scope["method"], scope["path"], status, message)
            await JSONResponse({"detail": message}, status, headers=headers)(scope, receive, send)
            return
        limit = self.config.max_upload_bytes
        received = 0
        exceeded = started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the endpoint's answer to a cut-off body (a parse error) is replaced below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if started:
                raise
        if exceeded and not started:
            logger.warning("refused %s %s: 413 body over %d bytes", scope["method"], scope["path"], limit)
            await JSONResponse({"detail": _too_large(None, limit)}, 413)(scope, receive, send)

    def check(self, scope: Scope) -> tuple[int, str, dict[str, str]] | None:
        """``(status, message, headers)`` to refuse the request with, or None to let it through."""
        method = scope["method"]
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        cfg = self.config
        if cfg.loopback:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_HOSTS:
                return 400, (f"Host {host!r} refused: this server listens on loopback and answers only "
                             "127.0.0.1, localhost or [::1]"), {}
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/") not in cfg.origins:
            preflight = method == "OPTIONS" and "access-control-request-method" in headers
            return (400 if preflight else 403), (
                f"origin {origin!r} is not allowed; allowed: {', '.join(cfg.origins)} (add one with "
                "lmk3d serve --cors-origin)"), {}
        if method == "OPTIONS":
            return None
        problem = _id_problem(scope)
        if problem:
            return 400, problem, {}
        length = headers.get("content-length")
        if length is not None:
            try:
                n_bytes = int(length)
            except ValueError:
                return 400, f"Content-Length {length!r} is not a number", {}
            if n_bytes > cfg.max_upload_bytes:
                return 413, _too_large(n_bytes, cfg.max_upload_bytes), {}
        if cfg.keycloak:
            return None  # MONAI Label's own role checks on every endpoint
        token = _bearer(headers.get("authorization", ""))
        if is_admin_route(method, path):
            if not cfg.admin_token:
                return 403, (f"{method} {path} is an admin action and no admin token is configured: start the "
                             "server with LMK3D_ADMIN_TOKEN set and send 'Authorization: Bearer <token>'"), {}
            if not _same(token, cfg.admin_token):
                return 401, (f"{method} {path} is an admin action: send 'Authorization: Bearer <admin token>'"
                             f" ({'wrong token' if token else 'no token sent'})"), {"WWW-Authenticate": "Bearer"}
            return None
        if cfg.api_token and not _is_public(method, path):
            if not (_same(token, cfg.api_token) or (cfg.admin_token and _same(token, cfg.admin_token))):
                return 401, (f"{method} {path} needs a token: send 'Authorization: Bearer <token>' "
                             f"({'wrong token' if token else 'no token sent'})"), {"WWW-Authenticate": "Bearer"}
        return None


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _same(sent: str, expected: str) -> bool:
    return bool(sent) and hmac.compare_digest(sent.encode(), expected.encode())


def _too_large(n_bytes: int | None, limit: int) -> str:
    size = f"{n_bytes / 2**20:.1f} MB" if n_bytes is not None else "the request body"
    return (f"upload too large: {size} is over the server's limit of {limit / 2**20:g} MB "
            "(lmk3d serve --max-upload-mb)")


def _id_problem(scope: Scope) -> str | None:
    """Why a path segment or an id parameter of the request is not a plain name, or None."""
    raw = scope.get("raw_path") or b""
    if re.search(rb"%(2f|5c|2e|25|00)", raw, re.IGNORECASE):
        return f"path {raw.decode('latin-1')!r} refused: encoded separators, dots or '%' are not allowed"
    path = scope["path"]
    for segment in path.split("/")[1:]:
        if segment in (".", "..") or any(ord(c) < 32 for c in segment) or "\\" in segment:
            return f"path {path!r} refused: it has a '.', '..', '\\' or control-character segment"
    query = scope.get("query_string", b"").decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in ID_PARAMS and value:
            problem = plain_name_problem(value)
            if problem:
                return f"{key} {value!r} refused: {problem}"
    return None


# --- inference off the event loop -----------------------------------------------------------------
class InferencePool:
    """At most ``workers`` inferences at a time and ``queue`` waiting; more is refused with 503.

    A request that finds the pool full is told how long to wait (``Retry-After``, from the recent
    median inference time and the queue ahead); it is never held on the event loop.
    """

    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.capacity = workers + queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        self._lock = threading.Lock()
        self._in_flight = 0
        self._recent: list[float] = []

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self._in_flight >= self.capacity:
                raise HTTPException(503, detail=(
                    f"the server is busy: {self._in_flight} inferences in flight (at most {self.workers} at a "
                    f"time, {self.capacity - self.workers} waiting); retry after {self.retry_after()} s"),
                    headers={"Retry-After": str(self.retry_after())})
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: one median inference (a worker finishing)."""
        seconds = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
        return max(1, math.ceil(seconds / self.workers))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._recent = [*self._recent[-19:], time.perf_counter() - t0]

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)



# --- uploads ---------------------------------------------------------------------------------------
UPLOAD_PREFIX = "lmk3d-uploads-"


def upload_dir() -> Path:
    """This server process's upload folder (``$TMPDIR/lmk3d-uploads-<pid>``)."""
    return Path(tempfile.gettempdir()) / f"{UPLOAD_PREFIX}{os.getpid()}"


def remove_stale_uploads() -> None:
    """Remove the upload folders of servers that are no longer running (killed), and this process's own."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{UPLOAD_PREFIX}*"):
        if folder.is_dir() and stale_owner(folder.name, UPLOAD_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("removed %s, the upload folder of a server that is not running", folder)


def client_file_name(raw: str | None) -> str:
    """The name of an uploaded file as the server uses it: the last part of the client's file name.

    MONAI Label's client (and so 3D Slicer) sends the file's full local path as its name; the folders
    in it are the client's, so only the last part is kept. A name with a ``..`` part is refused (400),
    and the last part must be a plain name (400); ``""`` when the client sent no name.
    """
    if not raw:
        return ""
    parts = re.split(r"[\\/]", raw)
    if ".." in parts:
        raise http_error(400, f"uploaded file name {raw!r} refused: it has a '..' part")
    name = parts[-1]
    problem = plain_name_problem(name)
    if problem:
        raise http_error(400, f"uploaded file name {raw!r} refused: {problem}")
    return name


@dataclass
class Uploads:
    """Uploaded files saved for one request; :meth:`close` removes them all.

    Each file keeps the client's file name (a plain name, else 400) in a folder of its own, so a
    message about it names the client's file; :meth:`redact` takes the server's folder out of messages.
    """

    folders: list[Path] = field(default_factory=list)

    def save(self, upload: UploadFile, default_name: str) -> str:
        name = client_file_name(upload.filename) or default_name
        root = upload_dir()
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=root))
        self.folders.append(folder)
        path = folder / name
        with path.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        return str(path)

    def redact(self, message: str) -> str:
        for folder in self.folders:
            message = message.replace(f"{folder}{os.sep}", "")
        return message

    def close(self) -> None:
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def uploads() -> Iterator[Uploads]:
    saved = Uploads()
    try:
        yield saved
    except HTTPException as e:
        e.detail = saved.redact(str(e.detail))
        raise
    finally:
        saved.close()


def _params(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise http_error(UNPROCESSABLE, f"params is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise http_error(UNPROCESSABLE, f"params must be a JSON object, got {type(value).__name__}")
    return value


# --- replaced endpoints ----------------------------------------------------------------------------
router = APIRouter()
_pool: InferencePool | None = None


def _infer_sync(background_tasks: BackgroundTasks, model_name: str, image: str, session_id: str, params: str,
                file: UploadFile | None, label: UploadFile | None, output: Any) -> Any:
    instance = app_instance()
    p = _params(params)
    for key in ("model", "image", "label", "session"):
        if key in p:
            raise http_error(UNPROCESSABLE, f"params may not set {key!r}: give it in the URL or as a file")
    if label is not None:
        raise http_error(UNPROCESSABLE, "an uploaded label is not used by landmark inference; leave 'label' out")
    if _value(output) == "dicom_seg":
        raise http_error(UNPROCESSABLE, "output=dicom_seg is not offered by the landmarks app; use json, image "
                                        "or all (a DICOM SR is stored with the store_sr option)")
    with uploads() as saved:
        request: dict[str, Any] = {"model": model_name, "image": image}
        if file is not None:
            request["image"] = ""
            request["uploaded_image"] = saved.save(file, "image.nii.gz")
        elif not image and not session_id:
            raise http_error(UNPROCESSABLE, "no image: give ?image=ID of a datastore image or upload a file")
        else:  # OHIF's panel names a studies-folder image by the SeriesInstanceUID it is shown as
            request["image"] = dicomweb_proxy.viewer_image_id(instance, image)
        request.update(instance.info().get("config", {}).get("infer", {}))
        request.update(p)
        if session_id:
            sess = instance.sessions().get_session(session_id)
            if not sess:
                raise http_error(404, f"unknown session {session_id!r}")
            request["uploaded_image"] = sess.image
            request["session"] = sess.to_json()
        result = instance.infer(request)
        if _value(output) == "image" and not (result.get("file") or result.get("label")):
            raise http_error(UNPROCESSABLE, "output=image asks for the result file, but result_write_to_file is "
                                            "false: drop that option or ask for output=json")
        response = infer.send_response(instance.datastore(), result, output, background_tasks)
        notice = review_notice.header_value(result.get("params") or {})
        if notice is not None and _value(output) == "image":  # the label map alone: say what it cannot show
            response.headers[review_notice.HEADER] = notice
        return response


def _value(output: Any) -> str:
    return str(getattr(output, "value", output)) if output is not None else ""


@router.post("/infer/{model}", summary="Detect landmarks (bounded worker pool; 503 with Retry-After when full)")
async def api_infer(
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: infer.ResultType | None = None,
    user: User = Depends(RBAC(ROLE_ANNOTATOR)),
) -> Any:
    assert _pool is not None
    with _pool.slot():
        return await _pool.run(_infer_sync, background_tasks, model, image, session_id, params, file, label, output)


def _save_label_sync(image: str, params: str, tag: str, label: UploadFile, user: str) -> dict[str, Any]:
    instance = app_instance()
    save_params = _params(params)
    with uploads() as saved:
        path = saved.save(label, "label.nii.gz")
        label_id = instance.datastore().save_label(image, path, tag or "final", save_params)
    res = instance.on_save_label(image, label_id) or {}
    res.update({"image": image, "label": label_id})
    return dict(res)


@router.put("/datastore/label", summary="Save a label (checked against its image before it replaces anything)")
async def api_save_label(
    image: str,
    params: str = Form("{}"),
    tag: str = "final",
    label: UploadFile = File(...),
    user: User = Depends(RBAC(ROLE_ANNOTATOR)),
) -> Any:
    return await run_in_threadpool(_save_label_sync, image, params, tag, label, user.username)


def _add_image_sync(image: str | None, params: str, file: UploadFile, user: str) -> dict[str, Any]:
    instance = app_instance()
    save_params = _params(params)
    name = client_file_name(file.filename)
    image_id = image or (name.split(".")[0] if name else "")
    if not image_id:
        raise http_error(400, "the upload has no file name to take the image id from: give ?image=ID")
    if user:
        save_params["user"] = user
    with uploads() as saved:
        path = saved.save(file, f"{image_id}.nii.gz")
        return {"image": instance.datastore().add_image(image_id, path, save_params)}


@router.put("/datastore/image", summary="Upload a new image")
async def api_add_image(
    image: str | None = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(ROLE_ANNOTATOR)),
) -> Any:
    return await run_in_threadpool(_add_image_sync, image, params, file, user.username)


def _replace_model_sync(name: str, file: UploadFile, force: bool) -> dict[str, Any]:
    with uploads() as saved:
        path = saved.save(file, "checkpoint.pt")
        return dict(app_instance().replace_model(name, path, force))


@router.put("/model/{model}", summary="Add an uploaded checkpoint as a new version (admin; checked, then gated)")
async def api_replace_model(model: str, file: UploadFile, force: bool = False,
                            user: User = Depends(RBAC(ROLE_ADMIN))) -> Any:
    return await run_in_threadpool(_replace_model_sync, model, file, force)


@router.delete("/model/{model}", summary="Roll a model back to its previous version (admin)")
async def api_delete_model(model: str, user: User = Depends(RBAC(ROLE_ADMIN))) -> Any:
    return await run_in_threadpool(lambda: dict(app_instance().rollback_model(model)))


@router.get("/models/", summary="Every served model's versions (the model registry)")
async def api_models(user: User = Depends(RBAC(ROLE_ANNOTATOR))) -> Any:
    return await run_in_threadpool(lambda: dict(app_instance().models_json()))


@router.get("/models/{model}", summary="One model's versions: metrics, parents, decisions")
async def api_model_versions(model: str, user: User = Depends(RBAC(ROLE_ANNOTATOR))) -> Any:
    return await run_in_threadpool(lambda: dict(app_instance().models_json(model)))


@router.post("/models/{model}/rollback", summary="Serve the version before the current one again (admin)")
async def api_rollback_model(model: str, user: User = Depends(RBAC(ROLE_ADMIN))) -> Any:
    return await run_in_threadpool(lambda: dict(app_instance().rollback_model(model)))


def _dataset_archive_sync(limit_cases: int | None) -> str:
    ds = app_instance().datastore()
    if not ds.datalist():
        raise http_error(NOT_FOUND, "the datastore has no labelled image yet: there is nothing to archive")
    if limit_cases is not None and limit_cases < 1:
        raise http_error(UNPROCESSABLE, f"limit_cases {limit_cases} must be at least 1")
    return str(ds.get_dataset_archive(limit_cases))


@router.get("/datastore/dataset", summary="Download the labelled images and their labels as a ZIP archive (admin)")
async def api_download_dataset(background_tasks: BackgroundTasks, limit_cases: int | None = None,
                               user: User = Depends(RBAC(ROLE_ADMIN))) -> Any:
    path = await run_in_threadpool(_dataset_archive_sync, limit_cases)
    background_tasks.add_task(Path(path).unlink, missing_ok=True)  # MONAI Label's archive is never removed
    return FileResponse(path, media_type="application/zip", filename="dataset.zip")


# --- MONAI Label's other endpoints, each in a worker thread -----------------------------------------
#: ``(method, path)`` of MONAI Label routes this module replaces or does not offer.
REPLACED = {("POST", "/infer/{model}"), ("PUT", "/datastore/label"), ("PUT", "/datastore/image"),
            ("PUT", "/datastore/"), ("PUT", "/model/{model}"), ("DELETE", "/model/{model}"),
            ("GET", "/datastore/dataset")}
#: MONAI Label's OHIF and DICOMweb proxy routes are replaced by lib.ohif and lib.dicomweb_proxy (docs/ohif.md).
ROUTERS = (info, model, infer, batch_infer, train, activelearning, scoring, datastore, logs, session)


def _off_loop(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` (a MONAI Label ``async def`` that does blocking work) run to completion in a worker thread.

    A ``Request`` argument's body is read first, on the loop (the one thing these endpoints await).
    """

    async def run(*args: Any, **kwargs: Any) -> Any:
        for value in kwargs.values():
            if isinstance(value, Request):
                await value.body()
        return await run_in_threadpool(lambda: asyncio.run(endpoint(*args, **kwargs)))

    run.__signature__ = inspect.signature(endpoint)  # type: ignore[attr-defined]
    run.__name__ = endpoint.__name__
    run.__doc__ = endpoint.__doc__
    return run


def _monailabel_routes(target: FastAPI) -> None:
    prefix = settings.MONAI_LABEL_API_STR
    for module in ROUTERS:
        for route in module.router.routes:
            if not isinstance(route, APIRoute):
                continue
            methods = set(route.methods or ())
            if any((m, route.path) in REPLACED for m in methods):
                continue
            endpoint = route.endpoint
            if inspect.iscoroutinefunction(endpoint):
                endpoint = _off_loop(endpoint)
            # With Keycloak on, MONAI Label's own role checks apply; an admin route here needs the admin role
            # even where MONAI Label asks less (the dataset archive: annotator).
            admin = any(is_admin_route(m, prefix + route.path) for m in methods)
            target.add_api_route(prefix + route.path, endpoint, methods=sorted(methods), name=route.name,
                                 summary=route.summary, include_in_schema=route.include_in_schema,
                                 deprecated=route.deprecated, tags=route.tags, responses=route.responses,
                                 dependencies=[Depends(RBAC(ROLE_ADMIN))] if admin else None)


def build_app(config: GuardSettings | None = None) -> ASGIApp:
    """The server's ASGI app: MONAI Label's endpoints behind :class:`Guard` (see the module docstring)."""
    global _pool
    from monailabel.app import custom_swagger_ui_html, favicon, lifespan, reload, static_dir

    config = config or GuardSettings.from_env()
    _pool = InferencePool(config.infer_workers, config.infer_queue)
    remove_stale_uploads()
    fastapi_app = FastAPI(title=settings.MONAI_LABEL_PROJECT_NAME, openapi_url="/openapi.json", docs_url=None,
                          redoc_url="/docs", lifespan=lifespan)
    fastapi_app.add_middleware(CORSMiddleware, allow_origins=list(config.origins), allow_credentials=True,
                               allow_methods=["*"], allow_headers=["*"])
    fastapi_app.mount("/static", StaticFiles(directory=static_dir), name="static")
    if settings.MONAI_LABEL_AUTH_ENABLE:
        fastapi_app.include_router(login.router, prefix=settings.MONAI_LABEL_API_STR)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    fastapi_app.include_router(ohif.router, prefix=settings.MONAI_LABEL_API_STR)
    fastapi_app.include_router(dicomweb_proxy.router, prefix=settings.MONAI_LABEL_API_STR)
    _monailabel_routes(fastapi_app)
    fastapi_app.add_api_route("/", custom_swagger_ui_html, methods=["GET"], include_in_schema=False)
    fastapi_app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False)
    fastapi_app.add_api_route("/reload", _off_loop_sync(reload), methods=["POST"], include_in_schema=False)
    logger.info("lmk3d server: allowed origins %s; admin token %s; annotator token %s; uploads up to %d MB; "
                "%d inference worker(s), %d waiting", ", ".join(config.origins),
                "set" if config.admin_token else "not set (admin actions refused)",
                "set" if config.api_token else "not set", config.max_upload_bytes // 2**20, config.infer_workers,
                config.infer_queue)
    return Guard(fastapi_app, config)


def _off_loop_sync(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:  # a plain def: FastAPI runs it in a worker thread
        return fn()

    return run


app = build_app()
