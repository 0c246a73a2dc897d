"""``lmk3d serve``: run the MONAI Label server with the landmarks app and the project's settings.

A thin wrapper over ``monailabel start_server``, run as a child process with this interpreter
(``sys.executable -m monailabel.main``) so the library itself never imports monailabel. What it adds:

- host ``127.0.0.1`` unless ``--host`` says otherwise; another address is refused unless the server
  authenticates every request (``LMK3D_API_TOKEN`` or MONAI Label's Keycloak option,
  ``MONAI_LABEL_AUTH_ENABLE``) or ``--allow-unauthenticated-network`` says it is meant;
- the hardened HTTP app ``apps/landmarks/lib/server.py`` (``--uvicorn_app lib.server:app``, the app
  folder on ``PYTHONPATH``): roles (admin actions need ``LMK3D_ADMIN_TOKEN``), allowed origins (the
  server's own plus ``--cors-origin``), checked ids, an upload size limit (``--max-upload-mb``) and a
  bounded inference pool (``--infer-workers``, ``--infer-queue``), passed to it as ``LMK3D_*``
  variables (docs/security.md);
- ``MONAI_LABEL_TRACKING_ENABLED=false`` (no mlflow runs written or contacted);
- ``MONAI_LABEL_DATASTORE_FILE_EXT`` = :data:`DATASTORE_FILE_EXT`, so a local studies folder lists
  NIfTI and NRRD images and picks up Slicer markups (``.mrk.json``, ``.fcsv``) as labels under
  ``labels/<tag>/``;
- the app folder ``apps/landmarks`` and the model folder ``models/`` of this checkout, passed to the
  app as ``--conf models DIR``;
- ``--new-model NAME=DETECTOR`` (repeatable): a model of the user's own landmarks, not trained yet
  (docs/registry.md, "Declaring a new model"), passed to the app as ``--conf new_models
  NAME=DETECTOR,NAME2=DETECTOR2`` after :func:`new_models_conf` has checked it;
- for a DICOMweb ``--studies`` URL (docs/pacs.md): this interpreter's ``bin`` folder first on
  ``PATH`` (dcmqi's ``itkimage2segimage`` from PyPI, so nothing is downloaded at start), the PACS
  credentials ``MONAI_LABEL_DICOMWEB_USERNAME``/``_PASSWORD`` taken from ``LMK3D_PACS_USER``/
  ``LMK3D_PACS_PASSWORD`` when they are not set, and defaults (kept when the caller sets them) of
  ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` = :data:`DICOMWEB_CACHE_EXPIRY_S` seconds (new series show
  within seconds, not after MONAI Label's 2 hours) and ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` = ``{}``
  (every modality; MONAI Label's default lists CT only, and the app leaves out non-image series).

Example::

    lmk3d serve --studies .demo/studies --port 8000
    lmk3d serve --studies http://127.0.0.1:8042/dicom-web --conf dataset phantom-hn
    lmk3d serve --studies DIR --dry-run      # print the command and settings, start nothing
    lmk3d serve --studies DIR --new-model skull=cascade   # your own landmarks, trained from your labels

The settings above are forced on the child (they define what the app supports); every other
``MONAI_LABEL_*`` variable in the caller's environment passes through unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from lmk3d.errors import LandmarkError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_APP_DIR = REPO_ROOT / "apps" / "landmarks"
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Images first; the markups suffixes let labels/<tag>/<image id>.mrk.json (or .fcsv) count as labels.
DATASTORE_FILE_EXT = ("*.nii.gz", "*.nii", "*.nrrd", "*.mrk.json", "*.fcsv")
#: Seconds MONAI Label caches a DICOMweb series listing (its default is 7200).
DICOMWEB_CACHE_EXPIRY_S = 2
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Safety:
    """What the HTTP guard (``apps/landmarks/lib/server.py``) enforces; tokens come from the environment.

    Attributes:
        cors_origins: web origins allowed besides the server's own (``http://host:port``).
        max_upload_mb: largest request body, in MB.
        infer_workers: inferences run at a time.
        infer_queue: inferences waiting at most; more are answered 503 with ``Retry-After``.
        allow_unauthenticated_network: listen on a non-loopback address with no authentication.
    """

    cors_origins: tuple[str, ...] = ()
    max_upload_mb: int = 512
    infer_workers: int = 2
    infer_queue: int = 32
    allow_unauthenticated_network: bool = False

    def check(self, host: str, env: Mapping[str, str]) -> None:
        """Raise LandmarkError for bad values, or for an open server on a non-loopback address."""
        for what, value, low in (("--max-upload-mb", self.max_upload_mb, 1), ("--infer-workers", self.infer_workers, 1),
                                 ("--infer-queue", self.infer_queue, 0)):
            if value < low:
                raise LandmarkError(f"{what} {value}: must be at least {low}")
        for origin in self.cors_origins:
            if not re.fullmatch(r"https?://[^/\s]+", origin.rstrip("/")):
                raise LandmarkError(f"--cors-origin {origin!r}: give a web origin such as https://viewer.example.org "
                                    "(scheme and host, no path; '*' is not allowed)")
        authenticated = bool(env.get("LMK3D_API_TOKEN")) or env.get("MONAI_LABEL_AUTH_ENABLE", "").lower() in (
            "1", "true", "yes")
        if host not in LOOPBACK_HOSTS and not authenticated and not self.allow_unauthenticated_network:
            raise LandmarkError(
                f"refusing to listen on {host!r} without authentication: anyone who can reach it could read images "
                "and change labels. Set LMK3D_API_TOKEN (clients send 'Authorization: Bearer <token>'), or turn on "
                "MONAI Label's Keycloak login (MONAI_LABEL_AUTH_ENABLE=true, docs/security.md), or pass "
                "--allow-unauthenticated-network if the network is trusted")

    def env(self, host: str) -> dict[str, str]:
        """The ``LMK3D_*`` variables the server reads these from."""
        return {"LMK3D_BIND_HOST": host, "LMK3D_CORS_ORIGINS": json.dumps([o.rstrip("/") for o in self.cors_origins]),
                "LMK3D_MAX_UPLOAD_MB": str(self.max_upload_mb), "LMK3D_INFER_WORKERS": str(self.infer_workers),
                "LMK3D_INFER_QUEUE": str(self.infer_queue)}


def _is_url(studies: str) -> bool:
    return studies.startswith(("http://", "https://"))


def server_env(base: Mapping[str, str] | None = None, *, host: str = DEFAULT_HOST, safety: Safety | None = None,
               app_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default ``os.environ``) plus the project's forced settings."""
    env = dict(os.environ if base is None else base)
    env.update((safety or Safety()).env(host))
    app = str(Path(app_dir if app_dir is not None else DEFAULT_APP_DIR).resolve())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (app, env.get("PYTHONPATH", "")) if p)
    env.update({
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        # pydantic-settings parses list settings from JSON.
        "MONAI_LABEL_DATASTORE_FILE_EXT": json.dumps(list(DATASTORE_FILE_EXT)),
        "PYTHONUNBUFFERED": "1",
    })
    # The DICOMweb settings below matter only for a URL; they are harmless for a folder.
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
    for ml_key, lmk_key in (("MONAI_LABEL_DICOMWEB_USERNAME", "LMK3D_PACS_USER"),
                            ("MONAI_LABEL_DICOMWEB_PASSWORD", "LMK3D_PACS_PASSWORD")):
        if not env.get(ml_key) and env.get(lmk_key):
            env[ml_key] = env[lmk_key]
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", str(DICOMWEB_CACHE_EXPIRY_S))
    env.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", "{}")
    return env


