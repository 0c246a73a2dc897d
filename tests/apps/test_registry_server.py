"""The model registry through the real server: gated retrains, gated uploads, rollback, restarts, read-only models/.

Issue 19, items 2 and 3 (docs/registry.md). One server per module (``lmk3d serve`` on loopback,
:mod:`tests.apps.server_fixture`), serving a ``mean_shape`` model trained here as the *shipped* model
of a temporary models folder, on labels shifted by :data:`SHIFT_MM`: a poor model by construction. The
studies folder holds :data:`STUDIES` real hippocampus images whose true landmarks are submitted as
final labels. The tests run in file order and build on each other:

1. a retrain on the true labels is a clear improvement on the model's validation cases: accepted as
   ``v0001`` and served;
2. the labels of the *training* cases only are replaced by shifted ones and the model retrained: clearly
   worse on the (unchanged) validation cases, so ``v0002`` is kept as a rejected candidate and ``v0001``
   stays served;
3. an admin uploads the ``v0002`` checkpoint: kept as a candidate (409) unless ``?force=true``;
4. rollbacks need the admin token, walk back through the parents to the shipped checkpoint, then refuse;
5. after a restart the registry is the same; the shipped folder was never written.

Why the shift is -12 mm in x and not +25 mm: the hippocampus crops are ~36 mm wide in x with the
landmarks in its middle, so +25 mm puts every point more than 10 mm outside the image (the datastore
refuses such a label, lmk3d.io.labels.LABEL_MARGIN_MM) and a model predicting there finds nothing
(every MRE NaN). -12 mm keeps every point inside its image and costs ~10 mm of MRE.

A last test serves the repository's own ``models/`` (default ``--models``) with a temporary studies
folder and checks that training leaves ``git status`` of ``models/`` clean. No test measures time.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmk3d.data.samples import Sample
from lmk3d.detectors import detector_class, load_detector
from lmk3d.io import read_image, read_landmarks, read_table, write_landmarks
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate_detector
from lmk3d.registry import WORKSPACE_DIR
from tests.apps.server_fixture import (
    HIPPOCAMPUS,
    Reply,
    Server,
    copy_images,
    launch,
    multipart,
    ready,
    stop,
    tree_digest,
)
from tests.conftest import ROOT

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

MODEL = "mean_shape"
SHIPPED_NAME = f"{MODEL}-hippocampus"
#: Shift of the bad labels (world RAS mm): inside every image, ~10 mm worse than the truth (see above).
SHIFT_MM = (-12.0, 0.0, 0.0)
N_STUDIES = 8
#: The smallest gap (mm) between a good and a bad model's validation MRE that the gate tests rely on.
MARGIN_MM = 5.0
ADMIN_TOKEN = f"registry-admin-{uuid.uuid4().hex}"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRAIN_OPTIONS = {"max_minutes": 0.2, "seed": 0}

TRUTH = read_table(HIPPOCAMPUS / "landmarks.csv")
CASES = sorted(TRUTH)
STUDIES = tuple(CASES[:N_STUDIES])
SHIPPED_TRAINING = tuple(CASES[N_STUDIES:N_STUDIES + 20])  # the shipped model's cases: not in the studies


def shifted(landmarks: LandmarkSet, shift: tuple[float, float, float] = SHIFT_MM) -> LandmarkSet:
    return LandmarkSet(landmarks.names, landmarks.xyz_mm_ras + np.asarray(shift), landmarks.scores, landmarks.found)


def sample(case: str, landmarks: LandmarkSet | None = None) -> Sample:
    return Sample(case, HIPPOCAMPUS / "images" / f"{case}.nii.gz", TRUTH[case] if landmarks is None else landmarks)


def library_mre(folder: Path, cases: list[str]) -> float:
    """The validation MRE (mm) of the checkpoint in ``folder`` on ``cases``' true labels, by the library."""
    overall = evaluate_detector(load_detector(folder, "cpu"), [sample(c) for c in cases]).overall
    assert overall.n_scored == overall.n_truth, "every validation landmark is found: the shift stays inside"
    return float(overall.mre)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class World:
    """The module's server (replaced by the restart test) and what the tests learn on the way."""

    root: Path
    studies: Path
    models: Path
    server: Server
    shipped_digest: dict[str, str]
    learned: dict[str, Any] = field(default_factory=dict)

    @property
    def shipped(self) -> Path:
        return self.models / SHIPPED_NAME

    @property
    def workspace_model(self) -> Path:
        return self.studies / WORKSPACE_DIR / MODEL

    def version_dir(self, vid: str) -> Path:
        return self.workspace_model / "versions" / vid

    def start(self, name: str) -> Server:
        self.server = ready(launch(self.root / name, self.studies, models=self.models,
                                   env={"LMK3D_ADMIN_TOKEN": ADMIN_TOKEN}))
        return self.server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("registry")
    names = TRUTH[CASES[0]].names
    # The shipped model: trained here, on shifted labels, into a models folder of the test's own.
    detector = detector_class(MODEL).create(names, profile="tiny")
    detector.fit([sample(c, shifted(TRUTH[c])) for c in SHIPPED_TRAINING], None, seed=0, max_minutes=0.2,
                 progress=False)
    models = root / "models"
    detector.save(models / SHIPPED_NAME)
    studies = root / "studies"
    copy_images(studies, STUDIES)
    w = World(root, studies, models, None, tree_digest(models / SHIPPED_NAME, skip=()))  # type: ignore[arg-type]
    w.start("server")
    try:
        yield w
    finally:
        stop(w.server.process)


