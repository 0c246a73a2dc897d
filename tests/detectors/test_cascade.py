"""The ``cascade`` detector: networks, losses against hand-computed values, learning, checkpoints, geometry."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmk3d.data.samples import Sample
from lmk3d.detectors import detector_class, load_detector
from lmk3d.detectors.cascade import CascadeDetector
from lmk3d.detectors.cascade.stages import lattice_offsets
from lmk3d.detectors.cascade.training import choose_lattice, fit_step_weights, stage1_estimates
from lmk3d.io import read_image, read_table, write_image
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate
from lmk3d.networks.displacement_cnn import DisplacementCNN
from lmk3d.networks.heatmap_unet import HeatmapUNet
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pairwise import PairwisePrior
from lmk3d.training.cascade_losses import (
    deep_supervision_loss,
    displacement_loss,
    exp_weighted_mse,
    heatmap_channel_mask,
    heatmap_targets,
    normalise_with_background,
)
from lmk3d.transforms.grid import Grid, image_tensor, sample
from lmk3d.transforms.heatmap import gaussian_heatmaps

from ..conftest import DATA

HIPPO = DATA / "hippocampus"


# --- networks ----------------------------------------------------------------------------------------
def test_unet_shapes_on_odd_sizes() -> None:
    torch.manual_seed(0)
    net = HeatmapUNet(spatial_dims=3, in_channels=1, out_channels=5, channels=(4, 8, 8, 16))
    x = torch.randn(2, 1, 17, 23, 9)
    out, sides = net.forward_deep(x)
    assert out.shape == (2, 5, 17, 23, 9)
    assert len(sides) == 3 and all(s.shape == out.shape for s in sides)
    assert torch.equal(net(x), out)


def test_unet_rejects_too_many_side_outputs() -> None:
    with pytest.raises(ValueError, match="num_side_outputs"):
        HeatmapUNet(channels=(4, 8, 16), num_side_outputs=3)


def test_displacement_cnn_shapes_and_independent_networks() -> None:
    torch.manual_seed(0)
    net = DisplacementCNN(roi_size=(17, 16, 19), channels=(4, 4, 8, 8), hidden=16, num_networks=3).eval()
    x = torch.randn(2, 3, 17, 16, 19)
    out = net(x)
    assert out.shape == (2, 3, 3)
    # Changing network 1's patch changes network 1's output only: the N networks share nothing.
    y = x.clone()
    y[:, 1] = torch.randn(2, 17, 16, 19)
    out2 = net(y)
    assert torch.allclose(out[:, 0], out2[:, 0]) and torch.allclose(out[:, 2], out2[:, 2])
    assert not torch.allclose(out[:, 1], out2[:, 1])
    with pytest.raises(ValueError, match="at least 16"):
        DisplacementCNN(roi_size=(15, 16, 16))


# --- losses against hand-computed values -------------------------------------------------------------
def test_background_normalisation_by_hand() -> None:
    # Three voxels, two landmarks: overlapping spots, one spot alone, no spot.
    spots = torch.tensor([[[0.8, 0.5, 0.0], [0.2, 0.0, 0.0]]])  # (B=1, N=2, 3 voxels)
    t = normalise_with_background(spots)
    expected = torch.tensor([[[0.64, 0.5, 0.0], [0.16, 0.0, 0.0], [0.2, 0.5, 1.0]]])
    assert torch.allclose(t, expected, atol=1e-6)
    assert torch.allclose(t.sum(dim=1), torch.ones(1, 3))


def test_heatmap_targets_keep_peaks_and_mask_missing() -> None:
    k, sigma = 0.9, 1.5
    points = torch.tensor([[[3.0, 3.0, 3.0], [12.0, 12.0, 12.0], [0.0, 0.0, 0.0]]])
    present = torch.tensor([[True, True, False]])
    t = heatmap_targets(points, present, (16, 16, 16), sigma, k)
    assert t.shape == (1, 4, 16, 16, 16)
    # Far-apart spots keep their height k (a softmax would not); the background there is 1 - k.
    assert t[0, 0, 3, 3, 3] == pytest.approx(k, abs=1e-5)
    assert t[0, 1, 12, 12, 12] == pytest.approx(k, abs=1e-5)
    assert t[0, 3, 3, 3, 3] == pytest.approx(1 - k, abs=1e-5)
    # One voxel off the peak: k * exp(-1 / (2 sigma^2)).
    assert t[0, 0, 4, 3, 3] == pytest.approx(k * math.exp(-1 / (2 * sigma**2)), abs=1e-5)
    assert torch.allclose(t.sum(dim=1), torch.ones(16, 16, 16), atol=1e-5)
    # The missing landmark is not drawn at (0, 0, 0); its channel and the background leave the loss.
    assert float(t[0, 2].abs().max()) == 0.0
    assert heatmap_channel_mask(present).tolist() == [[True, True, False, False]]


def test_exp_weighted_mse_by_hand() -> None:
    pred = torch.tensor([[[0.0, 0.5], [1.0, 1.0]]], requires_grad=True)  # (B=1, C=2, 2 voxels)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    loss = exp_weighted_mse(pred, target, mask, gamma=1.0)
    # Channel 0 only: weights exp(0) = 1 and exp(0.5); squared errors 1 and 0.25; mean over 2 voxels.
    expected = (1.0 * 1.0 + math.exp(0.5) * 0.25) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # The weights are constants: d/dp = w * 2 (p - t) / 2 voxels.
    assert pred.grad is not None
    assert pred.grad[0, 0].tolist() == pytest.approx([-1.0, math.exp(0.5) * 0.5], rel=1e-6)
    assert pred.grad[0, 1].tolist() == [0.0, 0.0]
    # gamma scales the power: exp(2 * 0.5) for the second voxel.
    assert exp_weighted_mse(pred, target, mask, gamma=2.0).item() == pytest.approx((1 + math.e * 0.25) / 2, rel=1e-6)


def test_target_weighting_by_hand() -> None:
    # Two landmark channels and the background (last), 2 voxels; every channel counts.
    pred = torch.tensor([[[0.0, 0.5], [0.2, 0.0], [1.0, 0.5]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = exp_weighted_mse(pred, target, mask, gamma=2.0, include_target=True).item()
    # Landmark channels: weights exp(2 * max(p, t)); the background keeps exp(2 * p).
    ch0 = (math.exp(2.0) * 1.0 + math.exp(1.0) * 0.25) / 2  # the unpredicted spot weighs e^2, not e^0
    ch1 = (math.exp(0.4) * 0.04 + 1.0 * 0.0) / 2
    ch2 = (math.exp(2.0) * 1.0 + math.exp(1.0) * 0.25) / 2
    assert got == pytest.approx((ch0 + ch1 + ch2) / 3, rel=1e-6)
    plain = exp_weighted_mse(pred, target, mask, gamma=2.0)
    assert plain.item() == pytest.approx(((1.0 + math.exp(1.0) * 0.25) / 2 + ch1 + ch2) / 3, rel=1e-6)


def test_deep_supervision_weights() -> None:
    target = torch.zeros(1, 1, 2)
    mask = torch.tensor([[True]])
    main = torch.full((1, 1, 2), 1.0)
    sides = [torch.full((1, 1, 2), v) for v in (0.5, 0.25, 0.125)]
    loss = deep_supervision_loss(main, sides, target, mask, gamma=0.0)
    assert float(loss) == pytest.approx(1.0 + 0.3 * 0.25 + 0.6 * 0.0625 + 0.9 * 0.015625, rel=1e-6)


def test_displacement_loss_masks_missing_by_hand() -> None:
    pred = torch.tensor([[[1.0, 2.0, 2.0], [5.0, 5.0, 5.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0], [float("nan")] * 3]])
    present = torch.tensor([[True, False]])
    assert float(displacement_loss(pred, target, present)) == pytest.approx(9.0)


# --- a small real set: hippocampus crops placed at random positions in a larger field of view ------------
def _moving_hippocampus(root: Path, n_cases: int, seed: int) -> list[Sample]:
    """Real MR crops embedded at random offsets (up to +-9 mm) in a 56 x 64 x 56 mm zero canvas.

    The landmarks move with the crops, so the mean-position baseline is poor and the detector has to
    find the anatomy in the image.
    """
    rng = np.random.default_rng(seed)
    table = read_table(HIPPO / "landmarks.csv")
    canvas = np.array([56, 64, 56])
    out = []
    for case in sorted(table)[:n_cases]:
        vol = read_image(HIPPO / "images" / f"{case}.nii.gz")
        arr = np.zeros(canvas, dtype=np.float32)
        sub = np.minimum(vol.array.shape, canvas)
        free = canvas - sub
        off = (free // 2 + rng.integers(-9, 10, size=3)).clip(0, free)
        box = tuple(slice(int(o), int(o + n)) for o, n in zip(off, sub, strict=True))
        arr[box] = vol.array[: sub[0], : sub[1], : sub[2]]
        path = root / f"{case}.nii.gz"
        write_image(path, arr, np.eye(4))
        # Crop voxel ijk is canvas voxel ijk + off, and the canvas affine is the identity.
        to_canvas = _translation(off.astype(np.float64)) @ np.linalg.inv(vol.affine)
        out.append(Sample(case, path, table[case].transformed(to_canvas)))
    return out


def _translation(t: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def _mean_position_mre(train: list[Sample], test: list[Sample]) -> float:
    names = train[0].landmarks.names  # type: ignore[union-attr]
    stack = np.stack([s.landmarks.reorder(names).xyz_mm_ras for s in train])  # type: ignore[union-attr]
    mean = LandmarkSet(names, np.nanmean(stack, axis=0))
    return evaluate({s.case: mean for s in test}, {s.case: s.landmarks for s in test}).overall.mre  # type: ignore[misc]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[CascadeDetector, list[Sample], list[Sample]]:
    root = tmp_path_factory.mktemp("cascade_data")
    samples = _moving_hippocampus(root, 48, seed=0)
    train, test = samples[:36], samples[36:]
    # Landmark 0 is missing in every other training case: masked out, never treated as (0, 0, 0).
    name0 = train[0].landmarks.names[0]  # type: ignore[union-attr]
    partial = []
    for i, s in enumerate(train):
        lm = s.landmarks
        assert lm is not None
        if i % 2:
            lm = lm.with_found(np.array([n != name0 for n in lm.names]))
        partial.append(Sample(s.case, s.image_path, lm))
    det = CascadeDetector.create(train[0].landmarks.names, "tiny", max_epochs=40, patch_epochs=20,  # type: ignore[union-attr]
                                 patience=100)
    det.fit(partial[:30], partial[30:], seed=0, progress=False)
    return det, train, test  # type: ignore[return-value]


def test_registered() -> None:
    assert detector_class("cascade") is CascadeDetector


def test_learns_and_beats_mean_position(trained: tuple[CascadeDetector, list[Sample], list[Sample]]) -> None:
    det, train, test = trained
    truth = {s.case: s.landmarks for s in test}
    ev = evaluate({s.case: det.predict(s.load_image()) for s in test}, truth)  # type: ignore[misc]
    baseline = _mean_position_mre(train, test)
    name0 = det.landmark_names[0]
    assert baseline > 6.0  # the random placement makes the baseline poor
    assert ev.overall.n_missing == 0
    assert ev.overall.mre < 0.6 * baseline, (ev.overall.mre, baseline)
    # The half-annotated landmark is learnt as well (not pulled towards the origin by masked cases).
    assert ev.per_landmark[name0].mre < 0.6 * baseline, (ev.per_landmark[name0].mre, baseline)
    assert np.all(np.isfinite(det.stage2.ranges_mm)) and np.all(det.stage2.ranges_mm > 0)


def test_stages_scores_and_not_found(trained: tuple[CascadeDetector, list[Sample], list[Sample]]) -> None:
    det, _, test = trained
    image = test[0].load_image()
    pred = det.predict_all(image)
    assert [s.name for s in pred.stages] == ["stage1_heatmap", "stage2_displacement"]
    s1, s2 = pred.stages[0].landmarks, pred.stages[1].landmarks
    assert np.all((pred.landmarks.scores >= 0) & (pred.landmarks.scores <= 1))
    # Stage 2 moves each landmark by at most its range, and the score never exceeds stage 1's.
    moved = np.linalg.norm(s2.xyz_mm_ras - s1.xyz_mm_ras, axis=1)
    assert np.all(moved <= det.stage2.ranges_mm + 1e-6)
    assert np.all(s2.scores <= s1.scores + 1e-12)
    # A channel without a clear peak (here: silenced, flat zero) gives a landmark that is not found,
    # with score 0; the other landmarks are unaffected.
    silent = copy.deepcopy(det)
    with torch.no_grad():
        silent.stage1.unet.head.conv.weight[0] = 0.0
        silent.stage1.unet.head.conv.bias[0] = 0.0
    quiet = silent.predict(image)
    assert not quiet.found[0] and quiet.scores[0] == 0.0
    assert quiet.found[1:].all() and np.allclose(quiet.xyz_mm_ras[1:], pred.landmarks.xyz_mm_ras[1:])


def test_save_load_identical(trained: tuple[CascadeDetector, list[Sample], list[Sample]], tmp_path: Path) -> None:
    det, _, test = trained
    det.save(tmp_path / "model")
    loaded = load_detector(tmp_path / "model", device="cpu")
    assert isinstance(loaded, CascadeDetector) and loaded.profile == det.profile
    assert np.array_equal(loaded.stage2.ranges_mm, det.stage2.ranges_mm)
    assert np.array_equal(loaded.stage2.step_weights, det.stage2.step_weights)
    for s in test[:3]:
        image = s.load_image()
        a, b = det.predict(image), loaded.predict(image)
        assert np.array_equal(a.xyz_mm_ras, b.xyz_mm_ras) and np.array_equal(a.scores, b.scores)
    # Preparing ahead (as servers and benchmarks do) changes nothing, and the prepared image is not kept.
    image = test[0].load_image()
    c = loaded.predict_all(image, loaded.prepare(image)).landmarks
    assert not any(isinstance(v, PreparedImage) for obj in (loaded, *loaded.stages()) for v in vars(obj).values())
    assert np.array_equal(c.xyz_mm_ras, det.predict(image).xyz_mm_ras)
    # A checkpoint of the layout before stages (format 1: state_dicts and one fitted dict) loads the same model.
    new = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=True)
    one, two = new["stages"]["stage1_heatmap"], new["stages"]["stage2_displacement"]
    old = {k: new[k] for k in ("detector", "profile", "config", "landmark_names")}
    old["state_dicts"] = {"stage1": one["networks"]["unet"], "stage2": two["networks"]["cnn"]}
    old["fitted"] = {**one["fitted"], **two["fitted"], **new["fitted"], "training": {"seconds": 1.0}}
    upgraded = CascadeDetector.from_checkpoint(old, "cpu")
    assert isinstance(upgraded, CascadeDetector) and upgraded.training == {"seconds": 1.0}
    assert upgraded.modality_fitted == det.modality_fitted
    assert np.array_equal(upgraded.predict(image).xyz_mm_ras, c.xyz_mm_ras)


def _permuted_flipped(image: Volume) -> Volume:
    """Same world image, array axes permuted (k, i, j) and the new first axis flipped."""
    arr = np.transpose(image.array, (2, 0, 1))[::-1].copy()
    perm = np.zeros((4, 4))
    perm[2, 0] = perm[0, 1] = perm[1, 2] = perm[3, 3] = 1.0  # new (a, b, c) -> old (i, j, k) = (b, c, a)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, arr.shape[0] - 1
    return Volume(arr, image.affine @ perm @ flip)


def _moved(image: Volume, world: np.ndarray) -> Volume:
    return Volume(image.array, world @ image.affine)


def _rotation(deg: float, axis: int, centre: np.ndarray, shift: np.ndarray) -> np.ndarray:
    a = math.radians(deg)
    r = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre + shift
    return m


def _resampled(image: Volume, spacing: tuple[float, float, float]) -> Volume:
    """The same field of view (voxel edges) resampled to another spacing, trilinearly."""
    sp0 = image.spacing_mm
    extent = np.asarray(image.shape) * sp0
    shape = np.maximum(np.round(extent / np.asarray(spacing)).astype(int), 2)
    new_sp = extent / shape
    a = image.affine.copy()
    a[:3, :3] = image.affine[:3, :3] @ np.diag(new_sp / sp0)
    a[:3, 3] = image.ijk_to_ras(-0.5 + 0.5 * new_sp / sp0)
    grid = Grid(a, (int(shape[0]), int(shape[1]), int(shape[2])))
    arr = sample(image_tensor(image.array), image.affine, grid)[0, 0].numpy()
    return Volume(arr, a)


def test_predictions_follow_rigid_motion(trained: tuple[CascadeDetector, list[Sample], list[Sample]]) -> None:
    det, _, test = trained
    base_err, rot_err, fine_err, motion = [], [], [], []
    for n, s in enumerate(test[:6]):
        image, truth = s.load_image(), s.landmarks
        assert truth is not None
        ref = det.predict(image)
        if n < 3:
            # Permuted and flipped axes describe the same world image: the same answer, up to float rounding.
            assert det.predict(_permuted_flipped(image)).allclose(ref, atol_mm=1e-3)
            # A world translation moves the whole pipeline (grids included) with it.
            t = _translation(np.array([7.3, -12.1, 3.4]))
            assert det.predict(_moved(image, t)).allclose(ref.transformed(t), atol_mm=1e-3)
        # A rotation (within the training augmentation) plus a shift, and another spacing: the network sees
        # a resampled image, so the answer changes a little, but it follows the anatomy.
        centre = image.ijk_to_ras((np.asarray(image.shape) - 1) / 2.0)
        rot = _rotation(8.0, axis=n % 3, centre=centre, shift=np.array([6.0, -5.0, 4.0]))
        moved_truth = truth.transformed(rot)
        base_err.append(np.linalg.norm(ref.xyz_mm_ras - truth.xyz_mm_ras, axis=1))
        rot_err.append(np.linalg.norm(det.predict(_moved(image, rot)).xyz_mm_ras - moved_truth.xyz_mm_ras, axis=1))
        motion.append(np.linalg.norm(moved_truth.xyz_mm_ras - truth.xyz_mm_ras, axis=1))
        fine = det.predict(_resampled(image, (0.8, 1.25, 0.9)))
        fine_err.append(np.linalg.norm(fine.xyz_mm_ras - truth.xyz_mm_ras, axis=1))
    base, rotated, finer = float(np.mean(base_err)), float(np.mean(rot_err)), float(np.mean(fine_err))
    # Ignoring the motion would cost its full size (about 9 mm here); following it costs little accuracy.
    assert float(np.mean(motion)) > 7.0
    assert rotated < base + 1.5, (rotated, base)
    assert finer < base + 1.0, (finer, base)


def test_step_weights_switch_off_a_useless_refinement(
        trained: tuple[CascadeDetector, list[Sample], list[Sample]]) -> None:
    det, _, test = trained
    assert np.all((det.stage2.step_weights >= 0) & (det.stage2.step_weights <= 1))
    # A stage 2 that always pushes by its whole range along +x is far worse than no refinement on held-out
    # images: the fitted share of its displacement is small, and never worse than stage 1 alone there.
    bad = copy.deepcopy(det)
    with torch.no_grad():
        bad.stage2.cnn.fc2.weight.zero_()
        bad.stage2.cnn.fc2.bias.zero_()
        bad.stage2.cnn.fc2.bias[:, 0] = 1.0  # the output is in units of the landmark's range
    cases = bad.training_cases(test[:6])
    stage1_estimates(bad.stage1, cases)
    table = fit_step_weights(bad.stage2, cases)
    assert np.all(bad.stage2.step_weights < 0.5), table
    for row in table.values():
        assert row["val_mre_mm"] <= row["val_mre_stage1_mm"] < row["val_mre_full_step_mm"]
    # The score halves when stage 2 wants to move by its whole range: s = s1 * (1 - 0.5 * 1).
    pred = bad.predict_all(test[0].load_image())
    assert np.allclose(pred.landmarks.scores, 0.5 * pred.stages[0].landmarks.scores)


def test_shape_decode_is_chosen_on_validation_saved_and_refuses_a_twin(
        trained: tuple[CascadeDetector, list[Sample], list[Sample]], tmp_path: Path) -> None:
    det, train, test = trained
    info = det.training["decode"]
    assert info["chosen"] == det.stage1.decode and (det.stage1.pair_prior is None) == (det.stage1.decode == "peak")
    if det.stage1.decode == "shape":  # only when strictly better on the validation images
        assert info["val_mre_shape_mm"] < info["val_mre_peak_mm"]
    shaped = copy.deepcopy(det)
    shaped.stage1.pair_prior = PairwisePrior.fit(np.stack([k.xyz for k in shaped.training_cases(train[:30])]),
                                                 noise_mm=2.0)
    shaped.stage1.decode = "shape"
    shaped.save(tmp_path / "model")
    loaded = load_detector(tmp_path / "model", device="cpu")
    assert isinstance(loaded, CascadeDetector) and loaded.stage1.decode == "shape"
    # A checkpoint written before shape_decode existed always took each channel's maximum.
    payload = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=False)
    del payload["config"]["shape_decode"]
    assert CascadeDetector.from_checkpoint(payload, "cpu").config.shape_decode is False
    np.testing.assert_array_equal(loaded.stage1.pair_prior.mean, shaped.stage1.pair_prior.mean)  # type: ignore[union-attr]
    image = test[0].load_image()
    assert np.array_equal(loaded.predict(image).xyz_mm_ras, shaped.predict(image).xyz_mm_ras)
    # Heatmaps with a spot on every landmark, where channel 0 is brighter on landmark 3's place than on its
    # own: the per-channel maximum takes the wrong spot, the joint decode keeps landmark 0's own.
    truth = test[0].landmarks.reorder(det.landmark_names).xyz_mm_ras  # type: ignore[union-attr]
    grid = shaped.stage1.coarse_grid(shaped.prepare(image))
    pts = torch.as_tensor(grid.world_to_grid(truth))
    n = len(truth)
    h = torch.zeros(1, n + 1, *grid.shape, dtype=torch.float64)
    h[0, :n] = 0.8 * gaussian_heatmaps(pts, grid.shape, 1.0)
    h[0, 0] += 0.95 * gaussian_heatmaps(pts[3], grid.shape, 1.0)
    peak, _ = shaped.stage1.decode_heatmaps(h, [grid], "peak")
    joint, score = shaped.stage1.decode_heatmaps(h, [grid], "shape")
    assert np.linalg.norm(peak[0, 0] - truth[3]) < 1.0
    np.testing.assert_allclose(joint[0], truth, atol=0.5)
    assert 0.5 < score[0, 0] <= 0.8  # the score is that of the spot taken (a voxel value), not of the 0.95 one
    # A flat-zero channel has no local maximum: a finite position with score 0 (not found), never NaN.
    h[0, 1] = 0.0
    flat, score = shaped.stage1.decode_heatmaps(h, [grid], "shape")
    assert np.isfinite(flat).all() and score[0, 1] == 0.0
    np.testing.assert_allclose(flat[0, [0, 2, 3]], truth[[0, 2, 3]], atol=0.5)


def test_profiles_build_and_describe_themselves() -> None:
    for profile in ("paper", "cpu", "cpu_ct", "tiny"):
        det = CascadeDetector.create(["a", "b", "c"], profile)
        assert det.stage1.unet.head.conv.out_channels == 4  # N + 1 heatmap channels
        assert det.stage2.cnn.num_networks == 3
    assert CascadeDetector.profiles["paper"].side_weights == (0.3, 0.6, 0.9)
    assert CascadeDetector.profiles["paper"].refine_lattice_mm == 0.0  # one patch per landmark, as published
    assert not CascadeDetector.profiles["paper"].shape_decode and CascadeDetector.profiles["cpu"].shape_decode
    assert not CascadeDetector.profiles["paper"].weight_target and not CascadeDetector.profiles["cpu"].weight_target
    with pytest.raises(ValueError, match="modality"):
        CascadeDetector.create(["a"], "tiny", modality="PET")


def test_fit_options_are_checked() -> None:
    det = CascadeDetector.create(["a"], "tiny")
    with pytest.raises(ValueError, match="unknown option"):
        det.fit([], bogus=1)
    with pytest.raises(ValueError, match="init must be"):
        det.fit([], init="warm")


def test_lattice_shapes() -> None:
    cube = lattice_offsets(1.5, "cube")
    # The cube is the 27 points of {-a, 0, a}^3 in C order (the shipped models' averaging order).
    expected = 1.5 * np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=float)
    assert np.array_equal(cube, expected)
    cross = lattice_offsets(1.5, "cross")
    assert cross.shape == (7, 3) and np.array_equal(cross.sum(axis=0), np.zeros(3))
    assert sorted(map(tuple, cross)) == sorted([(0.0, 0.0, 0.0)] + [tuple(s * 1.5 * np.eye(3)[a])
                                                                   for a in range(3) for s in (-1.0, 1.0)])
    assert np.array_equal(lattice_offsets(0.0, "cross"), np.zeros((1, 3)))
    assert np.array_equal(lattice_offsets(1.5, "centre"), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="refine_lattice"):
        CascadeDetector.create(["a"], "tiny", refine_lattice="sphere")


def test_the_lattice_rule_by_hand() -> None:
    def row(patches: int, mre: float, over: int) -> dict[str, float]:
        return {"patches": patches, "val_mre_mm": mre, "val_over_mm": over}

    cube = row(27, 1.00, 3)
    # The fewest patches within 2 % of the cube's MRE and with no more points over 3 mm.
    assert choose_lattice({"cube": cube, "cross": row(7, 1.019, 3), "centre": row(1, 1.0201, 3)}) == "cross"
    assert choose_lattice({"cube": cube, "cross": row(7, 0.90, 3), "centre": row(1, 0.90, 4)}) == "cross"
    assert choose_lattice({"cube": cube, "cross": row(7, 1.05, 3), "centre": row(1, 0.95, 2)}) == "centre"
    assert choose_lattice({"cube": cube, "cross": row(7, 1.03, 2), "centre": row(1, 1.00, 4)}) == "cube"
    # No validation points at all: nothing passes, the cube stays.
    nan = float("nan")
    assert choose_lattice({"cube": row(27, nan, 0), "cross": row(7, nan, 0), "centre": row(1, nan, 0)}) == "cube"


def test_training_chooses_the_lattice_on_validation_and_saves_it(
        trained: tuple[CascadeDetector, list[Sample], list[Sample]], tmp_path: Path) -> None:
    det, _, _ = trained
    report = det.training["lattice"]
    rows = report["candidates"]
    assert set(rows) == {"cube", "cross", "centre"}
    assert [rows[n]["patches"] for n in ("cube", "cross", "centre")] == [27, 7, 1]
    assert report["chosen"] == choose_lattice(rows) == det.config.refine_lattice
    assert det.stage1.config is det.config and det.stage2.config is det.config
    det.save(tmp_path / "model")
    assert load_detector(tmp_path / "model", device="cpu").config.refine_lattice == report["chosen"]
    # The paper profile keeps its single patch: nothing to choose.
    assert not CascadeDetector.profiles["paper"].fit_lattice


def test_cross_lattice_averages_its_seven_patches_and_is_saved(
        trained: tuple[CascadeDetector, list[Sample], list[Sample]], tmp_path: Path) -> None:
    det, _, test = trained
    image = test[0].load_image()
    crossed = copy.deepcopy(det)
    assert det.config.refine_lattice_mm == 1.5
    crossed.config = crossed.stage1.config = crossed.stage2.config = dataclasses.replace(
        det.config, refine_lattice="cross")
    prepared = crossed.prepare(image)
    s1 = crossed.stage1(prepared, None)
    centres = s1.xyz_mm_ras
    seen: list[int] = []
    original = crossed.stage2.displacements

    def counting(patches: torch.Tensor) -> torch.Tensor:
        seen.append(int(patches.shape[0]))
        return original(patches)

    crossed.stage2.displacements = counting  # type: ignore[method-assign]
    d, _ = crossed.stage2.refine(prepared, centres)
    assert sum(seen) == 7
    # By hand: each of the 7 patch centres' own clamped estimate, averaged, clamped again.
    stage2 = crossed.stage2
    offsets = lattice_offsets(det.config.refine_lattice_mm, "cross")
    each = []
    for off in offsets:
        starts = centres + off
        with torch.no_grad():
            patches = torch.stack([prepared.sample(stage2.patch_grids(starts[i:i + 1]), det.config.pixdim)[:, 0]
                                   for i in range(len(centres))], dim=1)
            raw = original(patches).double().numpy()[0]
        each.append(starts + stage2.clamped(raw[None])[0][0])
    by_hand, _ = stage2.clamped((np.mean(each, axis=0) - centres)[None])
    np.testing.assert_allclose(d, by_hand[0], atol=1e-5)
    # The cube's answer differs: the lattice is used, not ignored.
    cubed = copy.deepcopy(det)
    cubed.config = cubed.stage1.config = cubed.stage2.config = dataclasses.replace(det.config, refine_lattice="cube")
    d_cube, _ = cubed.stage2.refine(cubed.prepare(image), centres)
    assert not np.allclose(d, d_cube, atol=1e-6)
    crossed.stage2.displacements = original  # type: ignore[method-assign]
    crossed.save(tmp_path / "crossed")
    loaded = load_detector(tmp_path / "crossed", device="cpu")
    assert isinstance(loaded, CascadeDetector) and loaded.config.refine_lattice == "cross"
    a, b = crossed.predict(image), loaded.predict(image)
    assert np.array_equal(a.xyz_mm_ras, b.xyz_mm_ras) and np.array_equal(a.scores, b.scores)
