"""The trust layer's parts on synthetic data: crops (nibabel as the oracle), the shape model, the image
check, the not-found rule, calibrated outputs and their round trip through every writer."""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest

from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.io.markups import markups_dict, parse_markups
from lmk3d.io.table import landmarks_from_json, landmarks_to_json, parse_table, table_text
from lmk3d.landmarks import LandmarkSet
from lmk3d.trust import (
    OOD_SCORE_CAP,
    ImageModel,
    ShapeModel,
    TrustModel,
    apply_trust,
    load_trust,
    point_features,
    pulled_inside,
    save_trust,
)
from lmk3d.trust.cuts import crop, cut_outside, distance_to_faces_mm
from lmk3d.trust.fit import FACE_AUROC_MARGIN, MIN_GROUP_POINTS, Record, choose_presence, fit_from_records

OBLIQUE = np.array([[0.0, -0.9, 0.3, 40.0], [1.1, 0.0, 0.1, -20.0], [0.05, 0.35, -1.4, 7.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-0.8, 1.2, 2.5, 1.0]), OBLIQUE])
def test_crop_keeps_world_positions_like_nibabel(affine: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(20, 18, 16)).astype(np.float32)
    vol = Volume(arr, affine)
    c = crop(vol, (3, 0, 5), (17, 18, 12))
    oracle = nib.Nifti1Image(arr, affine).slicer[3:17, 0:18, 5:12]
    np.testing.assert_allclose(c.affine, oracle.affine, atol=1e-12)
    np.testing.assert_array_equal(c.array, np.asarray(oracle.dataobj))
    with pytest.raises(Exception, match="not inside"):
        crop(vol, (0, 0, 0), (21, 18, 16))


def test_cut_outside_leaves_the_target_beyond_the_nearest_face() -> None:
    vol = Volume(np.random.default_rng(9).normal(size=(30, 40, 20)).astype(np.float32), OBLIQUE)
    ijk = np.array([[4.0, 20.0, 10.0], [15.0, 20.0, 10.0], [25.0, 33.0, 12.0]])
    xyz = vol.ijk_to_ras(ijk)
    for target, gone in ((0, 3.0), (2, 6.0)):
        cut = cut_outside(vol, xyz, target, gone)
        assert cut is not None
        d = distance_to_faces_mm(cut.volume, xyz)
        assert d[target].min() < 0  # outside
        assert cut.outside_mm == pytest.approx(gone, abs=float(max(vol.spacing_mm)))
        inside = cut.volume.contains_ras(xyz, margin=0.5)
        assert not inside[target] and inside[1]
        # a point that stayed lands on the same voxel value: world geometry is unchanged
        i, j, k = np.rint(cut.volume.ras_to_ijk(xyz[1])).astype(int).reshape(3)
        assert cut.volume.array[i, j, k] == vol.array[15, 20, 10]


def _shapes(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    base = np.array([[0.0, 0, 0], [10, 0, 0], [0, 20, 0], [5, 5, 15]])
    return [base * rng.uniform(0.9, 1.1) + rng.normal(0, 0.3, base.shape) + rng.uniform(-50, 50, 3)
            for _ in range(n)]


def test_shape_model_puts_each_landmark_where_the_others_say() -> None:
    rng = np.random.default_rng(1)
    model = ShapeModel.fit(_shapes(60, rng))
    assert model is not None
    probe = _shapes(1, rng)[0]
    err = np.linalg.norm(model.expected(probe) - probe, axis=1)
    assert err.max() < 3.0
    moved = probe.copy()
    moved[3] += [0, 0, 30]
    assert np.linalg.norm(model.expected(moved)[3] - probe[3]) < 6.0  # the others still say where it belongs
    assert ShapeModel.fit(_shapes(5, rng)) is None  # too few cases


def _blob(rng: np.random.Generator, shape: tuple[int, int, int] = (36, 48, 34), offset: float = 0.0) -> Volume:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) / 2 + rng.normal(0, 1.5, 3) + offset
    a = 200.0 * np.exp(-np.sum((grid - centre) ** 2, -1) / (2 * 8.0 ** 2)) + rng.normal(0, 5, shape) + 50
    return Volume(a.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))


def test_image_check_flags_other_kinds_and_passes_its_own() -> None:
    rng = np.random.default_rng(2)
    model = ImageModel.fit([_blob(rng) for _ in range(30)], [_blob(rng) for _ in range(10)], "MR")
    own = [model.verdict(_blob(rng)) for _ in range(10)]
    assert sum(v.in_distribution for v in own) >= 9
    assert all(0.0 <= v.score <= 1.0 for v in own)
    stripes = Volume((np.indices((36, 48, 34)).sum(0) % 6 * 40.0).astype(np.float32), np.eye(4))
    for other, why in ((stripes, "unlike"),
                       (Volume(np.full((36, 48, 34), -1000.0, np.float32), np.eye(4)), "CT"),
                       (_blob(rng, (200, 220, 180)), "field of view"),
                       (Volume(_blob(rng).array, np.diag([4.0, 4.0, 4.0, 1.0])), "spacing")):
        v = model.verdict(other)
        assert not v.in_distribution and why in v.reason, v
    doc = json.loads(json.dumps(model.to_json()))
    again = ImageModel.from_json(doc)
    x = _blob(rng)
    assert again.verdict(x).to_json() == model.verdict(x).to_json()


