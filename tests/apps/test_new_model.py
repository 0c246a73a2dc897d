"""Own landmarks from zero (issue 19, item 1): ``lmk3d serve --new-model NAME=DETECTOR``, through REST only.

The main test starts the real server (:mod:`tests.apps.server_fixture`) on a studies folder of
:data:`STUDIES` real hippocampus images with no label, an empty models folder (so no shipped model is
served) and ``--new-model hipp=prior_guided`` (of the detectors, ``prior_guided``'s ``cpu`` profile
trained fastest on 8 cases with 2 epochs here: 3.8 s against 5.6 s for ``cascade``). It then goes
from an empty datastore to a served model with the user's own landmark names: inference is refused
as "not trained yet", the user saves point lists with names of their own, trains, and the model is
served (first the ``mean_shape`` baseline as ``v0001``, then ``prior_guided`` as ``v0002`` if the
gate finds it no worse) without a restart, and again after one.

The smaller tests check the refusals: bad ``--new-model`` values (``--dry-run``, exit status 2 and
one line), and, on a second server whose declared model has no names yet, a label map without names
(422), an unknown train option (422) and inference (409). No test measures time.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from lmk3d import cli
from lmk3d.errors import LandmarkFormatError
from lmk3d.io import read_image, read_table
from lmk3d.io.image import Volume
from lmk3d.io.label_map import write_label_map
from lmk3d.io.markups import write_markups
from lmk3d.landmarks import LandmarkSet
from lmk3d.registry import WORKSPACE_DIR
from tests.apps.server_fixture import HIPPOCAMPUS, Reply, Server, copy_images, launch, multipart, ready, stop
from tests.conftest import ROOT

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")]

MODEL, DETECTOR = "hipp", "prior_guided"
TRUTH = read_table(HIPPOCAMPUS / "landmarks.csv")
STUDIES = tuple(sorted(TRUTH)[:8])
#: The user's own names for the hippocampus landmarks, in the order their point lists hold them.
RENAMED = {"HIPPO_ANTERIOR_TIP": "ant_tip", "HIPPO_POSTERIOR_TIP": "post_tip",
           "HIPPO_ANTERIOR_CENTROID": "ant_centroid", "HIPPO_POSTERIOR_CENTROID": "post_centroid"}
#: Left out of the first (sorted) case's label: it first appears in the second, so it comes last.
LATE = "ant_centroid"
EXPECTED_NAMES = ("ant_tip", "post_tip", "post_centroid", "ant_centroid")
TRAIN_OPTIONS = {"max_minutes": 0.5, "max_epochs": 2}
# A bound on a hung training process, not a speed check (the machine may be busy).
TRAIN_TIMEOUT_S = 900.0


def user_label(case: str) -> LandmarkSet:
    """The true landmarks of ``case`` under the user's names (the first case without :data:`LATE`)."""
    truth = TRUTH[case]
    names = [n for n in RENAMED.values() if not (case == STUDIES[0] and n == LATE)]
    old = {new: old for old, new in RENAMED.items()}
    positions = {n: truth.xyz_mm_ras[truth.names.index(old[n])] for n in names}
    return LandmarkSet.from_dict(positions)


def put_label(server: Server, case: str, path: Path, params: dict[str, Any] | None = None) -> Reply:
    body, ctype = multipart({"params": (None, json.dumps(params or {}).encode()),
                             "label": (path.name, path.read_bytes())})
    return server.request("PUT", f"/datastore/label?image={case}&tag=final", body=body, content_type=ctype)


def infer(server: Server, case: str) -> Reply:
    body, ctype = multipart({"params": (None, b"{}")})
    return server.request("POST", f"/infer/{MODEL}?image={case}&output=json", body=body, content_type=ctype)


def post_json(server: Server, path: str, payload: dict[str, Any]) -> Reply:
    return server.request("POST", path, body=json.dumps(payload).encode(), content_type="application/json")


def start(root: Path, studies: Path, models: Path) -> Server:
    return ready(launch(root, studies, models=models, flags=["--new-model", f"{MODEL}={DETECTOR}"]))


def wait_for_training(server: Server, task_id: str) -> dict[str, Any]:
    """Poll ``GET /train/`` until the task ``task_id`` has ended; its last state."""
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        state = dict(server.get_json("/train/"))
        if state.get("id") == task_id and state.get("status") not in ("SUBMITTED", "RUNNING"):
            return state
        assert time.monotonic() < deadline, f"training still {state.get('status')} after {TRAIN_TIMEOUT_S} s"
        time.sleep(1.0)


