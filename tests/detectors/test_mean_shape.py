"""The mean-shape baseline and the generic train -> predict -> evaluate command chain."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lmk3d.cli import main
from lmk3d.data import Sample, load_dataset
from lmk3d.detectors import detector_class, detector_names, load_detector
from lmk3d.detectors.mean_shape import MeanShapeDetector, frame_of
from lmk3d.errors import LandmarkError
from lmk3d.io import Volume, read_landmarks, read_table, write_image
from lmk3d.landmarks import LandmarkSet
from tests.conftest import oblique_affine

NAMES = ("a", "b", "c")
#: true landmark positions in the image's normalised frame (centre 0, extent 1 per RAS axis)
U = np.array([[0.1, -0.2, 0.05], [-0.25, 0.3, 0.0], [0.0, 0.0, -0.3]])


def _case(tmp: Path, name: str, affine: np.ndarray, shape: tuple[int, int, int], jitter: np.ndarray,
          found: np.ndarray | None = None) -> Sample:
    path = write_image(tmp / f"{name}.nii.gz", Volume(np.zeros(shape, np.int16), affine))
    centre, extent = frame_of(shape, affine)
    xyz = centre + extent * (U + jitter)
    return Sample(name, path, LandmarkSet(NAMES, xyz, found=found))


def test_registered_with_uniform_profiles() -> None:
    assert "mean_shape" in detector_names()
    cls = detector_class("mean_shape")
    assert cls is MeanShapeDetector and {"cpu", "tiny"} <= set(cls.profiles)


def test_mean_position_relative_to_the_field_of_view(tmp_path: Path, rng: np.random.Generator) -> None:
    jitters = [rng.normal(0, 0.02, size=(3, 3)) for _ in range(6)]
    jitters.append(-np.sum(jitters, axis=0))  # the training mean of U + jitter is exactly U
    train = [_case(tmp_path, f"t{i}", oblique_affine(rng, spacing=(1.0 + 0.1 * i, 0.8, 2.0)),
                   (20 + i, 24, 12), j) for i, j in enumerate(jitters)]
    det = MeanShapeDetector.create(NAMES, "tiny")
    report = det.fit(train, progress=False)
    assert report["n_train"] == 7 and report["train_mre_mm"] > 0
    # A new image anywhere, of any size and orientation: the landmarks follow its field of view.
    new = _case(tmp_path, "new", oblique_affine(rng, spacing=(0.5, 0.7, 3.0), flip=(-1, -1, 1)), (40, 30, 16),
                np.zeros((3, 3)))
    image = new.load_image()
    pred = det.predict(image)
    assert new.landmarks is not None
    np.testing.assert_allclose(pred.xyz_mm_ras, new.landmarks.xyz_mm_ras, atol=1e-6)
    # found = inside the (oblique) field of view, whose RAS bounding box is larger than itself
    np.testing.assert_array_equal(pred.found, image.contains_ras(pred.xyz_mm_ras))
    assert pred.found.any() and np.all((pred.scores >= 0) & (pred.scores <= 1))
    assert [s.name for s in det.predict_all(new.load_image()).stages] == ["mean_position"]


def test_missing_training_landmarks_are_masked_not_zero(tmp_path: Path, rng: np.random.Generator) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    train = [_case(tmp_path, f"t{i}", affine, (30, 30, 30), np.zeros((3, 3)),
                   found=np.array([True, i % 2 == 0, False])) for i in range(4)]
    for s in train:  # the missing landmark's stored position is garbage: it must be ignored
        assert s.landmarks is not None
        object.__setattr__(s, "landmarks", LandmarkSet(NAMES, np.where(s.landmarks.found[:, None],
                                                                       s.landmarks.xyz_mm_ras, 1e6),
                                                       found=s.landmarks.found))
    det = MeanShapeDetector.create(NAMES, "cpu")
    det.fit(train, progress=False)
    pred = det.predict(Volume(np.zeros((30, 30, 30), np.float32), affine))
    centre, extent = frame_of((30, 30, 30), affine)
    np.testing.assert_allclose(pred.xyz_mm_ras[:2], centre + extent * U[:2], atol=1e-9)
    assert not pred.found[2] and pred.scores[2] == 0.0  # never annotated: not found


def test_outside_the_field_of_view_is_not_found(tmp_path: Path) -> None:
    det = MeanShapeDetector.create(["x"], "tiny")
    det.offsets = np.array([[0.7, 0.0, 0.0]])  # beyond the half-extent: outside any image
    pred = det.predict(Volume(np.zeros((10, 10, 10), np.float32), np.eye(4)))
    assert not pred.found[0]


def test_save_load_gives_identical_predictions(tmp_path: Path, rng: np.random.Generator) -> None:
    train = [_case(tmp_path, f"t{i}", oblique_affine(rng), (16, 18, 10), rng.normal(0, 0.05, (3, 3)))
             for i in range(5)]
    det = MeanShapeDetector.create(NAMES, "cpu")
    det.fit(train, progress=False)
    det.save(tmp_path / "model")
    back = load_detector(tmp_path / "model", "cpu")
    assert isinstance(back, MeanShapeDetector) and back.profile == "cpu"
    image = Volume(np.zeros((21, 13, 9), np.float32), oblique_affine(rng, flip=(-1, 1, -1)))
    a, b = det.predict(image), back.predict(image)
    np.testing.assert_array_equal(a.xyz_mm_ras, b.xyz_mm_ras)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.found, b.found)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_hn")
    assert main(["phantoms", "--out", str(out), "--n", "10", "--seed", "4", "--profile", "small",
                 "--size", "40,40,28"]) == 0
    return out


def test_cli_train_predict_evaluate_chain(tiny_set: Path, tmp_path: Path) -> None:
    model, pred, ev = tmp_path / "model", tmp_path / "pred", tmp_path / "eval"
    assert main(["train", "--detector", "mean_shape", "--profile", "tiny", "--data", str(tiny_set),
                 "--out", str(model), "--no-progress"]) == 0
    assert {"checkpoint.pt", "split.json", "train_report.json", "metrics.json"} <= {p.name for p in model.iterdir()}
    split = json.loads((model / "split.json").read_text())
    assert split["counts"] == {"train": 7, "val": 1, "test": 2} and split["seed"] == 0
    report = json.loads((model / "train_report.json").read_text())
    assert report["detector"] == "mean_shape" and report["groups"][0]["landmarks"] == ["chin", "occ_bone"]
    trained = json.loads((model / "metrics.json").read_text())

    # predict the test split of the dataset, then score it with `lmk3d evaluate`
    assert main(["predict", "--model", str(model), "--data", str(tiny_set), "--subset", "test",
                 "--out", str(pred)]) == 0
    assert sorted(p.name for p in pred.glob("*.mrk.json")) == sorted(f"{c}.mrk.json" for c in split["test"])
    with open(pred / "predictions.csv") as f:
        assert next(csv.reader(f)) == ["case", "name", "x_ras", "y_ras", "z_ras", "score", "found"]
    assert main(["evaluate", "--pred", str(pred / "predictions.csv"), "--truth", str(pred / "truth.csv"),
                 "--out", str(ev)]) == 0
    scored = json.loads((ev / "metrics.json").read_text())
    assert scored["overall"]["n_truth"] == trained["overall"]["n_truth"] > 0
    assert scored["overall"]["mre"] == pytest.approx(trained["overall"]["mre"], abs=1e-3)


def _train_with_a_site(tiny_set: Path, model: Path, site: Path) -> None:
    """A tiny mean_shape model in ``model`` and 6 small CT-like phantoms in ``site`` (cases that trained nothing)."""
    assert main(["train", "--detector", "mean_shape", "--profile", "tiny", "--data", str(tiny_set),
                 "--out", str(model), "--no-progress"]) == 0
    assert main(["phantoms", "--out", str(site), "--n", "6", "--seed", "5", "--profile", "small",
                 "--size", "40,40,28"]) == 0


def test_cli_calibrates_on_cases_that_trained_nothing_and_refuses_its_own_dataset(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, site, cal = tmp_path / "model", tmp_path / "site", tmp_path / "cal"
    _train_with_a_site(tiny_set, model, site)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(model), "--data", str(tiny_set), "--presence-epochs", "0",
                 "--calibration-data", str(tiny_set)]) == 2
    assert "the model's own dataset" in capsys.readouterr().err
    assert not (model / "trust.json").exists()
    assert main(["calibrate", "--model", str(model), "--data", str(tiny_set), "--presence-epochs", "0",
                 "--calibration-data", str(site), "--anatomy-check", "--out", str(cal)]) == 0
    out = capsys.readouterr().out
    assert "on 6 calibration cases" in out
    doc = json.loads((cal / "trust.json").read_text())
    report = doc["report"]
    assert report["calibration_data"] == str(site) and "--calibration-data" in report["command"]
    # the anatomy check: the 7 training images, a threshold over each calibration image (6 and their cut variants)
    assert "--anatomy-check" in report["command"] and doc["anatomy"]["n_images"] == 7
    # mean_shape fixes no modality; the image check takes the one of its (CT-like) training images
    assert doc["image"]["modality"] == "CT" and "image check: modality CT, from the training images" in out
    assert len(doc["anatomy"]["reference"]) > 6 and doc["anatomy"]["threshold"] > max(doc["anatomy"]["reference"])
    labelled = [s.case for s in load_dataset(site) if s.landmarks is not None]
    assert sorted(report["calibration_cases"]) == sorted(labelled) and len(labelled) == 6


def test_cli_calibrates_with_an_ensemble_of_presence_networks_only_of_other_seeds(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.trust.presence import PresenceModel

    model, site = tmp_path / "model", tmp_path / "site"
    _train_with_a_site(tiny_set, model, site)
    nets = [tmp_path / f"net{s}" for s in (1, 2)]
    for s, net in zip((1, 2), nets, strict=True):
        assert main(["calibrate", "--model", str(model), "--data", str(tiny_set), "--presence-epochs", "1",
                     "--seed", str(s), "--calibration-data", str(site), "--out", str(net)]) == 0
    capsys.readouterr()
    common = ["calibrate", "--model", str(model), "--data", str(tiny_set), "--calibration-data", str(site)]
    assert main([*common, "--presence", str(nets[0]), "--presence-ensemble"]) == 2
    assert "two or more --presence networks" in capsys.readouterr().err
    assert main([*common, "--presence", str(nets[0]), str(nets[0]), "--presence-ensemble"]) == 2
    assert "same seed" in capsys.readouterr().err
    assert not (model / "trust.json").exists()
    out = tmp_path / "ens"
    assert main([*common, "--presence", str(nets[0]), str(nets[1]), "--presence-ensemble", "--out", str(out)]) == 0
    report = json.loads((out / "trust.json").read_text())["report"]
    assert "--presence-ensemble" in report["command"] and len(report["presence_choice"]) == 2
    served = PresenceModel.load(out)
    assert served is not None
    assert served.members == (2 if report["presence_choice"][1]["chosen"] else 1)


@pytest.mark.parametrize("fmt", ["fcsv", "json", "csv"])
def test_cli_predict_images_in_each_format(tiny_set: Path, tmp_path: Path, fmt: str) -> None:
    model = tmp_path / "model"
    assert main(["train", "--detector", "mean_shape", "--profile", "cpu", "--data", str(tiny_set),
                 "--out", str(model), "--no-progress"]) == 0
    images = [str(s.image_path) for s in load_dataset(tiny_set)][:2]
    assert main(["predict", "--model", str(model), "--out", str(tmp_path / "p"), "--format", fmt, *images]) == 0
    table = read_table(tmp_path / "p" / "predictions.csv")
    for case, lm in table.items():
        one = read_landmarks(tmp_path / "p" / f"{case}.{fmt}")
        assert one.reorder(lm.names).allclose(lm, atol_mm=1e-3)
    assert len(table) == 2


def test_cli_bad_input_exits_2(tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--detector", "nope", "--data", str(tiny_set), "--out", str(tmp_path / "m")]) == 2
    assert "unknown detector 'nope'" in capsys.readouterr().err
    assert main(["train", "--detector", "mean_shape", "--profile", "paper2", "--data", str(tiny_set),
                 "--out", str(tmp_path / "m")]) == 2
    assert main(["predict", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "p"), "x.nii.gz"]) == 2
    assert main(["train", "--detector", "mean_shape", "--data", str(tiny_set), "--out", str(tmp_path / "m"),
                 "--set", "bogus=1"]) == 2
    assert "unknown config field(s) bogus" in capsys.readouterr().err
    assert main(["train", "--detector", "mean_shape", "--data", str(tiny_set), "--out", str(tmp_path / "m"),
                 "--set", "hit_radius_mm"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_cli_train_config_overrides(tiny_set: Path, tmp_path: Path) -> None:
    assert main(["train", "--detector", "mean_shape", "--data", str(tiny_set), "--out", str(tmp_path / "m"),
                 "--no-progress", "--set", "hit_radius_mm=3.5"]) == 0
    model = load_detector(tmp_path / "m", "cpu")
    assert model.config.hit_radius_mm == 3.5 and model.profile == "cpu+overrides"
    report = json.loads((tmp_path / "m" / "train_report.json").read_text())
    assert report["command"].endswith("--set hit_radius_mm=3.5")


def _calibrate_on_a_site(tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         presence_epochs: int) -> tuple[list[str], Path]:
    """A tiny model and a site (:func:`_train_with_a_site`): the ``lmk3d calibrate`` arguments for them, and
    the folder to write the trust model to."""
    model, site = tmp_path / "model", tmp_path / "site"
    _train_with_a_site(tiny_set, model, site)
    capsys.readouterr()
    return (["calibrate", "--model", str(model), "--data", str(tiny_set), "--calibration-data", str(site),
             "--presence-epochs", str(presence_epochs)], tmp_path / "cal")


def test_cli_trains_a_local_presence_network_on_the_detectors_own_points(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.trust.presence import PresenceModel

    common, out = _calibrate_on_a_site(tiny_set, tmp_path, capsys, presence_epochs=1)
    assert main([*common, "--presence-answer-variants", "2"]) == 2  # a global network has no points to centre on
    assert "--presence-answer-variants 2: give a count of 0 or more, with --train-presence local" in \
        capsys.readouterr().err
    assert main([*common, "--train-presence", "local", "--presence-answer-variants", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the detector answered 2 cut variants of each of" in printed
    net = PresenceModel.load(out)
    assert net is not None and net.config.mode == "local" and net.config.answer_variants == 2
    doc = json.loads((out / "trust.json").read_text())
    assert "--train-presence local --presence-answer-variants 2" in doc["report"]["command"]


def test_cli_calibrates_a_model_that_pulls_points_just_beyond_the_field_of_view_inside(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmk3d.trust import load_trust

    common, out = _calibrate_on_a_site(tiny_set, tmp_path, capsys, presence_epochs=0)
    model, site = tmp_path / "model", tmp_path / "site"
    assert main([*common, "--pull-inside-mm", "-1"]) == 2
    assert "--pull-inside-mm -1.0: give a distance in mm, 0 or more" in capsys.readouterr().err
    assert main([*common, "--pull-inside-mm", "5", "--out", str(out)]) == 0
    trust = load_trust(out)
    assert trust is not None and trust.pull_inside_mm == 5.0
    assert trust.report["command"].endswith("--pull-inside-mm 5")
    # A version the server trains from it keeps judging so (as it keeps the tolerance and the anatomy check).
    from lmk3d.calibrate import calibrate_new_weights
    from lmk3d.data import read_split

    split = read_split(model)
    version, _ = calibrate_new_weights(load_detector(model, "cpu"), list(load_dataset(tiny_set).subset(split.train)),
                                       [s for s in load_dataset(site) if s.landmarks is not None], [out])
    assert version is not None and version.pull_inside_mm == 5.0


def test_cli_trains_the_presence_network_on_more_cases_and_nothing_else(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--presence-data DIR``: its cases with every landmark join the presence network's training alone (the
    shape model, the image check and the calibration are as without it); the model's own dataset and its
    calibration data are refused, and so is a run that trains no network."""
    common, out = _calibrate_on_a_site(tiny_set, tmp_path, capsys, presence_epochs=1)
    site, more = tmp_path / "site", tmp_path / "more"
    assert main(["phantoms", "--out", str(more), "--n", "5", "--seed", "6", "--profile", "small",
                 "--size", "40,40,28"]) == 0
    for refused, why in ((tiny_set, "own dataset"), (site, "calibration data")):
        capsys.readouterr()
        assert main([*common, "--presence-data", str(refused), "--out", str(out)]) == 2
        assert f"--presence-data {refused}: that is the model's own dataset or its calibration data" in \
            capsys.readouterr().err, why
    assert main([*common, "--presence", str(tmp_path / "model"), "--presence-data", str(more)]) == 2
    assert "no presence network is trained here" in capsys.readouterr().err
    assert not out.exists()
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "trust.json").read_text())
    capsys.readouterr()
    assert main([*common, "--presence-data", str(more), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "trust.json").read_text())
    complete = [s for s in load_dataset(more) if s.landmarks is not None and len(s.landmarks) == 5
                and np.isfinite(s.landmarks.xyz_mm_ras).all()]
    cases = [d["report"]["presence_training"]["training_cases"] for d in (doc, plain)]
    extra = cases[0] - cases[1]
    assert extra == len(complete) > 0 and f"({len(complete)} of them from the extra presence data)" in printed
    assert doc["report"]["command"].endswith(f"--presence-data {more}")
    for key in ("shape", "image"):  # fitted on the training and calibration cases only, as before
        assert doc[key] == plain[key], key
    assert doc["report"]["calibration_cases"] == plain["report"]["calibration_cases"]


