"""The image check on the anatomy around the detector's points (lmk3d.trust.anatomy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.trust import AnatomyModel, ImageVerdict, TrustModel, anatomy_verdict, apply_trust, load_trust, save_trust
from lmk3d.trust.anatomy import anatomy_descriptor, anchor
from lmk3d.trust.cuts import cut_outside

NAMES = ("a", "b", "c", "d")
#: the landmarks about the structure's centre, in mm
OFFSETS = np.array([[-9.0, -12.0, 0.0], [9.0, -12.0, 0.0], [0.0, 12.0, -6.0], [0.0, 4.0, 8.0]])


def _case(rng: np.random.Generator, shape: tuple[int, int, int] = (36, 48, 34)) -> tuple[Volume, LandmarkSet]:
    """A bright ellipsoid with a dark core and a bright rod, at a random place, in noise; its landmarks."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    centre = np.array(shape) / 2.0 + rng.normal(0, 1.5, 3)
    d = grid - centre
    body = np.exp(-np.sum((d / np.array([10.0, 14.0, 9.0])) ** 2, -1))
    core = np.exp(-np.sum((d / np.array([4.0, 5.0, 4.0])) ** 2, -1))
    rod = np.exp(-((d[..., 0] - 6.0) ** 2 + (d[..., 2] + 3.0) ** 2) / 4.0) * (np.abs(d[..., 1]) < 15)
    a = 100.0 + 300.0 * body - 250.0 * core + 200.0 * rod * rng.uniform(0.8, 1.2) + rng.normal(0, 12, shape)
    xyz = centre + OFFSETS  # voxel = mm here
    return Volume(a.astype(np.float32), affine), LandmarkSet(NAMES, xyz, np.ones(len(NAMES)))


def _answer(truth: LandmarkSet, rng: np.random.Generator, wrong: int | None = None) -> LandmarkSet:
    """A detector's points: the truth give or take a millimetre, point ``wrong`` somewhere else."""
    xyz = truth.xyz_mm_ras + rng.normal(0, 1.0, truth.xyz_mm_ras.shape)
    if wrong is not None:
        xyz[wrong] = truth.xyz_mm_ras[wrong] + np.array([0.0, 0.0, 15.0])
    return LandmarkSet(NAMES, xyz, np.ones(len(NAMES)))


def _cut(vol: Volume, truth: LandmarkSet, t: int, rng: np.random.Generator) -> Volume:
    cut = cut_outside(vol, truth.xyz_mm_ras, t, float(rng.uniform(2.0, 8.0)))
    assert cut is not None
    return cut.volume


@pytest.fixture(scope="module")
def fitted() -> AnatomyModel:
    rng = np.random.default_rng(0)
    train = [_case(rng) for _ in range(30)]
    calibration = []
    for _ in range(8):
        vol, truth = _case(rng)
        calibration.append((vol, _answer(truth, rng)))
        for t in range(len(NAMES)):  # the cut variants, the cut-off point misplaced as a detector does
            calibration.append((_cut(vol, truth, t, rng), _answer(truth, rng, wrong=t)))
    return AnatomyModel.fit(train, calibration)


def test_the_distance_integrates_out_the_missing_voxels_like_the_full_covariance() -> None:
    rng = np.random.default_rng(1)
    size, k = 4, 3
    d = size ** 3
    x = rng.normal(0, 1, (40, k)) @ rng.normal(0, 1, (k, d)) + rng.normal(0, 0.3, (40, d))
    model = AnatomyModel._from_boxes(x, np.ones_like(x, dtype=bool), 10.0, size, k, np.zeros((4, 3)))
    # the oracle: the covariance the model stands for, written out, and its block on the observed voxels
    cov = model.components.T @ np.diag(model.variances - model.noise) @ model.components + model.noise * np.eye(d)
    probe = rng.normal(0, 1, d) * 1.5
    for seen in (np.ones(d, dtype=bool), rng.uniform(size=d) < 0.4):
        r = (probe - model.mean)[seen]
        expected = math.sqrt(float(r @ np.linalg.solve(cov[np.ix_(seen, seen)], r)) / int(seen.sum()))
        assert model.distance_of(probe, seen) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(model.distance_of(probe, np.zeros(d, dtype=bool)))


def test_missing_training_voxels_are_filled_by_the_model_not_counted_as_zero() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (60, 2)) @ rng.normal(0, 1, (2, 27)) + 5.0 + rng.normal(0, 0.1, (60, 27))
    seen = rng.uniform(size=x.shape) > 0.3
    model = AnatomyModel._from_boxes(np.where(seen, x, 0.0), seen, 10.0, 3, 2, np.zeros((4, 3)))
    full = AnatomyModel._from_boxes(x, np.ones_like(seen), 10.0, 3, 2, np.zeros((4, 3)))
    np.testing.assert_allclose(model.mean, full.mean, atol=0.1)  # zeros would pull the mean from 5 towards 3.5
    assert model.noise < 0.05