# --- lmk3d serve --new-model: bad values exit 2 with one line ---------------------------------------------------
@pytest.mark.parametrize(("value", "message"), [
    ("hipp=no_such_detector", "unknown detector 'no_such_detector'; choose one of"),
    ("../x=cascade", "the model name '../x' is not a plain name"),
    (".hidden=cascade", "is not a plain name (it starts with '.')"),
    ("cascade=pin", "'cascade' is the name of a served model"),
    ("hipp", "give NAME=DETECTOR"),
])
def test_bad_new_model_values_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
                                                   message: str) -> None:
    status = cli.main(["serve", "--studies", str(tmp_path), "--new-model", value, "--dry-run"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_a_model_declared_twice_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["serve", "--studies", str(tmp_path), "--new-model", "a=pin", "--new-model", "a=cascade",
                       "--dry-run"])
    err = capsys.readouterr().err
    assert status == 2 and "model 'a' is declared twice" in err, err


def test_new_models_reach_the_app_as_one_conf_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["serve", "--studies", str(tmp_path), "--new-model", "skull=cascade", "--new-model",
                       "knee=pin", "--dry-run"])
    out = capsys.readouterr().out
    assert status == 0 and "--conf new_models skull=cascade,knee=pin" in out, out


# --- which names a saved label may carry (lib.label_names, in-process) ------------------------------------------
def _label_names_module() -> ModuleType:
    """The app's ``lib.label_names``, imported, then ``lib`` forgotten (too generic a name to leave behind)."""
    app = str(ROOT / "apps" / "landmarks")
    before = set(sys.modules)
    sys.path.insert(0, app)
    try:
        return importlib.import_module("lib.label_names")
    finally:
        sys.path.remove(app)
        for name in set(sys.modules) - before:
            if name == "lib" or name.startswith("lib."):
                del sys.modules[name]


LN = _label_names_module()
POINTS = LandmarkSet.from_dict({"b": [1.0, 2.0, 3.0], "a": [4.0, 5.0, 6.0]})


