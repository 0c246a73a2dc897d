"""Nothing lost on kill -9: the real server killed with SIGKILL while it saves labels, then restarted.

The server (``python -m lmk3d.cli serve``, in its own session, serving a temporary copy of the
``mean_shape`` model, which loads fast) gets a studies folder of four images, each with a final label
written before the first start (version 0):

- two hippocampus MR images whose labels are small Slicer point lists (``.mrk.json``);
- two large images (a hippocampus image padded to :data:`LARGE_SHAPE`, same voxel size and origin, so
  its landmarks keep their positions) whose labels are uncompressed sphere label maps on the image
  grid (``.nii``, about 10 MB each: a write takes long enough to be caught half-way).

Two client threads keep replacing those labels (``PUT /datastore/label``), each version different
from the one before (a point moved by a hundredth of a millimetre; a different landmark left out of the
label map), and the test kills the server's whole process group with SIGKILL at :data:`KILLS` points:
the moment a label write is seen in progress in ``labels/final`` (a temporary file there, or a label
file shorter than a whole one), or a fixed delay after a large label was sent. After each kill the
server is started again on the same folder and port, and

- every label file is a complete version the client sent: the one last acknowledged or the one in
  flight at the kill (never 0 bytes, never truncated: it decodes through
  :func:`lmk3d.io.labels.read_label`, and a label map reads as NIfTI with its image's shape);
- the datastore lists every image's final label, and ``GET /info/`` answers;
- no temporary file is left in the studies folder (a dot-file other than MONAI Label's ``.lock``, or a
  ``.tmp`` name) nor in the server's upload folder (the server runs with its own ``TMPDIR``).

Then a real training on those labels is killed with the server as soon as its ``app_train_stats.json``
says RUNNING: after the restart it says STOPPED, in the file and in ``GET /info/``. A last test leaves
what a training killed while publishing leaves in the model's registry folder (a ``.staging-*``
folder and ``app_train_stats.json`` saying RUNNING) and checks that a start removes the folder and
records the training as stopped, the shipped checkpoint untouched. Only the kill points depend on
timing; every assertion is about files and answers, none about time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lmk3d.io import read_image, read_table, write_image, write_landmarks
from lmk3d.io.labels import read_label
from lmk3d.io.markups import markups_dict
from lmk3d.landmarks import LandmarkSet
from lmk3d.serve import wait_until_ready
from tests.conftest import DATA, ROOT

pytestmark = [pytest.mark.server, pytest.mark.slow]

MODEL = "mean_shape"
HIPPOCAMPUS = DATA / "hippocampus"
SMALL = ("hippocampus_004", "hippocampus_006")
LARGE = {"large_007": "hippocampus_007", "large_008": "hippocampus_008"}  # image id -> padded source case
LARGE_SHAPE = (256, 256, 160)
#: Where each kill happens: at a write seen in progress, or this many seconds after a large label is sent.
KILLS: tuple[tuple[str, float], ...] = (("mid_write", 0.0), ("after_send", 0.05), ("mid_write", 0.0),
                                        ("after_send", 0.4))
#: Acknowledged large-label writes in a round before the kill is armed (so every round replaces labels).
ACKS_BEFORE_KILL = 2
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Bounds on a hung server or client, not speed checks.
STARTUP_TIMEOUT_S = 600.0
ROUND_TIMEOUT_S = 300.0
#: How long a "mid_write" kill watches for a write in progress before it kills anyway.
WATCH_S = 30.0


# --- the server -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One ``lmk3d serve`` process group on ``port``; its log is appended to ``log`` across restarts."""

    root: Path
    studies: Path
    models: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tmp(self) -> Path:
        """The server's own ``TMPDIR``: its upload folder lives there."""
        return self.root / "tmp"

    def uploads_left(self) -> int:
        """Uploads in every server upload folder (``lmk3d-uploads-<pid>``, apps/landmarks/lib/server.py)."""
        return sum(len(list(folder.iterdir())) for folder in self.tmp.glob("lmk3d-uploads-*") if folder.is_dir())

    def start(self) -> None:
        self.tmp.mkdir(exist_ok=True)
        env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(self.root / "sessions"), "TMPDIR": str(self.tmp)}
        cmd = [sys.executable, "-m", "lmk3d.cli", "serve", "--studies", str(self.studies), "--host", "127.0.0.1",
               "--port", str(self.port), "--models", str(self.models)]
        with self.log.open("ab") as out:
            out.write(f"\n===== start: {' '.join(cmd)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                            start_new_session=True)
        failure = ""
        try:
            wait_until_ready(self.url, self.process, timeout_s=STARTUP_TIMEOUT_S, log_file=self.log)
        except RuntimeError as e:
            failure = f"the server did not start: {e}"
        if failure:
            self.stop()
            pytest.fail(failure, pytrace=False)

    def kill9(self) -> None:
        """SIGKILL to the whole session: ``lmk3d serve``, monailabel, any child; nothing can clean up."""
        assert self.process is not None and self.process.poll() is None, "the server died before the kill"
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def get_json(self, path: str) -> object:
        with HTTP.open(f"{self.url}{path}", timeout=60) as r:
            assert r.status == 200
            return json.loads(r.read().decode("utf-8"))


def _multipart(label_name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{label_name}"\r\n\r\n'
            ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# --- the labels and their versions ------------------------------------------------------------------
@dataclass
class Studies:
    """The studies folder's images, and every label version the test can send for them."""

    folder: Path
    names: tuple[str, ...]
    truth: dict[str, LandmarkSet]  # image id -> its landmarks (version 0 of a point list)
    shapes: dict[str, tuple[int, int, int]]
    large_payloads: dict[str, list[bytes]]  # image id -> label map bytes of each variant

    @property
    def final(self) -> Path:
        return self.folder / "labels" / "final"

    def label_file(self, image: str) -> Path:
        return self.final / (f"{image}.nii" if image in LARGE else f"{image}.mrk.json")

    def small_version(self, image: str, version: int) -> LandmarkSet:
        """Version ``version`` of a point list: the first landmark moved by ``0.01 * version`` mm along x."""
        base = self.truth[image]
        xyz = base.xyz_mm_ras.copy()
        xyz[0, 0] += 0.01 * version
        return LandmarkSet(base.names, xyz, base.scores.copy(), base.found.copy())

    def large_found(self, version: int) -> np.ndarray:
        """Which landmarks version ``version`` of a label map holds: all but landmark ``version % N``."""
        found = np.ones(len(self.names), bool)
        found[version % len(self.names)] = False
        return found


def _make_studies(folder: Path, work: Path) -> Studies:
    truth_table = read_table(HIPPOCAMPUS / "landmarks.csv")
    names = truth_table[SMALL[0]].names
    final = folder / "labels" / "final"
    final.mkdir(parents=True)
    truth: dict[str, LandmarkSet] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    payloads: dict[str, list[bytes]] = {}
    for case in SMALL:
        shutil.copyfile(HIPPOCAMPUS / "images" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
        truth[case] = truth_table[case].reorder(names)
        shapes[case] = read_image(folder / f"{case}.nii.gz").shape
    for image_id, case in LARGE.items():
        src = read_image(HIPPOCAMPUS / "images" / f"{case}.nii.gz")
        big = np.zeros(LARGE_SHAPE, np.int16)
        i, j, k = src.shape
        big[:i, :j, :k] = np.clip(src.array, -32768, 32767).astype(np.int16)  # padded at the far ends: same origin
        write_image(folder / f"{image_id}.nii.gz", big, src.affine)
        reference = read_image(folder / f"{image_id}.nii.gz")
        truth[image_id] = truth_table[case].reorder(names)
        shapes[image_id] = reference.shape
        payloads[image_id] = []
        for variant in range(len(names)):
            keep = np.ones(len(names), bool)
            keep[variant] = False
            lm = truth[image_id]
            path = work / f"{image_id}.v{variant}.nii"
            write_landmarks(path, LandmarkSet(lm.names, lm.xyz_mm_ras, lm.scores, lm.found & keep), reference)
            payloads[image_id].append(path.read_bytes())
    studies = Studies(folder, names, truth, shapes, payloads)
    for image in SMALL:  # version 0 of every label, before the first start
        write_landmarks(studies.label_file(image), studies.small_version(image, 0))
    for image in LARGE:
        studies.label_file(image).write_bytes(payloads[image][0])
    return studies


# --- the writers ------------------------------------------------------------------------------------
@dataclass
class Writer:
    """A client thread replacing the labels of ``images`` in turn, version after version, until the server dies.

    ``acked[image]`` is the last version the server answered 200 for; ``in_flight[image]`` the version sent
    and not yet answered (None when nothing is). Any answer other than 200 is recorded in ``refused``.
    """

    studies: Studies
    url: str
    images: tuple[str, ...]
    next_version: dict[str, int]
    acked: dict[str, int]
    in_flight: dict[str, int | None] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    n_acked: int = 0
    sent: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def body(self, image: str, version: int) -> tuple[bytes, str]:
        if image in LARGE:
            return _multipart(f"{image}.nii", self.studies.large_payloads[image][version % len(self.studies.names)])
        doc = markups_dict(self.studies.small_version(image, version))
        return _multipart(f"{image}.mrk.json", json.dumps(doc).encode())

    def run(self) -> None:
        while not self.stop.is_set():
            for image in self.images:
                version = self.next_version[image]
                self.next_version[image] += 1
                body, ctype = self.body(image, version)
                req = urllib.request.Request(f"{self.url}/datastore/label?image={image}&tag=final", data=body,
                                             method="PUT")
                req.add_header("Content-Type", ctype)
                self.in_flight[image] = version
                self.sent.set()
                try:
                    with HTTP.open(req, timeout=ROUND_TIMEOUT_S) as r:
                        status, raw = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, raw = e.code, e.read()
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    return  # the server is gone: this version stays in flight
                if status == 200:
                    self.acked[image] = version
                    self.n_acked += 1
                else:
                    self.refused.append(f"PUT label {image} v{version}: HTTP {status}: {raw[:300]!r}")
                self.in_flight[image] = None


# --- what a kill may leave --------------------------------------------------------------------------
def _stale_temps(folder: Path) -> list[str]:
    """Files a killed writer leaves: dot-files (MONAI Label's ``.lock`` aside) and ``.tmp`` names."""
    stale = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ((p.name.startswith(".") and p.name != ".lock") or ".tmp" in p.name
                            or p.name.endswith((".part", "~"))):
            stale.append(str(p.relative_to(folder)))
    return stale


def _write_in_progress(studies: Studies) -> bool:
    """A label write caught half-way: a temporary file in ``labels/final``, or a label shorter than a whole one."""
    expected = {studies.label_file(i).name for i in (*SMALL, *LARGE)}
    whole = {f"{i}.nii": len(studies.large_payloads[i][0]) for i in LARGE}
    try:
        with os.scandir(studies.final) as entries:
            for e in entries:
                if e.name not in expected:
                    return True
                if e.name in whole and e.stat().st_size < whole[e.name]:
                    return True
    except FileNotFoundError:
        return False
    return False


def _stored_version(studies: Studies, image: str, allowed: set[int]) -> tuple[int | None, str]:
    """Which of the ``allowed`` versions the stored label is, complete; else ``(None, what is wrong)``."""
    path = studies.label_file(image)
    if not path.is_file():
        return None, f"{path.name}: missing"
    size = path.stat().st_size
    if size == 0:
        return None, f"{path.name}: 0 bytes"
    if image in LARGE:
        whole = len(studies.large_payloads[image][0])
        if size != whole:
            return None, f"{path.name}: {size} bytes, a whole label map has {whole}"
        try:
            vol = read_image(path, dtype=None)
        except ValueError as e:
            return None, f"{path.name}: not a readable NIfTI ({e})"
        if vol.shape != studies.shapes[image]:
            return None, f"{path.name}: shape {vol.shape}, its image has {studies.shapes[image]}"
    try:
        got = read_label(path, studies.names)
    except ValueError as e:
        return None, f"{path.name}: does not decode ({e})"
    for v in sorted(allowed, reverse=True):
        if image in LARGE:
            want = studies.truth[image]
            f = studies.large_found(v)
            if np.array_equal(got.found, want.found & f) and np.allclose(got.xyz_mm_ras[f], want.xyz_mm_ras[f],
                                                                          atol=1.5):
                return v, ""
        elif got.allclose(studies.small_version(image, v), atol_mm=1e-3):
            return v, ""
    return None, (f"{path.name}: complete, but not one of the versions {sorted(allowed)} (the last acknowledged, "
                  "the one in flight)")


@dataclass
class KillRecord:
    """What one kill caught and what the restarted server showed."""

    trigger: str
    caught_mid_write: bool
    acked: int
    temps_after_kill: list[str]
    uploads_after_kill: int
    problems: list[str]
    temps_after_restart: list[str]
    uploads_after_restart: int
    unlabelled_after_restart: list[str]


def _one_round(server: Server, studies: Studies, versions: dict[str, int], acked: dict[str, int],
               trigger: str, delay_s: float) -> KillRecord:
    small = Writer(studies, server.url, SMALL, versions, acked)
    large = Writer(studies, server.url, tuple(LARGE), versions, acked)
    threads = [threading.Thread(target=w.run, daemon=True) for w in (small, large)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while large.n_acked < ACKS_BEFORE_KILL:
        assert not large.refused and not small.refused, large.refused + small.refused
        assert time.monotonic() < deadline, "the large-label writer made no progress"
        time.sleep(0.01)
    caught = False
    if trigger == "mid_write":
        # Watch for a write in progress; if none is seen in time, kill anyway (the check below still holds).
        watch_until = time.monotonic() + WATCH_S
        while time.monotonic() < watch_until and not caught:
            caught = _write_in_progress(studies)
    else:
        large.sent.clear()
        assert large.sent.wait(ROUND_TIMEOUT_S), "the large-label writer sent nothing"
        time.sleep(delay_s)
        caught = _write_in_progress(studies)
    server.kill9()
    for w in (small, large):
        w.stop.set()
    for t in threads:
        t.join(ROUND_TIMEOUT_S)
    refused = small.refused + large.refused
    in_flight = {**small.in_flight, **large.in_flight}
    temps_after_kill = _stale_temps(studies.folder)
    uploads_after_kill = server.uploads_left()

    server.start()
    problems = list(refused)
    for image in (*SMALL, *LARGE):
        allowed = {acked[image]} | ({v} if (v := in_flight.get(image)) is not None else set())
        version, problem = _stored_version(studies, image, allowed)
        if version is None:
            problems.append(problem)
        else:
            acked[image] = version  # the next round starts from what is on disk now
    listed = server.get_json("/datastore/?output=all")
    objects = listed.get("objects", {}) if isinstance(listed, dict) else {}
    unlabelled = [i for i in (*SMALL, *LARGE) if "final" not in (objects.get(i, {}).get("labels") or {})]
    return KillRecord(trigger if trigger == "mid_write" else f"{trigger} {delay_s:g} s", caught,
                      small.n_acked + large.n_acked, temps_after_kill, uploads_after_kill, problems,
                      _stale_temps(studies.folder), server.uploads_left(), unlabelled)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kill9")


def _models_copy(root: Path) -> Path:
    models = root / "models"
    shutil.copytree(ROOT / "models" / f"{MODEL}-hippocampus", models / f"{MODEL}-hippocampus")
    return models


@dataclass
class Rounds:
    server: Server
    studies: Studies
    records: list[KillRecord]


@pytest.fixture(scope="module")
def rounds(root: Path, request: pytest.FixtureRequest) -> Rounds:
    work = root / "work"
    work.mkdir()
    studies = _make_studies(root / "studies", work)
    server = Server(root, studies.folder, _models_copy(root), _free_port(), root / "server.log")
    request.addfinalizer(server.stop)
    server.start()
    versions = {i: 1 for i in (*SMALL, *LARGE)}
    acked = {i: 0 for i in (*SMALL, *LARGE)}
    records = []
    for trigger, delay_s in KILLS:
        records.append(_one_round(server, studies, versions, acked, trigger, delay_s))
        assert server.get_json("/info/")
    for r in records:  # the figures docs/load_and_kill.md quotes (shown with pytest -s)
        print(f"kill ({r.trigger}): caught mid-write {r.caught_mid_write}; {r.acked} writes acknowledged; "
              f"{len(r.temps_after_kill)} temp file(s) and {r.uploads_after_kill} upload(s) left by the kill; "
              f"{len(SMALL) + len(LARGE)} labels checked, problems: {r.problems or 'none'}; after restart "
              f"{len(r.temps_after_restart)} temp file(s), {r.uploads_after_restart} upload(s)")
    return Rounds(server, studies, records)


def test_kill9_during_label_saves_leaves_every_label_whole(rounds: Rounds) -> None:
    problems = [f"kill {n} ({r.trigger}): {p}" for n, r in enumerate(rounds.records, 1) for p in r.problems]
    assert not problems, "\n".join(problems)


def test_restart_after_kill9_lists_every_label(rounds: Rounds) -> None:
    missing = [f"kill {n}: {r.unlabelled_after_restart}" for n, r in enumerate(rounds.records, 1)
               if r.unlabelled_after_restart]
    assert not missing, f"final labels not listed by GET /datastore/ after the restart: {missing}"


def test_restart_after_kill9_leaves_no_temporary_files(rounds: Rounds) -> None:
    stale = [f"kill {n}: {r.temps_after_restart}" for n, r in enumerate(rounds.records, 1) if r.temps_after_restart]
    assert not stale, f"temporary files left in the studies folder after the restart: {stale}"
    uploads = [f"kill {n}: {r.uploads_after_restart}" for n, r in enumerate(rounds.records, 1)
               if r.uploads_after_restart]
    assert not uploads, f"uploaded files left in the server's upload folder after the restart: {uploads}"


def test_kill9_during_training_is_stopped_after_restart(rounds: Rounds) -> None:
    """A real training (on the four final labels) killed with the server as soon as it says RUNNING."""
    server = rounds.server
    # The model's registry folder (lmk3d.registry; the server's default workspace is in the studies folder).
    stats_file = server.studies / ".lmk3d-workspace" / MODEL / "app_train_stats.json"
    stats_file.unlink(missing_ok=True)
    req = urllib.request.Request(f"{server.url}/train/{MODEL}", data=json.dumps({"max_minutes": 1.0}).encode(),
                                 method="POST")
    req.add_header("Content-Type", "application/json")
    with HTTP.open(req, timeout=60) as r:
        assert r.status == 200
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    stats: dict[str, object] = {}
    while stats.get("status") != "RUNNING":
        assert time.monotonic() < deadline, f"the training never said RUNNING (last: {stats})"
        try:
            stats = json.loads(stats_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet
            stats = {}
        assert stats.get("status") in (None, "RUNNING"), f"the training ended before the kill: {stats}"
    server.kill9()
    server.start()
    on_disk = json.loads(stats_file.read_text(encoding="utf-8"))
    assert on_disk["status"] == "STOPPED", on_disk
    info = server.get_json("/info/")
    assert isinstance(info, dict) and info["train_stats"][MODEL]["status"] == "STOPPED", info
    assert not list(stats_file.parent.glob(".staging-*"))
    print(f"training killed in phase {stats.get('phase')!r}; after the restart: {on_disk}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def interrupted_training(root: Path) -> Iterator[tuple[Server, Path, str]]:
    """A model folder as a training killed while publishing leaves it; the server started on it."""
    base = root / "interrupted"
    base.mkdir()
    studies = base / "studies"
    studies.mkdir()
    shutil.copyfile(HIPPOCAMPUS / "images" / f"{SMALL[0]}.nii.gz", studies / f"{SMALL[0]}.nii.gz")
    models = _models_copy(base)
    shipped = models / f"{MODEL}-hippocampus"
    server = Server(base, studies, models, _free_port(), base / "server.log")
    server.start()  # creates the model's registry folder
    server.stop()
    model_dir = studies / ".lmk3d-workspace" / MODEL
    staging = model_dir / ".staging-xyz"
    staging.mkdir()
    (staging / "checkpoint.pt").write_bytes((shipped / "checkpoint.pt").read_bytes()[:1000])  # half written
    (model_dir / "app_train_stats.json").write_text(json.dumps(
        {"model": MODEL, "status": "RUNNING", "phase": "deciding", "start_ts": "2024-01-01 00:00:00",
         "init": "current", "max_minutes": 1.0, "epoch": 0, "total_epochs": 1}), encoding="utf-8")
    before = _sha256(shipped / "checkpoint.pt")
    server.start()
    try:
        yield server, model_dir, before
    finally:
        server.stop()


def test_start_clears_an_interrupted_training(interrupted_training: tuple[Server, Path, str]) -> None:
    server, model_dir, checkpoint_sha = interrupted_training
    assert not list(model_dir.glob(".staging-*")), "the stale staging folder is still there after the start"
    stats_on_disk = json.loads((model_dir / "app_train_stats.json").read_text(encoding="utf-8"))
    assert stats_on_disk["status"] == "STOPPED", stats_on_disk
    info = server.get_json("/info/")
    assert isinstance(info, dict)
    assert MODEL in info["models"], info.get("unavailable_models")
    assert info["train_stats"][MODEL]["status"] == "STOPPED", info["train_stats"]
    assert _sha256(server.models / f"{MODEL}-hippocampus" / "checkpoint.pt") == checkpoint_sha