# --- helpers: REST only ---------------------------------------------------------------------------------
def put_label(server: Server, case: str, landmarks: LandmarkSet, folder: Path) -> None:
    path = folder / f"{case}.mrk.json"
    write_landmarks(path, landmarks)
    body, ctype = multipart({"params": (None, b"{}"), "label": (path.name, path.read_bytes())})
    reply = server.request("PUT", f"/datastore/label?image={case}&tag=final", body=body, content_type=ctype)
    assert reply.status == 200, reply


def train(server: Server) -> dict[str, Any]:
    """``POST /train/mean_shape?run_sync=true``; the finished task and ``/info/``'s train_stats."""
    reply = server.request("POST", f"/train/{MODEL}?run_sync=true", body=json.dumps(TRAIN_OPTIONS).encode(),
                           content_type="application/json")
    assert reply.status == 200, reply
    state = server.get_json("/train/")
    details = "\n".join(state.get("details", []))
    assert state["status"] == "DONE", details
    stats = server.get_json("/info/")["train_stats"][MODEL]
    stats["details"] = details
    return dict(stats)


def record(server: Server) -> dict[str, Any]:
    return dict(server.get_json(f"/models/{MODEL}"))


def versions(server: Server) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in record(server)["versions"]}


def infer(server: Server, case: str = STUDIES[0]) -> dict[str, Any]:
    body, ctype = multipart({"params": (None, b"{}")})
    reply = server.request("POST", f"/infer/{MODEL}?image={case}&output=json", body=body, content_type=ctype)
    assert reply.status == 200, reply
    return dict(reply.json())


def assert_serves(world: World, folder: Path, case: str = STUDIES[0]) -> None:
    """Inference answers with the checkpoint in ``folder``, and what the library predicts with it."""
    result = infer(world.server, case)
    assert result["checkpoint"]["path"] == str(folder / "checkpoint.pt")
    expected = load_detector(folder, "cpu").predict(read_image(world.studies / f"{case}.nii.gz"))
    got = np.array([it["ras"] for it in result["landmarks"]], dtype=float)
    assert np.allclose(got, expected.xyz_mm_ras, atol=1e-4), (got, expected.xyz_mm_ras)


def rollback(server: Server, headers: dict[str, str] | None = None, via_delete: bool = False) -> Reply:
    if via_delete:
        return server.request("DELETE", f"/model/{MODEL}", headers=headers)
    return server.request("POST", f"/models/{MODEL}/rollback", headers=headers)


