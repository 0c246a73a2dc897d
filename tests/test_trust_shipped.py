"""The shipped hippocampus models' trust on real images they never saw (the test split).

These fail if a landmark cut off by the field of view is called found, if an image of another kind gets
confident points, or if ordinary test images are turned away. The full figures (every test case, every
kind) come from ``benchmarks/trust_eval.py`` and are in docs/trust.md; here a fixed subset keeps the
run short. Margins: the thresholds below sit well under the measured rates (docs/trust.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmk3d.data import load_dataset, read_split
from lmk3d.detectors import load_detector
from lmk3d.io.image import read_image
from lmk3d.trust import OOD_SCORE_CAP
from lmk3d.trust.cuts import cut_outside
from tests.conftest import DATA, ROOT

MODELS = [m for m in ("cascade-hippocampus", "consensus-hippocampus") if (ROOT / "models" / m / "trust.json").is_file()]
OTHER_KINDS = {
    "whole-head MPRAGE (DICOM)": DATA / "dicom" / "mr_brain_sagittal_mprage",
    "MNI template": DATA / "afids_mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "spine T2": DATA / "spine_t2" / "t2.nii.gz",
    "abdominal CT": DATA / "ct_abdomen_examples" / "example_ct.nii.gz",
}


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return load_detector(ROOT / "models" / request.param, "cpu")


@pytest.fixture(scope="module")
def consensus():  # type: ignore[no-untyped-def]
    """The shipped hippocampus consensus, loaded once for the tests that need it alone."""
    if "consensus-hippocampus" not in MODELS:
        pytest.skip("models/consensus-hippocampus has no trust.json")
    return load_detector(ROOT / "models" / "consensus-hippocampus", "cpu")


@pytest.fixture(scope="module")
def test_cases():  # type: ignore[no-untyped-def]
    split = read_split(ROOT / "models" / "cascade-hippocampus")
    ds = load_dataset(DATA / "hippocampus")
    return list(ds.subset(split.test))[:8]


def test_the_shipped_models_carry_a_trust_model() -> None:
    assert "cascade-hippocampus" in MODELS, "models/cascade-hippocampus/trust.json is missing (lmk3d calibrate)"
    doc = json.loads((ROOT / "models" / "cascade-hippocampus" / "trust.json").read_text())
    split = read_split(ROOT / "models" / "cascade-hippocampus")
    # calibrated on the validation cases only: never a test case
    assert set(doc["report"]["calibration_cases"]) == set(split.val)


def test_cut_off_landmarks_are_not_found_and_the_others_stay(model, test_cases) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(777)
    outside_not_found, inside_found = [], []
    for s in test_cases:
        vol = s.load_image()
        for t in range(len(s.landmarks)):
            cut = cut_outside(vol, s.landmarks.xyz_mm_ras, t, float(rng.uniform(3.0, 8.0)))
            if cut is None:
                continue
            pred = model.predict_all(cut.volume)
            inside = cut.volume.contains_ras(s.landmarks.xyz_mm_ras, margin=0.5)
            lm = pred.landmarks
            outside_not_found += list(~lm.found[~inside])
            inside_found += list(lm.found[inside])
            # a landmark reported not found keeps its name and pretends no position
            assert lm.names == s.landmarks.names
            assert np.isnan(lm.xyz_mm_ras[~lm.found]).all() and (lm.scores[~lm.found] == 0).all()
    assert len(outside_not_found) >= 30
    assert np.mean(outside_not_found) >= 0.85, f"cut-off landmarks called found: {np.mean(outside_not_found):.2f}"
    assert np.mean(inside_found) >= 0.85, f"landmarks inside lost: {np.mean(inside_found):.2f}"


def test_ordinary_test_images_are_in_distribution_with_calibrated_points(model, test_cases) -> None:  # type: ignore[no-untyped-def]
    verdicts, found = [], []
    for s in test_cases:
        pred = model.predict_all(s.load_image())
        verdicts.append(pred.verdict.in_distribution)
        found += list(pred.landmarks.found)
        lm = pred.landmarks
        assert lm.calibrated and lm.tolerance_mm == 3.0
        assert np.all(np.isfinite(lm.radius_mm[lm.found])) and np.all(lm.radius_mm[lm.found] > 0)
        np.testing.assert_array_equal(lm.xyz_mm_ras[lm.found], pred.raw.xyz_mm_ras[lm.found])
    assert sum(verdicts) >= len(verdicts) - 1
    assert np.mean(found) >= 0.9


@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_images_of_other_kinds_get_no_confident_point(model, kind: str) -> None:  # type: ignore[no-untyped-def]
    pred = model.predict_all(read_image(OTHER_KINDS[kind]))
    assert not pred.verdict.in_distribution, pred.verdict
    assert pred.verdict.reason
    assert not pred.landmarks.found.any()
    assert pred.landmarks.scores.max() <= OOD_SCORE_CAP


def test_the_anatomy_check_refuses_most_contrast_inverted_test_images(consensus, test_cases) -> None:  # type: ignore[no-untyped-def]
    """The consensus carries the anatomy check (docs/trust.md): 82.5 % of the 40 inverted test images refused,
    7 of these 8; without it 12.5 %. Its own test images stay in (the test above)."""
    from lmk3d.io.image import Volume

    det = consensus
    assert det.trust is not None and det.trust.anatomy is not None
    refused = 0
    for s in test_cases:
        vol = s.load_image()
        lo, hi = np.percentile(vol.array, [1.0, 99.0])
        pred = det.predict_all(Volume((lo + hi - vol.array).astype(np.float32), vol.affine))
        if not pred.verdict.in_distribution:
            refused += 1
            assert not pred.landmarks.found.any() and pred.verdict.reason
    assert refused >= 5, f"{refused} of {len(test_cases)} contrast-inverted test images refused"


def test_the_consensus_weighs_its_members_by_their_uncapped_scores(consensus, test_cases, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A member's scores are capped on an image it finds atypical; the consensus was calibrated on the members'
    calibrated scores as they are, so it asks them uncapped and caps only its own answer."""
    det = consensus
    asked: list[object] = []
    for member in det.members.values():
        own = member.predict_all

        def wrapped(image, *args, _own=own, **kwargs):  # type: ignore[no-untyped-def]
            asked.append(kwargs.get("cap_atypical", True))
            return _own(image, *args, **kwargs)

        monkeypatch.setattr(member, "predict_all", wrapped)
    pred = det.predict_all(test_cases[0].load_image())
    assert asked == [False, False, False]
    assert pred.verdict.in_distribution and not pred.verdict.atypical


