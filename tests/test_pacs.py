"""A real Orthanc PACS (DICOMweb) in a private network namespace, driven with dicomweb-client.

``scripts/test_pacs.sh start`` runs Orthanc under ``unshare --net`` with only loopback up (Orthanc
binds 0.0.0.0; in its own namespace that reaches nothing outside). To talk to it, this module's
fixture moves the test thread into Orthanc's network namespace with setns(2) (what ``nsenter``
does) for the module's duration and moves it back afterwards; Orthanc is stopped by its PID.
Needs root (CAP_SYS_ADMIN) and a working ``unshare --net``; skips with the reason otherwise.

Uploads the oblique MPRAGE and the (UID-repaired, see tests/test_dicom_sr.py) abdominal CT by
STOW-RS, finds them by QIDO-RS, retrieves series by WADO-RS and checks they read to the same
geometry and voxels as the local files, stores an SR made by ``build_sr`` and reads it back, and
checks that wrong credentials get 401.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset

from lmk3d.io import read_image
from lmk3d.io.dicom_sr import build_sr, read_sr, sr_frame_of_reference_uids
from tests.conftest import ROOT
from tests.test_dicom_sr import MR_SERIES, TOL_MM, header_lps, landmarks_for, read_series, repaired_ct_series

pytestmark = [pytest.mark.pacs, pytest.mark.server]

SCRIPT = ROOT / "scripts" / "test_pacs.sh"
PORT = 8042  # inside a private namespace: no clash with anything else on the machine
CLONE_NEWNET = 0x40000000
# A bound on a hung start (it may install Orthanc first), not a speed check.
START_TIMEOUT_S = 600


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _why_no_namespace() -> str | None:
    """Why this machine cannot run the namespaced PACS, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "joining the PACS's network namespace (setns) needs root"
    for tool in ("unshare", "nsenter", "ip", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"unshare --net does not work here: {probe.stderr.strip() or probe.returncode}"
    return None


@dataclass
class Pacs:
    url: str
    user: str
    password: str
    pid: int
    env: dict[str, str]
    host_netns_fd: int

    def client(self, user: str | None = None, password: str | None = None) -> Any:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user or self.user, password or self.password)
        return DICOMwebClient(self.url, session=session)

    def in_host_namespace(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a thread that is back in the test's original network namespace."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                _setns(self.host_netns_fd)  # only this thread moves
                result["value"] = fn()
            except BaseException as e:  # handed to the caller
                result["error"] = e

        t = threading.Thread(target=run)
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["value"]


def _script(pacs_env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=pacs_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    reason = _why_no_namespace()
    if reason:
        pytest.skip(f"test PACS cannot run: {reason}")
    state = tmp_path_factory.mktemp("pacs")
    env = {**os.environ, "LMK3D_PACS_DIR": str(state), "LMK3D_PACS_PORT": str(PORT),
           "LMK3D_PACS_USER": "lmk3d-test", "LMK3D_PACS_PASSWORD": secrets.token_urlsafe(16)}
    start = _script(env, "start", timeout=START_TIMEOUT_S)
    if start.returncode == 3:  # the script's "cannot run here" (e.g. Orthanc missing and not installable)
        pytest.skip(f"test PACS cannot run: {start.stderr.strip()}")
    assert start.returncode == 0, f"test_pacs.sh start failed:\n{start.stdout}\n{start.stderr}"
    pid = int((state / "orthanc.pid").read_text())
    host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    pacs_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        _setns(pacs_fd)
        yield Pacs(f"http://127.0.0.1:{PORT}/dicom-web", env["LMK3D_PACS_USER"], env["LMK3D_PACS_PASSWORD"], pid,
                   env, host_fd)
    finally:
        _setns(host_fd)
        os.close(pacs_fd)
        os.close(host_fd)
        stop = _script(env, "stop")
        assert stop.returncode == 0, stop.stderr
        assert not Path(f"/proc/{pid}").exists(), f"Orthanc (pid {pid}) still running after stop"


@dataclass
class Uploaded:
    mr: list[Dataset]
    ct: list[Dataset]
    ct_folder: Path


@pytest.fixture(scope="module")
def uploaded(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Uploaded:
    ct_folder = repaired_ct_series(tmp_path_factory.mktemp("ct") / "example_ct_dicom")
    mr, ct = read_series(MR_SERIES), read_series(ct_folder)
    client = pacs.client()
    for series in (mr, ct):
        response = client.store_instances(series)
        assert len(response.get("FailedSOPSequence", [])) == 0, response
        stored = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
        assert stored == {str(d.SOPInstanceUID) for d in series}
    return Uploaded(mr, ct, ct_folder)


def _value(attributes: dict[str, Any], tag: str) -> Any:
    return attributes[tag]["Value"][0]


def test_stow_then_qido_finds_both_series(pacs: Pacs, uploaded: Uploaded) -> None:
    client = pacs.client()
    for series in (uploaded.mr, uploaded.ct):
        study, uid = str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID)
        found = client.search_for_series(study, search_filters={"SeriesInstanceUID": uid})
        assert len(found) == 1
        assert _value(found[0], "00080060") == series[0].Modality
        assert int(_value(found[0], "00201209")) == len(series)  # Number of Series Related Instances
        instances = client.search_for_instances(study, uid)
        assert {_value(i, "00080018") for i in instances} == {str(d.SOPInstanceUID) for d in series}


@pytest.mark.parametrize("which", ["mr", "ct"])
def test_wado_series_reads_to_the_same_image(pacs: Pacs, uploaded: Uploaded, which: str, tmp_path: Path) -> None:
    series, local = (uploaded.mr, MR_SERIES) if which == "mr" else (uploaded.ct, uploaded.ct_folder)
    # transfer-syntax=* asks for the stored encoding: the CT is JPEG 2000, which Orthanc without its
    # GDCM plugin cannot transcode to the default (Explicit VR Little Endian) and answers 500.
    retrieved = pacs.client().retrieve_series(str(series[0].StudyInstanceUID), str(series[0].SeriesInstanceUID),
                                              media_types=(("application/dicom", "*"),))
    assert len(retrieved) == len(series)
    for k, ds in enumerate(retrieved):
        ds.save_as(tmp_path / f"{k:04d}.dcm", write_like_original=False)
    remote, ref = read_image(tmp_path, dtype=None), read_image(local, dtype=None)
    assert remote.shape == ref.shape
    assert np.allclose(remote.affine, ref.affine, atol=1e-6, rtol=0)
    assert np.array_equal(remote.array, ref.array)


def test_mr_wado_default_transfer_syntax(pacs: Pacs, uploaded: Uploaded) -> None:
    """Without a transfer-syntax parameter the uncompressed MR comes back as stored."""
    retrieved = pacs.client().retrieve_series(str(uploaded.mr[0].StudyInstanceUID),
                                              str(uploaded.mr[0].SeriesInstanceUID))
    assert len(retrieved) == len(uploaded.mr)


@pytest.mark.parametrize("which", ["mr", "ct"])
def test_sr_stored_by_stow_reads_back_by_wado(pacs: Pacs, uploaded: Uploaded, which: str) -> None:
    series, folder = (uploaded.mr, MR_SERIES) if which == "mr" else (uploaded.ct, uploaded.ct_folder)
    lm, ijk = landmarks_for(folder)
    sr = build_sr(lm, series, algorithm_parameters=["detector=pin"])
    client = pacs.client()
    response = client.store_instances([sr])
    assert len(response.get("FailedSOPSequence", [])) == 0, response
    study = str(series[0].StudyInstanceUID)
    sr_series = client.search_for_series(study, search_filters={"Modality": "SR"})
    assert str(sr.SeriesInstanceUID) in {_value(s, "0020000E") for s in sr_series}
    back = client.retrieve_instance(study, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID))
    frame = str(series[0].FrameOfReferenceUID)
    assert sr_frame_of_reference_uids(back) == {frame}
    got = read_sr(back, frame_of_reference_uid=frame)
    assert got.names == lm.names and np.array_equal(got.found, lm.found)
    assert np.abs(got.xyz_mm_ras[lm.found] - lm.xyz_mm_ras[lm.found]).max() < TOL_MM
    # and, independently of lmk3d's geometry, at the voxels' positions from the DICOM headers
    assert np.abs(got.xyz_mm_lps[lm.found] - header_lps(series, ijk[lm.found])).max() < TOL_MM
    assert isinstance(back, pydicom.Dataset) and back.StudyInstanceUID == study


def test_wrong_credentials_are_refused_with_401(pacs: Pacs) -> None:
    for user, password in ((pacs.user, "wrong-password"), ("nobody", pacs.password)):
        with pytest.raises(requests.HTTPError) as info:
            pacs.client(user, password).search_for_studies()
        assert info.value.response is not None and info.value.response.status_code == 401
        assert "401" in str(info.value) and "Unauthorized" in str(info.value)
    anonymous = requests.get(f"{pacs.url}/studies", timeout=60)
    assert anonymous.status_code == 401
    assert "Basic" in anonymous.headers.get("WWW-Authenticate", "")


def test_pacs_is_unreachable_outside_its_namespace(pacs: Pacs) -> None:
    def probe() -> int | None:
        """HTTP status of an authenticated QIDO request; None when nothing listens."""
        try:
            return requests.get(f"{pacs.url}/studies", auth=(pacs.user, pacs.password), timeout=30).status_code
        except requests.ConnectionError:
            return None

    assert probe() == 200
    # In the original namespace the port is closed (or, if some other server happens to use it
    # there, that server does not know this PACS's random password).
    assert pacs.in_host_namespace(probe) != 200


def test_script_status_and_exec(pacs: Pacs) -> None:
    status = _script(pacs.env, "status")
    assert status.returncode == 0 and f"pid={pacs.pid}" in status.stdout
    code = _script(pacs.env, "exec", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   "-u", f"{pacs.user}:{pacs.password}", f"{pacs.url}/studies")
    assert code.returncode == 0 and code.stdout == "200", code