def _ranges(n: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    ones = np.ones((n, 3))
    return ((ones.min(0), ones.max(0)), (40 * ones.min(0), 40 * ones.max(0)))


def test_merged_image_model_is_the_joint_fit_when_the_prior_kept_every_direction() -> None:
    """Oracle: with fewer images than components nothing is summarised away, so the merge is exact."""
    rng = np.random.default_rng(5)
    old = rng.normal(0, 1, (5, 64)) + rng.normal(0, 3, 64)
    new = rng.normal(0, 1, (4, 64)) + rng.normal(0, 3, 64)
    prior = ImageModel._from_descriptors(old, _ranges(5), "MR", 10)
    merged = prior.merged(new, _ranges(4), "MR", 10)
    joint = ImageModel._from_descriptors(np.concatenate([old, new]), _ranges(9), "MR", 10)
    assert merged.n_images == 9
    np.testing.assert_allclose(merged.mean, joint.mean, atol=1e-12)
    np.testing.assert_allclose(merged.variances, joint.variances, rtol=1e-9)
    np.testing.assert_allclose(merged.components.T @ merged.components, joint.components.T @ joint.components,
                               atol=1e-9)  # the same subspace
    for x in (old[0], new[2], (old[1] + new[1]) / 2):  # inside the span: no residual
        assert merged.distance(x) == pytest.approx(joint.distance(x), rel=1e-6)
    # With more images than components, the prior's residual is kept: an image lying in what it summarised
    # away is not mistaken for a stranger.
    many = rng.normal(0, 1, (40, 64))
    summary = ImageModel._from_descriptors(many, _ranges(40), "MR", 10)
    grown = summary.merged(rng.normal(0, 1, (3, 64)), _ranges(3), "MR", 10)
    fitted_all = ImageModel._from_descriptors(np.concatenate([many, rng.normal(0, 1, (3, 64))]), _ranges(43), "MR", 10)
    assert grown.residual_scale == pytest.approx(fitted_all.residual_scale, rel=0.1)
    with pytest.raises(ValueError, match="n_images"):
        dataclasses.replace(summary, n_images=None).merged(new, _ranges(4), "MR")


def test_a_fine_tuned_image_check_learns_the_new_kind_and_keeps_the_old() -> None:
    rng = np.random.default_rng(7)
    prior = ImageModel.fit([_blob(rng) for _ in range(30)], [_blob(rng) for _ in range(10)], "MR")
    assert prior.n_images == 30 and ImageModel.from_json(json.loads(json.dumps(prior.to_json()))).n_images == 30

    def inverted() -> Volume:  # the same anatomy, another contrast: a dark blob on a bright background
        v = _blob(rng)
        return Volume((300.0 - v.array).astype(np.float32), v.affine)

    assert sum(prior.verdict(inverted()).in_distribution for _ in range(10)) == 0
    merged = ImageModel.fit([inverted() for _ in range(6)], [inverted() for _ in range(6)], "MR", prior=prior)
    assert merged.n_images == 36
    assert sum(merged.verdict(inverted()).in_distribution for _ in range(10)) >= 9
    assert sum(merged.verdict(_blob(rng)).in_distribution for _ in range(10)) >= 9  # nothing forgotten
    stripes = Volume((np.indices((36, 48, 34)).sum(0) % 6 * 40.0).astype(np.float32), np.eye(4))
    assert not merged.verdict(stripes).in_distribution


def _trust(shape: ShapeModel | None, image: ImageModel | None) -> TrustModel:
    names = ("a", "b", "c", "d")
    # scale = exp(0.2 * intercept + 1.0 * -log raw): a lower raw score means a larger expected error
    weights = np.array([0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0])
    normalised = np.sort(np.random.default_rng(3).gamma(2.0, 0.5, 200))
    return TrustModel(names, 3.0, weights, normalised, float(np.quantile(normalised, 0.9)), 1.0, math.inf, shape,
                      image, {}, 0.0)


def test_apply_trust_calibrates_cuts_and_refuses_other_kinds() -> None:
    rng = np.random.default_rng(4)
    vols = [_blob(rng) for _ in range(30)]
    image = ImageModel.fit(vols, [_blob(rng) for _ in range(10)], "MR")
    trust = _trust(None, image)
    vol = _blob(rng)
    xyz = vol.ijk_to_ras(np.array([[18.0, 24, 17], [10, 10, 10], [25, 30, 20], [0.2, 24, 17]]))
    raw = LandmarkSet(("a", "b", "c", "d"), xyz, np.array([0.95, 0.5, 0.1, 0.9]))
    out = apply_trust(trust, raw, None, vol)
    lm = out.landmarks
    assert out.verdict.in_distribution
    assert lm.calibrated and lm.tolerance_mm == 3.0
    assert lm.scores[0] > lm.scores[1] > lm.scores[2]  # the calibrated score keeps the raw ranking here
    assert np.all((lm.scores >= 0) & (lm.scores <= 1))
    assert lm.radius_mm[0] < lm.radius_mm[1] < lm.radius_mm[2]
    # the fourth point sits on the border (0.7 mm from the face < 1.0 mm): cut off, no position pretended
    assert not lm.found[3] and np.isnan(lm.xyz_mm_ras[3]).all() and lm.scores[3] == 0 and out.cut_off[3]
    np.testing.assert_array_equal(lm.xyz_mm_ras[:3], xyz[:3])
    stripes = Volume((np.indices((36, 48, 34)).sum(0) % 6 * 40.0).astype(np.float32), np.eye(4))
    other = apply_trust(trust, raw, None, stripes)
    assert not other.verdict.in_distribution
    assert not other.landmarks.found.any() and other.landmarks.scores.max() <= OOD_SCORE_CAP


def test_an_image_farther_than_nearly_every_calibration_image_gets_capped_scores() -> None:
    """Atypical (docs/trust.md, "Scores capped on an image at the edge of the calibration images"): an image
    that passes the check but lies farther than all but 2.5 % of the calibration images keeps its points,
    each score capped at 0.2, and says so; an ordinary one is untouched; too few calibration images never cap."""
    from lmk3d.trust import ATYPICAL_SCORE, image_descriptor

    rng = np.random.default_rng(4)
    image = ImageModel.fit([_blob(rng) for _ in range(30)], [_blob(rng) for _ in range(10)], "MR")
    trust = _trust(None, image)
    vol = _blob(rng)
    d = image.distance(image_descriptor(vol))
    xyz = vol.ijk_to_ras(np.array([[18.0, 24, 17], [10, 10, 10], [25, 30, 20], [12, 24, 17]]))
    raw = LandmarkSet(("a", "b", "c", "d"), xyz, np.array([0.999, 0.99, 0.95, 0.9]))

    def with_reference(ref: np.ndarray):  # type: ignore[no-untyped-def]
        image.reference, image.threshold = np.sort(ref), 1.25 * float(np.max(ref))
        return apply_trust(trust, raw, None, vol)

    typical = with_reference(np.r_[np.full(60, 0.5 * d), np.full(40, 2.0 * d)])  # 40 of 100 farther
    assert typical.verdict.in_distribution and not typical.verdict.atypical
    assert typical.landmarks.scores.max() > 0.5  # confident points, or the cap below would prove nothing
    # farther than 99 of 100 (score 2/101 <= 0.025): points kept, scores capped, the reason says why
    edge = with_reference(np.r_[np.full(99, 0.5 * d), 1.1 * d])
    v = edge.verdict
    assert v.in_distribution and v.atypical and v.score <= ATYPICAL_SCORE
    assert "capped at 0.2" in v.reason and v.to_json()["atypical"] is True
    assert v.summary().startswith("atypical, every score capped at 0.2 (score 0.020): like the training images")
    assert typical.verdict.summary().startswith("of the model's kind (score 0.406)")
    np.testing.assert_array_equal(edge.landmarks.found, typical.landmarks.found)
    np.testing.assert_array_equal(edge.landmarks.radius_mm, typical.landmarks.radius_mm)
    assert edge.landmarks.scores.max() <= OOD_SCORE_CAP
    np.testing.assert_allclose(edge.landmarks.scores, np.minimum(typical.landmarks.scores, OOD_SCORE_CAP))
    # a consensus asks its members without the cap: the calibrated scores as they were calibrated
    uncapped = apply_trust(trust, raw, None, vol, cap_atypical=False)
    assert uncapped.verdict.atypical
    np.testing.assert_array_equal(uncapped.landmarks.scores, typical.landmarks.scores)
    # three farther than it of 100 (score 4/101 > 0.025): not atypical
    assert not with_reference(np.r_[np.full(97, 0.5 * d), np.full(3, 1.1 * d)]).verdict.atypical
    # 30 calibration images, all nearer: the smallest possible score, 1/31, is over 0.025
    few = with_reference(np.full(30, 0.5 * d))
    assert few.verdict.score == pytest.approx(1 / 31) and not few.verdict.atypical
    assert typical.verdict.to_json()["atypical"] is False


def test_trust_model_round_trips_through_json(tmp_path) -> None:
    rng = np.random.default_rng(5)
    trust = _trust(ShapeModel.fit(_shapes(40, rng)), ImageModel.fit([_blob(rng) for _ in range(12)],
                                                                     [_blob(rng) for _ in range(5)], "MR"))
    save_trust(tmp_path, trust)
    again = load_trust(tmp_path)
    assert again is not None and again.to_json() == json.loads(json.dumps(trust.to_json()))
    assert load_trust(tmp_path / "nothing") is None
    (tmp_path / "trust.json").write_text("{not json")
    with pytest.raises(Exception, match="cannot read the trust model"):
        load_trust(tmp_path)


def test_a_trust_file_without_a_feature_set_uses_the_base_one_and_an_unknown_one_is_refused(tmp_path) -> None:
    trust = _trust(None, None)
    doc = trust.to_json()
    assert doc["features"] == "base"
    del doc["features"]  # as every trust.json written before the face feature
    again = TrustModel.from_json(doc)
    feats = {"raw": np.array([0.9, 0.2, 0.5, 0.7]), "d_stage": np.zeros(4), "d_shape": np.zeros(4),
             "face_mm": np.array([0.5, 3.0, 20.0, np.nan])}
    assert again.features == "base"
    np.testing.assert_array_equal(again.scale(feats), trust.scale(feats))
    with pytest.raises(Exception, match="'bogus'"):
        TrustModel.from_json({**doc, "features": "bogus"})
    with pytest.raises(Exception, match="7 error-scale weights; face features on 4 landmarks need 8"):
        TrustModel.from_json({**doc, "features": "face"})  # the weights of the base set
    face = dataclasses.replace(trust, weights=np.append(trust.weights, -0.5), features="face")
    save_trust(tmp_path, face)
    loaded = load_trust(tmp_path)
    assert loaded is not None and loaded.features == "face"
    # log1p of the face distance, 0 for a point without a position: nearer a face, a larger scale
    expected = trust.scale(feats) * np.exp(-0.5 * np.log1p(np.array([0.5, 3.0, 20.0, 0.0])))
    np.testing.assert_allclose(loaded.scale(feats), expected, rtol=1e-12)


def _face_records(errors_near_faces: bool) -> list[Record]:
    """One image per case, three points placed 1-18 mm from the low x face, the raw score saying nothing.
    The error is large near the face when ``errors_near_faces``, else larger for landmark "c" wherever it is."""
    rng = np.random.default_rng(21)
    names = ("a", "b", "c")
    out = []
    for i in range(20):
        vol = Volume(np.zeros((40, 40, 40), dtype=np.float32), np.eye(4))
        placed = np.column_stack([rng.uniform(1.0, 18.0, 3), np.full(3, 20.0), np.full(3, 20.0)])
        face = distance_to_faces_mm(vol, placed).min(axis=1)
        size = (np.where(face < 5.0, 5.0, 1.0) if errors_near_faces else np.array([1.0, 1.0, 5.0]))
        size = size * rng.uniform(0.7, 1.3, 3)
        truth = placed + np.column_stack([np.zeros(3), size * np.cos(a := rng.uniform(0, 2 * np.pi, 3)),
                                          size * np.sin(a)])
        out.append(Record(f"case{i}", "normal", LandmarkSet(names, placed, np.full(3, 0.8)), None, vol,
                          LandmarkSet(names, truth), vol.contains_ras(truth, margin=0.5)))
    return out


def test_the_face_distance_joins_the_error_scale_only_when_it_ranks_errors_better_out_of_sample() -> None:
    near = fit_from_records(_face_records(True), None, None)
    report = near.report["error_scale"]
    assert near.features == "face" and report["features"] == "face"
    assert report["loco_auroc"]["face"] >= report["loco_auroc"]["base"] + FACE_AUROC_MARGIN
    feats = {"raw": np.full(3, 0.8), "d_stage": np.zeros(3), "d_shape": np.zeros(3),
             "face_mm": np.array([1.5, 8.0, 16.0]), "shape_face_mm": np.full(3, np.nan)}
    s = near.scale(feats)
    assert s[0] > 2 * s[1] and s[0] > 2 * s[2]  # the point by the face gets the wide radius
    elsewhere = fit_from_records(_face_records(False), None, None)
    assert elsewhere.features == "base" and elsewhere.report["error_scale"]["features"] == "base"
    assert len(elsewhere.weights) == 3 + 3  # three intercepts and the three base features


def _group_records(partial_errs_more: bool) -> list[Record]:
    """Per case an uncut image and a cut variant whose landmark "c" lies outside, which the detector reports
    not found (so the variant is a partial image); the points still inside err 3 times as much there when
    ``partial_errs_more``, alike otherwise. The raw score and the features say nothing of it."""
    rng = np.random.default_rng(31)
    names = ("a", "b", "c")
    out = []
    for i in range(60):
        for kind in ("normal", "cut"):
            vol = Volume(np.zeros((40, 40, 40), dtype=np.float32), np.eye(4))
            placed = np.column_stack([np.full(3, 20.0), rng.uniform(12.0, 28.0, 3), np.full(3, 20.0)])
            size = rng.gamma(2.0, 0.6, 3) * (3.0 if kind == "cut" and partial_errs_more else 1.0)
            truth = placed + np.column_stack([size, np.zeros(3), np.zeros(3)])
            found = np.array([True, True, kind == "normal"])
            if kind == "cut":
                truth[2] = [20.0, 20.0, 45.0]  # beyond the high z face
            final = LandmarkSet(names, np.where(found[:, None], placed, np.nan), np.full(3, 0.8), found)
            out.append(Record(f"case{i}", kind, final, None, vol, LandmarkSet(names, truth),
                              vol.contains_ras(truth, margin=0.5)))
    return out


def test_images_with_a_landmark_not_found_are_calibrated_apart_when_that_calibrates_better() -> None:
    grouped = fit_from_records(_group_records(True), None, None)
    report = grouped.report["groups"]
    assert report["calibration"] == "grouped" and report["loco_brier"]["grouped"] < report["loco_brier"]["pooled"]
    assert report["partial_points"] == 120 and report["complete_points"] == 180 >= MIN_GROUP_POINTS
    assert grouped.partial_normalised is not None and grouped.partial_q90 is not None
    s = np.array([1.0, 1.0])
    complete, partial = grouped.probability_within(s), grouped.probability_within(s, partial=True)
    assert np.all(partial < complete)  # the same error scale is less likely within 3 mm in a partial image
    assert grouped.quantile(True) > 2 * grouped.quantile(False)
    # apply_trust puts an image in its group by what it reports found
    vol = Volume(np.zeros((40, 40, 40), dtype=np.float32), np.eye(4))
    xyz = np.array([[20.0, 15, 20], [20, 25, 20], [20, 20, 20]])
    whole = apply_trust(grouped, LandmarkSet(("a", "b", "c"), xyz, np.full(3, 0.8)), None, vol).landmarks
    missing = apply_trust(grouped, LandmarkSet(("a", "b", "c"), xyz, np.full(3, 0.8), np.array([True, True, False])),
                          None, vol).landmarks
    assert np.all(missing.scores[:2] < whole.scores[:2]) and np.all(missing.radius_mm[:2] > whole.radius_mm[:2])
    doc = json.loads(json.dumps(grouped.to_json()))
    np.testing.assert_array_equal(TrustModel.from_json(doc).partial_normalised, grouped.partial_normalised)
    del doc["partial"]  # as every trust.json written before the groups: one distribution
    assert TrustModel.from_json(doc).partial_normalised is None
    alike = fit_from_records(_group_records(False), None, None)
    assert alike.report["groups"]["calibration"] == "pooled" and alike.partial_normalised is None


def _calibrated() -> LandmarkSet:
    return LandmarkSet(("AC", "PC", "X"), np.array([[1.0, 2, 3], [4, 5, 6], [np.nan] * 3]),
                       np.array([0.93, 0.31, 0.0]), np.array([True, True, False]), np.array([2.1, 6.4, np.nan]), 3.0)


def test_calibrated_scores_and_radii_survive_every_writer(tmp_path) -> None:
    s = _calibrated()
    back = parse_table(table_text({"c1": s}))["c1"]
    for other in (back, landmarks_from_json(json.loads(json.dumps(landmarks_to_json(s)))),
                  parse_markups(markups_dict(s))):
        assert other.tolerance_mm == 3.0
        np.testing.assert_allclose(other.radius_mm, s.radius_mm, atol=0.05)
        np.testing.assert_allclose(other.scores, s.scores, atol=1e-3)
        np.testing.assert_array_equal(other.found, s.found)
    doc = markups_dict(s)["markups"][0]
    pts = doc["controlPoints"]
    assert "p error <= 3 mm" in pts[0]["description"] and "radius90=2.1 mm" in pts[0]["description"]
    # confident point: locked, drawn in the confident colour; low score / not found: selected (warning), free
    assert pts[0]["locked"] and not pts[0]["selected"]
    assert not pts[1]["locked"] and pts[1]["selected"] and pts[2]["selected"]
    assert doc["display"]["selectedColor"] != doc["display"]["color"]
    assert "score_meaning" in landmarks_to_json(s)
    # an uncalibrated set writes what it always wrote
    plain = LandmarkSet(("AC",), np.array([[1.0, 2, 3]]), np.array([0.5]))
    assert table_text({"c": plain}).splitlines()[0] == "case,name,x_ras,y_ras,z_ras,score,found"
    assert "radius_mm" not in landmarks_to_json(plain)["landmarks"][0]
    assert markups_dict(plain)["markups"][0]["controlPoints"][0]["locked"] is False


def test_consensus_follows_the_agreeing_members_and_scores_their_disagreement() -> None:
    from lmk3d.detectors.consensus import combine

    names = ("a", "b")
    truth = np.array([[0.0, 0, 0], [10, 10, 10]])
    m1 = LandmarkSet(names, truth + [[0.5, 0, 0], [0, 0.5, 0]], np.array([0.9, 0.9]))
    m2 = LandmarkSet(names, truth + [[-0.5, 0, 0], [0, -0.5, 0]], np.array([0.8, 0.8]))
    # the third member is far off on landmark a (it must not drag the answer) and not found on b
    m3 = LandmarkSet(names, np.array([[20.0, 0, 0], [np.nan] * 3]), np.array([0.95, 0.0]),
                     np.array([True, False]))
    out, spread = combine([m1, m2, m3], inlier_mm=4.0)
    assert np.linalg.norm(out.xyz_mm_ras[0] - truth[0]) < 0.5
    assert np.linalg.norm(out.xyz_mm_ras[1] - truth[1]) < 0.5
    assert out.found.all() and spread[0] < 1.0
    # two members in agreement score higher than the same two plus a dissenter (the inlier share drops)
    agree, _ = combine([m1, m2], inlier_mm=4.0)
    assert agree.scores[0] > out.scores[0]
    far = LandmarkSet(names, truth + [[3.0, 0, 0], [0, 3.0, 0]], np.array([0.8, 0.8]))  # m2, moved
    wide, wide_spread = combine([m1, far], inlier_mm=4.0)
    assert wide_spread[0] > spread[0] and wide.scores[0] < agree.scores[0]
    none, _ = combine([LandmarkSet.empty(names), LandmarkSet.empty(names)], inlier_mm=4.0)
    assert not none.found.any()


def test_a_consensus_weighted_by_radius_follows_its_most_precise_member() -> None:
    """``weighting="radius"``: weights 1 / r^2 from the members' calibrated 90 % radii, so a member whose error is
    calibrated small counts more even when every member's score is close to 1 (as on the phantoms)."""
    from lmk3d.detectors.consensus import ConsensusConfig, combine, member_weights

    names = ("a",)
    truth = np.zeros((1, 3))
    # both members are confident; the precise one (radius 1 mm) is 0.5 mm off, the other (4 mm) 2 mm off
    precise = LandmarkSet(names, truth + [[0.5, 0, 0]], np.array([0.97]), radius_mm=np.array([1.0]))
    rough = LandmarkSet(names, truth + [[-2.0, 0, 0]], np.array([0.99]), radius_mm=np.array([4.0]))
    by_score, _ = combine([precise, rough], inlier_mm=4.0)
    by_radius, spread = combine([precise, rough], inlier_mm=4.0, weighting="radius")
    assert abs(by_score.xyz_mm_ras[0, 0] - (-0.75)) < 0.05  # about the middle: scores 0.97 and 0.99
    # weights 1 and 1/16: (0.5 * 16 - 2) / 17
    assert by_radius.xyz_mm_ras[0, 0] == pytest.approx((0.5 * 16 - 2.0) / 17, abs=1e-9)
    assert combine([precise, rough], inlier_mm=4.0, weighting="score")[0].xyz_mm_ras[0, 0] == by_score.xyz_mm_ras[0, 0]
    assert 0 < spread[0] < 2.5 and 0 < by_radius.scores[0] <= 1
    # a member found without a radius: that landmark falls back to the scores
    bare = LandmarkSet(names, truth + [[-2.0, 0, 0]], np.array([0.99]))
    fallback = combine([precise, bare], 4.0, "radius")[0]
    assert np.allclose(fallback.xyz_mm_ras, combine([precise, bare], 4.0)[0].xyz_mm_ras)
    # a radius near 0 does not give one member every weight
    assert member_weights(np.array([0.9, 0.9]), np.array([0.0, 1.0]), "radius") == pytest.approx([100.0, 1.0])
    with pytest.raises(LandmarkError, match="weighting 'median'"):
        ConsensusConfig(weighting="median")
    from lmk3d.calibrate import CONSENSUS_WEIGHTINGS  # the CLI names them without importing torch
    from lmk3d.detectors.consensus import WEIGHTINGS

    assert CONSENSUS_WEIGHTINGS == WEIGHTINGS


def test_a_consensus_weighted_per_landmark_follows_the_member_that_was_precise_there() -> None:
    """``weighting="landmark"``: weights ``p * lambda[m, l]``, ``lambda`` the precision of each member at each
    landmark on fit cases (errors clipped at ``inlier_mm``; a landmark not found counts as ``inlier_mm``)."""
    import dataclasses
    import json

    from lmk3d.detectors.consensus import ConsensusConfig, answer_errors, combine, fit_landmark_weights

    names = ("a", "b")
    truth = LandmarkSet(names, np.array([[0.0, 0, 0], [10, 10, 10]]), np.ones(2))
    # fit cases: member 1 is 0.5 mm off at a and 2 mm off at b; member 2 the other way round, and once not found
    one = LandmarkSet(names, truth.xyz_mm_ras + [[0.5, 0, 0], [0, 2.0, 0]], np.array([0.9, 0.9]))
    two = LandmarkSet(names, truth.xyz_mm_ras + [[2.0, 0, 0], [0, 0.5, 0]], np.array([0.9, 0.9]))
    lost = two.with_found(np.array([True, False]))
    errors = np.stack([answer_errors([one, two], truth), answer_errors([one, lost], truth)])
    assert errors[1, 1, 1] == np.inf and errors[0, 0, 0] == pytest.approx(0.5)
    lam = fit_landmark_weights(errors, inlier_mm=4.0)
    b2 = 1 / (0.01 + (0.25 + 16) / 2)  # member 2 at b: errors 0.5 and 4 (not found, clipped)
    assert lam == pytest.approx(np.array([[1.0, 1.0], [(0.01 + 0.25) / (0.01 + 4), b2 * (0.01 + 4)]]))
    # a gross miss counts as inlier_mm, not as its size
    far = errors.copy()
    far[1, 1, 1] = 50.0
    assert np.array_equal(fit_landmark_weights(far, 4.0), lam)
    # on a new image, with equal scores (the score weights give the midpoints 0 and 11), the consensus follows
    # member 1 at a (its fitted precision 15 times member 2's) and at b (member 2 once lost b)
    new1 = LandmarkSet(names, np.array([[1.0, 0, 0], [10, 10, 10]]), np.array([0.95, 0.95]))
    new2 = LandmarkSet(names, np.array([[-1.0, 0, 0], [10, 12, 10]]), np.array([0.95, 0.95]))
    assert combine([new1, new2], 4.0)[0].xyz_mm_ras[:, 0:2].round(9).tolist() == [[0.0, 0.0], [10.0, 11.0]]
    out, _ = combine([new1, new2], 4.0, "landmark", lam)
    assert out.xyz_mm_ras[0, 0] == pytest.approx((1.0 - lam[1, 0]) / (1.0 + lam[1, 0]))
    assert out.xyz_mm_ras[1, 1] == pytest.approx((10.0 + 12.0 * lam[1, 1]) / (1.0 + lam[1, 1]))
    assert out.xyz_mm_ras[0, 0] > 0.8 and out.xyz_mm_ras[1, 1] < 10.7
    with pytest.raises(LandmarkError, match="landmark_weights of shape"):
        combine([new1, new2], 4.0, "landmark", lam[:, :1])
    with pytest.raises(LandmarkError, match="needs the fitted landmark weights"):
        combine([new1, new2], 4.0, "landmark")
    with pytest.raises(LandmarkError, match="no fit case has the truth of landmark"):
        fit_landmark_weights(np.full((2, 2, 2), np.nan), 4.0)
    # the configuration holds them, and reads back from its JSON (the checkpoint's form)
    cfg = ConsensusConfig(members=("pin", "cascade"), weighting="landmark", landmark_weights=lam.tolist())
    back = ConsensusConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and np.array_equal(np.asarray(back.landmark_weights), lam)
    with pytest.raises(LandmarkError, match="needs landmark_weights"):
        ConsensusConfig(weighting="landmark")
    with pytest.raises(LandmarkError, match="one row per member"):
        ConsensusConfig(members=("pin", "cascade", "prior_guided"), weighting="landmark", landmark_weights=lam.tolist())
    with pytest.raises(LandmarkError, match="finite and positive"):
        ConsensusConfig(members=("pin", "cascade"), weighting="landmark", landmark_weights=[[1.0, 0.0], [1.0, 1.0]])
    assert ConsensusConfig().landmark_weights is None  # every earlier checkpoint reads as before


def test_a_label_map_gets_a_sidecar_with_what_it_cannot_hold(tmp_path) -> None:
    from lmk3d.io import label_map_sidecar, read_landmarks, write_landmarks
    from lmk3d.io.table import read_json

    ref = Volume(np.zeros((20, 20, 20), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    s = LandmarkSet(("AC", "PC", "X"), np.array([[5.0, 5, 5], [12, 12, 12], [np.nan] * 3]),
                    np.array([0.93, 0.31, 0.0]), np.array([True, True, False]), np.array([2.1, 6.4, np.nan]), 3.0)
    path = write_landmarks(tmp_path / "case1.nii.gz", s, reference=ref)
    side = label_map_sidecar(path)
    assert side.name == "case1.landmarks.json"
    doc = json.loads(side.read_text())
    assert [i["label"] for i in doc["landmarks"]] == [1, 2, 3] and doc["tolerance_mm"] == 3.0
    again = read_json(side)
    np.testing.assert_allclose(again.radius_mm, s.radius_mm)
    back = read_landmarks(path, names=list(s.names))
    np.testing.assert_allclose(back.xyz_mm_ras[:2], s.xyz_mm_ras[:2], atol=0.5)


def test_shared_percentiles_are_the_images_own() -> None:
    """The trust checks share one image's percentiles; another array (a crop, a copy) gets its own."""
    from lmk3d.trust.intensity import percentiles_1_99, scaled

    rng = np.random.default_rng(3)
    a = rng.normal(0, 300, (40, 30, 20)).astype(np.int16)
    assert percentiles_1_99(a) == tuple(np.percentile(a.astype(np.float32), [1.0, 99.0]))
    b = a[5:, :, ::-1]  # a view: other values, another array object
    assert percentiles_1_99(b) == tuple(np.percentile(b.astype(np.float32), [1.0, 99.0]))
    c = a.copy()
    c[c > 0] = 0  # same shape and dtype, other values
    assert percentiles_1_99(c) == tuple(np.percentile(c.astype(np.float32), [1.0, 99.0]))
    lo, hi = percentiles_1_99(c)
    x = c.astype(np.float32)
    np.testing.assert_array_equal(scaled(x, lo, hi), np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0))


@pytest.mark.parametrize("kind", ["normal", "ct_air_ties", "few_values", "constant", "flipped_fortran", "nan"])
def test_band_selection_gives_numpys_percentiles(kind: str) -> None:
    """Large images take the 1st and 99th percentiles by band selection: exactly ``np.percentile``'s."""
    from lmk3d.trust import intensity

    rng = np.random.default_rng(11)
    shape = (128, 128, 72)  # above SELECT_MIN_VOXELS
    a: np.ndarray
    if kind == "normal":
        a = rng.normal(0, 300, shape).astype(np.float32)
    elif kind == "ct_air_ties":  # 40 % of voxels exactly -1024: the 1st percentile sits inside the ties
        a = np.where(rng.random(shape) < 0.4, -1024, rng.normal(40, 200, shape)).astype(np.int16)
    elif kind == "few_values":
        a = rng.integers(0, 3, shape).astype(np.uint8)
    elif kind == "constant":
        a = np.full(shape, 7.5, dtype=np.float32)
    elif kind == "flipped_fortran":
        a = np.asfortranarray(rng.gamma(2, 50, shape).astype(np.float32))[::-1, :, ::-1]
    else:
        a = rng.normal(0, 1, shape).astype(np.float32)
        a[3, 4, 5] = np.nan
    assert a.size >= intensity.SELECT_MIN_VOXELS
    expected = np.percentile(np.asarray(a, dtype=np.float32), [1.0, 99.0])
    got = intensity.percentiles_1_99(a)
    np.testing.assert_array_equal(np.asarray(got), expected)
    selected = intensity._select(np.asarray(a, dtype=np.float32).ravel(order="K"), intensity.QUANTILES)
    if kind == "nan":
        assert selected is None  # NaN: np.percentile answers
    else:
        assert selected is not None, "the band selection fell back: this test would not check it"
        np.testing.assert_array_equal(np.asarray(selected), expected)


class _FixedPresence:
    """A stand-in presence network that answers from a table (one ``(N,)`` array per volume)."""

    def __init__(self, table: dict[int, np.ndarray]) -> None:
        self.table = table

    def for_answer(self, volume: Volume, answer: LandmarkSet) -> np.ndarray:
        return self.table[id(volume)]


def _cut_records() -> list[Record]:
    """Uncut images and images whose crop leaves landmark 0 outside, every point placed well inside (as the
    detectors do): the face and shape rules cannot tell which landmark is gone; only a presence network can."""
    rng = np.random.default_rng(11)
    names = ("a", "b", "c")
    out = []
    for i in range(12):
        vol = Volume(rng.normal(size=(40, 40, 40)).astype(np.float32), np.eye(4))
        placed = np.array([[12.0, 20, 20], [20, 20, 20], [28, 20, 20]]) + rng.normal(0, 0.5, (3, 3))
        truth = LandmarkSet(names, placed + [[-20.0 if i % 2 else 0.0, 0, 0], [0, 0, 0], [0, 0, 0]])
        inside = vol.contains_ras(truth.xyz_mm_ras, margin=0.5)
        out.append(Record(f"case{i // 2}", "cut" if i % 2 else "normal", LandmarkSet(names, placed), None, vol,
                          truth, inside))
    return out


def test_the_presence_network_that_tells_cut_off_landmarks_is_chosen_and_ties_keep_the_first() -> None:
    records = _cut_records()
    knows = _FixedPresence({id(r.volume): r.truth_inside.astype(float) for r in records})
    blind = _FixedPresence({id(r.volume): np.full(3, 0.5) for r in records})
    for candidates, winner in (([blind, knows], 1), ([None, knows], 1), ([knows, blind], 0), ([blind, blind], 0),
                               ([None, blind], 0)):
        chosen, results = choose_presence(records, None, candidates)  # type: ignore[arg-type]
        assert chosen == winner, results
        assert [r.presence is not None for r in records] == [candidates[winner] is not None] * len(records)
    chosen, results = choose_presence(records, None, [None, knows])  # type: ignore[list-item]
    assert results[1]["calibration_cut_off_not_found"] == 1.0 and results[1]["calibration_inside_found"] == 1.0
    # geometry alone: the points lie inside, away from the faces, so a rule catches the gone landmark only by
    # also losing the ones inside
    assert min(results[0]["calibration_cut_off_not_found"], results[0]["calibration_inside_found"]) < 0.5
    assert all(np.array_equal(r.presence, r.truth_inside.astype(float)) for r in records)


def test_the_not_found_rule_weighs_the_landmarks_inside_cut_images_not_those_of_uncut_ones() -> None:
    """20 cases, each uncut and cut (landmark 0 beyond a face). A threshold of 0.35 catches 85 % of the cut-off
    landmarks and keeps 90 % of those inside the cut images; 0.55 catches 95 % and keeps 80 %. Counting the
    uncut images' landmarks (all found) as "inside" would make 0.55 look best (92 % kept); the rule must
    balance the cut images' own shares and choose 0.35."""
    names = ("a", "b", "c")
    rng = np.random.default_rng(5)
    records, table = [], {}
    for i in range(20):
        for kind in ("normal", "cut"):
            vol = Volume(rng.normal(size=(40, 40, 40)).astype(np.float32), np.eye(4))
            placed = np.array([[12.0, 20, 20], [20, 20, 20], [28, 20, 20]])
            truth = LandmarkSet(names, placed + [[-20.0 if kind == "cut" else 0.0, 0, 0], [0, 0, 0], [0, 0, 0]])
            prob = np.ones(3)
            if kind == "cut":
                prob[0] = 0.3 if i < 17 else 0.5 if i < 19 else 1.0
                prob[1] = 0.29 if i < 4 else 0.45 if i < 8 else 1.0
            records.append(Record(f"case{i}", kind, LandmarkSet(names, placed), None, vol, truth,
                                  vol.contains_ras(truth.xyz_mm_ras, margin=0.5)))
            table[id(vol)] = prob
    _, results = choose_presence(records, None, [_FixedPresence(table)])  # type: ignore[list-item]
    rule = results[0]
    assert rule["presence_threshold"] == pytest.approx(0.35)
    assert rule["calibration_cut_off_not_found"] == pytest.approx(0.85)
    assert rule["calibration_inside_found"] == pytest.approx(0.9)
    fitted = fit_from_records(records, None, None)  # without presence: geometry only, the same counts reported
    assert fitted.report["not_found_rule"]["calibration_inside_landmarks"] == 40
    assert fitted.report["not_found_rule"]["calibration_cut_off_landmarks"] == 20


def test_the_presence_networks_training_starts_no_epoch_after_its_deadline() -> None:
    import time

    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    rng = np.random.default_rng(0)
    volumes = [_blob(rng) for _ in range(2)]
    truths = [np.array([v.affine[:3, :3] @ (np.asarray(v.shape) / 2.0) + v.affine[:3, 3]]) for v in volumes]
    config = PresenceConfig(box_mm=40.0, size=16, channels=2, epochs=3, variants_per_case=1)
    lines: list[str] = []
    late = PresenceModel(("centre",), config)
    report = late.fit(volumes, truths, log=lines.append, deadline=time.monotonic() - 1.0)
    assert report["epochs_run"] == 1 and late.report["epochs_run"] == 1 and late.report["epochs"] == 3
    assert lines[-1] == "presence network: stopped after 1 of 3 epochs (the training's time is up)"
    on_time = PresenceModel(("centre",), config)
    assert on_time.fit(volumes, truths, deadline=time.monotonic() + 3600.0)["epochs_run"] == 3
    assert on_time.fitted and late.fitted


def test_the_presence_networks_training_starts_no_epoch_that_its_last_epoch_says_would_end_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from lmk3d.trust import presence
    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    clock = iter(range(0, 1000, 10))  # each reading 10 s later: every epoch takes 10 s, and 10 s pass between
    monkeypatch.setattr(presence, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    rng = np.random.default_rng(0)
    volumes = [_blob(rng) for _ in range(2)]
    truths = [np.array([v.affine[:3, :3] @ (np.asarray(v.shape) / 2.0) + v.affine[:3, 3]]) for v in volumes]
    config = PresenceConfig(box_mm=40.0, size=16, channels=2, epochs=5, variants_per_case=1)
    # Epoch 1 runs from 0 to 10 s; epoch 2 would start at 20 s and end at 30 s: past a deadline at 25 s,
    # though 20 s is before it.
    assert PresenceModel(("centre",), config).fit(volumes, truths, deadline=25.0)["epochs_run"] == 1
    clock = iter(range(0, 1000, 10))
    # With the deadline at 30 s it ends in time; epoch 3 (40 to 50 s) would not.
    assert PresenceModel(("centre",), config).fit(volumes, truths, deadline=30.0)["epochs_run"] == 2


def _oblique(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag(spacing) @ np.diag(rng.choice([-1.0, 1.0], 3))
    affine[:3, 3] = rng.normal(0, 20, 3)
    return affine


@pytest.mark.parametrize("case", range(8))
def test_scaling_only_the_voxels_read_gives_the_trust_checks_the_same_bits(case: int) -> None:
    """The thumbnail and the presence network's input scale only the voxels their interpolation reads:
    the same numbers as scaling every voxel first (what they did before)."""
    from scipy import ndimage

    from lmk3d.preprocessing import canonical_view
    from lmk3d.trust import THUMB, image_descriptor
    from lmk3d.trust.intensity import percentiles_1_99, scaled
    from lmk3d.trust.presence import presence_input

    rng = np.random.default_rng(100 + case)
    shape = [(36, 48, 34), (200, 180, 60), (15, 9, 40), (17, 16, 33), (64, 64, 64), (5, 70, 31), (129, 31, 16),
             (40, 40, 1)][case]
    spacing = tuple(rng.uniform(0.4, 3.0, 3))
    affine = np.diag([*spacing, 1.0]) if case % 2 else _oblique(rng, shape, spacing)
    arr = (rng.normal(100, 60, shape) * (rng.random(shape) < 0.9)).astype(np.float32)
    if case == 3:
        arr = arr.transpose(2, 1, 0)[::-1].copy().transpose(2, 1, 0)  # another memory order, same shape
    vol = Volume(arr, affine)
    lo, hi = percentiles_1_99(vol.array)
    a, _ = canonical_view(np.asarray(vol.array, dtype=np.float32), vol.affine)
    full = scaled(np.asarray(a, dtype=np.float32), lo, hi)
    t = ndimage.zoom(full, [THUMB / s for s in full.shape], order=1, grid_mode=True, mode="nearest")
    t = t[:THUMB, :THUMB, :THUMB]
    if t.shape != (THUMB,) * 3:
        t = np.pad(t, [(0, THUMB - s) for s in t.shape], mode="edge")
    np.testing.assert_array_equal(image_descriptor(vol), t.reshape(-1).astype(np.float64))
    for box_mm, size in ((64.0, 40), (float(np.max(np.asarray(shape) * spacing)) * 1.3, 24)):
        got = presence_input(vol, box_mm, size)
        centre = vol.ijk_to_ras((np.asarray(vol.shape, dtype=np.float64) - 1.0) / 2.0).reshape(3)
        ax = (np.arange(size) - (size - 1) / 2.0) * (box_mm / size)
        grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3) + centre
        ijk = vol.ras_to_ijk(grid).reshape(-1, 3).T
        img = ndimage.map_coordinates(scaled(np.asarray(vol.array, dtype=np.float32), lo, hi), ijk, order=1,
                                      mode="constant", cval=0.0)
        np.testing.assert_array_equal(got[0], img.reshape((size,) * 3).astype(np.float32))


@pytest.mark.parametrize("case", range(4))
def test_local_presence_patches_are_centred_on_their_world_points_like_nibabel(case: int) -> None:
    """An image whose intensity is a linear function of the world position (nibabel maps each voxel): every
    patch voxel holds the scaled world R coordinate of its grid point, on oblique, flipped and anisotropic
    grids; the mask is 1 inside the field of view and 0 outside."""
    from nibabel.affines import apply_affine

    from lmk3d.trust.intensity import percentiles_1_99
    from lmk3d.trust.presence import presence_patches

    rng = np.random.default_rng(300 + case)
    shape = [(40, 50, 30), (64, 20, 33), (30, 30, 30), (25, 60, 41)][case]
    spacing = tuple(rng.uniform(0.6, 2.5, 3))
    affine = np.diag([*spacing, 1.0]) if case == 0 else _oblique(rng, shape, spacing)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    arr = apply_affine(affine, ijk)[:, 0].reshape(shape).astype(np.float32)  # world R of each voxel
    vol = Volume(arr, affine)
    lo, hi = percentiles_1_99(vol.array)
    centres = apply_affine(affine, np.array([[s / 2.0 for s in shape], [2.0, shape[1] / 3.0, 1.0]]))  # 2nd: a corner
    box_mm, size = 12.0, 8
    got = presence_patches(vol, box_mm, size, centres)
    assert got.shape == (2, 2, size, size, size) and got.dtype == np.float32
    ax = (np.arange(size) - (size - 1) / 2.0) * (box_mm / size)
    offsets = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)
    for k, c in enumerate(centres):
        world = offsets + c
        back = apply_affine(np.linalg.inv(affine), world.reshape(-1, 3)).reshape(world.shape)
        inside = np.all((back >= 0) & (back <= np.asarray(shape) - 1), axis=-1)
        outside = np.any((back < -0.5 - 1e-6) | (back > np.asarray(shape) - 0.5 + 1e-6), axis=-1)
        assert inside.any() and (k == 0 or outside.any())
        expect = np.clip((world[..., 0] - lo) / (hi - lo), 0.0, 1.0)
        np.testing.assert_allclose(got[k, 0][inside], expect[inside], atol=2e-5)
        assert np.all(got[k, 1][inside] == 1.0) and np.all(got[k, 1][outside] == 0.0)
    # one patch centred on the image's centre is the global input
    from lmk3d.trust.presence import presence_input

    middle = vol.ijk_to_ras((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0).reshape(1, 3)
    np.testing.assert_array_equal(presence_patches(vol, 30.0, 10, middle)[0], presence_input(vol, 30.0, 10))


def test_a_local_presence_network_answers_per_point_and_keeps_its_kind_when_saved(tmp_path: object) -> None:
    from pathlib import Path

    import torch

    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    vol = _blob(rng)
    names = ("a", "b", "c")
    model = PresenceModel(names, PresenceConfig(mode="local", box_mm=24.0, size=16, channels=2))
    points = np.array([[10.0, 20, 15], [18, 24, 17], [30, 40, 30]])
    p = model.probabilities(vol, points)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    # each point is answered from its own patch, by its own output: moving one point changes its answer only
    moved = points.copy()
    moved[2] = [5.0, 5, 5]
    q = model.probabilities(vol, moved)
    np.testing.assert_allclose(q[:2], p[:2], rtol=1e-6)
    assert q[2] != p[2]
    # a point not found has nothing to call cut off
    gone = points.copy()
    gone[1] = np.nan
    r = model.probabilities(vol, gone)
    assert r[1] == 1.0
    np.testing.assert_allclose(r[[0, 2]], p[[0, 2]], rtol=1e-6)
    with pytest.raises(ValueError, match="needs the detector's points"):
        model.probabilities(vol)
    answer = LandmarkSet(names, gone, found=np.array([True, False, True]))
    np.testing.assert_array_equal(model.for_answer(vol, answer), r)
    model.fitted = True
    model.save(Path(str(tmp_path)))
    back = PresenceModel.load(Path(str(tmp_path)))
    assert back is not None and back.config.mode == "local" and back.config == model.config
    np.testing.assert_array_equal(back.probabilities(vol, points), p)
    with pytest.raises(ValueError, match="mode 'patch'"):
        PresenceConfig(mode="patch")


@pytest.mark.parametrize("mode", ["global", "local"])
def test_an_ensemble_of_presence_networks_answers_their_mean_and_keeps_every_member_when_saved(
        tmp_path: object, mode: str) -> None:
    from pathlib import Path

    import torch

    from lmk3d.trust.presence import PRESENCE_FILE, PresenceConfig, PresenceModel

    vol = _blob(np.random.default_rng(4))
    names = ("a", "b", "c")
    points = np.array([[10.0, 20, 15], [18, 24, 17], [np.nan, np.nan, np.nan]])
    members = [PresenceModel(names, PresenceConfig(mode=mode, box_mm=24.0, size=16, channels=2, seed=s))
               for s in (0, 1, 2)]
    for m in members:
        m.fitted = True
    alone = [m.probabilities(vol, points) for m in members]
    assert not np.allclose(alone[0], alone[1])  # other first weights, other answers
    ensemble = PresenceModel.mean_of(members)
    assert ensemble.members == 3 and members[0].members == 1
    p = ensemble.probabilities(vol, points)
    np.testing.assert_allclose(p, np.mean(alone, axis=0), rtol=1e-12)
    if mode == "local":
        assert p[2] == 1.0  # a point not found stays "nothing to call cut off"
    ensemble.save(Path(str(tmp_path)))
    back = PresenceModel.load(Path(str(tmp_path)))
    assert back is not None and back.members == 3 and back.config == members[0].config
    np.testing.assert_array_equal(back.probabilities(vol, points), p)
    assert back.report["members"] == 3 and len(back.report["ensemble"]) == 3
    # a presence.pt written before ensembles (no "ensemble" entry) loads as one network, answering as before
    doc = torch.load(Path(str(tmp_path)) / PRESENCE_FILE, weights_only=True)
    del doc["ensemble"]
    old = Path(str(tmp_path)) / "old"
    old.mkdir()
    torch.save(doc, old / PRESENCE_FILE)
    single = PresenceModel.load(old)
    assert single is not None and single.members == 1
    np.testing.assert_array_equal(single.probabilities(vol, points), alone[0])
    # and one network is saved as it was before ensembles, with no "ensemble" entry
    single.save(old)
    assert "ensemble" not in torch.load(old / PRESENCE_FILE, weights_only=True)
    # loading an ensemble leaves torch's generator as it was
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    PresenceModel.load(Path(str(tmp_path)))
    assert torch.equal(torch.random.get_rng_state(), state)
    # only single networks of the same settings, for the same landmarks, from other seeds, make an ensemble
    with pytest.raises(ValueError, match="at least two"):
        PresenceModel.mean_of(members[:1])
    with pytest.raises(ValueError, match="same seed"):
        PresenceModel.mean_of([members[0], members[0]])
    other = PresenceModel(names, PresenceConfig(mode=mode, box_mm=32.0, size=16, channels=2, seed=5))
    other.fitted = True
    with pytest.raises(ValueError, match="other settings"):
        PresenceModel.mean_of([members[0], other])
    fewer = PresenceModel(names[:2], PresenceConfig(mode=mode, box_mm=24.0, size=16, channels=2, seed=5))
    fewer.fitted = True
    with pytest.raises(ValueError, match="other landmarks"):
        PresenceModel.mean_of([members[0], fewer])
    with pytest.raises(ValueError, match="single networks"):
        PresenceModel.mean_of([ensemble, other])
    untrained = PresenceModel(names, PresenceConfig(mode=mode, box_mm=24.0, size=16, channels=2, seed=7))
    with pytest.raises(ValueError, match="must be trained"):
        PresenceModel.mean_of([members[0], untrained])
    with pytest.raises(ValueError, match="train its members apart"):
        ensemble.fit([vol], [np.zeros((3, 3))])


def test_a_local_presence_network_can_learn_from_the_detectors_own_points_on_cut_images() -> None:
    """``answer_variants`` (docs/trust.md, "A local presence network trained on the detector's own points"): the
    detector answers K cut variants of each training case once; half of each epoch's patches are centred on its
    points (the jittered truth where it found none). Without it the training is as it was."""
    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    rng = np.random.default_rng(0)
    volumes = [_blob(rng) for _ in range(2)]
    truths = [v.ijk_to_ras(np.array([[18.0, 24, 17], [10, 12, 9]])) for v in volumes]
    names = ("a", "b")
    # a patch is centred on the detector's point where it has one, on the true position where not
    model = PresenceModel(names, PresenceConfig(mode="local", box_mm=24.0, size=16, channels=2, jitter_mm=0.0))
    answer = np.array([[20.0, 26, 19], [np.nan] * 3])
    x, y, k = model._examples(volumes[0], truths[0], rng, answer)
    from lmk3d.trust.presence import presence_patches

    np.testing.assert_array_equal(x, presence_patches(volumes[0], 24.0, 16, np.array([answer[0], truths[0][1]])))
    assert y[:, 0].tolist() == [1.0, 1.0] and k.tolist() == [0, 1]

    calls: list[tuple[int, ...]] = []

    def answers(volume: Volume) -> np.ndarray:
        calls.append(volume.shape)
        return np.array([[0.0, 0, 0], [np.nan] * 3]) + volume.ijk_to_ras(np.array([18.0, 24, 17]))

    config = PresenceConfig(mode="local", box_mm=24.0, size=16, channels=2, epochs=2, variants_per_case=2,
                            answer_variants=3)
    with pytest.raises(ValueError, match="needs the detector's answers"):
        PresenceModel(names, config).fit(volumes, truths)
    taught = PresenceModel(names, config)
    lines: list[str] = []
    taught.fit(volumes, truths, log=lines.append, answers=answers)
    assert len(calls) == 6  # 3 cut variants of each case, answered once before the epochs
    assert "the detector answered 3 cut variants of each of 2 training cases" in lines[0]
    assert taught.report["config"]["answer_variants"] == 3
    plain = PresenceModel(names, dataclasses.replace(config, answer_variants=0))
    plain.fit(volumes, truths, answers=answers)
    assert len(calls) == 6  # not asked without answer_variants
    v = volumes[0]
    assert not np.array_equal(taught.probabilities(v, truths[0]), plain.probabilities(v, truths[0]))
    for bad in ({"answer_variants": -1, "mode": "local"}, {"answer_variants": 2, "mode": "global"}):
        with pytest.raises(ValueError, match="answer_variants"):
            PresenceConfig(**bad)  # type: ignore[arg-type]


def test_a_presence_networks_first_weights_depend_on_its_seed_only() -> None:
    """Two networks with the same config start from the same weights whatever drew from torch's generator
    before (a calibration that loads other networks first trains the same one), and the caller's generator
    is left as it was."""
    import torch

    from lmk3d.trust.presence import PresenceConfig, PresenceModel

    config = PresenceConfig(mode="local", box_mm=24.0, size=16, channels=2, seed=3)
    torch.manual_seed(0)
    first = PresenceModel(("a", "b"), config)
    state = torch.random.get_rng_state()
    torch.rand(1000)
    second = PresenceModel(("a", "b"), config)
    other = PresenceModel(("a", "b"), dataclasses.replace(config, seed=4))
    for (name, a), b in zip(first.net.state_dict().items(), second.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.net.state_dict().values(),
                                                     other.net.state_dict().values(), strict=True))
    torch.manual_seed(0)
    PresenceModel(("a", "b"), config)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("case", range(4))
def test_a_point_just_beyond_the_field_of_view_is_pulled_onto_the_outer_voxels_like_nibabel(case: int) -> None:
    rng = np.random.default_rng(40 + case)
    shape = (20, 26, 14)
    spacing = (0.8, 1.3, 2.5)
    affine = _oblique(rng, shape, spacing)
    vol = Volume(np.zeros(shape, dtype=np.float32), affine)
    # Continuous voxel indices: inside; 3 mm beyond the high i face (+ 0.5 voxel to the face itself); 3 mm beyond
    # the low k face and 2 mm beyond the high j face (a corner, 3.6 mm out); 20 mm beyond the low j face; unknown.
    ijk = np.array([[5.0, 7, 3], [shape[0] - 0.5 + 3 / spacing[0], 10, 6], [4, shape[1] - 0.5 + 2 / spacing[1],
                                                                             -0.5 - 3 / spacing[2]],
                    [8, -0.5 - 20 / spacing[1], 7], [np.nan] * 3])
    xyz = nib.affines.apply_affine(affine, ijk)
    final = LandmarkSet(("a", "b", "c", "d", "e"), xyz, np.array([0.9, 0.8, 0.7, 0.6, 0.0]),
                        np.array([True, False, False, False, False]))
    pulled = pulled_inside(final, vol, 4.0)
    np.testing.assert_array_equal(pulled.found, [True, True, True, False, False])
    expected = nib.affines.apply_affine(affine, np.clip(ijk[1:3], 0, np.array(shape) - 1))
    np.testing.assert_allclose(pulled.xyz_mm_ras[1:3], expected, atol=1e-9)
    assert vol.contains_ras(pulled.xyz_mm_ras[1:3]).all()
    np.testing.assert_array_equal(pulled.xyz_mm_ras[[0, 3]], xyz[[0, 3]])  # inside, and too far out: as they were
    assert np.isnan(pulled.xyz_mm_ras[4]).all() and list(pulled.scores) == list(final.scores)
    assert pulled_inside(final, vol, 3.5).found.tolist() == [True, True, False, False, False]  # the corner is 3.6 out
    assert pulled_inside(final, vol, 0.0) is final


def test_a_trust_model_that_pulls_points_inside_judges_them_with_its_not_found_rule(tmp_path) -> None:
    rng = np.random.default_rng(8)
    vol = _blob(rng)
    trust = dataclasses.replace(_trust(None, None), face_mm=0.0, pull_inside_mm=6.0)
    ijk = np.array([[18.0, 24, 17], [10, 10, 10], [25, 30, 20], [36.5, 24, 17]])  # the last 1 voxel beyond i-high
    raw = LandmarkSet(("a", "b", "c", "d"), vol.ijk_to_ras(ijk), np.array([0.95, 0.5, 0.1, 0.9]),
                      np.array([True, True, True, False]))
    out = apply_trust(trust, raw, None, vol)
    assert out.landmarks.found.all() and 0 < out.landmarks.scores[3] <= 1
    np.testing.assert_allclose(out.landmarks.xyz_mm_ras[3], vol.ijk_to_ras(np.array([[35.0, 24, 17]]))[0])
    assert not apply_trust(dataclasses.replace(trust, pull_inside_mm=0.0), raw, None, vol).landmarks.found[3]
    assert not apply_trust(dataclasses.replace(trust, face_mm=1.0), raw, None, vol).landmarks.found[3]  # on the border
    save_trust(tmp_path, trust)
    again = load_trust(tmp_path)
    assert again is not None and again.pull_inside_mm == 6.0
    doc = trust.to_json()
    assert "pull_inside_mm" not in _trust(None, None).to_json()  # files without it: 0, as before
    with pytest.raises(Exception, match="pull_inside_mm -1"):
        TrustModel.from_json({**doc, "pull_inside_mm": -1})


def test_the_consensus_benchmark_fits_each_cases_landmark_weights_without_that_case() -> None:
    """``benchmarks/consensus_weights.py --leave-one-out`` (the choice of docs/trust.md, "Member weights per
    landmark"): the weights that combine a case come from the other cases only."""
    from lmk3d.detectors.consensus import fit_landmark_weights
    from tests.conftest import load_benchmark

    bench = load_benchmark("consensus_weights")
    rng = np.random.default_rng(0)
    errors = rng.gamma(2.0, 0.7, size=(6, 3, 4))
    errors[2, 1, 3] = np.inf  # a member lost a landmark on case 2
    own = bench.landmark_weights_for(2, errors, None, 4.0)
    assert np.array_equal(own, fit_landmark_weights(errors[[0, 1, 3, 4, 5]], 4.0))
    changed = errors.copy()
    changed[2] = 0.01  # case 2 itself does not move its own weights, and does move the others'
    assert np.array_equal(bench.landmark_weights_for(2, changed, None, 4.0), own)
    assert not np.array_equal(bench.landmark_weights_for(0, changed, None, 4.0),
                              bench.landmark_weights_for(0, errors, None, 4.0))
    fixed = np.ones((3, 4))
    assert bench.landmark_weights_for(2, errors, fixed, 4.0) is fixed  # --fit-data: the same weights for all


def test_cross_fitted_points_join_the_scores_but_never_the_not_found_rule_nor_the_validation_only_fit() -> None:
    records = _group_records(True)
    val = records[:20]  # 10 cases: an uncut image and a cut variant each
    cross = [dataclasses.replace(r, kind="cross-fit") for r in records[20:] if r.kind == "normal"]  # 50 uncut images
    plain = fit_from_records(val, None, None)
    both = fit_from_records(val, None, None, cross_fitted=cross)
    assert both.report["not_found_rule"] == plain.report["not_found_rule"]
    assert both.report["calibration_cases"] == plain.report["calibration_cases"]
    assert both.report["calibration_points"] == plain.report["calibration_points"] + 150
    assert both.report["groups"]["complete_points"] == plain.report["groups"]["complete_points"] + 150
    rep = both.report["cross_fit"]
    assert (rep["cross_fitted_cases"], rep["cross_fitted_points"], rep["cases_scored"]) == (50, 150, 60)
    assert (rep["validation_only"]["features"], rep["validation_only"]["grouped"]) == (
        plain.features, plain.partial_normalised is not None)
    # the validation-only method scores a cross-fitted point with the fit on every validation point ...
    feats = [point_features(r.final, r.first, None, r.volume) for r in cross]
    p_cross = np.concatenate([plain.probability_within(plain.scale(f)) for f in feats])
    within = np.concatenate([np.linalg.norm(r.final.xyz_mm_ras - r.truth.xyz_mm_ras, axis=1) for r in cross]) <= 3.0
    # ... and a validation point leave one validation case out, never with a cross-fitted point
    group = "grouped" if plain.partial_normalised is not None else "pooled"
    n_val_points = rep["points_scored"] - 150
    whole = plain.report["groups"]["loco_brier"][group] * n_val_points + (p_cross - within) @ (p_cross - within)
    assert rep["validation_only"]["brier"] == pytest.approx(whole / rep["points_scored"], abs=1e-12)
    lo, hi = rep["difference_interval_95"]
    assert lo <= rep["brier_difference"] <= hi
