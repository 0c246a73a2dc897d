"""The landmark server on a real PACS: ``lmk3d serve --studies <Orthanc DICOMweb URL>``.

Orthanc runs in a private network namespace (``tests/test_pacs.py``'s ``pacs`` fixture, which also
moves the test thread into that namespace); the MONAI Label server is started from that thread, so it
lives in the same namespace and reaches Orthanc on loopback. It serves a copy of the shipped
``models/mean_shape-hippocampus``. The oblique MPRAGE and the repaired abdominal CT are uploaded by
STOW-RS (``uploaded`` fixture); each is inferred by SeriesInstanceUID with ``store_sr``, the SR is read
back by WADO-RS and checked with ``read_sr`` (highdicom), ``dsrdump`` and ``dciodvfy``.

The tests run in file order: bad input first, then corrections and training, then a server with wrong
credentials, and last the PACS is stopped to check that the server answers 503 and keeps running.
No test measures time; waits are bounded, with messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lmk3d.io.dicom_sr import read_sr
from lmk3d.serve import start_server, wait_until_ready, workspace_conf
from tests.conftest import DATA, ROOT
from tests.test_dicom_sr import MR_SERIES, TOL_MM, read_series
from tests.test_pacs import Pacs, Uploaded, _script, pacs, uploaded  # noqa: F401  (module fixtures)

pytestmark = [pytest.mark.pacs, pytest.mark.server,
              pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

MODEL = "mean_shape"
SHIPPED_MODEL = ROOT / "models" / f"{MODEL}-hippocampus"
PORT, WRONG_CREDENTIALS_PORT = 8000, 8001  # inside the PACS's private namespace
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Bounds on a hung server or PACS, not speed checks (the machine is shared).
STARTUP_TIMEOUT_S = 600.0
LISTING_TIMEOUT_S = 60.0
TRAIN_TIMEOUT_S = 600.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    models: Path

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with HTTP.open(req, timeout=600) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def infer(self, image: str, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        body, ctype = _multipart({"params": (None, json.dumps(params or {}).encode())})
        return self.request("POST", f"/infer/{MODEL}?image={image}&output=json", body, ctype)

    def listed(self) -> set[str]:
        status, body = self.request("GET", "/datastore/?output=all")
        assert status == 200, body
        return set(body["objects"])


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, (file_name, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{file_name}"' if file_name else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (monailabel and a training child, if any) by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(pacs: Pacs, root: Path, port: int, models: Path, env_changes: dict[str, str],  # noqa: F811
           request: pytest.FixtureRequest) -> Server:
    env = {k: v for k, v in pacs.env.items() if not k.startswith("MONAI_LABEL_DICOMWEB_")}
    env.update({"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
                "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}, **env_changes)
    log = root / "server.log"
    with log.open("wb") as out:  # started from the thread that is in the PACS's namespace: so is the server
        # Its own workspace: the default one is keyed by the PACS address, which other tests' servers share.
        process = start_server(pacs.url, port=port, models_dir=models, env=env, stdout=out,
                               conf=[workspace_conf(root / f"workspace-{port}")],
                               stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    request.addfinalizer(lambda: _stop(process))
    server = Server(f"http://127.0.0.1:{port}", process, log, models)
    try:
        wait_until_ready(server.url, process, timeout_s=STARTUP_TIMEOUT_S, log_file=log)
    except RuntimeError as e:
        pytest.fail(f"the server did not start: {e}", pytrace=False)
    return server


@pytest.fixture(scope="module")
def server(pacs: Pacs, uploaded: Uploaded, tmp_path_factory: pytest.TempPathFactory,  # noqa: F811
           request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("pacs-server")
    models = root / "models"
    shutil.copytree(SHIPPED_MODEL, models / SHIPPED_MODEL.name)  # training publishes into it
    # Without the model's trust files (lmk3d.trust): they rightly refuse the whole-head MPRAGE as not a
    # hippocampus crop (tests/test_trust_shipped.py checks that); these tests are about the PACS path.
    for name in ("trust.json", "presence.pt"):
        (models / SHIPPED_MODEL.name / name).unlink(missing_ok=True)
    # The credentials come as LMK3D_PACS_USER/PASSWORD only: lmk3d serve maps them.
    yield _start(pacs, root, PORT, models, {}, request)


def _sr_checks(pacs: Pacs, result: dict[str, Any], series: list[Dataset], tmp_path: Path) -> None:  # noqa: F811
    """The stored SR read back by WADO-RS equals the response's landmarks (read_sr, dsrdump, dciodvfy)."""
    uids = result["sr"]
    assert uids["StudyInstanceUID"] == str(series[0].StudyInstanceUID)
    back = pacs.client().retrieve_instance(uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                                           uids["SOPInstanceUID"])
    path = tmp_path / "sr.dcm"
    back.save_as(path, write_like_original=False)
    expected = {it["name"]: np.array(it["lps"], dtype=float) for it in result["landmarks"] if it["found"]}
    assert expected, "the detector found no landmark"

    got = read_sr(back, frame_of_reference_uid=str(series[0].FrameOfReferenceUID))
    assert set(n for n, f in zip(got.names, got.found, strict=True) if f) == set(expected)
    for name, lps in expected.items():
        assert np.abs(got.xyz_mm_lps[got.names.index(name)] - lps).max() < TOL_MM, name
    # the image verdict travels with the algorithm's parameters, for a PACS user who reads only the SR
    verdicts = [str(e.value) for e in back.iterall() if e.keyword == "TextValue" and
                str(e.value).startswith("image_check=")]
    check = result["image_check"]
    assert len(verdicts) == (0 if check["in_distribution"] is None else 1), (verdicts, check)
    assert all(check["reason"] in v for v in verdicts), (verdicts, check)

    dsrdump = shutil.which("dsrdump")
    if dsrdump:
        run = subprocess.run([dsrdump, "+Pu", "+Pl", str(path)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        printed: dict[str, np.ndarray] = {}
        current = None
        for line in run.stdout.splitlines():
            m = re.search(r'"Tracking Identifier"\)="(.*)">', line)
            if m:
                current = m.group(1)
            m = re.search(r'SCOORD3D:.*=\(POINT,"[0-9.]+",([-0-9.e+]+)/([-0-9.e+]+)/([-0-9.e+]+)\)', line)
            if m and current is not None:
                printed[current] = np.array([float(v) for v in m.group(1, 2, 3)])
        assert set(printed) == set(expected)
        for name, lps in expected.items():
            assert np.abs(printed[name] - lps).max() < TOL_MM, name
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=300)
        report = run.stdout + run.stderr
        assert "Comprehensive3DSR" in report, report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report
    if not (dsrdump and dciodvfy):
        pytest.skip("dsrdump or dciodvfy is not installed (Debian dcmtk, dicom3tools); read_sr checks passed")


# --- the happy path ---------------------------------------------------------------------------------------
def test_lists_the_uploaded_image_series(server: Server, uploaded: Uploaded) -> None:  # noqa: F811
    status, info = server.request("GET", "/info/")
    assert status == 200 and MODEL in info["models"], info
    assert "error" not in info["datastore"], info["datastore"]
    listed = server.listed()
    assert {str(uploaded.mr[0].SeriesInstanceUID), str(uploaded.ct[0].SeriesInstanceUID)} <= listed


@pytest.mark.parametrize("which", ["mr", "ct"])
def test_infer_by_series_uid_stores_an_sr(server: Server, pacs: Pacs, uploaded: Uploaded,  # noqa: F811
                                          which: str, tmp_path: Path) -> None:
    series = uploaded.mr if which == "mr" else uploaded.ct
    status, result = server.infer(str(series[0].SeriesInstanceUID),
                                  {"store_sr": True, "result_write_to_file": False})
    assert status == 200, result
    assert {"download", "load", "sr_build", "sr_store", "total"} <= set(result["latencies"]), result["latencies"]
    _sr_checks(pacs, result, series, tmp_path)


def test_new_series_is_listed_within_seconds(server: Server, pacs: Pacs) -> None:  # noqa: F811
    before = server.listed()  # fills the listing cache
    slices = _mr_copy(10)
    response = pacs.client().store_instances(slices)
    assert not response.get("FailedSOPSequence"), response
    uid = str(slices[0].SeriesInstanceUID)
    assert uid not in before
    deadline = time.monotonic() + LISTING_TIMEOUT_S
    while uid not in server.listed():
        assert time.monotonic() < deadline, (f"series {uid} stored {LISTING_TIMEOUT_S:.0f} s ago is still not "
                                             "listed; is MONAI_LABEL_DICOMWEB_CACHE_EXPIRY set low by lmk3d serve?")
        time.sleep(0.5)


# --- bad input ----------------------------------------------------------------------------------------------
def test_unknown_series_is_404(server: Server) -> None:
    status, body = server.infer("1.2.3.4.5.6.7.8.9", {"store_sr": True})
    assert status == 404, body
    assert "unknown image" in body["detail"] and "SeriesInstanceUID" in body["detail"]


def test_sr_series_is_not_an_image(server: Server, pacs: Pacs, uploaded: Uploaded) -> None:  # noqa: F811
    study = str(uploaded.mr[0].StudyInstanceUID)
    srs = pacs.client().search_for_series(study, search_filters={"Modality": "SR"})
    assert srs, "the infer test stored no SR"
    sr_uid = str(srs[0]["0020000E"]["Value"][0])
    assert sr_uid not in server.listed()
    status, body = server.infer(sr_uid)
    assert status == 422, body
    assert "SR object, not an image series" in body["detail"]


@pytest.mark.parametrize("defect", ["uneven", "tilt"])
def test_uneven_or_tilted_series_is_refused(server: Server, pacs: Pacs, defect: str) -> None:  # noqa: F811
    slices = _mr_copy(12)
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=float)
    row, normal = iop[:3], np.cross(iop[:3], iop[3:])
    for k, ds in enumerate(slices):
        pos = np.asarray(ds.ImagePositionPatient, dtype=float)
        # uneven: the second half one extra half-slice further; tilt: 0.3 mm along the row per slice.
        shift = 0.5 * normal * (k >= 6) if defect == "uneven" else 0.3 * k * row
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos + shift]
    assert not pacs.client().store_instances(slices).get("FailedSOPSequence")
    status, body = server.infer(str(slices[0].SeriesInstanceUID))
    assert status == 422, body
    assert ("not evenly spaced" if defect == "uneven" else "gantry tilt") in body["detail"], body