def test_the_box_is_centred_on_world_points_and_its_faces_count_as_missing() -> None:
    vol = Volume(np.arange(20 * 20 * 20, dtype=np.float32).reshape(20, 20, 20), np.diag([-2.0, 2.0, 2.0, 1.0]))
    centre = vol.ijk_to_ras(np.array([2.0, 10.0, 10.0])).reshape(3)
    _, seen = anatomy_descriptor(vol, centre, 16.0, 8)
    # the box's voxel centres, in the image's voxels (RAS axes, 2 mm apart, centred on the point)
    ax = (np.arange(8) - 3.5) * 2.0
    ras = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3) + centre
    ijk = vol.ras_to_ijk(ras).reshape(-1, 3)
    interpolated_inside = np.all((ijk >= 0.0) & (ijk <= 19.0), axis=1)  # every voxel it reads is in the image
    assert 0 < seen.sum() < seen.size
    assert np.all(interpolated_inside[seen])  # nothing kept reads the zeros outside
    i_plane = ijk[:, 0].reshape(8, 8, 8)[:, 0, 0]  # RAS x runs against i: the box's far x side leaves the image
    assert i_plane[0] > i_plane[-1] and i_plane[-1] < 0
    mask = seen.reshape(8, 8, 8)
    assert mask[0].any() and not mask[-1].any()
    empty = LandmarkSet(NAMES, np.full((4, 3), np.nan), np.zeros(4), np.zeros(4, dtype=bool))
    np.testing.assert_allclose(anchor(empty, vol), vol.ijk_to_ras(np.array([9.5, 9.5, 9.5])).reshape(3))


def test_cut_images_of_its_kind_pass_and_other_anatomy_or_contrast_does_not(fitted: AnatomyModel) -> None:
    rng = np.random.default_rng(3)
    assert np.isfinite(fitted.threshold) and len(fitted.reference) == 40
    passed = 0
    for _ in range(6):
        vol, truth = _case(rng)
        passed += fitted.distance(vol, _answer(truth, rng)) <= fitted.threshold
        for t in range(len(NAMES)):  # a cut-off point misplaced: the other points' centres still find the anatomy
            passed += fitted.distance(_cut(vol, truth, t, rng), _answer(truth, rng, wrong=t)) <= fitted.threshold
    assert passed >= 28  # of 30
    for _ in range(5):
        vol, truth = _case(rng)
        answer = _answer(truth, rng)
        lo, hi = np.percentile(vol.array, [1.0, 99.0])
        inverted = Volume((lo + hi - vol.array).astype(np.float32), vol.affine)
        stripes = Volume((np.indices(vol.shape).sum(0) % 6 * 60.0).astype(np.float32), vol.affine)
        smooth = Volume((100.0 + rng.normal(0, 12, vol.shape)).astype(np.float32), vol.affine)
        for other in (inverted, stripes, smooth):
            assert fitted.distance(other, answer) > fitted.threshold


def _trust(anatomy: AnatomyModel | None) -> TrustModel:
    weights = np.array([0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0])
    normalised = np.sort(np.random.default_rng(3).gamma(2.0, 0.5, 200))
    return TrustModel(NAMES, 3.0, weights, normalised, float(np.quantile(normalised, 0.9)), 0.0, math.inf, None,
                      None, {}, 0.0, anatomy=anatomy)


def test_an_image_whose_anatomy_is_unlike_is_refused_after_the_detector_and_says_why(fitted: AnatomyModel) -> None:
    rng = np.random.default_rng(4)
    vol, truth = _case(rng)
    answer = _answer(truth, rng)
    own = apply_trust(_trust(fitted), answer, None, vol)
    assert own.verdict.in_distribution and own.landmarks.found.all()
    assert 0.0 < own.verdict.score <= 1.0 and "anatomy" in own.verdict.reason
    assert own.verdict.to_json()["anatomy_distance"] <= fitted.threshold
    assert "anatomy_distance" not in apply_trust(_trust(None), answer, None, vol).verdict.to_json()
    lo, hi = np.percentile(vol.array, [1.0, 99.0])
    inverted = Volume((lo + hi - vol.array).astype(np.float32), vol.affine)
    other = apply_trust(_trust(fitted), answer, None, inverted)
    assert not other.verdict.in_distribution and "anatomy around the points is unlike" in other.verdict.reason
    assert not other.landmarks.found.any() and np.all(other.landmarks.scores == 0)
    assert np.isnan(other.landmarks.xyz_mm_ras).all() and other.landmarks.names == NAMES
    # an image the first check already refused keeps its reason
    first = ImageVerdict(False, 0.0, "the image looks like CT; the model was trained on MR")
    assert anatomy_verdict(_trust(fitted), first, answer, vol) is first