def test_leave_one_out_is_the_fit_without_that_case(tmp_path: Path, rng: np.random.Generator) -> None:
    train = [_case(tmp_path, f"t{i}", oblique_affine(rng, spacing=(1.0, 0.9 + 0.1 * i, 1.5)), (18 + i, 20, 12),
                   rng.normal(0, 0.05, (3, 3)), found=np.array([True, i != 2, True])) for i in range(5)]
    det = MeanShapeDetector.create(NAMES, "cpu")
    det.fit(train, progress=False)
    before = det.stage.offsets.copy()
    image = Volume(np.zeros((21, 13, 9), np.float32), oblique_affine(rng, flip=(-1, 1, -1)))
    left = det.leave_one_out(train)
    assert len(left) == len(train)
    for i, d in enumerate(left):
        oracle = MeanShapeDetector.create(NAMES, "cpu")  # the detector's own fit on the other cases
        oracle.fit(train[:i] + train[i + 1:], progress=False)
        assert isinstance(d, MeanShapeDetector) and d.trust is None
        np.testing.assert_allclose(d.stage.offsets, oracle.stage.offsets, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(d.stage.n_cases, oracle.stage.n_cases)
        np.testing.assert_allclose(d.predict(image).xyz_mm_ras, oracle.predict(image).xyz_mm_ras, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(det.stage.offsets, before)  # the fitted detector itself is left as it was
    with pytest.raises(LandmarkError, match="not the mean of these training cases"):
        det.leave_one_out(train[1:])
    alone = [_case(tmp_path, f"s{i}", np.eye(4), (20, 20, 20), np.zeros((3, 3)),
                   found=np.array([True, i == 0, True])) for i in range(3)]
    det.fit(alone, progress=False)
    with pytest.raises(LandmarkError, match="s0 is the only one with a landmark"):
        det.leave_one_out(alone)


def test_a_detector_with_networks_refuses_cross_fitting() -> None:
    with pytest.raises(LandmarkError, match="one training per case; only mean_shape"):
        detector_class("pin").create(NAMES, "tiny").leave_one_out([])


def test_cli_calibrates_the_scores_on_training_cases_answered_without_themselves(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, site = tmp_path / "model", tmp_path / "site"
    assert main(["train", "--detector", "mean_shape", "--profile", "tiny", "--data", str(tiny_set), "--out",
                 str(model), "--val-fraction", "0.5", "--test-fraction", "0.1", "--no-progress"]) == 0
    split = json.loads((model / "split.json").read_text())
    assert (len(split["train"]), len(split["val"])) == (4, 5)
    base = ["calibrate", "--model", str(model), "--data", str(tiny_set), "--presence-epochs", "0"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--cross-fit", "--out", str(tmp_path / "cross")]) == 0
    plain, cross = (json.loads((tmp_path / d / "trust.json").read_text()) for d in ("plain", "cross"))
    report = cross["report"]
    assert "--cross-fit" in report["command"] and "--cross-fit" not in plain["report"]["command"]
    assert sorted(report["calibration_cases"]) == sorted(split["val"])  # the not-found rule's cases: validation only
    assert report["not_found_rule"] == plain["report"]["not_found_rule"] and cross["image"] == plain["image"]
    fit = report["cross_fit"]
    assert fit["cross_fitted_cases"] == 4 and fit["cases_scored"] == 9 and fit["cross_fitted_points"] > 0
    assert report["calibration_points"] == plain["report"]["calibration_points"] + fit["cross_fitted_points"]
    lo, hi = fit["difference_interval_95"]
    assert lo <= fit["brier_difference"] <= hi
    assert cross["weights"] != plain["weights"]
    capsys.readouterr()
    assert main([*base, "--cross-fit", "--calibration-data", str(tiny_set)]) == 2
    assert main(["phantoms", "--out", str(site), "--n", "5", "--seed", "5", "--profile", "small",
                 "--size", "40,40,28"]) == 0
    capsys.readouterr()
    assert main([*base, "--cross-fit", "--calibration-data", str(site)]) == 2
    assert "--cross-fit: the training cases' points would join calibration points from other data" in \
        capsys.readouterr().err


def test_cli_calibrates_the_scores_on_training_cases_answered_by_fold_models(
        tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``lmk3d train --fold k/n`` leaves fold k of the training cases out (same validation and test cases);
    ``lmk3d calibrate --cross-fit-models`` answers each training case with the fold model that never saw it."""
    from lmk3d.calibrate import fold_answers
    from lmk3d.data import read_split

    model = tmp_path / "model"
    common = ["--detector", "mean_shape", "--profile", "tiny", "--data", str(tiny_set), "--val-fraction", "0.5",
              "--test-fraction", "0.1", "--no-progress"]
    assert main(["train", *common, "--out", str(model)]) == 0
    folds = [tmp_path / f"fold{k}" for k in range(2)]
    for k, f in enumerate(folds):
        assert main(["train", *common, "--out", str(f), "--fold", f"{k}/2"]) == 0
    split = read_split(model)
    held = [json.loads((f / "split.json").read_text())["fold"]["held_out"] for f in folds]
    assert sorted(held[0] + held[1]) == sorted(split.train) and len(held[0]) == len(held[1]) == 2
    for f, h in zip(folds, held, strict=True):
        fsplit = read_split(f)
        assert fsplit.val == split.val and fsplit.test == split.test
        assert set(fsplit.train) == set(split.train) - set(h)
        report = json.loads((f / "train_report.json").read_text())
        assert report["counts"]["train"] == 2 and "--fold" in report["command"]

    # each case is answered by the fold model that left it out: its mean is of the other fold's cases
    det = load_detector(model)
    ds = load_dataset(tiny_set)
    train = list(ds.subset(split.train))
    pairs = fold_answers(det, split, train, [str(f) for f in folds])
    assert sorted(s.case for s, _ in pairs) == sorted(split.train)
    for s, answer in pairs:
        owner = folds[0] if s.case in held[0] else folds[1]
        vol = s.load_image()
        want = load_detector(owner).predict_all(vol, trust=False)
        got, _ = answer(vol)
        np.testing.assert_array_equal(got.xyz_mm_ras, (want.raw or want.landmarks).xyz_mm_ras)
        assert not np.allclose(got.xyz_mm_ras, det.predict_all(vol, trust=False).landmarks.xyz_mm_ras)

    base = ["calibrate", "--model", str(model), "--data", str(tiny_set), "--presence-epochs", "0"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--cross-fit-models", *map(str, folds), "--out", str(tmp_path / "cross")]) == 0
    plain, cross = (json.loads((tmp_path / d / "trust.json").read_text()) for d in ("plain", "cross"))
    report = cross["report"]
    assert f"--cross-fit-models {folds[0]} {folds[1]}" in report["command"]
    assert report["not_found_rule"] == plain["report"]["not_found_rule"] and cross["image"] == plain["image"]
    fit = report["cross_fit"]
    assert fit["cross_fitted_cases"] == 4 and fit["cases_scored"] == 9
    on_val = fit["validation_points"]
    assert on_val["cases"] == 5 and 0 < on_val["points"] < fit["points_scored"]
    lo, hi = on_val["difference_interval_95"]
    assert lo <= on_val["brier_difference"] <= hi

    # A version the server trains from such a parent cannot train fold models on the fly: a detector that cannot
    # be refitted without a case (as a network) says so and is calibrated on its validation cases alone.
    from lmk3d.calibrate import calibrate_new_weights
    from lmk3d.detectors.base import Detector

    monkeypatch.setattr(MeanShapeDetector, "leave_one_out", Detector.leave_one_out)
    version, record = calibrate_new_weights(det, train, list(ds.subset(split.val)), [tmp_path / "cross"],
                                            fitted_on=train)
    assert version is not None and "cross_fit" not in version.report
    assert "no training case answered without itself (mean_shape: cross-fitted calibration needs" in record["reason"]
    assert "lmk3d calibrate --cross-fit-models" in record["reason"]
    monkeypatch.undo()

    # folds that are not this model's, or that leave a case out twice, are refused and write nothing
    other = tmp_path / "other"
    assert main(["train", *common, "--split-seed", "1", "--out", str(other), "--fold", "0/2"]) == 0
    capsys.readouterr()
    for bad, message in (([folds[0], other], "validation or test cases are not the model's"),
                         ([folds[0], folds[0]], "is also left out by"),
                         ([folds[0], model], "names no left-out fold")):
        assert main([*base, "--cross-fit-models", *map(str, bad), "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert main([*base, "--cross-fit", "--cross-fit-models", str(folds[0]), "--out", str(tmp_path / "bad")]) == 2
    assert "not with --cross-fit" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