def test_store_sr_for_an_uploaded_file_is_refused(server: Server) -> None:
    body, ctype = _multipart({"params": (None, json.dumps({"store_sr": True}).encode()),
                              "file": ("image.nii.gz", (DATA / "hippocampus" / "images" /
                                                        "hippocampus_004.nii.gz").read_bytes())})
    status, result = server.request("POST", f"/infer/{MODEL}?output=json", body, ctype)
    assert status == 422, result
    assert "store_sr needs a series of the PACS" in result["detail"]


# --- corrections through the PACS, and training from them -----------------------------------------------
def test_final_label_is_stored_as_sr_and_trains(server: Server, pacs: Pacs, uploaded: Uploaded,  # noqa: F811
                                                tmp_path: Path) -> None:
    image = str(uploaded.mr[0].SeriesInstanceUID)
    status, result = server.infer(image, {"result_write_to_file": False})
    assert status == 200, result
    corrected = {it["name"]: [v + 1.0 for v in it["lps"]] for it in result["landmarks"] if it["found"]}
    markups = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
        {"label": n, "position": p} for n, p in corrected.items()]}]}
    body, ctype = _multipart({"params": (None, b"{}"), "label": ("final.mrk.json", json.dumps(markups).encode())})
    status, saved = server.request("PUT", f"/datastore/label?image={image}&tag=final", body, ctype)
    assert status == 200, saved

    srs = pacs.client().search_for_series(str(uploaded.mr[0].StudyInstanceUID), search_filters={"Modality": "SR"},
                                          fields=["SeriesDescription"])
    finals = [s for s in srs if s.get("0008103E", {}).get("Value") == ["lmk3d final landmarks"]]
    assert len(finals) == 1, srs
    final_uid = str(finals[0]["0020000E"]["Value"][0])
    (sr,) = pacs.client().retrieve_series(str(uploaded.mr[0].StudyInstanceUID), final_uid)
    back = read_sr(sr)
    for name, lps in corrected.items():
        assert np.abs(back.xyz_mm_lps[back.names.index(name)] - np.array(lps)).max() < TOL_MM

    status, bad = server.request("PUT", f"/datastore/label?image={image}&tag=final",
                                 *_multipart({"params": (None, b"{}"), "label": ("x.mrk.json", b"{not json")}))
    assert status == 422, bad
    far = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
        {"label": n, "position": [p[0] + 1e6, p[1], p[2]]} for n, p in corrected.items()]}]}
    far_label = ("far.mrk.json", json.dumps(far).encode())
    status, bad = server.request("PUT", f"/datastore/label?image={image}&tag=final",
                                 *_multipart({"params": (None, b"{}"), "label": far_label}))
    assert status == 422 and "outside" in bad["detail"], bad

    status, info = server.request("GET", "/info/")
    assert info["datastore"]["completed"] == 1, info["datastore"]
    status, started = server.request("POST", f"/train/{MODEL}", json.dumps({"max_minutes": 1}).encode(),
                                     "application/json")
    assert status == 200, started
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        status, task = server.request("GET", "/train/?check_if_running=false")
        if isinstance(task, dict) and task.get("status") in ("DONE", "ERROR"):
            break
        assert time.monotonic() < deadline, f"training did not finish within {TRAIN_TIMEOUT_S:.0f} s: {task}"
        time.sleep(1)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "DONE", details
    assert "read 1 final label(s)" in details, details


