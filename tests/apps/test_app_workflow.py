"""The landmarks app's whole loop on a real server: detect, correct, submit, retrain, pick the next image.

One server per module, started with ``lmk3d.serve.start_server`` on a free 127.0.0.1 port, serving one
model trained here into a temporary models folder (the ``mean_shape`` baseline, which trains in a
second; the ``cascade`` detector's ``tiny`` profile until the baseline has landed), with a temporary
studies folder of real hippocampus MR images plus a corrupt file and a 2D image. Driven with
monailabel's own ``MONAILabelClient`` and plain HTTP; stopped by PID when the module is done.

The tests run in file order and build on each other, as a radiologist's session does: nothing is
labelled at first (training must be refused), then corrected labels are submitted, bad uploads must
leave them alone, a short training run adds a model version that the gate serves or keeps as a candidate,
and the next infer must use the served one.
No test measures time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
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

from lmk3d.data.samples import Sample
from lmk3d.detectors import Detector, detector_class, detector_names, load_detector
from lmk3d.io import read_image, read_landmarks, read_table, write_image, write_landmarks
from lmk3d.io.markups import validate_markups
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import radial_errors
from lmk3d.serve import start_server, wait_until_ready
from tests.conftest import DATA, SCHEMA

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

HIPPOCAMPUS = DATA / "hippocampus"
STUDIES = ("hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_008", "hippocampus_014")
CORRUPT, FLAT = "corrupt_scan", "flat_2d"
TRAINING_CASES = 6  # trained in the fixture on cases not among STUDIES
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Bounds on a hung server or training process, not speed checks (the machine may be busy).
STARTUP_TIMEOUT_S = 600.0
TRAIN_TIMEOUT_S = 900.0


def _served_detector() -> tuple[str, str]:
    """The fastest detector to train: the baseline when it is registered."""
    name = "mean_shape" if "mean_shape" in detector_names() else "cascade"
    profiles = detector_class(name).profiles
    return name, "tiny" if "tiny" in profiles else next(iter(profiles))


MODEL, PROFILE = _served_detector()


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    studies: Path
    models: Path
    log: Path
    truth: dict[str, LandmarkSet]
    names: tuple[str, ...]
    train_mre_mm: float

    @property
    def model_dir(self) -> Path:
        return self.models / f"{MODEL}-hippocampus"

    def request(self, method: str, path: str, *, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with HTTP.open(req, timeout=600) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def get_json(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)

    def post_json(self, path: str, payload: dict[str, Any] | None = None) -> tuple[int, Any]:
        status, body, _ = self.request("POST", path, body=json.dumps(payload or {}).encode(),
                                       content_type="application/json")
        return status, json.loads(body) if body else None

    def infer(self, image: str, output: str, params: dict[str, Any] | None = None,
              model: str = MODEL) -> tuple[int, bytes, dict[str, str]]:
        body, ctype = _multipart({"params": (None, json.dumps(params or {}).encode())})
        return self.request("POST", f"/infer/{model}?image={image}&output={output}", body=body, content_type=ctype)

    def put_label(self, image: str, file_name: str, data: bytes, params: dict[str, Any] | None = None,
                  tag: str = "final") -> tuple[int, Any]:
        body, ctype = _multipart({"params": (None, json.dumps(params or {}).encode()), "label": (file_name, data)})
        status, raw, _ = self.request("PUT", f"/datastore/label?image={image}&tag={tag}", body=body,
                                      content_type=ctype)
        return status, json.loads(raw)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, (file_name, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{file_name}"' if file_name else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (monailabel and a training child, if any) by PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("workflow")
    truth = read_table(HIPPOCAMPUS / "landmarks.csv")
    names = truth[STUDIES[0]].names

    # The served model, trained here on cases the studies folder does not hold.
    train_cases = [c for c in sorted(truth) if c not in STUDIES][:TRAINING_CASES]
    samples = [Sample(c, HIPPOCAMPUS / "images" / f"{c}.nii.gz", truth[c]) for c in train_cases]
    detector = detector_class(MODEL).create(names, profile=PROFILE)
    detector.fit(samples, None, seed=0, max_minutes=0.2, progress=False)
    models = root / "models"
    detector.save(models / f"{MODEL}-hippocampus")
    preds = {s.case: detector.predict(s.load_image()) for s in samples}
    errors = np.concatenate([radial_errors(preds[c], truth[c]) for c in train_cases])
    train_mre_mm = float(np.nanmean(errors))

    studies = root / "studies"
    studies.mkdir()
    for case in STUDIES:
        (studies / f"{case}.nii.gz").write_bytes((HIPPOCAMPUS / "images" / f"{case}.nii.gz").read_bytes())
    (studies / f"{CORRUPT}.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(2000))  # gzip magic, then garbage
    write_image(studies / f"{FLAT}.nii.gz", np.zeros((40, 40, 1), np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))

    port = _free_port()
    log = root / "server.log"
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    with log.open("wb") as out:
        process = start_server(studies, port=port, models_dir=models, env=env, stdout=out,
                               stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    request.addfinalizer(lambda: _stop(process))
    url = f"http://127.0.0.1:{port}"
    failure = ""
    try:
        wait_until_ready(url, process, timeout_s=STARTUP_TIMEOUT_S, log_file=log)
    except RuntimeError as e:
        failure = f"the server did not start: {e}"
    if failure:
        pytest.fail(failure, pytrace=False)
    yield Server(url, process, studies, models, log, truth, names, train_mre_mm)


def _landmarks_from_json(result: dict[str, Any]) -> LandmarkSet:
    items = result["landmarks"]
    xyz = np.array([it["ras"] if it["ras"] is not None else [np.nan] * 3 for it in items], dtype=float)
    return LandmarkSet(tuple(it["name"] for it in items), xyz, np.array([it["score"] for it in items]),
                       np.array([it["found"] for it in items]))


def _library_prediction(server: Server, case: str) -> tuple[Detector, LandmarkSet]:
    detector = load_detector(server.model_dir, "cpu")
    return detector, detector.predict(read_image(server.studies / f"{case}.nii.gz"))


# --- the model as clients see it ----------------------------------------------------------------------
def test_info_lists_the_model_with_its_landmarks_and_options(server: Server) -> None:
    from monailabel.client import MONAILabelClient

    info = MONAILabelClient(server.url).info()
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {n: i + 1 for i, n in enumerate(server.names)}
    assert model["config"]["landmark_output"] == ["label", "markups"]
    assert info["trainers"][MODEL]["config"]["init"] == ["current", "scratch"]
    assert {"random", "first", "least_confident"} <= set(info["strategies"])
    assert list(info["labels"]) == list(server.names)
    assert MODEL not in info["unavailable_models"]


def test_infer_json_gives_the_library_prediction_with_centroids_and_latencies(server: Server) -> None:
    case = STUDIES[0]
    status, body, _ = server.infer(case, "json")
    assert status == 200, body
    result = json.loads(body)
    got = _landmarks_from_json(result)
    detector, expected = _library_prediction(server, case)

    # The server answers what the library predicts, through the same reader.
    assert got.names == server.names
    assert np.array_equal(got.found, expected.found)
    assert np.allclose(got.scores, expected.scores)
    assert got.allclose(expected, atol_mm=1e-4)
    # ... which is as accurate here as the model is on its own training cases.
    err = radial_errors(got, server.truth[case])
    assert np.nanmean(err) <= 3.0 * server.train_mre_mm + 2.0, (err, server.train_mre_mm)

    image = read_image(server.studies / f"{case}.nii.gz")
    assert result["label_names"] == {n: i + 1 for i, n in enumerate(server.names)}
    centroids = {}
    for item in result["landmarks"]:
        assert item["label"] == result["label_names"][item["name"]]
        if item["found"]:
            assert np.allclose(item["lps"], [-item["ras"][0], -item["ras"][1], item["ras"][2]])
            assert np.allclose(item["ijk"], image.ras_to_ijk(np.array(item["ras"])), atol=1e-6)
            centroids[f"label_{item['label']}"] = [int(v) for v in np.rint(item["ijk"])]
    assert result["centroids"] == [{k: v} for k, v in centroids.items()]
    prediction = detector.predict_all(image)
    stages = list(prediction.latencies)
    assert list(result["latencies"]) == ["load", *stages, "write", "total"]
    # Each stage's own landmarks, in order, as the library reports them (latencies aside).
    assert [s["name"] for s in result["stages"]] == [s["name"] for s in prediction.stages_json()]
    for got_stage, want_stage in zip(result["stages"], prediction.stages_json(), strict=True):
        assert got_stage["seconds"] >= 0
        assert [p["name"] for p in got_stage["landmarks"]] == list(server.names)
        for got_point, want_point in zip(got_stage["landmarks"], want_stage["landmarks"], strict=True):
            assert got_point["found"] == want_point["found"]
            if want_point["found"]:
                assert np.allclose(got_point["xyz_mm_ras"], want_point["xyz_mm_ras"], atol=1e-4)
    assert all(v >= 0 for v in result["latencies"].values())
    assert result["checkpoint"]["mtime_ns"] == (server.model_dir / "checkpoint.pt").stat().st_mtime_ns


def test_infer_image_markups_is_a_valid_slicer_point_list(server: Server, tmp_path: Path) -> None:
    case = STUDIES[1]
    status, body, headers = server.infer(case, "image", {"landmark_output": "markups"})
    assert status == 200, body
    assert ".mrk.json" in headers["content-disposition"]  # Slicer loads a .json result as markups
    doc = json.loads(body)
    validate_markups(doc, SCHEMA)
    path = tmp_path / "result.mrk.json"
    path.write_bytes(body)
    _, expected = _library_prediction(server, case)
    assert read_landmarks(path).allclose(expected, atol_mm=1e-3)


OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}  # what OHIF sends


@pytest.mark.parametrize("params", [{}, OHIF_PARAMS], ids=["default", "ohif"])
def test_infer_image_label_map_decodes_back_to_the_points(server: Server, tmp_path: Path,
                                                          params: dict[str, Any]) -> None:
    case = STUDIES[2]
    status, body, headers = server.infer(case, "image", {"landmark_output": "label", **params})
    assert status == 200, body
    suffix = params.get("result_extension", ".nii.gz")
    assert f'{suffix}"' in headers["content-disposition"]
    path = tmp_path / f"result{suffix}"
    path.write_bytes(body)
    if suffix == ".nrrd":
        assert b"encoding: raw" in body[:1000]  # what OHIF's NRRD reader needs

    labels = read_image(path, dtype=None)
    image = read_image(server.studies / f"{case}.nii.gz")
    assert labels.shape == image.shape and np.allclose(labels.affine, image.affine, atol=1e-4)
    assert labels.array.dtype == np.uint8
    _, expected = _library_prediction(server, case)
    values = set(np.unique(labels.array).tolist()) - {0}
    assert values == {k + 1 for k in np.flatnonzero(expected.found)}
    decoded = read_landmarks(path, server.names)
    assert np.array_equal(decoded.found, expected.found)
    f = expected.found
    assert np.allclose(decoded.xyz_mm_ras[f], expected.xyz_mm_ras[f], atol=1.5)


def test_infer_all_through_monailabel_client(server: Server, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    result_file, params = client.infer(MODEL, STUDIES[3], {"landmark_output": "markups"})
    assert result_file.endswith(".mrk.json") and Path(result_file).is_file()
    assert read_landmarks(result_file).allclose(_landmarks_from_json(params), atol_mm=1e-3)
    assert params["landmark_output"] == "markups"


# --- bad input: a 4xx with a message, and the server keeps serving --------------------------------------
@pytest.mark.parametrize(("path", "params", "status", "message"), [
    (f"/infer/{MODEL}?image=no_such_image&output=json", {}, 404, "unknown image 'no_such_image'"),
    (f"/infer/no_such_model?image={STUDIES[0]}&output=json", {}, 404, "unknown model 'no_such_model'"),
    (f"/infer/{MODEL}?image={CORRUPT}&output=json", {}, 422, f"cannot detect landmarks in image '{CORRUPT}'"),
    (f"/infer/{MODEL}?image={FLAT}&output=json", {}, 422, "expected a 3D image"),
    (f"/infer/{MODEL}?image={STUDIES[0]}&output=json", {"landmark_output": "points"}, 422,
     "landmark_output 'points' is not one of label, markups"),
    (f"/infer/{MODEL}?image={STUDIES[0]}&output=image", {"result_extension": ".png"}, 422,
     "result_extension '.png' cannot hold a label map"),
])
def test_bad_infer_requests_are_4xx_with_a_message(server: Server, path: str, params: dict[str, Any], status: int,
                                                   message: str) -> None:
    before = _tree_digest(server.models)
    body, ctype = _multipart({"params": (None, json.dumps(params).encode())})
    got, raw, _ = server.request("POST", path, body=body, content_type=ctype)
    assert got == status, raw
    assert message in json.loads(raw)["detail"]
    assert server.get_json("/info/")["models"][MODEL]
    assert _tree_digest(server.models) == before


def test_training_without_labels_is_refused(server: Server) -> None:
    status, answer = server.post_json(f"/train/{MODEL}", {"max_minutes": 0.1})
    assert status == 409, answer
    assert "no final labels" in answer["detail"] and "PUT /datastore/label" in answer["detail"]
    assert server.get_json("/info/")["datastore"]["completed"] == 0


@pytest.mark.parametrize(("model", "params", "status", "message"), [
    ("no_such_model", {}, 404, "unknown model 'no_such_model'"),
    (MODEL, {"init": "pretrained"}, 422, "init 'pretrained' is not one of current, scratch"),
    (MODEL, {"max_minutes": -1}, 422, "max_minutes -1 must be a number in (0, 1440]"),
])
def test_bad_train_requests_are_4xx_with_a_message(server: Server, model: str, params: dict[str, Any], status: int,
                                                   message: str) -> None:
    got, answer = server.post_json(f"/train/{model}", params)
    assert got == status, answer
    assert message in answer["detail"]


def test_unknown_strategy_is_404(server: Server) -> None:
    status, answer = server.post_json("/activelearning/no_such_strategy")
    assert status == 404 and "unknown strategy 'no_such_strategy'" in answer["detail"], answer


# --- correct and submit ---------------------------------------------------------------------------------
def test_submit_a_corrected_markups_and_a_sphere_label_map(server: Server, tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    a, b, c = STUDIES[:3]
    # A radiologist's corrections: the truth, one landmark left out on the first (partial annotation).
    partial = server.truth[a].reorder(server.names[:-1])
    write_landmarks(tmp_path / f"{a}.mrk.json", partial)
    assert client.save_label(a, str(tmp_path / f"{a}.mrk.json"), tag="final")["label"] == a
    # What Slicer's "Submit Label" sends: the segments as a label map, with their names and values.
    image_b = read_image(server.studies / f"{b}.nii.gz")
    write_landmarks(tmp_path / f"{b}.nii.gz", server.truth[b], image_b)
    label_info = [{"name": n, "idx": i + 1} for i, n in enumerate(server.names)]
    status, answer = server.put_label(b, f"{b}.nii.gz", (tmp_path / f"{b}.nii.gz").read_bytes(),
                                      {"label_info": label_info, "model": MODEL})
    assert status == 200, answer
    write_landmarks(tmp_path / f"{c}.fcsv", server.truth[c])
    status, answer = server.put_label(c, f"{c}.fcsv", (tmp_path / f"{c}.fcsv").read_bytes())
    assert status == 200, answer

    objects = client.datastore()["objects"]
    assert {i: objects[i]["labels"]["final"]["ext"] for i in (a, b, c)} == {a: ".mrk.json", b: ".nii.gz", c: ".fcsv"}
    stored = read_landmarks(server.studies / "labels" / "final" / f"{a}.mrk.json")
    assert stored.allclose(partial, atol_mm=1e-3)
    decoded = read_landmarks(server.studies / "labels" / "final" / f"{b}.nii.gz", server.names)
    assert decoded.allclose(server.truth[b], atol_mm=1.0)


@pytest.mark.parametrize(("image", "file_name", "content", "params", "status", "message"), [
    (STUDIES[0], "x.mrk.json", b'{"points": []}', {}, 422, "not a Slicer markups document"),
    (STUDIES[0], "x.mrk.json", b"{not json", {}, 422, "not valid JSON"),
    (STUDIES[0], "x.fcsv", b"# Markups fiducial file version = 4.11\nnot,a,fiducial\n", {}, 422, "rejected"),
    (STUDIES[0], "x.mrk.json", None, {}, 422, "unknown landmark(s) NOSE_TIP"),
    (STUDIES[1], "x.nii.gz", "label_value_99", {}, 422, "label values [99] have no landmark name"),
    (STUDIES[1], "x.nii.gz", "empty", {}, 422, "no placed landmark"),
    (STUDIES[1], "x.png", b"\x89PNG", {}, 422, "unknown label type"),
    ("no_such_image", "x.mrk.json", None, {}, 404, "unknown image 'no_such_image'"),
])
def test_bad_labels_are_4xx_and_leave_the_stored_labels_alone(server: Server, image: str, file_name: str,
                                                              content: Any, params: dict[str, Any], status: int,
                                                              message: str) -> None:
    labels = server.studies / "labels" / "final"
    before = _tree_digest(labels)
    assert before, "the submission test stores labels first"
    if content is None:  # a well-formed point list naming a landmark the model does not have
        data = json.dumps(_markups_with_label("NOSE_TIP")).encode()
    elif isinstance(content, str):
        ref = read_image(server.studies / f"{image}.nii.gz")
        arr = np.zeros(ref.shape, np.uint8)
        if content == "label_value_99":
            arr[2:5, 2:5, 2:5] = 99
        path = server.studies.parent / f"bad_{content}.nii.gz"
        write_image(path, arr, ref.affine)
        data = path.read_bytes()
    else:
        data = content
    got, answer = server.put_label(image, file_name, data, params)
    assert got == status, answer
    assert message in answer["detail"]
    assert _tree_digest(labels) == before
    assert server.get_json("/info/")["datastore"]["completed"] == 3


def _markups_with_label(label: str) -> dict[str, Any]:
    from lmk3d.io.markups import markups_dict

    return markups_dict(LandmarkSet.from_dict({label: (1.0, 2.0, 3.0)}))


# --- retrain, then infer with the new weights -----------------------------------------------------------
def test_train_briefly_adds_a_version_served_only_if_the_gate_allows(server: Server) -> None:
    shipped_before = _digest(server.model_dir)
    status, task = server.post_json(f"/train/{MODEL}", {"init": "current", "max_minutes": 0.1, "val_fraction": 0.34})
    # the task may already have started by the time the answer comes back
    assert status == 200 and task["status"] in ("SUBMITTED", "RUNNING"), task

    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        state = server.get_json("/train/")
        if state["id"] == task["id"] and state["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, f"training still {state['status']} after {TRAIN_TIMEOUT_S} s"
        time.sleep(1.0)
    details = "\n".join(state.get("details", []))
    assert state["status"] == "DONE", details

    stats = server.get_json("/info/")["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["init"] == "current" and stats["version"] == "v0001"
    assert stats["n_train"] + stats["n_val"] == 3 and stats["n_val"] >= 1 and stats["n_train"] >= 1
    assert 0.0 <= stats["best_metric"] <= 1.0
    assert f"version v0001 {'PUBLISHED' if stats['published'] else 'kept as a candidate'}" in details
    record = server.get_json(f"/models/{MODEL}")
    (version,) = record["versions"]
    assert version["parent"] == "shipped" and version["decision"]["reason"] == stats["decision"]
    assert version["status"] == ("published" if stats["published"] else "rejected")
    assert record["validation_cases"] == stats["val_cases"]
    assert not set(stats["val_cases"]) & set(stats["train_cases"])
    # The gate's rule, on the numbers it reported: no worse MRE and no fewer landmarks found.
    before, after = version["decision"]["compared"]["before"], version["decision"]["compared"]["after"]
    assert stats["published"] == (after["val_mre_mm"] <= before["val_mre_mm"]
                                  and after["val_found"] >= before["val_found"])
    assert _digest(server.model_dir) == shipped_before, "the shipped model folder was written"
    served_dir = Path(version["path"]) if stats["published"] else server.model_dir
    assert record["current"] == ("v0001" if stats["published"] else "shipped")

    status, body, _ = server.infer(STUDIES[4], "json")
    assert status == 200, body
    result = json.loads(body)
    assert result["checkpoint"]["path"] == str(served_dir / "checkpoint.pt")
    expected = load_detector(served_dir, "cpu").predict_all(read_image(server.studies / f"{STUDIES[4]}.nii.gz"))
    assert _landmarks_from_json(result).allclose(expected.landmarks, atol_mm=1e-4)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- active learning ------------------------------------------------------------------------------------
def test_least_confident_picks_the_unlabelled_image_with_the_lowest_mean_score(server: Server) -> None:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url)
    unlabelled = [c for c in STUDIES[3:]]  # the first three have final labels now
    # Scores are computed in the background (lib/background.py): poll until every image is scored or skipped.
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        answer = client.next_sample("least_confident", {})
        if answer["scored"] == answer["candidates"] == len(unlabelled) and len(answer["skipped"]) == 2:
            break
        assert time.monotonic() < deadline, f"background scoring not done after {TRAIN_TIMEOUT_S} s: {answer}"
        time.sleep(0.5)
    detector = load_detector(server.model_dir, "cpu")
    mean_score = {c: float(np.mean(detector.predict(read_image(server.studies / f"{c}.nii.gz")).scores))
                  for c in unlabelled}
    best = min(mean_score, key=lambda c: (mean_score[c], c))
    assert answer["id"] == best, (answer, mean_score)
    assert answer["confidence"] == pytest.approx(mean_score[best], abs=1e-9)
    assert answer["candidates"] == len(unlabelled)
    assert set(answer["skipped"]) == {CORRUPT, FLAT}  # unreadable images are skipped, not fatal
    assert client.next_sample("least_confident", {"reduce": "min"})["id"] in unlabelled
    assert client.next_sample("first", {})["id"] in {*unlabelled, CORRUPT, FLAT}
    assert client.next_sample("random", {})["id"] in {*unlabelled, CORRUPT, FLAT}