def upload(server: Server, checkpoint: Path, query: str = "", headers: dict[str, str] | None = None) -> Reply:
    body, ctype = multipart({"file": ("checkpoint.pt", checkpoint.read_bytes())})
    return server.request("PUT", f"/model/{MODEL}{query}", body=body, content_type=ctype, headers=headers)


# --- 1. the shipped model, then a gated retrain that is accepted ----------------------------------------
def test_the_shipped_model_is_served_before_any_version(world: World) -> None:
    rec = record(world.server)
    assert rec["current"] == "shipped" and rec["versions"] == []
    assert Path(rec["shipped"]) == world.shipped.resolve()
    assert Path(rec["root"]) == world.workspace_model.resolve()  # the default: <studies>/.lmk3d-workspace
    assert world.server.get_json("/models/")[MODEL]["current"] == "shipped"
    assert_serves(world, world.shipped.resolve())


def test_a_retrain_on_the_true_labels_is_accepted_and_served(world: World, tmp_path: Path) -> None:
    for case in STUDIES:
        put_label(world.server, case, TRUTH[case], tmp_path)
    stats = train(world.server)

    rec = record(world.server)
    val = rec["validation_cases"]
    training = [c for c in STUDIES if c not in val]
    assert val and set(val) < set(STUDIES)
    assert sorted(stats["val_cases"]) == sorted(val) and sorted(stats["train_cases"]) == training
    world.learned.update(val=val, training=training)

    (v1,) = rec["versions"]
    assert v1["id"] == "v0001" and v1["parent"] == "shipped" and v1["status"] == "published"
    assert rec["current"] == "v0001"
    v1_dir = world.version_dir("v0001")
    assert Path(v1["path"]) == v1_dir.resolve()
    # The gate's numbers are the library's, on the validation cases' true labels ...
    before, after = v1["decision"]["compared"]["before"], v1["decision"]["compared"]["after"]
    assert before["val_mre_mm"] == pytest.approx(library_mre(world.shipped, val), abs=1e-6)
    assert after["val_mre_mm"] == pytest.approx(library_mre(v1_dir, val), abs=1e-6)
    assert before["n_val"] == after["n_val"] == len(val)
    assert before["val_found"] == after["val_found"] == 1.0
    # ... and the new version is better by a wide margin, not by chance.
    assert after["val_mre_mm"] + MARGIN_MM < before["val_mre_mm"], (before, after)
    reason = v1["decision"]["reason"]
    assert v1["decision"]["accepted"] is True and reason.startswith("no worse")
    assert f"MRE {after['val_mre_mm']:.3f} mm vs {before['val_mre_mm']:.3f} mm served" in reason

    assert stats["published"] is True and stats["version"] == "v0001" and stats["served_version"] == "v0001"
    assert stats["decision"] == reason
    assert "version v0001 PUBLISHED" in stats["details"]
    # Too few validation cases to fit a trust model: none, and every place that tells of the version says why.
    why = f"{len(val)} validation case(s); calibration needs at least 5"
    assert len(val) < 5 and not (v1_dir / "trust.json").exists()
    assert v1["calibrated"] is False and v1["calibration"]["reason"] == why
    assert stats["calibrated"] is False and stats["calibration"] == why
    assert f"not calibrated: {why}; this version serves the detector's raw scores" in stats["details"]
    assert world.server.get_json("/info/")["model_versions"][MODEL]["current"] == "v0001"
    assert_serves(world, v1_dir.resolve())
    assert "score_meaning" not in infer(world.server) and "tolerance_mm" not in infer(world.server)


