"""Start the real ``lmk3d serve`` on loopback for a test module, and talk to it with plain HTTP.

:func:`start` runs ``python -m lmk3d.cli serve`` on a free 127.0.0.1 port in a new session (so the
server, its MONAI Label child and any training child form one process group), with a private
``TMPDIR`` under the test's folder: every temporary file the server makes shows up there, so a test
can tell whether an upload leaked one. :func:`stop` ends the group by PID (SIGTERM, then SIGKILL).

:meth:`Server.request` answers ``(status, body, headers)`` for every status, 4xx and 5xx included,
so a test asserts on refusals instead of catching exceptions.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import pytest

from lmk3d.serve import wait_until_ready
from tests.conftest import DATA, ROOT

HIPPOCAMPUS = DATA / "hippocampus"
APP_DIR = ROOT / "apps" / "landmarks"
# Loopback only, whatever http_proxy the environment sets.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A bound on a hung start, not a speed check: a start takes ~10-30 s here, more on a busy machine.
STARTUP_TIMEOUT_S = 600.0
# A bound on a hung request (an inference on a small image takes well under a second).
REQUEST_TIMEOUT_S = 300.0


class Reply(NamedTuple):
    """One HTTP answer: status, raw body, headers with lower-case names."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def detail(self) -> str:
        """The error message of a refusal (FastAPI's ``detail``), as text whatever its JSON shape."""
        try:
            doc = self.json()
        except ValueError:
            return self.body.decode("utf-8", "replace")
        detail = doc.get("detail", doc) if isinstance(doc, dict) else doc
        return detail if isinstance(detail, str) else json.dumps(detail)


@dataclass
class Server:
    """A running ``lmk3d serve`` and the folders it was given."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    root: Path
    studies: Path
    models: Path | None
    tmp: Path
    log: Path

    def request(self, method: str, path: str, *, body: bytes | Iterable[bytes] | None = None,
                headers: Mapping[str, str] | None = None, content_type: str | None = None) -> Reply:
        """``method path`` (path as sent, with its query string); any status comes back, none raises.

        A ``body`` that is an iterable of chunks without a Content-Length header is sent chunked.
        """
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)  # type: ignore[arg-type]
        if content_type:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with HTTP.open(req, timeout=REQUEST_TIMEOUT_S) as r:
                return Reply(r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})

    def raw_request(self, method: str, path: str, headers: Mapping[str, str]) -> Reply:
        """Send only a request line and ``headers`` (no body, whatever Content-Length says) and read the answer."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            return Reply(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
        finally:
            conn.close()

    def get_json(self, path: str, headers: Mapping[str, str] | None = None) -> Any:
        reply = self.request("GET", path, headers=headers)
        assert reply.status == 200, reply
        return reply.json()

    def alive(self) -> bool:
        """The process runs and ``GET /info/`` answers 200."""
        return self.process.poll() is None and self.request("GET", "/info/").status == 200

    def upload_dir(self) -> Path:
        """Where the server keeps uploads while a request runs (lib.server.upload_dir: one per server process)."""
        import psutil

        children = psutil.Process(self.process.pid).children()  # lmk3d serve runs the server as its child
        return self.tmp / f"lmk3d-uploads-{children[0].pid if children else self.process.pid}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@contextmanager
def app_lib(*names: str) -> Iterator[SimpleNamespace]:
    """The app's ``lib`` modules, for tests that run its tasks in process.

    ``names`` are dotted paths under ``apps/landmarks/lib`` (``"trainers.task"``); each is an attribute of
    the answer with dots as underscores (``trainers_task``). The app's package is called ``lib``, a
    generic name, so every ``lib`` module imported here is removed from ``sys.modules`` afterwards.
    """
    before = set(sys.modules)
    sys.path.insert(0, str(APP_DIR))
    try:
        modules: dict[str, ModuleType] = {n.replace(".", "_"): importlib.import_module(f"lib.{n}") for n in names}
    finally:
        sys.path.remove(str(APP_DIR))
    try:
        yield SimpleNamespace(**modules)
    finally:
        for name in set(sys.modules) - before:
            if name == "lib" or name.startswith("lib."):
                del sys.modules[name]