def test_the_anatomy_check_survives_trust_json_and_a_broken_one_is_refused(fitted: AnatomyModel, tmp_path) -> None:
    rng = np.random.default_rng(5)
    save_trust(tmp_path, _trust(fitted))
    again = load_trust(tmp_path)
    assert again is not None and again.anatomy is not None
    vol, truth = _case(rng)
    answer = _answer(truth, rng)
    assert again.anatomy.distance(vol, answer) == fitted.distance(vol, answer)
    np.testing.assert_array_equal(again.anatomy.offsets, fitted.offsets)
    plain = tmp_path / "plain"
    save_trust(plain, _trust(None))
    assert "anatomy" not in json.loads((plain / "trust.json").read_text())  # older files keep their layout
    doc = json.loads((tmp_path / "trust.json").read_text())
    doc["anatomy"]["mean"] = doc["anatomy"]["mean"][:-1]
    (tmp_path / "trust.json").write_text(json.dumps(doc))
    with pytest.raises(LandmarkError, match="anatomy check"):
        load_trust(tmp_path)


def test_a_merged_check_is_the_joint_fit_when_the_prior_kept_every_direction() -> None:
    rng = np.random.default_rng(6)
    d, k = 27, 6
    old = rng.normal(0, 1, (5, d)) + 2.0  # 5 images: 4 directions, all kept by 6 components
    new = rng.normal(0, 1, (9, d)) @ np.diag(rng.uniform(0.5, 2.0, d))
    off_old, off_new = rng.normal(0, 5, (4, 3)), rng.normal(0, 5, (4, 3))
    seen_old, seen_new = np.ones_like(old, dtype=bool), np.ones_like(new, dtype=bool)
    prior = AnatomyModel._from_boxes(old, seen_old, 10.0, 3, k, off_old)
    merged = prior.merged(new, seen_new, off_new, k)
    joint = AnatomyModel._from_boxes(np.concatenate([old, new]), np.ones((14, d), dtype=bool), 10.0, 3, k, off_old)
    assert merged.n_images == 14
    np.testing.assert_allclose(merged.mean, joint.mean, atol=1e-10)
    np.testing.assert_allclose(merged.variances, joint.variances, rtol=1e-8)
    np.testing.assert_allclose(np.abs(merged.components @ joint.components.T), np.eye(k), atol=1e-6)
    assert merged.noise == pytest.approx(joint.noise, rel=1e-6)
    np.testing.assert_allclose(merged.offsets, (5 * off_old + 9 * off_new) / 14)
    probe = rng.normal(0, 1, d)
    assert merged.distance_of(probe, np.ones(d, dtype=bool)) == pytest.approx(
        joint.distance_of(probe, np.ones(d, dtype=bool)), rel=1e-6)


def test_a_fine_tuned_check_knows_the_new_kind_and_keeps_the_old(fitted: AnatomyModel) -> None:
    rng = np.random.default_rng(7)

    def inverted(case: tuple[Volume, LandmarkSet]) -> tuple[Volume, LandmarkSet]:
        vol, truth = case
        lo, hi = np.percentile(vol.array, [1.0, 99.0])
        return Volume((lo + hi - vol.array).astype(np.float32), vol.affine), truth

    new_train = [inverted(_case(rng)) for _ in range(12)]
    calibration = [(v, _answer(t, rng)) for v, t in (inverted(_case(rng)) for _ in range(6))]
    tuned = AnatomyModel.fit(new_train, calibration, prior=fitted)
    assert tuned.n_images == fitted.n_images + 12 and (tuned.box_mm, tuned.size) == (fitted.box_mm, fitted.size)
    for make in (lambda c: c, inverted):
        vol, truth = make(_case(rng))
        assert tuned.distance(vol, _answer(truth, rng)) <= tuned.threshold
    alone = AnatomyModel.fit(new_train, calibration)
    vol, truth = _case(rng)
    assert alone.distance(vol, _answer(truth, rng)) > alone.threshold  # without the prior the old kind is refused


def test_one_training_image_is_too_few_alone_and_enough_beside_a_prior(fitted: AnatomyModel) -> None:
    rng = np.random.default_rng(8)
    one = [_case(rng)]
    with pytest.raises(ValueError, match="at least 2 training image"):
        AnatomyModel.fit(one, [])
    tuned = AnatomyModel.fit(one, [(v, _answer(t, rng)) for v, t in (_case(rng) for _ in range(3))], prior=fitted)
    assert tuned.n_images == fitted.n_images + 1 and math.isfinite(tuned.threshold)