def test_crops_of_a_whole_head_get_no_confident_point(consensus) -> None:  # type: ignore[no-untyped-def]
    """Crops of the whole-head MPRAGE the size of a test image (benchmarks/trust_eval.py's, seed 5) that the
    consensus lets through lie farther than nearly every calibration image: atypical, every score capped
    (docs/trust.md: 14 of the 20 refused, the other 6 atypical). Fails if such a crop gets a confident point."""
    from lmk3d.trust.cuts import crop

    det = consensus
    split = read_split(ROOT / "models" / "consensus-hippocampus")
    test = list(load_dataset(DATA / "hippocampus").subset(split.test))[:10]
    images = [s.load_image() for s in test]
    typical = np.median([np.asarray(v.shape) * v.spacing_mm for v in images], axis=0)
    vol = read_image(OTHER_KINDS["whole-head MPRAGE (DICOM)"])
    size = np.maximum((typical / vol.spacing_mm).astype(int), 8)
    rng = np.random.default_rng(5)
    passed = 0
    for _ in range(10):
        lo = [int(rng.integers(0, max(vol.shape[a] - size[a], 1))) for a in range(3)]
        pred = det.predict_all(crop(vol, lo, [min(lo[a] + size[a], vol.shape[a]) for a in range(3)]))
        if pred.verdict.in_distribution:
            passed += 1
            assert pred.verdict.atypical, pred.verdict
            assert "capped" in pred.verdict.reason
        assert pred.landmarks.scores.max() <= OOD_SCORE_CAP, pred.verdict
    assert passed >= 1  # a crop that passes the checks is among these, or the cap is not tested