def _label_map(tmp_path: Path) -> Path:
    volume = Volume(np.zeros((12, 13, 14), dtype=np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    return Path(write_label_map(tmp_path / "x.nii.gz", POINTS, volume, 1.5))


def test_any_name_is_accepted_while_a_declared_model_has_none(tmp_path: Path) -> None:
    points = write_markups(tmp_path / "x.mrk.json", POINTS)
    names = LN.LabelNames(default=("p", "q"), known=frozenset({"p", "q"}), open_models=("hipp",))
    assert LN.read_saved_label(str(points), {}, names, "x").names == ("b", "a")
    with pytest.raises(LandmarkFormatError, match=r"unknown landmark\(s\) b, a; the models' landmarks are p, q"):
        LN.read_saved_label(str(points), {}, LN.LabelNames(("p", "q"), frozenset({"p", "q"})), "x")


def test_known_names_come_in_the_served_order(tmp_path: Path) -> None:
    points = write_markups(tmp_path / "x.mrk.json", POINTS)
    names = LN.LabelNames(default=("a", "b", "c"), known=frozenset({"a", "b", "c"}))
    got = LN.read_saved_label(str(points), {}, names, "x")
    assert got.names == ("a", "b", "c") and got.found.tolist() == [True, True, False]


def test_a_label_map_needs_names_only_when_no_model_has_any(tmp_path: Path) -> None:
    path = str(_label_map(tmp_path))
    nameless = LN.LabelNames(open_models=("hipp",))
    with pytest.raises(LandmarkFormatError, match="the model\\(s\\) hipp have no landmark names yet"):
        LN.read_saved_label(path, {}, nameless, "x")
    named = LN.read_saved_label(path, {"label_info": [{"name": "b", "idx": 1}, {"name": "a", "idx": 2}]}, nameless,
                                "x")
    assert named.names == ("b", "a") and np.allclose(named.xyz_mm_ras, POINTS.xyz_mm_ras, atol=0.5)
    served = LN.LabelNames(default=("b", "a"), known=frozenset({"b", "a"}), open_models=("hipp",))
    assert LN.read_saved_label(path, {}, served, "x").names == ("b", "a")  # value k+1 = the served model's name k


# --- a declared model with no names yet ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def nameless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("nameless")
    studies, models = root / "studies", root / "models"
    copy_images(studies, STUDIES[:2])
    models.mkdir()
    server = start(root / "server", studies, models)
    yield server
    stop(server.process)


def test_a_label_map_without_names_is_422_while_the_model_has_none(nameless: Server, tmp_path: Path) -> None:
    case = STUDIES[0]
    path = tmp_path / f"{case}.nii.gz"
    write_label_map(path, TRUTH[case], read_image(nameless.studies / f"{case}.nii.gz"))
    reply = put_label(nameless, case, path)
    assert reply.status == 422, reply
    assert f"the model(s) {MODEL} have no landmark names yet" in reply.detail and "label_info" in reply.detail
    final = nameless.studies / "labels" / "final"
    assert not final.exists() or not any(final.iterdir())


def test_an_unknown_train_option_is_422(nameless: Server) -> None:
    reply = post_json(nameless, f"/train/{MODEL}", {"max_minutes": 0.5, "learning_rate": 0.1})
    assert reply.status == 422 and "unknown training option(s) 'learning_rate'" in reply.detail, reply


def test_training_with_no_final_label_is_409(nameless: Server) -> None:
    reply = post_json(nameless, f"/train/{MODEL}", TRAIN_OPTIONS)
    assert reply.status == 409 and "no final labels yet" in reply.detail, reply


def test_inference_on_an_untrained_model_is_409_saying_how_to_train_it(nameless: Server) -> None:
    reply = infer(nameless, STUDIES[0])
    assert reply.status == 409, reply
    assert reply.detail.startswith(f"model {MODEL} is not trained yet: save final labels") and \
        f"POST /train/{MODEL}" in reply.detail


# --- from an empty datastore to a served, user-named model ---------------------------------------------------
def test_from_an_empty_datastore_to_a_served_user_named_model(tmp_path: Path) -> None:
    studies, models, labels = tmp_path / "studies", tmp_path / "models", tmp_path / "labels"
    copy_images(studies, STUDIES)
    models.mkdir()
    labels.mkdir()
    server = start(tmp_path / "server", studies, models)
    try:
        # Declared, not trained: listed with the reason and how to train it; inference refused.
        info = server.get_json("/info/")
        assert MODEL not in info["models"] and MODEL in info["trainers"], info
        untrained = info["untrained_models"][MODEL]
        assert untrained["detector"] == DETECTOR and untrained["landmark_names"] is None
        assert "not trained yet" in untrained["reason"] and f"POST /train/{MODEL}" in untrained["how_to_train"]
        assert info["datastore"]["completed"] == 0
        reply = infer(server, STUDIES[0])
        assert reply.status == 409 and f"model {MODEL} is not trained yet" in reply.detail, reply
        assert server.get_json(f"/models/{MODEL}")["versions"] == []

        # The user's own landmarks, as Slicer point lists: names no served model knows are accepted.
        for case in STUDIES:
            path = write_markups(labels / f"{case}.mrk.json", user_label(case))
            reply = put_label(server, case, path)
            assert reply.status == 200, reply

        reply = post_json(server, f"/train/{MODEL}", TRAIN_OPTIONS)
        assert reply.status == 200 and reply.json()["status"] in ("SUBMITTED", "RUNNING"), reply
        state = wait_for_training(server, reply.json()["id"])
        details = "\n".join(state.get("details", []))
        assert state["status"] == "DONE", details

        # Served without a restart, with the user's names (in order of first appearance).
        result = infer(server, STUDIES[-1])
        assert result.status == 200, result
        answer = result.json()
        assert tuple(lm["name"] for lm in answer["landmarks"]) == EXPECTED_NAMES, answer["landmarks"]
        assert answer["label_names"] == {n: k + 1 for k, n in enumerate(EXPECTED_NAMES)}
        info = server.get_json("/info/")
        assert MODEL in info["models"] and MODEL not in info["untrained_models"], info
        assert info["train_stats"][MODEL]["status"] == "DONE"

        # v0001: the baseline, the first version; v0002: the declared detector, through the gate.
        record = server.get_json(f"/models/{MODEL}")
        assert record["landmark_names"] == list(EXPECTED_NAMES) and record["shipped"] is None
        v1, v2 = record["versions"]
        assert (v1["id"], v1["detector"], v1["status"], v1["parent"]) == ("v0001", "mean_shape", "published", None)
        assert v1["decision"]["reason"].startswith("first version")
        assert (v2["id"], v2["detector"], v2["parent"]) == ("v0002", DETECTOR, "v0001")
        assert v2["status"] in ("published", "rejected") and v2["decision"]["reason"], v2
        served = "v0002" if v2["status"] == "published" else "v0001"
        assert record["current"] == served
        assert answer["checkpoint"]["path"] == str(studies / WORKSPACE_DIR / MODEL / "versions" / served /
                                                   "checkpoint.pt")
        assert f"version v0002 {'PUBLISHED' if served == 'v0002' else 'kept as a candidate'}" in details

        # Its names are fixed now: a name no model knows is refused.
        nose_tip = LandmarkSet.from_dict({"nose_tip": TRUTH[STUDIES[0]].xyz_mm_ras[0]})
        odd = write_markups(labels / "odd.mrk.json", nose_tip)
        reply = put_label(server, STUDIES[0], odd)
        assert reply.status == 422 and "unknown landmark(s) nose_tip" in reply.detail, reply
    finally:
        stop(server.process)

    # A restart serves it again, from its record.
    server = start(tmp_path / "server2", studies, models)
    try:
        info = server.get_json("/info/")
        assert MODEL in info["models"] and not info["untrained_models"], info
        assert server.get_json(f"/models/{MODEL}")["current"] == served
        result = infer(server, STUDIES[0])
        assert result.status == 200, result
        assert tuple(lm["name"] for lm in result.json()["landmarks"]) == EXPECTED_NAMES
    finally:
        stop(server.process)
