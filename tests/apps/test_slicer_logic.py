"""The Landmark Review Slicer module's logic (plugins/slicer/LandmarkReview, issue 19 item 4) against the real server.

The module's widgets need 3D Slicer and are not tested here; everything else lives in
``LandmarkReviewLib/landmark_review.py``, plain Python that this module drives as the widgets do. One
server for the module (:mod:`tests.apps.server_fixture`): ``lmk3d serve`` on loopback with a token
(``LMK3D_API_TOKEN``), a copy of the shipped ``mean_shape-hippocampus`` model and a studies folder of
four real hippocampus images. The tests run in file order, as a reviewer's session does: detect,
correct and submit two images, have a bad submission refused, ask for the next image, train.

What the server stored is read back with the library (:func:`lmk3d.io.labels.read_label` on the file
in ``labels/final/``), and the documents the logic writes are checked against Slicer's markups schema
and :func:`lmk3d.io.markups.parse_markups`; the logic itself must not import lmk3d. No test measures time.
"""

from __future__ import annotations

import ast
import importlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from lmk3d.io.labels import read_label
from lmk3d.io.markups import parse_markups, validate_markups
from tests.apps.server_fixture import Server, copy_images, copy_model, launch, ready, stop
from tests.conftest import ROOT, SCHEMA

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

PLUGIN = ROOT / "plugins" / "slicer" / "LandmarkReview"
LOGIC = PLUGIN / "LandmarkReviewLib" / "landmark_review.py"
MODEL = "mean_shape"
STUDIES = ("hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_008")
TOKEN = "review-token"
# A bound on a hung training process, not a speed check (the machine may be busy).
TRAIN_TIMEOUT_S = 900.0