# --- credentials and a PACS that goes away ---------------------------------------------------------------------
def test_wrong_credentials_get_a_clear_502(pacs: Pacs, server: Server,  # noqa: F811
                                           tmp_path_factory: pytest.TempPathFactory,
                                           request: pytest.FixtureRequest) -> None:
    root = tmp_path_factory.mktemp("wrong-credentials")
    wrong = _start(pacs, root, WRONG_CREDENTIALS_PORT, server.models,
                   {"LMK3D_PACS_PASSWORD": "not-the-password"}, request)
    status, info = wrong.request("GET", "/info/")  # the server runs and says what is wrong
    assert status == 200 and "refused the credentials" in info["datastore"]["error"], info
    status, body = wrong.request("GET", "/datastore/?output=all")
    assert status == 502, body
    assert "HTTP 401" in body["detail"] and "LMK3D_PACS_PASSWORD" in body["detail"]
    status, body = wrong.infer(str(MR_SERIES.name))
    assert status == 502, body
    _stop(wrong.process)


def test_pacs_down_gives_503_and_the_server_keeps_running(server: Server, pacs: Pacs) -> None:  # noqa: F811
    stop = _script(pacs.env, "stop")
    assert stop.returncode == 0, stop.stderr
    status, body = server.infer(generate_uid())
    assert status == 503, body
    assert "cannot reach the PACS" in body["detail"]
    status, info = server.request("GET", "/info/")
    assert status == 200 and "cannot reach the PACS" in info["datastore"]["error"], info
    assert server.process.poll() is None


def _mr_copy(n: int) -> list[Dataset]:
    """The first ``n`` slices of the MPRAGE as a new study and series (new UIDs)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for ds in read_series(MR_SERIES)[:n]:  # fresh datasets on each call
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out
