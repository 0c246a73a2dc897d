"""Fast active learning: scores computed in the background, ``least_confident`` answered from the cache.

In-process tests drive :class:`lib.background.BackgroundScorer` and :class:`LeastConfident` with a
real ``LocalDatastore`` of small synthetic volumes (oblique, anisotropic affines) and a stub detector
whose scores follow the image, so the ranking is known. Server tests start the real ``lmk3d serve``
(:mod:`tests.apps.server_fixture`) on a copy of the shipped ``prior_guided`` hippocampus model, whose
scores differ from image to image, and compare its choice with scores computed here by the library.

Waits poll for a state with a generous bound on a hung server; no test measures time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from lmk3d.detectors import load_detector
from lmk3d.io import read_image, write_image
from tests.apps import server_fixture
from tests.apps.server_fixture import Reply, Server, copy_images, copy_model, launch, multipart, ready, stop
from tests.conftest import oblique_affine

MODEL = "prior_guided"
CASES = ("hippocampus_004", "hippocampus_006", "hippocampus_007", "hippocampus_008", "hippocampus_014")
# Bounds on a hung scorer or server, not speed checks: the machine may be busy with other tests.
WAIT_S = 600.0
STUB_WAIT_S = 60.0


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(every_s)


def test_the_score_cache_survives_a_restart_and_drops_stale_or_unreadable_entries(app_lib: SimpleNamespace,
                                                                                   tmp_path: Path) -> None:
    image, checkpoint, saved = tmp_path / "a.nii.gz", tmp_path / "checkpoint.pt", tmp_path / "ws" / "scores.json"
    image.write_bytes(b"image")
    checkpoint.write_bytes(b"weights")
    (tmp_path / "ws").mkdir()
    sig = app_lib.scores.file_signature
    app_lib.scores.ScoreCache(saved).put("m", str(image), sig(checkpoint), np.array([0.25, 0.5]))
    again = app_lib.scores.ScoreCache(saved)  # a new server on the same workspace
    np.testing.assert_array_equal(again.get("m", str(image), sig(checkpoint)), [0.25, 0.5])
    assert again.get("other", str(image), sig(checkpoint)) is None
    other = tmp_path / "b.nii.gz"
    other.write_bytes(b"a spine")
    app_lib.scores.ScoreCache(saved).put("m", str(other), sig(checkpoint), np.zeros(2), refused="not of its kind")
    again = app_lib.scores.ScoreCache(saved)
    assert again.refusal("m", str(other)) == "not of its kind" and again.refusal("m", str(image)) is None
    image.write_bytes(b"another image")  # the file changed: the saved scores are not its
    assert app_lib.scores.ScoreCache(saved).latest("m", str(image)) is None
    other.write_bytes(b"a hippocampus")
    assert app_lib.scores.ScoreCache(saved).refusal("m", str(other)) is None
    saved.write_text("{not json")
    assert app_lib.scores.ScoreCache(saved).latest("m", str(image)) is None  # starts empty, keeps running
    assert (tmp_path / "ws" / "scores.json.unreadable").read_text() == "{not json"


# --- in process: the scorer and the ranking ------------------------------------------------------------
@pytest.fixture(scope="module")
def app_lib() -> Iterator[SimpleNamespace]:
    """The background scorer, the score cache and the strategy, from the app's ``lib``."""
    with server_fixture.app_lib("background", "scores", "activelearning.least_confident") as lib:
        yield SimpleNamespace(background=lib.background, scores=lib.scores,
                              least_confident=lib.activelearning_least_confident)


@dataclass
class StubDetector:
    """Scores ``(3,)`` from the image's mean intensity, so the ranking is known; records who called it."""

    calls: list[tuple[str, str, float]] = field(default_factory=list)  # (image path, thread name, quiet_s then)
    scores: Any = None

    #: The stub refuses an image of negative mean intensity as not of its kind, with this reason.
    REFUSAL = "the image is unlike the training images"

    def predict_all(self, volume: Any) -> Any:
        self.calls.append((volume.path, threading.current_thread().name, self.scores.quiet_s()))
        m = float(np.mean(volume.array))
        if m < 0:
            return SimpleNamespace(landmarks=SimpleNamespace(scores=np.zeros(3)),
                                   verdict=SimpleNamespace(in_distribution=False, reason=self.REFUSAL))
        return SimpleNamespace(landmarks=SimpleNamespace(scores=np.array([m, m, 1.0])),
                               verdict=SimpleNamespace(in_distribution=True, reason="like the training images"))


