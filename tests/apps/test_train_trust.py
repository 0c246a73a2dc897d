"""A version trained by the server gets its own trust model, and serves calibrated scores from its first answer.

In process: the app's train task (:class:`lib.trainers.task.LandmarkTrainTask`) on a real
``LocalDatastore`` of :data:`N_STUDIES` hippocampus images from the shipped model's *test* split, with
their true landmarks as final labels, then the app's infer task on one of them. The served model is a
copy of the shipped ``mean_shape-hippocampus`` folder (its ``presence.pt`` and ``trust.json``) whose
checkpoint is replaced by one trained here on labels shifted by :data:`SHIFT_MM`: a poor parent by
construction, so a retrain on the true labels passes the gate by a wide margin and is served. Its
``trust.json`` says :data:`PARENT_TOLERANCE_MM`, so the test sees the tolerance kept.

The model's validation fraction is :data:`VAL_FRACTION` (not the default 0.2) so that 5 of 11
labelled cases are validation cases, the fewest a calibration needs. A declared model's first version
(the ``mean_shape`` baseline, no parent) trains a presence network only where ``mean_shape`` is the declared
detector: otherwise the declared detector's version, which follows, trains it. The case with fewer
validation cases (no ``trust.json``, the reason recorded) is tested through the real server in
``test_registry_server.py``. ``mean_shape`` trains in a second; nothing measures time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lmk3d.data.samples import Sample
from lmk3d.detectors import detector_class, load_detector
from lmk3d.errors import LandmarkError
from lmk3d.io import read_image, read_table, write_landmarks
from lmk3d.landmarks import LandmarkSet
from lmk3d.registry import ModelRecord, Registry
from lmk3d.trust.presence import PresenceModel
from tests.apps import server_fixture
from tests.apps.server_fixture import HIPPOCAMPUS, copy_images, copy_model
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:'cgi' is deprecated:DeprecationWarning")

MODEL = "mean_shape"
SHIPPED_NAME = f"{MODEL}-hippocampus"
TRUTH = read_table(HIPPOCAMPUS / "landmarks.csv")
SPLIT = json.loads((ROOT / "models" / SHIPPED_NAME / "split.json").read_text())
N_STUDIES = 11
STUDIES = tuple(SPLIT["test"][:N_STUDIES])  # never seen by the shipped model
#: Gives 5 validation cases among STUDIES (checked in the fixture): the fewest a calibration needs.
VAL_FRACTION = 0.5
#: Inside every image, ~10 mm worse than the truth (see test_registry_server.py).
SHIFT_MM = (-12.0, 0.0, 0.0)
PARENT_TOLERANCE_MM = 4.0
#: Epochs bound what trains here, never the clock (mean_shape has none; the presence network 30).
TRAIN_OPTIONS = {"max_minutes": 5, "seed": 0}


@pytest.fixture(scope="module")
def app_lib() -> Iterator[SimpleNamespace]:
    """The train and infer tasks, the model config and the checkpoint upload, from the app's ``lib``."""
    with server_fixture.app_lib("configs", "infers.task", "model_files", "trainers.task") as lib:
        yield SimpleNamespace(LandmarkModelConfig=lib.configs.LandmarkModelConfig,
                              LandmarkInferTask=lib.infers_task.LandmarkInferTask,
                              LandmarkTrainTask=lib.trainers_task.LandmarkTrainTask,
                              replace_checkpoint=lib.model_files.replace_checkpoint,
                              process_age_s=lib.trainers_task._process_age_s)