def multipart(fields: Mapping[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """``(body, content type)`` of a multipart form: ``{field: (file name or None, data)}``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (file_name, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{file_name}"' if file_name is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def files_under(folder: Path) -> set[str]:
    """Every file and folder below ``folder``, as relative paths (empty when it does not exist)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def tree_digest(folder: Path, skip: Sequence[str] = (".lock",)) -> dict[str, str]:
    """``{relative path: sha256}`` of the files below ``folder``, except those named in ``skip``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def studies_digest(studies: Path, skip: Sequence[str] = (".lock",)) -> dict[str, str]:
    """:func:`tree_digest` of a studies folder without what the background scorer rewrites at any time:
    the score cache (``scores.json``) and its temporary files (``.lmk3d-tmp-*``, which may vanish
    while the folder is read)."""
    out = {}
    for p in sorted(studies.rglob("*")):
        if p.name in skip or p.name == "scores.json" or p.name.startswith(".lmk3d-tmp-"):
            continue
        try:
            if p.is_file():
                out[str(p.relative_to(studies))] = hashlib.sha256(p.read_bytes()).hexdigest()
        except FileNotFoundError:
            continue
    return out


def copy_images(studies: Path, cases: Sequence[str]) -> None:
    """Copy the shared hippocampus images ``cases`` into ``studies`` (created if needed)."""
    studies.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (studies / f"{case}.nii.gz").write_bytes((HIPPOCAMPUS / "images" / f"{case}.nii.gz").read_bytes())


def copy_model(models: Path, name: str = "mean_shape-hippocampus") -> Path:
    """A copy of the shipped ``models/<name>`` under ``models``: the repository's own stays untouched."""
    dest = models / name
    dest.mkdir(parents=True)
    for f in (ROOT / "models" / name).iterdir():
        if f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (``lmk3d serve``, monailabel, a training child) by PID.

    SIGTERM first (uvicorn shuts down cleanly; the wrapper waits for it), SIGKILL after 60 s.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def launch(root: Path, studies: Path, *, models: Path | None = None, env: Mapping[str, str] | None = None,
           flags: Sequence[str] = ()) -> Server:
    """Start ``lmk3d serve`` (not yet ready: call :func:`ready`); its files go under ``root``.

    Args:
        root: the server's own folder: its log, sessions, ``tmp/`` (its ``TMPDIR``) and ``cwd/``.
        studies: the studies folder.
        models: a models folder (default: the checkout's ``models/``, served read-only).
        env: variables added to this process's environment (``LMK3D_ADMIN_TOKEN``...); the tokens
            are empty unless given here.
        flags: more ``lmk3d serve`` arguments (``--max-upload-mb 1``...).
    """
    port = free_port()
    tmp, cwd = root / "tmp", root / "cwd"
    tmp.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    # No token from the caller's environment: a test names the tokens its server has.
    child_env = {**os.environ, "LMK3D_ADMIN_TOKEN": "", "LMK3D_API_TOKEN": "",
                 "MONAI_LABEL_SESSION_PATH": str(root / "sessions"), "TMPDIR": str(tmp), **(env or {})}
    cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), *(["--models", str(models)] if models is not None else []), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=cwd,
                                   start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", port, process, root, studies, models, tmp, log)


def ready(server: Server) -> Server:
    """Wait until ``server`` answers ``GET /info/``; fail the test (not error) with its log when it does not."""
    failure = ""
    try:
        wait_until_ready(server.url, server.process, timeout_s=STARTUP_TIMEOUT_S, log_file=server.log)
    except RuntimeError as e:
        failure = f"the server did not start: {e}"
    if failure:
        stop(server.process)
        pytest.fail(failure, pytrace=False)
    return server