def server_command(
    studies: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    app_dir: str | os.PathLike[str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    conf: Sequence[tuple[str, str]] = (),
    log_level: str = "INFO",
) -> list[str]:
    """Check the arguments and build the ``monailabel start_server`` command line.

    Args:
        studies: a folder of images (must exist) or a DICOMweb URL (``http(s)://...``).
        host: interface to listen on; ``127.0.0.1`` keeps the server private to this machine.
        port: TCP port, 1-65535.
        app_dir: the MONAI Label app folder (default: this checkout's ``apps/landmarks``).
        models_dir: the folder of ``<detector>-<dataset>/checkpoint.pt`` models (default: ``models/``).
        conf: extra ``(key, value)`` app settings; a later key overrides an earlier one, so these
            override the ``models`` entry derived from ``models_dir``.
        log_level: one of DEBUG, INFO, WARNING, ERROR.

    Raises:
        LandmarkError: a missing studies/app folder, a bad port or log level, or no monailabel.
    """
    studies_s = str(studies)
    if not _is_url(studies_s):
        sp = Path(studies_s).expanduser()
        if not sp.is_dir():
            raise LandmarkError(f"studies folder {sp} does not exist; give an existing folder of images "
                                "(.nii.gz, .nii, .nrrd) or a DICOMweb URL (http://... or https://...)")
        studies_s = str(sp.resolve())
    app = Path(app_dir) if app_dir is not None else DEFAULT_APP_DIR
    if not (app / "main.py").is_file():
        raise LandmarkError(f"{app}: not a MONAI Label app folder (no main.py); pass --app with the "
                            "checkout's apps/landmarks folder")
    models = Path(models_dir) if models_dir is not None else DEFAULT_MODELS_DIR
    if not 1 <= int(port) <= 65535:
        raise LandmarkError(f"port {port} is out of range; use 1-65535")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    if log_level.upper() not in levels:
        raise LandmarkError(f"unknown log level {log_level!r}; choose one of {', '.join(levels)}")
    if importlib.util.find_spec("monailabel") is None:
        raise LandmarkError(f"monailabel is not installed for {sys.executable}; install the project with "
                            "its app extra (pip install -e '.[app]', or run make test once)")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server",
           "--app", str(app.resolve()), "--studies", studies_s,
           "--host", host, "--port", str(int(port)), "--verbose", log_level.upper(),
           "--uvicorn_app", "lib.server:app",
           "--conf", "models", str(models.resolve())]
    for key, value in conf:
        cmd += ["--conf", str(key), str(value)]
    return cmd