@pytest.fixture(scope="module")
def poor_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``mean_shape`` checkpoint trained on shifted labels of cases outside the studies."""
    folder = tmp_path_factory.mktemp("poor")
    cases = [c for c in SPLIT["train"] if c not in STUDIES][:20]
    names = TRUTH[cases[0]].names
    shifted = [Sample(c, HIPPOCAMPUS / "images" / f"{c}.nii.gz",
                      LandmarkSet(names, TRUTH[c].xyz_mm_ras + np.asarray(SHIFT_MM), TRUTH[c].scores,
                                  TRUTH[c].found)) for c in cases]
    detector = detector_class(MODEL).create(names, profile="tiny")
    detector.fit(shifted, None, seed=0, max_minutes=0.2, progress=False)
    return detector.save(folder)


@dataclass
class World:
    root: Path
    shipped: Path
    datastore: Any
    model: Any  # lib.configs.LoadedModel
    record: ModelRecord

    def version_dir(self, vid: str) -> Path:
        return self.record.root / "versions" / vid


def labelled_datastore(tmp_path: Path) -> Any:
    """A ``LocalDatastore`` of :data:`STUDIES` with their true landmarks as final labels (Slicer point lists)."""
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    copy_images(studies, STUDIES)
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    for case in STUDIES:
        label = write_landmarks(tmp_path / f"{case}.mrk.json", TRUTH[case])
        datastore.save_label(case, str(label), "final", {})
    return datastore


@pytest.fixture
def world(tmp_path: Path, app_lib: SimpleNamespace, poor_checkpoint: Path) -> World:
    shipped = copy_model(tmp_path / "models", SHIPPED_NAME)
    shutil.copyfile(poor_checkpoint, shipped / "checkpoint.pt")
    trust = json.loads((shipped / "trust.json").read_text())
    trust["tolerance_mm"] = PARENT_TOLERANCE_MM
    (shipped / "trust.json").write_text(json.dumps(trust))
    datastore = labelled_datastore(tmp_path)
    registry = Registry(tmp_path / "ws")
    registry.ensure(MODEL, MODEL, shipped=shipped.resolve(), val_fraction=VAL_FRACTION)
    model = app_lib.LandmarkModelConfig(detector=MODEL).load(registry, tmp_path / "models", "hippocampus", "cpu")
    val = model.record.validation_cases(STUDIES)
    assert len(val) == 5, f"the test needs exactly 5 validation cases among the studies, not {val}"
    return World(tmp_path, shipped.resolve(), datastore, model, model.record)


def train(app_lib: SimpleNamespace, world: World, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    """Run the train task as ``POST /train/mean_shape?run_sync=true`` does; its result and its output lines."""
    task = app_lib.LandmarkTrainTask(world.model, "cpu")
    result = task(dict(TRAIN_OPTIONS), world.datastore)
    return result, capsys.readouterr().out


def test_a_retrained_version_is_calibrated_and_serves_calibrated_scores(app_lib: SimpleNamespace, world: World,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    infer = app_lib.LandmarkInferTask(world.model, device="cpu")  # made at start-up, as the app does
    result, lines = train(app_lib, world, capsys)
    assert result["version"] == "v0001" and result["published"] is True, result["decision"]
    assert result["calibrated"] is True and result["calibration"].startswith("fitted on 5 validation case(s)")
    assert f"calibrated: {result['calibration']}" in lines
    assert "init=current" in lines and "learning rate x0.1" in lines  # a fine-tune takes smaller steps

    v1 = world.version_dir("v0001")
    trust = json.loads((v1 / "trust.json").read_text())
    parent = json.loads((world.shipped / "trust.json").read_text())
    assert trust["tolerance_mm"] == PARENT_TOLERANCE_MM  # the parent's
    assert trust["report"]["calibration_cases"] == sorted(world.record.validation_cases(STUDIES))
    assert trust["weights"] != parent["weights"], "the parent's trust model was copied onto new weights"
    # The parent's scores were also calibrated on its training cases answered without themselves: so are the
    # version's, on its 6 (those its mean was fitted on each left out, the early-stopping one as it is).
    assert "cross_fit" in parent["report"] and trust["report"]["cross_fit"]["cross_fitted_cases"] == 6
    assert result["calibration"].endswith("; the scores also on the 6 training case(s), each answered without itself")
    # The presence network: the parent's, or one trained on the training cases from its weights, whichever
    # told the validation cases' cut-off landmarks better (ties: the parent's).
    served, original = PresenceModel.load(v1), PresenceModel.load(world.shipped)
    assert served is not None and original is not None
    inherited, trained = _checked_choice(trust)
    same = all(torch.equal(served.net.state_dict()[k], v) for k, v in original.net.state_dict().items())
    if inherited["chosen"]:
        assert same and trust["report"]["presence"] == "inherited"
        assert trust["report"]["presence_from"] == str(world.shipped)
        assert f"the presence network of {world.shipped} (one trained on these cases did no better)" in lines
    else:
        assert not same and trust["report"]["presence"] == "trained" and trust["report"]["presence_from"] is None
        assert served.report["fine_tuned_from"] == str(world.shipped) and served.report["training_cases"] == 6
        assert f"starting from that of {world.shipped} (it told cut-off landmarks better" in lines
    assert "presence epoch 30/30" in lines  # PRESENCE_EPOCHS: the train options set no max_epochs
    # Its image check knows the parent's training images as well as its own (the parent's trust.json predates
    # the count: twice its training cases, each with one cut variant).
    assert trust["report"]["images_from"] == str(world.shipped)
    assert trust["image"]["n_images"] > 2 * parent["report"]["training_cases"]
    assert f"the image check knows the {2 * parent['report']['training_cases']} training images of" in lines
    # The parent carries the anatomy check, so the version does, knowing the parent's images and its 6 own.
    assert trust["anatomy"]["n_images"] == parent["anatomy"]["n_images"] + 6
    assert trust["report"]["anatomy_from"] == str(world.shipped) and trust["anatomy"]["threshold"] > 0
    assert f"so does its anatomy check (kept from {world.shipped})" in result["calibration"]
    (version,) = world.record.to_json()["versions"]
    assert version["calibrated"] is True and version["calibration"]["reason"] == result["calibration"]
    report = json.loads((v1 / "report.json").read_text())
    assert report["calibration"]["calibrated"] is True and report["lr_scale"] == 0.1
    assert "Scores: calibrated probabilities (`trust.json`), fitted on 5" in (v1 / "MODEL_CARD.md").read_text()

    # The next inference answer is the new version's, with its calibrated scores.
    image = world.datastore.get_image_uri(STUDIES[0])
    _, answer = infer({"image": image, "landmark_output": "markups"})
    assert answer["checkpoint"]["path"] == str(v1 / "checkpoint.pt")
    assert answer["tolerance_mm"] == PARENT_TOLERANCE_MM
    assert answer["score_meaning"].startswith(f"probability that the landmark is within {PARENT_TOLERANCE_MM:g} mm")
    assert answer["image_check"]["in_distribution"] is True
    expected = load_detector(v1, "cpu").predict_all(read_image(image))
    assert expected.raw is not None
    for k, item in enumerate(answer["landmarks"]):
        assert item["found"], item
        assert 0.0 <= item["score"] <= 1.0 and item["radius_mm"] > 0.0, item
        assert item["score"] == pytest.approx(float(expected.landmarks.scores[k]), abs=1e-6)
        assert item["radius_mm"] == pytest.approx(float(expected.landmarks.radius_mm[k]), abs=1e-6)
    # mean_shape's raw score is one number per landmark for every image: the calibrated one is not it.
    raw = np.array([answer["raw_scores"][n] for n in expected.raw.names])
    assert np.allclose(raw, np.round(expected.raw.scores, 4))
    assert not np.allclose([it["score"] for it in answer["landmarks"]], expected.raw.scores, atol=1e-3)


def test_a_failed_calibration_keeps_the_version_without_a_trust_model(app_lib: SimpleNamespace, world: World,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(*args: Any, **kwargs: Any) -> Any:
        raise LandmarkError("trust: 3 calibration points are too few to fit 7 weights")

    monkeypatch.setattr("lmk3d.trust.fit.fit_trust", fails)
    result, lines = train(app_lib, world, capsys)
    assert result["version"] == "v0001" and result["calibrated"] is False
    reason = "calibration failed (LandmarkError: trust: 3 calibration points are too few to fit 7 weights)"
    assert result["calibration"] == reason
    assert f"not calibrated: {reason}; this version serves the detector's raw scores" in lines
    v1 = world.version_dir("v0001")
    # Never the parent's trust model (the shipped folder has one), nor its presence network alone.
    assert (v1 / "checkpoint.pt").is_file()
    assert not (v1 / "trust.json").exists() and not (v1 / "presence.pt").exists()
    (version,) = world.record.to_json()["versions"]
    assert version["calibrated"] is False and version["calibration"]["reason"] == reason
    assert load_detector(v1, "cpu").trust is None


def _checked_choice(trust: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two candidates of a version's presence choice (inherited or none, trained), checked for consistency:
    exactly one chosen, the trained one only when its smaller share is strictly larger."""
    inherited, trained = trust["report"]["presence_choice"]
    assert inherited["chosen"] != trained["chosen"]

    def smaller(c: dict[str, Any]) -> float:
        return min(c["calibration_cut_off_not_found"], c["calibration_inside_found"])

    assert trained["chosen"] == (smaller(trained) > smaller(inherited))
    chosen = trained if trained["chosen"] else inherited
    rule = trust["report"]["not_found_rule"]
    assert (rule["calibration_cut_off_not_found"], rule["calibration_inside_found"]) == (
        chosen["calibration_cut_off_not_found"], chosen["calibration_inside_found"])
    assert trust["presence_threshold"] == chosen["presence_threshold"]
    return inherited, trained