def test_lmk3d_consensus_from_rewrites_the_weighting_and_keeps_the_members(consensus, test_cases,  # type: ignore[no-untyped-def]
                                                                           tmp_path, capsys) -> None:
    """``lmk3d consensus --from DIR --weighting W``: the same members (as the checkpoint holds them, their trust
    models included), another way of weighting them; the shipped consensus weighs by fixed weights per member and
    landmark, fitted on its validation cases (docs/trust.md), which the same command fits again exactly."""
    from lmk3d.cli import main
    from lmk3d.detectors.base import mark_outside
    from lmk3d.detectors.consensus import combine

    shipped = ROOT / "models" / "consensus-hippocampus"
    assert main(["consensus", "--from", str(shipped), "--weighting", "score", "--out", str(tmp_path / "score")]) == 0
    rewritten = load_detector(tmp_path / "score", "cpu")
    assert consensus.config.weighting == "landmark" and rewritten.config.weighting == "score"
    assert (tmp_path / "score" / "split.json").read_text() == (shipped / "split.json").read_text()
    image = test_cases[1].load_image()
    names = consensus.landmark_names
    answers = [consensus.members[m].predict_all(image, cap_atypical=False).landmarks.reorder(names)
               for m in consensus.config.members]
    for det, weighting in ((consensus, "landmark"), (rewritten, "score")):
        raw = det.predict_all(image, trust=False).landmarks
        expected = mark_outside(combine(answers, det.config.inlier_mm, weighting, det.config.landmark_weights)[0],
                                image)
        assert np.array_equal(raw.xyz_mm_ras, expected.xyz_mm_ras, equal_nan=True), weighting
        assert np.array_equal(raw.scores, expected.scores), weighting
    # the shipped landmark weights are what the documented command fits on the validation split
    assert main(["consensus", "--from", str(tmp_path / "score"), "--weighting", "landmark",
                 "--out", str(tmp_path / "landmark")]) == 0
    refit = load_detector(tmp_path / "landmark", "cpu").config
    assert refit.weighting == "landmark"
    assert np.allclose(refit.landmark_weights, consensus.config.landmark_weights, rtol=0, atol=1e-6)
    assert "validation split (20 cases)" in capsys.readouterr().out
    own = str(DATA / "hippocampus")
    assert main(["consensus", "--from", str(shipped), "--weighting", "landmark", "--fit-data", own,
                 "--out", str(tmp_path / "own")]) != 0
    assert "the members' own dataset" in capsys.readouterr().err
    assert main(["consensus", "--from", str(shipped), "--weighting", "radius", "--fit-data", own,
                 "--out", str(tmp_path / "own")]) != 0
    assert "with --weighting landmark" in capsys.readouterr().err
    assert not (tmp_path / "own").exists()
    assert main(["consensus", "--from", str(shipped), "--out", str(shipped)]) != 0
    assert "give a new folder" in capsys.readouterr().err
    cascade = str(ROOT / "models" / "cascade-hippocampus")
    assert main(["consensus", "--from", cascade, "--out", str(tmp_path / "x")]) != 0
    assert "not a consensus" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _fitted_again(shipped, flag: str, tmp_path) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    """The shipped ``trust.json`` and the one the command it records (which carries ``flag``) fits again in
    ``tmp_path``, checked equal in its weights, normalised errors and 90 % quantile to 1e-9."""
    from lmk3d.cli import main

    doc = json.loads((shipped / "trust.json").read_text())
    command = doc["report"]["command"].split()
    assert command[:2] == ["lmk3d", "calibrate"] and flag in command
    args = [str(ROOT / a) if a.startswith("models/") else a for a in command[2:]]
    args = [str(DATA / "hippocampus") if a == "../shared/data/hippocampus" else a for a in args]
    assert main(["calibrate", *args, "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "trust.json").read_text())
    np.testing.assert_allclose(again["weights"], doc["weights"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(again["normalised"], doc["normalised"], rtol=0, atol=1e-9)
    assert again["q90"] == pytest.approx(doc["q90"], abs=1e-9)
    return doc, again


def test_mean_shape_hippocampus_is_calibrated_on_training_cases_answered_without_themselves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The shipped ``mean_shape-hippocampus`` scores come from its validation cases and its 140 training cases,
    each answered by the mean of the other 139 (docs/trust.md, "Cross-fitted calibration points"): the command its
    ``trust.json`` records fits them again, and its not-found rule and image checks come from the validation cases
    alone."""
    shipped = ROOT / "models" / "mean_shape-hippocampus"
    doc, again = _fitted_again(shipped, "--cross-fit", tmp_path)
    split = read_split(shipped)
    report = again["report"]
    assert set(report["calibration_cases"]) == set(split.val)
    fit = report["cross_fit"]
    assert fit["cross_fitted_cases"] == len(split.train) == 140 and fit["cases_scored"] == 160
    # the rule it shipped by: the Brier score of points no fit saw is lower, the case-bootstrap interval below 0
    assert fit["difference_interval_95"][1] < 0
    assert report["not_found_rule"] == doc["report"]["not_found_rule"]


#: Shipped models whose scores are also calibrated on their training cases answered by fold models, with their folds.
FOLD_CALIBRATED = {"prior_guided-hippocampus": 4}


@pytest.mark.parametrize("name", sorted(FOLD_CALIBRATED))
def test_models_calibrated_on_training_cases_answered_by_fold_models(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """These shipped models' scores also come from their 140 training cases, each answered by the fold model
    (``folds/``, ``lmk3d train --fold k/K``) trained without it (docs/trust.md, "Cross-fitted calibration points from
    fold networks"): the command the ``trust.json`` records fits them again, the folds leave out each training case
    once, and the rule it shipped by holds: on the validation records' points (the shipped model's own answers) the
    Brier score's case-bootstrap interval lies below zero."""
    shipped = ROOT / "models" / name
    doc, again = _fitted_again(shipped, "--cross-fit-models", tmp_path)
    split = read_split(shipped)
    held = [json.loads((shipped / "folds" / f"fold{k}" / "split.json").read_text())["fold"]["held_out"]
            for k in range(FOLD_CALIBRATED[name])]
    assert sorted(c for h in held for c in h) == sorted(split.train)
    report = again["report"]
    assert set(report["calibration_cases"]) == set(split.val)
    assert report["not_found_rule"] == doc["report"]["not_found_rule"] and again["image"] == doc["image"]
    fit = report["cross_fit"]
    assert fit["cross_fitted_cases"] == 140 and fit["validation_points"]["cases"] == 20
    assert fit["validation_points"]["difference_interval_95"][1] < 0