def _logic() -> ModuleType:
    """``LandmarkReviewLib.landmark_review``, imported as Slicer does (the module's folder on the path)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        return importlib.import_module("LandmarkReviewLib.landmark_review")
    finally:
        sys.path.remove(str(PLUGIN))


lr = _logic()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("slicer_review")
    studies, models = root / "studies", root / "models"
    copy_images(studies, STUDIES)
    copy_model(models, f"{MODEL}-hippocampus")
    server = ready(launch(root / "server", studies, models=models, env={"LMK3D_API_TOKEN": TOKEN}))
    yield server
    stop(server.process)


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return lr.ServerClient(server.url + "/", token=TOKEN)


def detect(client: Any, case: str) -> Any:
    return lr.ReviewSession.from_detection(case, MODEL, client.detect(MODEL, case))


def stored_label(server: Server, case: str, names: list[str]) -> Any:
    """The final label the server stored for ``case``, decoded by the library, in ``names`` order."""
    return read_label(server.studies / "labels" / "final" / f"{case}.mrk.json", names)


# --- the logic alone --------------------------------------------------------------------------------------------
def test_the_logic_imports_only_the_standard_library() -> None:
    tree = ast.parse(LOGIC.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported and imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


def _point(name: str, score: float, ras: list[float] | None) -> dict[str, Any]:
    lps = None if ras is None else [-ras[0], -ras[1], ras[2]]
    return {"name": name, "ras": ras, "lps": lps, "score": score, "found": ras is not None}


def test_not_found_points_come_first_then_the_lowest_score() -> None:
    result = {"landmarks": [_point("a", 0.9, [1.0, 2.0, 3.0]), _point("b", 0.2, [4.0, 5.0, 6.0]),
                            _point("c", 0.7, None), _point("d", 0.2, [7.0, 8.0, 9.0]), _point("e", 0.1, None),
                            _point("f", 0.55, [1.5, 2.5, 3.5])]}
    review = lr.ReviewSession.from_detection("case", "m", result)
    assert [p.name for p in review.points] == ["e", "c", "b", "d", "f", "a"]
    assert [p.name for p in review.points if p.warning] == ["e", "c", "b", "d"]  # not found or score < 0.5
    assert review.names == ["a", "b", "c", "d", "e", "f"]
    assert review.next_pending().name == "e"

    with pytest.raises(ValueError, match="e was not found by the detector: place it or mark it not visible"):
        review.accept("e")
    with pytest.raises(ValueError, match="is not 3 finite numbers"):
        review.move("b", [1.0, float("nan"), 2.0])
    with pytest.raises(KeyError, match="no landmark 'z' on image 'case'"):
        review.point("z")

    review.move("e", [10.0, 11.0, 12.0])  # placed by the reviewer
    review.mark_not_visible("c")
    assert review.sync({"b": [4.0, 5.0, 6.0 + 5e-4], "d": [7.0, 8.0, 10.0], "c": None}) == ["d"]
    review.accept("b")
    assert [(p.name, p.status) for p in review.points] == [
        ("e", lr.PLACED), ("c", lr.NOT_VISIBLE), ("b", lr.ACCEPTED), ("d", lr.MOVED), ("f", lr.PENDING),
        ("a", lr.PENDING)]
    assert review.next_pending().name == "f"

    doc = review.markups()
    validate_markups(doc, SCHEMA)
    got = parse_markups(doc)
    assert got.names == ("a", "b", "c", "d", "e", "f")
    assert got.found.tolist() == [True, True, False, True, True, True]
    expected = np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0], [7, 8, 10], [10, 11, 12], [1.5, 2.5, 3.5]], float)
    found = got.found
    assert np.allclose(got.xyz_mm_ras[found], expected[found], atol=1e-9)
    assert np.all(got.scores == 1.0)  # a reviewed point is certain: no "score=" in its description


def test_an_image_the_model_does_not_recognise_is_said_so() -> None:
    result = {"landmarks": [_point("a", 0.0, None)], "score_meaning": "probability that ... within 3 mm",
              "image_check": {"in_distribution": False, "score": 0.0, "reason": "the image looks like CT"}}
    review = lr.ReviewSession.from_detection("case", "m", result)
    assert review.image_warning == "The model does not recognise this image: the image looks like CT"
    assert lr.ReviewSession.from_detection("case", "m", {"landmarks": [_point("a", 0.9, [1.0, 2, 3])]}
                                           ).image_warning == ""
    unusual = {"in_distribution": True, "atypical": True, "score": 0.01, "reason": "farther than ...: capped at 0.2"}
    warning = lr.ReviewSession.from_detection("case", "m", {"landmarks": [_point("a", 0.2, [1.0, 2, 3])],
                                                            "image_check": unusual}).image_warning
    assert warning.startswith("The model finds this image unusual") and "capped at 0.2" in warning


def test_a_review_with_nothing_placed_is_not_sent() -> None:
    review = lr.ReviewSession.from_detection("case", "m", {"landmarks": [_point("a", 0.9, [1.0, 2.0, 3.0])]})
    review.mark_not_visible("a")
    with pytest.raises(ValueError, match="no landmark placed on 'case'"):
        review.submit(lr.ServerClient("http://127.0.0.1:9"))  # refused before any request


def test_training_progress_reads_the_stock_fields() -> None:
    running = lr.TrainingProgress.from_answers(MODEL, {"status": "RUNNING", "details": ["x"]},
                                               {"phase": "training: heatmap", "epoch": 3, "total_epochs": 12})
    assert running.running and running.fraction == pytest.approx(0.25)
    assert running.text() == "RUNNING: training: heatmap (epoch 3/12)"
    done = lr.TrainingProgress.from_answers(MODEL, {"status": "DONE"}, {
        "phase": "rejected", "epoch": 12, "total_epochs": 12, "published": False, "version": "v0002",
        "decision": "worse on 2 validation case(s)"})
    assert not done.running and done.fraction == 1.0 and done.published is False
    assert done.text() == "DONE: rejected; v0002 kept as a candidate: worse on 2 validation case(s)"
    assert lr.TrainingProgress.from_answers(MODEL, {}, {}).text() == "no training since the server started"


# --- against the server --------------------------------------------------------------------------------------------
def test_models_are_listed_and_a_missing_token_is_a_clear_refusal(server: Server, client: Any) -> None:
    assert client.models() == [MODEL]
    with pytest.raises(lr.ServerError) as refused:
        lr.ServerClient(server.url).detect(MODEL, STUDIES[0])
    assert refused.value.status == 401 and "needs a token" in refused.value.message, refused.value
    with pytest.raises(lr.ServerError) as unknown:
        client.detect(MODEL, "no_such_image")
    assert 400 <= unknown.value.status < 500 and "no_such_image" in unknown.value.message, unknown.value
    progress = client.training_progress(MODEL)
    assert progress.status == "" and not progress.running  # no training since the server started


def test_detection_is_reviewed_lowest_score_first(server: Server, client: Any, tmp_path: Path) -> None:
    result = client.detect(MODEL, STUDIES[0])
    review = lr.ReviewSession.from_detection(STUDIES[0], MODEL, result)
    keys = [(p.found, p.score) for p in review.points]
    assert keys == sorted(keys)
    assert sorted(p.name for p in review.points) == sorted(item["name"] for item in result["landmarks"])
    for item in result["landmarks"]:
        p = review.point(item["name"])
        assert p.status == lr.PENDING and p.score == item["score"] and p.found == item["found"]
        assert p.detected_ras == (tuple(item["ras"]) if item["found"] else None)
        assert p.warning == (not item["found"] or item["score"] < lr.WARN_SCORE)
    # the shipped model is calibrated: the server says what the score means and that the image is of its kind
    assert review.image_check.get("in_distribution") is True and review.image_warning == ""
    assert "within 3 mm" in review.score_meaning
    assert all(p.radius_mm is not None and p.radius_mm > 0 for p in review.points if p.found)
    path = Path(client.download_image(STUDIES[0], str(tmp_path)))
    assert path.name == f"{STUDIES[0]}.nii.gz"
    assert path.read_bytes() == (server.studies / f"{STUDIES[0]}.nii.gz").read_bytes()


def test_two_moved_points_are_stored_and_the_others_as_detected(server: Server, client: Any) -> None:
    case = STUDIES[0]
    review = detect(client, case)
    first, second = review.points[0], review.points[1]
    new_first = np.add(first.detected_ras, [1.5, -2.25, 0.75])
    new_second = np.add(second.detected_ras, [-0.5, 1.0, -1.125])
    review.move(first.name, new_first)
    review.sync({second.name: list(new_second), first.name: list(new_first)})  # what a drag in Slicer hands over
    review.accept(review.points[2].name)
    assert (first.status, second.status) == (lr.MOVED, lr.MOVED)
    validate_markups(review.markups(), SCHEMA)

    answer = review.submit(client)
    assert answer["image"] == case, answer
    stored = stored_label(server, case, review.names)
    assert stored.names == tuple(review.names) and stored.found.all()
    for k, name in enumerate(stored.names):
        expected = {first.name: new_first, second.name: new_second}.get(name, review.point(name).detected_ras)
        assert np.allclose(stored.xyz_mm_ras[k], expected, atol=1e-3), name


def test_a_point_marked_not_visible_is_stored_as_not_annotated(server: Server, client: Any) -> None:
    case = STUDIES[1]
    review = detect(client, case)
    hidden = review.points[-1].name
    review.mark_not_visible(hidden)
    for p in review.pending():
        review.accept(p.name)
    review.submit(client)
    stored = stored_label(server, case, review.names)
    assert {n: bool(f) for n, f in zip(stored.names, stored.found, strict=True)} == \
        {n: n != hidden for n in review.names}
    for k, name in enumerate(stored.names):
        if name != hidden:
            assert np.allclose(stored.xyz_mm_ras[k], review.point(name).detected_ras, atol=1e-3), name


def test_a_point_far_outside_the_image_surfaces_the_server_422(server: Server, client: Any) -> None:
    case = STUDIES[2]
    review = detect(client, case)
    stray = review.points[0]
    review.move(stray.name, np.add(stray.detected_ras, [500.0, 0.0, 0.0]))
    with pytest.raises(lr.ServerError) as refused:
        review.submit(client)
    error = refused.value
    assert error.status == 422, error
    assert f"'{stray.name}'" in error.message and "outside image" in error.message, error.message
    assert not (server.studies / "labels" / "final" / f"{case}.mrk.json").exists()


def test_next_image_is_one_without_a_final_label(client: Any) -> None:
    answer = client.next_image()
    assert answer["id"] in STUDIES[2:], answer  # the first two have final labels now


def test_training_runs_and_its_progress_ends_with_the_gate_decision(client: Any) -> None:
    task = client.start_training(MODEL, {"max_minutes": 0.2})
    assert task["status"] in lr.RUNNING_STATES, task
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        progress = client.training_progress(MODEL)
        assert 0.0 <= progress.fraction <= 1.0 and progress.epoch <= progress.total_epochs
        if not progress.running:
            break
        assert time.monotonic() < deadline, f"training still {progress.status} after {TRAIN_TIMEOUT_S} s"
        time.sleep(1.0)
    assert progress.status == "DONE", "\n".join(progress.details)
    assert progress.epoch == progress.total_epochs and progress.fraction == 1.0
    assert isinstance(progress.published, bool) and progress.decision, progress.stats
    assert progress.stats["version"] == "v0001" and progress.stats["n_train"] + progress.stats["n_val"] == 2
    assert progress.decision in progress.text() and "v0001" in progress.text()