def test_a_declared_mean_shape_models_first_version_gets_a_presence_network_trained_on_its_cases_if_it_helps(
        app_lib: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datastore = labelled_datastore(tmp_path)
    registry = Registry(tmp_path / "ws")
    record = registry.ensure("my_hippo", MODEL, val_fraction=VAL_FRACTION)  # 6 of STUDIES are its validation cases
    declared = app_lib.LandmarkModelConfig(detector=MODEL).declared("my_hippo").declare(registry)
    result = app_lib.LandmarkTrainTask(declared, "cpu")(dict(TRAIN_OPTIONS), datastore)
    lines = capsys.readouterr().out
    assert result["version"] == "v0001" and result["published"] is True  # the first version: served
    assert result["calibrated"] is True, result["calibration"]
    assert "presence network: training on 5 cases with every landmark" in lines  # nothing to inherit
    v1 = record.root / "versions" / "v0001"
    trust = json.loads((v1 / "trust.json").read_text())
    assert trust["tolerance_mm"] == 3.0 and len(trust["report"]["calibration_cases"]) == 6
    assert trust["report"]["images_from"] is None and trust["image"]["n_images"] >= 2
    assert "anatomy" not in trust and trust["report"]["anatomy_from"] is None  # nothing to keep it from
    _, trained = _checked_choice(trust)
    detector = load_detector(v1, "cpu")
    assert detector.trust is not None
    if trained["chosen"]:
        assert result["calibration"].endswith("tolerance 3 mm, a presence network trained on 5 training case(s) (it "
                                              "told cut-off landmarks better than geometry alone); the image check "
                                              "knows these training images only")
        assert trust["report"]["presence"] == "trained" and detector.trust.presence is not None
        assert detector.trust.presence.report["data_fingerprint"] and detector.trust.presence.report["epochs"] == 30
        assert detector.trust.presence.report["epochs_run"] == 30
    else:
        assert result["calibration"].endswith("tolerance 3 mm, no presence network (geometry only) (one trained on "
                                              "these cases did no better); the image check knows these training "
                                              "images only")
        assert trust["presence_threshold"] == 0.0 and not (v1 / "presence.pt").exists()
        assert trust["report"]["presence"] == "none" and detector.trust.presence is None
    answer = detector.predict_all(read_image(datastore.get_image_uri(STUDIES[0]))).landmarks
    assert answer.calibrated and np.all((answer.scores >= 0.0) & (answer.scores <= 1.0))


def test_a_declared_detectors_baseline_trains_no_presence_network_and_the_detectors_version_does(
        app_lib: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first version (``mean_shape``) must come at once; its presence network would take minutes with many
    labels. The declared detector's version, in the same training, trains one (one epoch here)."""
    datastore = labelled_datastore(tmp_path)
    registry = Registry(tmp_path / "ws")
    record = registry.ensure("my_hippo", "prior_guided", val_fraction=VAL_FRACTION)
    declared = app_lib.LandmarkModelConfig(detector="prior_guided").declared("my_hippo").declare(registry)
    result = app_lib.LandmarkTrainTask(declared, "cpu")({**TRAIN_OPTIONS, "max_epochs": 1}, datastore)
    lines = capsys.readouterr().out
    assert result["version"] == "v0002" and result["first_version"]["published"] is True, result
    first = lines.index("version v0001 PUBLISHED")
    training = [i for i in range(len(lines)) if lines.startswith("presence network: training", i)]
    assert len(training) == 1 and training[0] > first, lines
    v1 = json.loads((record.root / "versions" / "v0001" / "trust.json").read_text())
    assert v1["report"]["presence"] == "none" and "presence_choice" not in v1["report"]
    assert not (record.root / "versions" / "v0001" / "presence.pt").exists()
    v2 = json.loads((record.root / "versions" / "v0002" / "trust.json").read_text())
    _checked_choice(v2)


def test_an_uploaded_checkpoint_is_calibrated_like_a_trained_version(app_lib: SimpleNamespace, world: World,
                                                                      tmp_path: Path) -> None:
    """``PUT /model`` (admin) as the app runs it: the shipped weights uploaded over the poor ones get their own
    trust model on the same validation cases, pass the gate, and serve calibrated scores."""
    train_cases, val = app_lib.LandmarkTrainTask(world.model, "cpu").labelled_split(world.datastore)
    assert len(val) == 5 and len(train_cases) == N_STUDIES - 5
    upload = tmp_path / "upload.pt"
    shutil.copyfile(ROOT / "models" / SHIPPED_NAME / "checkpoint.pt", upload)
    answer = app_lib.replace_checkpoint(world.model, str(upload), world.datastore.get_image_uri(STUDIES[0]), val,
                                        train=train_cases)
    assert answer["version"] == "v0001" and answer["published"] is True, answer["decision"]
    assert answer["calibrated"] is True and answer["calibration"].startswith("fitted on 5 validation case(s)")
    v1 = world.version_dir("v0001")
    trust = json.loads((v1 / "trust.json").read_text())
    assert trust["tolerance_mm"] == PARENT_TOLERANCE_MM and trust["report"]["presence_from"] == str(world.shipped)
    assert trust["report"]["images_from"] is None  # an upload's own training images are unknown here
    # the shipped model's anatomy check is kept, on the training cases the upload is calibrated beside
    assert trust["anatomy"]["n_images"] == len(train_cases) and trust["report"]["anatomy_from"] == str(world.shipped)
    assert trust["report"]["calibration_cases"] == sorted(s.case for s in val)
    (version,) = world.record.to_json()["versions"]
    assert version["calibrated"] is True and version["calibration"]["reason"] == answer["calibration"]
    served = load_detector(v1, "cpu")
    assert served.trust is not None
    landmarks = served.predict_all(read_image(world.datastore.get_image_uri(STUDIES[0]))).landmarks
    assert landmarks.calibrated and np.all((landmarks.scores >= 0.0) & (landmarks.scores <= 1.0))


def test_which_presence_network_the_server_trains() -> None:
    """:func:`lmk3d.calibrate._presence_to_train`: none without epochs or with too few complete cases, none when
    the inherited network was trained on these very cases, else one starting from the inherited weights (or
    new, its box sized on the training images)."""
    from lmk3d.calibrate import MIN_PRESENCE_CASES, _presence_to_train
    from lmk3d.checkpoint import data_fingerprint

    samples = [Sample(c, HIPPOCAMPUS / "images" / f"{c}.nii.gz", TRUTH[c]) for c in STUDIES[:MIN_PRESENCE_CASES]]
    names = TRUTH[STUDIES[0]].names
    said: list[str] = []
    assert _presence_to_train(names, samples, None, None, 0, 0, said.append) is None and not said
    fewer = samples[:-1]
    assert _presence_to_train(names, fewer, None, None, 30, 0, said.append) is None
    assert said[-1] == (f"presence network: not trained ({len(fewer)} training case(s) with every landmark placed; "
                        f"it needs at least {MIN_PRESENCE_CASES})")
    # a case that does not place every landmark does not count
    partial = LandmarkSet(names, TRUTH[STUDIES[0]].xyz_mm_ras, found=np.array([False] + [True] * (len(names) - 1)))
    assert _presence_to_train(names, [Sample("p", samples[0].image_path, partial)] + fewer, None, None, 30, 0,
                              said.append) is None

    new = _presence_to_train(names, samples, None, None, 30, 7, said.append)
    assert new is not None and not new.fitted and new.config.epochs == 30 and new.config.seed == 7
    extent = max(float(np.max(np.asarray(s.load_image().shape) * s.load_image().spacing_mm)) for s in samples)
    assert extent * 1.1 <= new.config.box_mm < extent * 1.1 + 8.0
    assert new.provenance["fine_tuned_from"] is None
    fingerprint = data_fingerprint([(s.case, s.landmarks) for s in samples])
    assert new.provenance["data_fingerprint"] == fingerprint

    parent = PresenceModel.load(ROOT / "models" / SHIPPED_NAME)
    assert parent is not None
    tuned = _presence_to_train(names, samples, parent, Path("parent"), 12, 0, said.append)
    assert tuned is not None and not tuned.fitted and tuned.provenance["fine_tuned_from"] == "parent"
    assert tuned.config == dataclasses.replace(parent.config, epochs=12, seed=0)
    for key, value in parent.net.state_dict().items():  # an ensemble's first member when the parent serves one
        assert torch.equal(tuned.net.state_dict()[key], value), key
    assert tuned.members == 1
    # a parent serving an ensemble: the new network starts from its first member
    other = PresenceModel(names, dataclasses.replace(parent.config, seed=parent.config.seed + 9))
    other.fitted = True
    ensemble = PresenceModel.mean_of([parent, other]) if parent.members == 1 else parent
    from_ensemble = _presence_to_train(names, samples, ensemble, Path("parent"), 12, 0, said.append)
    assert from_ensemble is not None and from_ensemble.members == 1
    for key, value in ensemble.net.state_dict().items():
        assert torch.equal(from_ensemble.net.state_dict()[key], value), key
    parent.report["data_fingerprint"] = fingerprint  # trained on these very cases: kept as it is
    assert _presence_to_train(names, samples, parent, Path("parent"), 12, 0, said.append) is None
    assert said[-1] == "presence network: the one of parent was trained on these cases; kept as it is"


def test_the_training_budget_starts_with_the_process(app_lib: SimpleNamespace) -> None:
    """A training child's ``max_minutes`` counts from the process's start: its age agrees with ``ps``'s."""
    if shutil.which("ps") is None:
        pytest.skip("no ps here to compare with")
    age = app_lib.process_age_s()
    elapsed = int(subprocess.run(["ps", "-o", "etimes=", "-p", str(os.getpid())], capture_output=True, text=True,
                                 check=True).stdout)
    assert elapsed - 1.0 <= age <= elapsed + 2.0 and age > 0.0


def test_a_parent_calibrated_on_validation_cases_alone_gives_versions_calibrated_so(
        app_lib: SimpleNamespace, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads((world.shipped / "trust.json").read_text())
    del doc["report"]["cross_fit"]
    (world.shipped / "trust.json").write_text(json.dumps(doc))
    task = app_lib.LandmarkTrainTask(world.model, "cpu")
    result = task({**TRAIN_OPTIONS, "max_epochs": 1}, world.datastore)  # one presence epoch: not the point here
    assert result["calibrated"] is True and "answered without itself" not in result["calibration"]
    trust = json.loads((world.version_dir("v0001") / "trust.json").read_text())
    assert "cross_fit" not in trust["report"]