# --- 2. a gated retrain that is rejected --------------------------------------------------------------
def test_a_retrain_on_shifted_training_labels_is_rejected_and_v0001_stays_served(world: World,
                                                                                 tmp_path: Path) -> None:
    val, training = world.learned["val"], world.learned["training"]
    assert record(world.server)["validation_cases"] == val  # read back over REST, as a client would
    for case in training:
        put_label(world.server, case, shifted(TRUTH[case]), tmp_path)
    stats = train(world.server)

    rec = record(world.server)
    assert rec["validation_cases"] == val, "the validation cases are fixed"
    assert sorted(stats["train_cases"]) == training and sorted(stats["val_cases"]) == sorted(val)
    # The validation labels were left alone: still the truth.
    for case in val:
        stored = read_landmarks(world.studies / "labels" / "final" / f"{case}.mrk.json")
        assert stored.allclose(TRUTH[case], atol_mm=1e-3)

    by_id = {v["id"]: v for v in rec["versions"]}
    assert list(by_id) == ["v0001", "v0002"]
    v2 = by_id["v0002"]
    assert v2["parent"] == "v0001" and v2["status"] == "rejected" and v2["decision"]["accepted"] is False
    assert by_id["v0001"]["status"] == "published" and rec["current"] == "v0001"
    assert v2["data_fingerprint"] != by_id["v0001"]["data_fingerprint"], "other training labels"
    before, after = v2["decision"]["compared"]["before"], v2["decision"]["compared"]["after"]
    assert before["val_mre_mm"] == pytest.approx(library_mre(world.version_dir("v0001"), val), abs=1e-6)
    assert after["val_mre_mm"] == pytest.approx(library_mre(world.version_dir("v0002"), val), abs=1e-6)
    assert before["val_mre_mm"] + MARGIN_MM < after["val_mre_mm"], (before, after)
    reason = v2["decision"]["reason"]
    assert "has a larger MRE" in reason and "kept as a candidate" in reason
    assert f"MRE {after['val_mre_mm']:.3f} mm vs {before['val_mre_mm']:.3f} mm served" in reason

    assert stats["published"] is False and stats["version"] == "v0002" and stats["served_version"] == "v0001"
    assert stats["decision"] == reason and stats["phase"] == "rejected"
    assert stats["val_mre_mm_before"] == pytest.approx(before["val_mre_mm"], abs=1e-9)
    assert "version v0002 kept as a candidate, NOT published" in stats["details"]
    # The rejected version is kept, with its weights and report.
    assert (world.version_dir("v0002") / "checkpoint.pt").is_file()
    assert (world.version_dir("v0002") / "report.json").is_file()
    assert_serves(world, world.version_dir("v0001").resolve())


# --- 3. an admin's upload goes through the same gate ---------------------------------------------------
def test_an_uploaded_worse_checkpoint_is_kept_as_a_candidate_unless_forced(world: World) -> None:
    worse = world.version_dir("v0002") / "checkpoint.pt"
    n_before = len(versions(world.server))

    reply = upload(world.server, worse)  # no token
    assert reply.status == 401, reply
    assert len(versions(world.server)) == n_before

    reply = upload(world.server, worse, headers=ADMIN)
    assert reply.status == 409, reply
    assert "kept as candidate version v0003, not served" in reply.detail
    assert "has a larger MRE" in reply.detail and "force=true" in reply.detail
    by_id = versions(world.server)
    assert by_id["v0003"]["status"] == "rejected" and by_id["v0003"]["parent"] == "v0001"
    assert sha256(world.version_dir("v0003") / "checkpoint.pt") == sha256(worse)
    assert record(world.server)["current"] == "v0001"
    assert_serves(world, world.version_dir("v0001").resolve())

    reply = upload(world.server, worse, query="?force=true", headers=ADMIN)
    assert reply.status == 200, reply
    answer = reply.json()
    assert answer["version"] == "v0004" and answer["published"] is True and answer["served_version"] == "v0004"
    assert answer["sha256"] == sha256(worse)
    assert "force=true" in answer["decision"] and "has a larger MRE" in answer["decision"]
    # Too few validation cases here for a trust model: the upload serves raw scores and says why.
    assert answer["calibrated"] is False and "calibration needs at least 5" in answer["calibration"], answer
    assert not (world.version_dir("v0004") / "trust.json").exists()
    rec = record(world.server)
    v4 = {v["id"]: v for v in rec["versions"]}["v0004"]
    assert rec["current"] == "v0004" and v4["status"] == "published" and v4["parent"] == "v0001"
    assert v4["decision"]["accepted"] is True and v4["decision"]["reason"] == answer["decision"]
    assert_serves(world, world.version_dir("v0004").resolve())


