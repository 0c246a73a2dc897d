"""The real MONAI Label server with the landmarks app, started by ``lmk3d serve`` on loopback.

One server per module (``server`` fixture) on a free 127.0.0.1 port, with a temporary studies folder
of real images from ../shared/data; driven with plain HTTP and with monailabel's own
``MONAILabelClient``; stopped by PID (terminate, then kill) when the module is done.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lmk3d
from lmk3d.io import read_table, write_landmarks
from lmk3d.serve import wait_until_ready
from tests.conftest import DATA, ROOT

# monailabel's client imports the deprecated cgi module; not ours to fix.
pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

HIPPOCAMPUS = ("hippocampus_004", "hippocampus_006", "hippocampus_007")
LABELLED = HIPPOCAMPUS[0]
DETECTORS = ("prior_guided", "pin", "cascade")
# Loopback only, whatever http_proxy the environment sets.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A bound on a hung start, not a speed check: a start takes ~10-30 s here, more on a busy machine.
STARTUP_TIMEOUT_S = 600.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    studies: Path
    log: Path

    def get_json(self, path: str) -> Any:
        with HTTP.open(f"{self.url}{path}", timeout=60) as r:
            assert r.status == 200
            return json.loads(r.read().decode("utf-8"))

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (``lmk3d serve`` and its monailabel child) by PID.

    SIGTERM first (uvicorn shuts down cleanly; the wrapper waits for it), SIGKILL after 60 s.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    studies = root / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for case in HIPPOCAMPUS:
        (studies / f"{case}.nii.gz").write_bytes((DATA / "hippocampus" / "images" / f"{case}.nii.gz").read_bytes())
    (studies / "spine_t2.nii.gz").write_bytes((DATA / "spine_t2" / "t2.nii.gz").read_bytes())
    truth = read_table(DATA / "hippocampus" / "landmarks.csv")
    write_landmarks(final / f"{LABELLED}.mrk.json", truth[LABELLED])

    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    request.addfinalizer(lambda: _stop(process))
    url = f"http://127.0.0.1:{port}"
    failure = ""
    try:
        wait_until_ready(url, process, timeout_s=STARTUP_TIMEOUT_S, log_file=log)
    except RuntimeError as e:
        failure = f"the server did not start: {e}"
    if failure:
        pytest.fail(failure, pytrace=False)
    yield Server(url, process, studies, log)


def test_info_over_plain_http(server: Server) -> None:
    info = server.get_json("/info/")
    assert info["name"] == "lmk3d landmarks"
    assert info["version"] == lmk3d.__version__
    assert {"random", "first"} <= set(info["strategies"])
    assert info["datastore"]["total"] == len(HIPPOCAMPUS) + 1
    assert info["datastore"]["completed"] == 1


def test_info_through_monailabel_client(server: Server) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url)
    info = client.info()
    plain = server.get_json("/info/")
    for key in ("name", "version", "models", "strategies", "unavailable_models"):
        assert info[key] == plain[key], key


def test_missing_checkpoint_makes_model_unavailable(server: Server) -> None:
    info = server.get_json("/info/")
    log = server.log_text()
    missing = [d for d in DETECTORS if not (ROOT / "models" / f"{d}-hippocampus" / "checkpoint.pt").is_file()]
    for d in DETECTORS:
        # Served or unavailable with a reason, never both, never silently absent.
        assert (d in info["models"]) != (d in info["unavailable_models"]), d
    for d in missing:
        reason = info["unavailable_models"][d]
        assert "no checkpoint" in reason and f"{d}-hippocampus" in reason, reason
        assert f"model '{d}' unavailable: no checkpoint" in log


def _post(server: Server, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"{server.url}{path}", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with HTTP.open(req, timeout=300) as r:
            return r.status, json.loads(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode("utf-8"))


def test_consensus_is_served_with_calibrated_scores_and_never_trained(server: Server) -> None:
    """The shipped consensus (issue #18 item 4) answers like any model, with its members' latencies and
    calibrated scores; training it is a 409 that says what to train instead."""
    info = server.get_json("/info/")
    assert "consensus" in info["models"] and "consensus" not in info["trainers"], info["trainers"]
    status, doc = _post(server, f"/infer/consensus?image={LABELLED}&output=json")
    assert status == 200, doc
    assert {"prior_guided", "pin", "cascade", "combine"} <= set(doc["latencies"]), doc["latencies"]
    assert "within 3 mm" in doc["score_meaning"] and doc["image_check"]["in_distribution"] is True
    assert doc["image_check"]["atypical"] is False, doc["image_check"]  # the clients' cue for capped scores
    truth = read_table(DATA / "hippocampus" / "landmarks.csv")[LABELLED]
    found = [lm for lm in doc["landmarks"] if lm["found"]]
    assert len(found) >= 3, doc["landmarks"]
    for lm in found:
        assert 0.0 <= lm["score"] <= 1.0 and lm["radius_mm"] > 0, lm
        error = float(sum((a - b) ** 2 for a, b in zip(lm["ras"], truth.position(lm["name"]), strict=True)) ** 0.5)
        assert error < 6.0, (lm["name"], error)  # a real answer: the shipped consensus's test MRE is 1.2 mm
    status, doc = _post(server, "/train/consensus")
    assert status == 409 and "built from trained models, not trained" in doc["detail"], doc


def test_datastore_lists_images_and_markups_labels(server: Server) -> None:
    from monailabel.client import MONAILabelClient

    ds = MONAILabelClient(server.url).datastore()
    objects = ds["objects"]
    assert set(objects) == {*HIPPOCAMPUS, "spine_t2"}
    assert objects[LABELLED]["labels"]["final"]["ext"] == ".mrk.json"
    assert all(not objects[i]["labels"] for i in objects if i != LABELLED)

    stats = server.get_json("/datastore/")
    assert stats["total"] == len(objects) and stats["label_tags"] == {"final": 1}


def test_datastore_serves_the_image_bytes(server: Server) -> None:
    with HTTP.open(f"{server.url}/datastore/image?image=spine_t2", timeout=60) as r:
        assert r.status == 200
        served = r.read()
    assert served == (DATA / "spine_t2" / "t2.nii.gz").read_bytes()


def test_server_listens_on_loopback_only(server: Server) -> None:
    assert f"Uvicorn running on {server.url}" in server.log_text()
    assert server.process.poll() is None


# --- lmk3d serve's own checks (no server started) -------------------------------------------------
def test_serve_dry_run_shows_the_project_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.cli import main

    assert main(["serve", "--studies", str(tmp_path), "--port", "8123", "--conf", "dataset", "phantom-hn",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "MONAI_LABEL_TRACKING_ENABLED=false" in out
    assert '"*.mrk.json"' in out and '"*.nii.gz"' in out
    assert "--host 127.0.0.1 --port 8123" in out
    assert f"--app {ROOT / 'apps' / 'landmarks'}" in out
    assert out.index("--conf models") < out.index("--conf dataset phantom-hn")


def test_serve_takes_a_dicomweb_url_as_studies() -> None:
    from lmk3d.serve import server_command

    cmd = server_command("http://127.0.0.1:8042/dicom-web")
    assert cmd[cmd.index("--studies") + 1] == "http://127.0.0.1:8042/dicom-web"


@pytest.mark.parametrize(("args", "message"), [
    (["--studies", "/nonexistent/studies"], "studies folder /nonexistent/studies does not exist"),
    (["--port", "70000"], "port 70000 is out of range"),
    (["--app", "/nonexistent/app"], "not a MONAI Label app folder"),
    (["--log-level", "LOUD"], "unknown log level 'LOUD'"),
])
def test_serve_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    from lmk3d.cli import main

    argv = ["serve", "--studies", str(tmp_path), *args, "--dry-run"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(tmp_path: Path) -> None:
    from lmk3d.errors import LandmarkError
    from lmk3d.serve import start_server

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LandmarkError, match=f"cannot listen on 127.0.0.1:{port}.*choose another with --port"):
            start_server(tmp_path, port=port)


# --- who may listen where, and the guard's settings (no server started) ------------------------------
@pytest.mark.parametrize(("args", "env", "message"), [
    (["--host", "0.0.0.0"], {}, "refusing to listen on '0.0.0.0' without authentication"),
    (["--host", "192.0.2.7"], {"LMK3D_ADMIN_TOKEN": "x"}, "refusing to listen on '192.0.2.7'"),
    (["--cors-origin", "*"], {}, "--cors-origin '*'"),
    (["--cors-origin", "https://viewer.example.org/path"], {}, "no path"),
    (["--max-upload-mb", "0"], {}, "--max-upload-mb 0: must be at least 1"),
    (["--infer-workers", "0"], {}, "--infer-workers 0: must be at least 1"),
    (["--infer-queue", "-1"], {}, "--infer-queue -1: must be at least 0"),
])
def test_serve_refuses_unsafe_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
                                       message: str) -> None:
    from lmk3d.cli import main

    for key in ("LMK3D_API_TOKEN", "LMK3D_ADMIN_TOKEN", "MONAI_LABEL_AUTH_ENABLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--studies", str(tmp_path), *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "env"), [
    (["--host", "0.0.0.0", "--allow-unauthenticated-network"], {}),
    (["--host", "0.0.0.0"], {"LMK3D_API_TOKEN": "annotators"}),
    (["--host", "0.0.0.0"], {"MONAI_LABEL_AUTH_ENABLE": "true"}),
])
def test_serve_listens_on_the_network_only_with_authentication_or_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str],
        env: dict[str, str]) -> None:
    from lmk3d.cli import main

    for key in ("LMK3D_API_TOKEN", "MONAI_LABEL_AUTH_ENABLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--studies", str(tmp_path), *args, "--dry-run"]) == 0
    assert "--host 0.0.0.0" in capsys.readouterr().out


def test_serve_dry_run_shows_the_guard_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.cli import main

    assert main(["serve", "--studies", str(tmp_path), "--cors-origin", "https://viewer.example.org",
                 "--max-upload-mb", "64", "--infer-workers", "2", "--infer-queue", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--uvicorn_app lib.server:app" in out
    assert "LMK3D_CORS_ORIGINS='[\"https://viewer.example.org\"]'" in out
    assert "LMK3D_MAX_UPLOAD_MB=64" in out and "LMK3D_INFER_WORKERS=2" in out and "LMK3D_INFER_QUEUE=5" in out
    assert "LMK3D_BIND_HOST=127.0.0.1" in out