def check_port_free(host: str, port: int) -> None:
    """Raise a clear error now rather than let uvicorn fail after the app has loaded."""
    bind_host = "0.0.0.0" if host in ("", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As uvicorn does: a port left in TIME_WAIT by a stopped server is free; a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
        except OSError as e:
            raise LandmarkError(f"cannot listen on {host}:{port} ({e.strerror}); the port is probably in "
                                "use: choose another with --port") from None


def server_url(host: str, port: int) -> str:
    """The URL a client on this machine uses (a wildcard host is reached through loopback)."""
    h = "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)
    return f"http://{h}:{port}"


def start_server(
    studies: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    app_dir: str | os.PathLike[str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    conf: Sequence[tuple[str, str]] = (),
    log_level: str = "INFO",
    env: Mapping[str, str] | None = None,
    safety: Safety | None = None,
    **popen_kwargs: Any,
) -> subprocess.Popen[bytes]:
    """Start the server in the background and return its process (see :func:`server_command`).

    Args:
        env: base environment (default ``os.environ``); the project's settings are added to it.
        safety: what the HTTP guard enforces (default :class:`Safety`).
        popen_kwargs: passed to :class:`subprocess.Popen` (``stdout``, ``stderr``, ``start_new_session``...).
    """
    cmd = server_command(studies, host=host, port=port, app_dir=app_dir, models_dir=models_dir, conf=conf,
                         log_level=log_level)
    safety = safety or Safety()
    child_env = server_env(env, host=host, safety=safety, app_dir=app_dir)
    safety.check(host, child_env)
    check_port_free(host, port)
    return subprocess.Popen(cmd, env=child_env, **popen_kwargs)


# The server is local: never send its requests through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout_s: float = 300.0,
    log_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Poll ``GET {url}/info/`` until it answers 200; return its JSON.

    Raises:
        RuntimeError: the process exited first, or ``timeout_s`` passed; the message ends with the
            last lines of ``log_file`` when one is given.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before {url}/info/ "
                               f"answered{_log_tail(log_file)}")
        try:
            with _NO_PROXY.open(f"{url}/info/", timeout=10) as r:
                return dict(json.loads(r.read().decode("utf-8")))
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last_error = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/info/ did not answer within {timeout_s:.0f} s (last: {last_error})"
                               f"{_log_tail(log_file)}")
        time.sleep(0.5)