# --- 4. rollback --------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer not-the-token"}], ids=["none", "wrong"])
@pytest.mark.parametrize("via_delete", [False, True], ids=["post", "delete"])
def test_a_rollback_needs_the_admin_token(world: World, headers: dict[str, str] | None, via_delete: bool) -> None:
    reply = rollback(world.server, headers, via_delete)
    assert reply.status == 401, reply
    assert "admin" in reply.detail
    assert record(world.server)["current"] == "v0004"


def test_rollbacks_walk_back_to_the_shipped_checkpoint_then_refuse(world: World) -> None:
    reply = rollback(world.server, ADMIN)
    assert reply.status == 200, reply
    assert reply.json() == {"model": MODEL, "rolled_back_from": "v0004", "served_version": "v0001"}
    assert record(world.server)["current"] == "v0001"
    assert_serves(world, world.version_dir("v0001").resolve())

    reply = rollback(world.server, ADMIN, via_delete=True)  # DELETE /model/NAME is the same rollback
    assert reply.status == 200, reply
    assert reply.json() == {"model": MODEL, "rolled_back_from": "v0001", "served_version": "shipped"}
    rec = record(world.server)
    assert rec["current"] == "shipped"
    assert world.server.get_json("/models/")[MODEL]["current"] == "shipped"
    statuses = {v["id"]: v["status"] for v in rec["versions"]}
    assert statuses == {"v0001": "rolled_back", "v0002": "rejected", "v0003": "rejected", "v0004": "rolled_back"}
    assert [e["event"] for e in rec["history"]][-2:] == ["rolled_back", "rolled_back"]
    assert_serves(world, world.shipped.resolve())

    for via_delete in (False, True):
        reply = rollback(world.server, ADMIN, via_delete)
        assert reply.status == 409, reply
        assert "nothing before it to roll back to" in reply.detail
    assert record(world.server)["current"] == "shipped"
    assert_serves(world, world.shipped.resolve())


# --- 5. restarts and the read-only shipped folder ----------------------------------------------------------
def test_versions_survive_a_restart(world: World) -> None:
    before = record(world.server)
    assert len(before["versions"]) == 4
    stop(world.server.process)
    world.start("server-restarted")
    after = record(world.server)
    assert after == before
    assert world.server.get_json("/models/")[MODEL]["current"] == "shipped"
    assert world.server.get_json("/info/")["model_versions"][MODEL]["versions"] == 4
    assert_serves(world, world.shipped.resolve())


def test_the_shipped_model_folder_is_never_written(world: World) -> None:
    assert tree_digest(world.shipped, skip=()) == world.shipped_digest
    # Everything the registry wrote is in the workspace, outside the models folder.
    assert sorted(p.name for p in world.models.iterdir()) == [SHIPPED_NAME]
    assert len(list((world.workspace_model / "versions").glob("v*"))) == 4


def test_training_with_the_repository_models_leaves_git_status_clean(tmp_path: Path) -> None:
    models = ROOT / "models"

    def git_status() -> str:
        # --ignored too: a file the server wrote that .gitignore hides is still a write into models/.
        return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "models/"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout

    status_before = git_status()
    digest_before = tree_digest(models, skip=())
    studies = tmp_path / "studies"
    cases = list(STUDIES[:3])
    copy_images(studies, cases)
    server = ready(launch(tmp_path / "server", studies))  # default --models: the repository's models/
    try:
        for case in cases:
            put_label(server, case, TRUTH[case], tmp_path)
        stats = train(server)
        rec = record(server)
        # With no admin token configured, an admin action is refused outright.
        refused = rollback(server)
        assert refused.status == 403, refused
    finally:
        stop(server.process)
    assert stats["version"] == "v0001" and rec["versions"][0]["id"] == "v0001"
    assert Path(rec["shipped"]) == (models / SHIPPED_NAME).resolve()
    assert Path(rec["root"]) == (studies / WORKSPACE_DIR / MODEL).resolve()
    assert (studies / WORKSPACE_DIR / MODEL / "versions" / "v0001" / "checkpoint.pt").is_file()
    assert git_status() == "", f"models/ changed (before: {status_before!r})"
    assert tree_digest(models, skip=()) == digest_before