class StubTask:
    """What the scorer and the strategy use of a ``LandmarkInferTask``: a name, a checkpoint file, a detector."""

    def __init__(self, app_lib: SimpleNamespace, checkpoint: Path) -> None:
        self.name, self.checkpoint, self.scores = "stub", checkpoint, app_lib.scores.ScoreCache()
        self.stub = StubDetector(scores=self.scores)
        self._signature = app_lib.scores.file_signature
        publish(checkpoint, b"weights v1")

    def is_valid(self) -> bool:
        return self.checkpoint.is_file()

    def detector(self) -> tuple[StubDetector, Any]:
        return self.stub, self._signature(self.checkpoint)


def publish(checkpoint: Path, data: bytes) -> None:
    """Put a new checkpoint file in place, as a publisher does (a new file renamed over the old one)."""
    staged = checkpoint.with_name(checkpoint.name + ".staged")
    staged.write_bytes(data)
    os.replace(staged, checkpoint)


def write_volume(path: Path, level: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = (level + 0.01 * rng.standard_normal((9, 11, 7))).astype(np.float32)
    write_image(path, data, oblique_affine(rng))
    return path


@pytest.fixture
def store(tmp_path: Path, app_lib: SimpleNamespace) -> tuple[Any, dict[str, float]]:
    """A LocalDatastore of four images (mean intensity = the stub's score) and one with a final label."""
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    studies.mkdir()
    levels = {"img_a": 0.7, "img_b": 0.3, "img_c": 0.9, "img_d": 0.5, "labelled": 0.1}
    for seed, (case, level) in enumerate(levels.items()):
        write_volume(studies / f"{case}.nii.gz", level, seed)
    ds = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    label = tmp_path / "label.nii.gz"
    write_volume(label, 1.0, 99)
    ds.save_label("labelled", str(label), "final", {})
    del levels["labelled"]
    return ds, levels


def scorer_for(app_lib: SimpleNamespace, tmp_path: Path) -> tuple[Any, StubTask]:
    task = StubTask(app_lib, tmp_path / "checkpoint.pt")
    scorer = app_lib.background.BackgroundScorer({"stub": task}, task.scores, quiet_s=0.2, poll_s=0.2)
    return scorer, task


def scored(scorer: Any, task: StubTask, ds: Any, ids: Any) -> bool:
    sig = task.detector()[1]
    return all(scorer.scores.get(task.name, ds.get_image_uri(i), sig) is not None for i in ids)


def test_scorer_scores_every_unlabelled_image_once_and_again_after_a_new_checkpoint(
        app_lib: SimpleNamespace, store: tuple[Any, dict[str, float]], tmp_path: Path) -> None:
    ds, levels = store
    scorer, task = scorer_for(app_lib, tmp_path)
    scorer.start(ds)
    try:
        wait_for(lambda: scored(scorer, task, ds, levels), STUB_WAIT_S, "every unlabelled image scored")
        first = list(task.stub.calls)
        assert sorted(Path(p).name for p, _, _ in first) == sorted(f"{c}.nii.gz" for c in levels)
        assert {thread for _, thread, _ in first} == {app_lib.background.THREAD_NAME}
        assert scorer.scores.latest("stub", ds.get_image_uri("labelled")) is None  # labelled: not a candidate
        for case, level in levels.items():
            cached = scorer.scores.get("stub", ds.get_image_uri(case), task.detector()[1])
            assert cached[0] == pytest.approx(level, abs=0.05)

        publish(task.checkpoint, b"weights v2")  # a new file, so a new signature
        scorer.wake()
        wait_for(lambda: scored(scorer, task, ds, levels), STUB_WAIT_S, "every image scored with the new checkpoint")
        assert len(task.stub.calls) == 2 * len(levels)
        assert scorer.status() == {"enabled": True, "running": True, "inferences": 2 * len(levels)}
    finally:
        scorer.stop()
    assert not scorer.running


def test_scorer_waits_while_an_interactive_inference_runs(
        app_lib: SimpleNamespace, store: tuple[Any, dict[str, float]], tmp_path: Path) -> None:
    ds, levels = store
    scorer, task = scorer_for(app_lib, tmp_path)
    with scorer.scores.inferring():
        scorer.start(ds)
        time.sleep(5 * scorer.quiet_s)  # long enough for a scorer that does not wait to have scored
        assert task.stub.calls == []
    try:
        wait_for(lambda: scored(scorer, task, ds, levels), STUB_WAIT_S, "every image scored once inference stopped")
    finally:
        scorer.stop()
    # Every image was started after a quiet moment (the scorer's own puts are not activity).
    assert all(quiet >= scorer.quiet_s for _, _, quiet in task.stub.calls), task.stub.calls


def test_an_unreadable_image_is_skipped_until_its_file_changes(
        app_lib: SimpleNamespace, store: tuple[Any, dict[str, float]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ds, levels = store
    studies = Path(ds.get_image_uri("img_a")).parent
    (studies / "corrupt.nii.gz").write_bytes(b"not an image")
    ds.refresh()
    scorer, task = scorer_for(app_lib, tmp_path)
    scorer.start(ds)
    try:
        wait_for(lambda: scored(scorer, task, ds, levels), STUB_WAIT_S, "every readable image scored")
        problem = wait_for(lambda: scorer.problem("stub", "corrupt", ds.get_image_uri("corrupt")), STUB_WAIT_S,
                           "the unreadable image reported")
        assert "corrupt" in problem
        strategy = app_lib.least_confident.LeastConfident({"stub": task}, scorer.scores, background=False)
        strategy.scorer = scorer
        answer = strategy({}, ds)
        assert set(answer["skipped"]) == {"corrupt"} and answer["candidates"] == len(levels)

        # Another pass (it scores a new image) does not try the unreadable one again...
        write_volume(studies / "img_e.nii.gz", 0.6, 7)
        ds.refresh()
        scorer.wake()
        wait_for(lambda: scored(scorer, task, ds, ["img_e"]), STUB_WAIT_S, "the new image scored")
        assert scorer.status()["inferences"] == len(levels) + 1
        tries = [r for r in caplog.records if "image corrupt:" in r.getMessage()]
        assert len(tries) == 1 and tries[0].threadName == app_lib.background.THREAD_NAME
        # ...until the file is replaced by a readable one.
        write_volume(studies / "corrupt.nii.gz", 0.05, 8)
        scorer.wake()
        wait_for(lambda: scored(scorer, task, ds, ["corrupt"]), STUB_WAIT_S, "the repaired image scored")
        assert strategy({}, ds)["id"] == "corrupt"
    finally:
        scorer.stop()


def test_an_image_the_model_refuses_is_never_proposed_until_it_changes(
        app_lib: SimpleNamespace, store: tuple[Any, dict[str, float]], tmp_path: Path) -> None:
    """A refused image scores 0 everywhere, so it would always rank first; it is listed apart instead."""
    ds, levels = store
    studies = Path(ds.get_image_uri("img_a")).parent
    write_volume(studies / "spine.nii.gz", -1.0, 11)  # the stub refuses it
    ds.refresh()
    scorer, task = scorer_for(app_lib, tmp_path)
    scorer.start(ds)
    try:
        wait_for(lambda: scored(scorer, task, ds, [*levels, "spine"]), STUB_WAIT_S, "every image scored")
        strategy = app_lib.least_confident.LeastConfident({"stub": task}, scorer.scores, background=False)
        strategy.scorer = scorer
        answer = strategy({}, ds)
        assert answer["not_of_kind"] == {"spine": StubDetector.REFUSAL}, answer
        assert (answer["id"], answer["candidates"], answer["scored"]) == ("img_b", len(levels), len(levels))
        write_volume(studies / "spine.nii.gz", 0.05, 12)  # replaced by an image of the model's kind
        scorer.wake()
        wait_for(lambda: scored(scorer, task, ds, ["spine"]), STUB_WAIT_S, "the new file scored")
        again = strategy({}, ds)
        assert (again["id"], again["not_of_kind"]) == ("spine", {})
    finally:
        scorer.stop()


def test_least_confident_ranks_served_scores_first_then_earlier_ones_then_picks_at_random(
        app_lib: SimpleNamespace, store: tuple[Any, dict[str, float]], tmp_path: Path) -> None:
    ds, levels = store
    task = StubTask(app_lib, tmp_path / "checkpoint.pt")
    cache = task.scores
    strategy = app_lib.least_confident.LeastConfident({"stub": task}, background=False)
    assert strategy.scores is cache  # the tasks' own cache
    served = task.detector()[1]
    uri = ds.get_image_uri

    nothing = strategy({}, ds)  # nothing scored: any unlabelled image, never the labelled one
    assert nothing["basis"] == "unscored" and nothing["id"] in levels and nothing["confidence"] is None
    assert (nothing["scored"], nothing["candidates"]) == (0, len(levels))
    assert nothing["background"] == {"enabled": False, "running": False, "inferences": 0}

    cache.put("stub", uri("img_c"), served, np.array([0.9, 0.9, 0.0]))
    cache.put("stub", uri("img_a"), served, np.array([0.5, 0.5, 0.5]))
    cache.put("stub", uri("img_d"), (1, 2, 3), np.array([0.1, 0.1, 0.1]))  # an earlier checkpoint's
    mean = strategy({"model": "stub"}, ds)
    assert (mean["id"], mean["basis"], mean["scored"], mean["candidates"]) == ("img_a", "scores", 2, len(levels))
    assert mean["confidence"] == pytest.approx(0.5)
    assert strategy({"reduce": "min"}, ds)["id"] == "img_c"
    cache.put("stub", uri("img_b"), served, np.zeros(3), refused="the image looks like CT")  # lowest, but refused
    kept = strategy({}, ds)
    assert (kept["id"], kept["not_of_kind"], kept["candidates"]) == ("img_a", {"img_b": "the image looks like CT"},
                                                                     len(levels) - 1)

    publish(task.checkpoint, b"weights v2")  # a new version: every score is from an earlier one
    earlier = strategy({}, ds)
    assert (earlier["id"], earlier["basis"], earlier["scored"]) == ("img_d", "earlier_scores", 0)
    assert task.stub.calls == []  # the request path never ran the model

    for case in levels:
        ds.save_label(case, str(tmp_path / "label.nii.gz"), "final", {})
    assert strategy({}, ds) == {}


def test_with_a_pacs_the_request_path_downloads_nothing(app_lib: SimpleNamespace, tmp_path: Path) -> None:
    from monailabel.datastore.dicom import DICOMWebDatastore

    class Pacs(DICOMWebDatastore):
        def __init__(self) -> None:  # no PACS: only what the strategy may touch
            pass

        def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
            return ["series_1", "series_2"]

        def get_image_uri(self, image_id: str) -> str:
            raise AssertionError(f"series {image_id} downloaded on the request path")

    task = StubTask(app_lib, tmp_path / "checkpoint.pt")
    strategy = app_lib.least_confident.LeastConfident({"stub": task}, background=False)
    answer = strategy({}, Pacs())
    assert (answer["basis"], answer["candidates"], answer["scored"]) == ("unscored", 2, 0)
    assert answer["id"] in ("series_1", "series_2")


def test_background_scoring_can_be_turned_off(app_lib: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                             store: tuple[Any, dict[str, float]], tmp_path: Path) -> None:
    ds, _ = store
    monkeypatch.setenv("LMK3D_BACKGROUND_SCORES", "off")
    task = StubTask(app_lib, tmp_path / "checkpoint.pt")
    strategy = app_lib.least_confident.LeastConfident({"stub": task})
    strategy.start(ds)
    assert not strategy.scorer.running and strategy({}, ds)["background"]["enabled"] is False
    monkeypatch.setenv("LMK3D_BACKGROUND_SCORES", "on")
    assert app_lib.background.enabled_from_env()


# --- the real server ---------------------------------------------------------------------------------------
def start_server(root: Path, cases: tuple[str, ...], env: dict[str, str] | None = None) -> Server:
    studies, models = root / "studies", root / "models"
    copy_images(studies, cases)
    copy_model(models, f"{MODEL}-hippocampus")
    return launch(root, studies, models=models, env=env)


def least_confident(server: Server, params: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = server.request("POST", "/activelearning/least_confident",
                           body=json.dumps({"model": MODEL, **(params or {})}).encode(),
                           content_type="application/json")
    assert reply.status == 200, reply
    answer: dict[str, Any] = reply.json()
    return answer


def infer_json(server: Server, case: str) -> Reply:
    body, ctype = multipart({"params": (None, b'{"result_write_to_file": false}')})
    return server.request("POST", f"/infer/{MODEL}?image={case}&output=json", body=body, content_type=ctype)


def library_mean_scores(model_dir: Path, studies: Path, cases: tuple[str, ...]) -> dict[str, float]:
    detector = load_detector(model_dir, "cpu")
    return {c: float(np.mean(detector.predict(read_image(studies / f"{c}.nii.gz")).scores)) for c in cases}


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Server:
    server = start_server(tmp_path_factory.mktemp("scoring"), CASES)
    request.addfinalizer(lambda: stop(server.process))
    return ready(server)


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Server:
    server = start_server(tmp_path_factory.mktemp("quiet"), CASES[:3], env={"LMK3D_BACKGROUND_SCORES": "off"})
    request.addfinalizer(lambda: stop(server.process))
    return ready(server)


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_a_call_right_after_start_answers_from_what_is_known(scoring_server: Server) -> None:
    answer = least_confident(scoring_server)
    assert answer["id"] in CASES and answer["candidates"] == len(CASES)
    assert 0 <= answer["scored"] <= len(CASES) and answer["skipped"] == {}
    assert answer["basis"] == ("scores" if answer["scored"] else "unscored")
    assert answer["background"]["enabled"] is True


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_once_scored_least_confident_picks_the_lowest_mean_score(scoring_server: Server) -> None:
    answer = wait_for(lambda: (a := least_confident(scoring_server))["scored"] == len(CASES) and a, WAIT_S,
                      "the background scorer scored every image", every_s=0.5)
    assert answer["background"]["inferences"] == len(CASES)  # each image once, none on the request path
    expected = library_mean_scores(scoring_server.models / f"{MODEL}-hippocampus", scoring_server.studies, CASES)
    best = min(expected, key=lambda c: (expected[c], c))
    assert len(set(np.round(list(expected.values()), 6))) == len(CASES)  # the check can fail: scores differ
    assert (answer["id"], answer["basis"]) == (best, "scores"), (answer, expected)
    assert answer["confidence"] == pytest.approx(expected[best], abs=1e-5)
    low = least_confident(scoring_server, {"reduce": "min"})
    assert low["scored"] == len(CASES) and low["id"] in CASES


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_a_new_checkpoint_is_scored_again_in_the_background(scoring_server: Server) -> None:
    before = wait_for(lambda: (a := least_confident(scoring_server))["scored"] == len(CASES) and a, WAIT_S,
                      "every image scored")
    reply = infer_json(scoring_server, CASES[0])
    assert reply.status == 200, reply
    checkpoint = Path(reply.json()["checkpoint"]["path"])  # the checkpoint the server serves
    staged = checkpoint.with_name("checkpoint.staged")
    staged.write_bytes(checkpoint.read_bytes())
    os.replace(staged, checkpoint)  # as a publisher does: a new file in its place

    # the answer may still show the old scores until the scorer sees the new file: wait for its inferences
    done = before["background"]["inferences"] + len(CASES)
    after = wait_for(lambda: (a := least_confident(scoring_server))["scored"] == len(CASES)
                     and a["background"]["inferences"] >= done and a, WAIT_S,
                     "every image scored with the new checkpoint", every_s=0.5)
    assert after["background"]["inferences"] == done  # each image once, none twice
    assert after["id"] == before["id"] and after["confidence"] == pytest.approx(before["confidence"])
    assert f"model '{MODEL}': loaded the new weights" in scoring_server.log_text()


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_the_request_path_runs_no_model_and_uses_the_scores_inferences_recorded(quiet_server: Server) -> None:
    cases = CASES[:3]
    for _ in range(2):  # had the first call scored anything, the second would say so
        answer = least_confident(quiet_server)
        assert (answer["basis"], answer["scored"], answer["candidates"]) == ("unscored", 0, len(cases))
        assert answer["id"] in cases and answer["confidence"] is None
        assert answer["background"] == {"enabled": False, "running": False, "inferences": 0}

    reply = infer_json(quiet_server, cases[1])
    assert reply.status == 200, reply
    inferred = float(np.mean([lm["score"] for lm in reply.json()["landmarks"]]))
    answer = least_confident(quiet_server)
    assert (answer["id"], answer["basis"], answer["scored"]) == (cases[1], "scores", 1)
    assert answer["confidence"] == pytest.approx(inferred, abs=1e-6)


@pytest.mark.server
@pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")
def test_after_a_restart_least_confident_answers_from_the_scores_known_before(tmp_path: Path) -> None:
    cases = CASES[:2]
    first = ready(start_server(tmp_path / "first", cases, env={"LMK3D_BACKGROUND_SCORES": "off"}))
    try:
        reply = infer_json(first, cases[1])
        assert reply.status == 200, reply
        inferred = float(np.mean([lm["score"] for lm in reply.json()["landmarks"]]))
    finally:
        stop(first.process)
    # the same studies and models (so the same workspace), the scorer still off: only the saved scores can rank
    second = ready(launch(tmp_path / "second", first.studies, models=first.models,
                          env={"LMK3D_BACKGROUND_SCORES": "off"}))
    try:
        answer = least_confident(second)
    finally:
        stop(second.process)
    assert (answer["id"], answer["basis"], answer["scored"]) == (cases[1], "scores", 1), answer
    assert answer["confidence"] == pytest.approx(inferred, abs=1e-6)