def _log_tail(log_file: str | os.PathLike[str] | None, lines: int = 40) -> str:
    if log_file is None or not Path(log_file).is_file():
        return ""
    tail = Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log_file} ---\n" + "\n".join(tail)


def stop_server(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """Terminate, wait up to ``timeout_s``, then kill; return the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def run_foreground(process: subprocess.Popen[bytes]) -> int:
    """Wait for the server; Ctrl-C or SIGTERM to this process stops it (terminate, then kill)."""

    def forward(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return int(process.wait())
    except KeyboardInterrupt:
        # A SIGTERM after the terminal's SIGINT is harmless to uvicorn: both mean "shut down".
        return stop_server(process)
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the sub-command ------------------------------------------------------------------------------
def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", required=True, metavar="DIR_OR_DICOMWEB_URL",
                   help="a folder of images (.nii.gz, .nii, .nrrd; labels in labels/final) or a DICOMweb URL")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to listen on (default {DEFAULT_HOST}); another address needs LMK3D_API_TOKEN, "
                   "Keycloak or --allow-unauthenticated-network")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="an app setting, repeatable: models DIR, dataset NAME (default hippocampus), "
                   "device cpu|cuda")
    p.add_argument("--app", default=None, help=f"MONAI Label app folder (default {DEFAULT_APP_DIR})")
    p.add_argument("--models", default=None, help=f"model folder (default {DEFAULT_MODELS_DIR})")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--dry-run", action="store_true", help="print the command and settings; start nothing")
    d = Safety()
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin allowed to call the server besides its own (repeatable), e.g. "
                   "https://viewer.example.org")
    p.add_argument("--max-upload-mb", type=int, default=d.max_upload_mb,
                   help=f"largest upload in MB (default {d.max_upload_mb})")
    p.add_argument("--infer-workers", type=int, default=d.infer_workers,
                   help=f"inferences run at a time (default {d.infer_workers})")
    p.add_argument("--infer-queue", type=int, default=d.infer_queue,
                   help=f"inferences waiting at most; more get 503 with Retry-After (default {d.infer_queue})")
    p.add_argument("--workspace", default=None, metavar="DIR",
                   help="the model registry's folder, where every trained or uploaded version is kept (default: "
                   "<studies>/.lmk3d-workspace for a folder; never under the repository's models/)")
    p.add_argument("--new-model", action="append", default=[], metavar="NAME=DETECTOR",
                   help="declare a model of your own landmarks, not trained yet (repeatable): NAME a plain name "
                   "unlike the served models', DETECTOR one of the detectors (e.g. skull=cascade); its landmark "
                   "names are those of the final labels you save, and POST /train/NAME trains it")
    p.add_argument("--allow-unauthenticated-network", action="store_true",
                   help="listen on a non-loopback --host with no authentication (only on a trusted network)")


def workspace_conf(workspace: str | os.PathLike[str]) -> tuple[str, str]:
    """``("workspace", DIR)`` for the app; a folder inside the repository's ``models/`` is refused.

    Raises:
        LandmarkError: ``workspace`` is inside ``models/`` (shipped models are read only).
    """
    path = Path(workspace).expanduser().resolve()
    models = DEFAULT_MODELS_DIR.resolve()
    if path == models or models in path.parents:
        raise LandmarkError(f"--workspace {workspace}: inside the repository's models/ folder, which holds the "
                            "shipped models and is never written; choose a folder elsewhere")
    return ("workspace", str(path))


#: The app setting that lists the declared models (``NAME=DETECTOR,NAME2=DETECTOR2``).
NEW_MODELS_CONF = "new_models"


def app_detectors(app_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The detectors the app serves: one config module per detector in ``<app>/lib/configs``, named after it.

    They are :func:`lmk3d.detectors.detector_names` (the app checks again against those when it starts);
    read from the folder so that ``lmk3d serve`` does not import torch and MONAI (seconds) to check a name.
    """
    folder = Path(app_dir if app_dir is not None else DEFAULT_APP_DIR) / "lib" / "configs"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def parse_new_models(items: Sequence[str], detectors: Sequence[str], what: str = "--new-model") -> dict[str, str]:
    """Check ``NAME=DETECTOR`` declarations; return ``{name: detector}`` in the given order.

    A name must be a plain name (:mod:`lmk3d.safe_names`), given once, and not the name of a served
    model (the app serves one model per detector, named after it); a detector must be one of ``detectors``.

    Raises:
        LandmarkError: the first bad declaration, with what is accepted.

    Example:
        >>> parse_new_models(["skull=cascade"], ["cascade", "pin"])
        {'skull': 'cascade'}
    """
    from lmk3d.safe_names import plain_name_problem

    declared: dict[str, str] = {}
    for item in items:
        name, sep, detector = (part.strip() for part in str(item).partition("="))
        if not sep or not name or not detector:
            raise LandmarkError(f"{what} {item!r}: give NAME=DETECTOR, e.g. skull=cascade")
        problem = plain_name_problem(name)
        if problem or "=" in name or "," in name:
            why = problem or f"it contains {'=' if '=' in name else ','!r}"
            raise LandmarkError(f"{what} {item!r}: the model name {name!r} is not a plain name ({why}); use letters, "
                                "digits, '_' or '-', e.g. my_skull")
        if detector not in detectors:
            raise LandmarkError(f"{what} {item!r}: unknown detector {detector!r}; choose one of {', '.join(detectors)}")
        if name in detectors:
            raise LandmarkError(f"{what} {item!r}: {name!r} is the name of a served model (one per detector: "
                                f"{', '.join(detectors)}); choose another name")
        if name in declared:
            raise LandmarkError(f"{what} {item!r}: model {name!r} is declared twice; give each model once")
        declared[name] = detector
    return declared


def new_models_conf(items: Sequence[str], conf: Sequence[tuple[str, str]] = (),
                    app_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """``conf`` with the ``--new-model`` declarations ``items`` merged into its ``new_models`` entry.

    A ``--conf new_models`` value given by hand is checked the same way and comes first.

    Raises:
        LandmarkError: a bad declaration (see :func:`parse_new_models`).
    """
    given = [v for k, v in conf if k == NEW_MODELS_CONF]
    earlier = [item for value in given for item in value.split(",") if item.strip()]
    declared = parse_new_models([*earlier, *items], app_detectors(app_dir)) if given or items else {}
    out = [(k, v) for k, v in conf if k != NEW_MODELS_CONF]
    if declared:
        out.append((NEW_MODELS_CONF, ",".join(f"{n}={d}" for n, d in declared.items())))
    return out


def run_serve(args: argparse.Namespace) -> int:
    conf = new_models_conf(args.new_model, [(k, v) for k, v in args.conf], args.app)
    if args.workspace:
        conf.append(workspace_conf(args.workspace))
    cmd = server_command(args.studies, host=args.host, port=args.port, app_dir=args.app,
                         models_dir=args.models, conf=conf, log_level=args.log_level)
    safety = Safety(tuple(args.cors_origin), args.max_upload_mb, args.infer_workers, args.infer_queue,
                    args.allow_unauthenticated_network)
    env = server_env(host=args.host, safety=safety, app_dir=args.app)
    safety.check(args.host, env)
    forced = ("MONAI_LABEL_TRACKING_ENABLED", "MONAI_LABEL_DATASTORE_FILE_EXT", *safety.env(args.host))
    if args.dry_run:
        for k in forced:
            print(f"{k}={shlex.quote(env[k])}")
        print(shlex.join(cmd))
        return 0
    check_port_free(args.host, args.port)
    url = server_url(args.host, args.port)
    print(f"lmk3d serve: starting MONAI Label at {url} (Ctrl-C stops it)", flush=True)
    process = subprocess.Popen(cmd, env=env)
    return run_foreground(process)
