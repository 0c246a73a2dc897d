"""The ``pin`` detector: shape model, CNN and loss, update rules, learning, checkpoints, geometry."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmk3d import geometry
from lmk3d.data.samples import Sample
from lmk3d.detectors import detector_class, load_detector
from lmk3d.detectors.pin import (
    PinConfig,
    PinDetector,
    PinImage,
    PinIterate,
    PinUnit,
    canonical_frame,
    extract_patches,
    reachable,
    resolve_settings,
    training_params,
    update_step,
)
from lmk3d.errors import LandmarkError
from lmk3d.io import read_image, read_table, write_image
from lmk3d.io.image import Volume
from lmk3d.landmarks import LandmarkSet
from lmk3d.metrics import evaluate
from lmk3d.networks.pin_cnn import PinCNN
from lmk3d.preprocessing import PreparedImage
from lmk3d.shape.pca import ShapeModel
from lmk3d.training.pin_loss import direction_labels, pin_loss
from tests.conftest import DATA

HIPPO = DATA / "hippocampus"


# --- the shape model ---------------------------------------------------------------------------------------
def _latent_shapes(rng: np.random.Generator, cases: int, sds: tuple[float, ...], n_landmarks: int = 4,
                   noise: float = 0.0, spread: float = 20.0) -> np.ndarray:
    """Shapes ``(cases, N, 3)`` = a mean (within +-spread) + orthogonal directions with standard deviations ``sds``."""
    dims = 3 * n_landmarks
    q, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    z = rng.normal(size=(cases, len(sds)))
    z -= z.mean(0)
    if cases > len(sds):  # exactly the requested (co)variances
        z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (cases - 1))).T
    flat = rng.uniform(-spread, spread, size=dims) + (z * np.array(sds)) @ q[:, :len(sds)].T
    return (flat + noise * rng.normal(size=flat.shape)).reshape(cases, n_landmarks, 3)


def test_pca_round_trip_between_parameters_and_shapes(rng: np.random.Generator) -> None:
    model = ShapeModel.fit(_latent_shapes(rng, 40, (6.0, 3.0, 1.5), noise=0.01))
    assert model.n_modes == 3 and model.components.shape == (12, 3)
    b = rng.normal(size=(5, 3)) * model.std
    x = model.from_params(b)
    assert x.shape == (5, 4, 3)
    assert np.allclose(model.to_params(x), b, atol=1e-9)
    # X -> b -> X is exact for shapes in the model's span and b = W^T (X - mean) by definition.
    assert np.allclose(model.from_params(model.to_params(x)), x, atol=1e-9)
    flat = x.reshape(5, -1) - model.mean.reshape(-1)
    assert np.allclose(model.to_params(x), flat @ model.components)


def test_pca_keeps_the_fewest_modes_explaining_the_variance(rng: np.random.Generator) -> None:
    # Variances 100, 10, 1 (+ nothing): two modes explain 110/111 = 99.1 %, three are needed for 99.5 %.
    shapes = _latent_shapes(rng, 50, (10.0, math.sqrt(10.0), 1.0))
    model = ShapeModel.fit(shapes, variance_kept=0.995)
    assert model.n_modes == 3 and model.explained >= 0.995
    assert np.allclose(model.variances, [100.0, 10.0, 1.0], rtol=1e-6)
    assert ShapeModel.fit(shapes, variance_kept=0.99).n_modes == 2
    assert ShapeModel.fit(shapes, variance_kept=0.9).n_modes == 1


def test_pca_mode_count_is_capped_by_the_number_of_cases(rng: np.random.Generator) -> None:
    shapes = _latent_shapes(rng, 3, (5.0, 4.0, 3.0, 2.0), noise=0.5)
    assert ShapeModel.fit(shapes, variance_kept=1.0).n_modes == 2  # 3 cases span 2 directions


def test_pca_refuses_too_few_complete_cases(rng: np.random.Generator) -> None:
    shapes = _latent_shapes(rng, 5, (3.0, 1.0))
    shapes[1:, 0] = np.nan
    with pytest.raises(LandmarkError, match="at least 2 cases with every landmark"):
        ShapeModel.fit(shapes)
    with pytest.raises(LandmarkError, match="identical"):
        ShapeModel.fit(np.repeat(shapes[:1], 4, axis=0))
    with pytest.raises(LandmarkError, match="cases, landmarks, 3"):
        ShapeModel.fit(np.zeros((4, 6)))


def test_pca_projects_partial_shapes_without_zero_filling(rng: np.random.Generator) -> None:
    shapes = _latent_shapes(rng, 60, (6.0, 3.0, 2.0))
    complete_mean = shapes.mean(axis=0)
    partial = shapes.copy()
    partial[::3, 0] = np.nan  # landmark 0 missing in a third of the cases
    model = ShapeModel.fit(partial)
    # Fitted on the complete cases only: landmark 0's mean is not pulled towards (0, 0, 0).
    assert np.linalg.norm(model.mean[0] - np.nanmean(partial[:, 0], axis=0)) < 2.0
    assert np.linalg.norm(model.mean[0] - complete_mean[0]) < 2.0
    zero_filled = np.nan_to_num(partial).mean(axis=0)
    assert np.linalg.norm(zero_filled[0] - complete_mean[0]) > 3.0
    # A shape of the model with a landmark missing: the masked least-squares fit recovers its b.
    b = np.array([[4.0, -2.0, 1.0]])
    x = model.from_params(b)
    x[0, 0] = np.nan
    assert np.allclose(model.project(x), b, atol=1e-4)
    x[0, 0] = (1e6, 1e6, 1e6)  # garbage where the mask says "missing" is ignored
    assert np.allclose(model.project(x, observed=np.array([[False, True, True, True]])), b, atol=1e-4)
    # Nothing observed: the mean shape (b = 0), not a crash.
    assert np.allclose(model.project(np.full((1, 4, 3), np.nan)), 0.0)


def test_coordinate_model_is_the_identity() -> None:
    pts = np.array([[[0.0, 0.0, 0.0]], [[2.0, 4.0, 6.0]], [[4.0, 2.0, 0.0]], [[np.nan] * 3]])
    model = ShapeModel.coordinates(pts)
    assert np.array_equal(model.components, np.eye(3))
    assert np.allclose(model.mean, [[2.0, 2.0, 2.0]])
    assert np.allclose(model.variances, [4.0, 4.0, 12.0])


# --- the CNN and its loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("roi_size", "channels", "fc"), [(1, (4, 4, 4, 4, 4), (8,)), (15, (4, 4, 8, 8, 8), (8,)),
                                                         (33, (4, 8, 8, 8, 16), (16, 16)),
                                                         (101, (32, 64, 128, 256, 512), (1024, 1024))])
def test_cnn_output_shapes_on_odd_sizes(roi_size: int, channels: tuple[int, ...], fc: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = PinCNN(in_channels=15, out_channels=7, roi_size=roi_size, channels=channels, fc_channels=fc).eval()
    d, logits = net(torch.randn(2, 15, roi_size, roi_size))
    assert d.shape == (2, 7) and logits.shape == (2, 14)
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        PinCNN(in_channels=3, out_channels=3, roi_size=15, spatial_dims=3)


def test_cnn_output_scale_is_a_saved_buffer() -> None:
    torch.manual_seed(0)
    net = PinCNN(3, 2, 9, channels=(4, 4, 4, 4, 4), fc_channels=(8,), output_scale=[2.0, 5.0]).eval()
    other = PinCNN(3, 2, 9, channels=(4, 4, 4, 4, 4), fc_channels=(8,)).eval()
    other.load_state_dict(net.state_dict())
    x = torch.randn(3, 3, 9, 9)
    assert torch.equal(net(x)[0], other(x)[0])


def test_direction_labels_and_loss_by_hand() -> None:
    d_gt = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.2, -0.1]])
    assert direction_labels(d_gt).tolist() == [3, 0]  # "-" along mode 1; "+" along mode 0
    d = torch.tensor([[0.0, -1.0, 2.0], [0.5, 0.0, 0.0]])
    logits = torch.zeros(2, 6)
    logits[0, 3] = 2.0
    mse = ((1.0 + 4.0 + 0.0) / 3 + (0.0 + 0.04 + 0.01) / 3) / 2
    ce = (-math.log(math.exp(2) / (math.exp(2) + 5)) - math.log(1 / 6)) / 2
    loss, parts = pin_loss(d, logits, d_gt, alpha=0.5)
    assert float(loss) == pytest.approx(0.5 * mse + 0.5 * ce, rel=1e-6)
    assert parts["mse"] == pytest.approx(mse, rel=1e-6) and parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(pin_loss(d, logits, d_gt, alpha=0.0)[0]) == pytest.approx(mse, rel=1e-6)
    assert float(pin_loss(d, logits, d_gt, alpha=1.0)[0]) == pytest.approx(ce, rel=1e-6)


def test_loss_masks_missing_landmarks() -> None:
    torch.manual_seed(0)
    w, _ = torch.linalg.qr(torch.randn(6, 2))  # 2 landmarks, 2 modes
    d, d_gt, logits = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 4)
    full = torch.ones(3, 6)
    # Complete cases: the landmark-space form equals the paper's shape-space MSE (W is orthonormal).
    assert torch.allclose(pin_loss(d, logits, d_gt, coord_mask=full, components=w)[0], pin_loss(d, logits, d_gt)[0])
    # Landmark 1 missing everywhere: only landmark 0's coordinates count, and no direction label is used.
    mask = full.clone()
    mask[:, 3:] = 0.0
    loss, parts = pin_loss(d, logits, d_gt, alpha=0.5, coord_mask=mask, components=w)
    err = (d - d_gt) @ w.T
    assert parts["mse"] == pytest.approx(float((err[:, :3] ** 2).sum(1).mean() / 2), rel=1e-5)
    assert parts["ce"] == 0.0 and float(loss) == pytest.approx(0.5 * parts["mse"], rel=1e-5)


# --- patches ----------------------------------------------------------------------------------------------
def _ramp_prepared(shape: tuple[int, int, int], values: np.ndarray, affine: np.ndarray) -> PinImage:
    frame = canonical_frame(affine, shape, 1.0)
    return PinImage(torch.as_tensor(values, dtype=torch.float32)[None, None], np.linalg.inv(affine), frame,
                    np.asarray(shape, dtype=float) / 2.0, 0.0)


def test_patches_are_three_orthogonal_planes_along_the_frame_axes() -> None:
    # Array axes (i, j, k) point to (S, R, -A): the frame is RAS whatever the array order.
    shape = (20, 22, 24)
    affine = np.array([[0, 1.0, 0, -10.5], [0, 0, -1.0, 11.5], [1.0, 0, 0, -9.5], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    x, y, z = (geometry.ijk_to_ras(ijk, affine) - canonical_frame(affine, shape, 1.0)[:3, 3]).T
    prep = _ramp_prepared(shape, (x + 10 * y + 100 * z + 5000).reshape(shape), affine)
    centres = torch.tensor([[[0.0, 0.0, 0.0], [1.5, -2.0, 0.25]], [[3.0, 2.0, -1.0], [40.0, 0.0, 0.0]]])
    p = extract_patches(prep, centres, None, roi_size=5)
    assert p.shape == (2, 6, 5, 5)
    r = torch.arange(5.0) - 2
    u, v = torch.meshgrid(r, r, indexing="ij")
    for b in range(2):
        cx, cy, cz = centres[b, 0].tolist()
        assert torch.allclose(p[b, 0], (cx + u) + 10 * (cy + v) + 100 * cz + 5000, atol=1e-2)  # axes 0, 1
        assert torch.allclose(p[b, 1], (cx + u) + 10 * cy + 100 * (cz + v) + 5000, atol=1e-2)  # axes 0, 2
        assert torch.allclose(p[b, 2], cx + 10 * (cy + u) + 100 * (cz + v) + 5000, atol=1e-2)  # axes 1, 2
    # A point 40 mm out along x: its planes are outside the field of view and take the background.
    assert torch.all(p[1, 3:] == 0.0)


def test_preparing_a_box_gives_the_whole_image_inside_it() -> None:
    image = read_image(HIPPO / "images" / "hippocampus_004.nii.gz")
    # Stored flipped and anisotropic (2 x 1 x 1.5 mm), filtered to 3 mm: blocks of 1 x 3 x 2 voxels.
    vol = Volume(np.ascontiguousarray(image.array[::-1]), image.affine @ np.diag([-2.0, 1.0, 1.5, 1.0]))
    image = PreparedImage.from_volume(vol, "MR")
    whole = PinImage.from_prepared(image, 3.0)
    centre = canonical_frame(vol.affine, vol.shape, 1.0)[:3, 3]
    part = PinImage.from_prepared(image, 3.0, roi_ras=(centre - 12.0, centre + 12.0))
    assert part.tensor.numel() < whole.tensor.numel() / 3
    assert np.array_equal(part.frame, whole.frame) and part.pad == whole.pad
    centres = torch.tensor([[[0.5, -1.0, 0.25]], [[-1.5, 1.0, 0.0]]])  # within the box, in 3 mm units
    a, b = extract_patches(whole, centres, None, 5), extract_patches(part, centres, None, 5)
    assert torch.allclose(a, b, atol=1e-5)


# --- update rules on a synthetic case where the true displacement is known ---------------------------------
class _Oracle(nn.Module):
    """Reads each landmark's current position from its patches and returns the true shape displacement.

    The image is ``|x|^2`` in frame units, so the central differences of a plane through ``x`` give
    ``4 x`` along the plane's axes exactly (trilinear interpolation errors cancel); ``d = W^T (X* - X)``.
    The classifier gives ``p_true`` to the true direction class (Eq. 1) and shares the rest evenly.
    """

    def __init__(self, model: ShapeModel, b_true: np.ndarray, p_true: float = 0.9) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.w = torch.tensor(model.components, dtype=torch.float64)
        self.x_true = torch.tensor(model.from_params(b_true).reshape(-1), dtype=torch.float64)
        self.p_true = p_true

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = patches.double()
        m = patches.shape[-1] // 2
        ax0 = (p[:, 0::3, m + 1, m] - p[:, 0::3, m - 1, m]) / 4
        ax1 = (p[:, 0::3, m, m + 1] - p[:, 0::3, m, m - 1]) / 4
        ax2 = (p[:, 1::3, m, m + 1] - p[:, 1::3, m, m - 1]) / 4
        x = torch.stack([ax0, ax1, ax2], dim=-1).reshape(p.shape[0], -1)
        d = (self.x_true - x) @ self.w
        n_classes = 2 * d.shape[1]
        rest = (1 - self.p_true) / (n_classes - 1)
        probs = torch.full((d.shape[0], n_classes), rest, dtype=torch.float64)
        probs[torch.arange(d.shape[0]), direction_labels(d)] = self.p_true
        return d.float(), probs.log().float()


@pytest.fixture
def oracle_case(rng: np.random.Generator) -> tuple[PinIterate, PinUnit, PinImage, np.ndarray]:
    shape = (51, 51, 51)
    affine = np.array([[-1.0, 0, 0, 20.0], [0, 0, 1.0, -23.0], [0, 1.0, 0, 7.0], [0, 0, 0, 1]])  # flipped, permuted
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    x = geometry.ijk_to_ras(ijk, affine) - canonical_frame(affine, shape, 1.0)[:3, 3]
    prep = _ramp_prepared(shape, (x**2).sum(-1).reshape(shape), affine)
    model = ShapeModel.fit(_latent_shapes(rng, 30, (3.0, 2.0, 1.0, 0.5), n_landmarks=3, spread=6.0),
                           variance_kept=1.0)
    b_true = np.array([2.0, -1.5, 0.8, 0.3]) * model.std
    det = PinDetector.create(["a", "b", "c"], "tiny", pixdim=1.0, modality="CT", tolerance_mm=1e-3)
    assert isinstance(det, PinDetector)
    stage = det.levels[0]  # the first level's search, with an oracle for its CNN
    unit = PinUnit([0, 1, 2], model, _Oracle(model, b_true))  # type: ignore[arg-type]
    stage.units = [unit]
    return stage, unit, prep, b_true


def test_update_steps_by_hand() -> None:
    d = torch.tensor([[2.0, -1.0, 0.5]])
    logits = torch.tensor([[0.0, 0.0, 0.0, math.log(4.0), 0.0, 0.0]])  # P(-mode 1) = 4/9, the rest 1/9
    assert torch.equal(update_step(d, logits, "B"), d)
    assert torch.allclose(update_step(d, logits, "C"), torch.tensor([[2 / 9, -4 / 9, 0.5 / 9]]))
    assert torch.equal(update_step(d, logits, "A"), torch.tensor([[0.0, -1.0, 0.0]]))
    with pytest.raises(LandmarkError, match="choose one of A, B, C"):
        update_step(d, logits, "D")


def test_rule_b_jumps_to_the_truth_in_one_step(oracle_case: tuple[PinIterate, PinUnit, PinImage, np.ndarray]) -> None:
    stage, unit, prep, b_true = oracle_case
    b0 = stage.initial_params(unit, prep, None)[None]  # b = 0 and random starts
    b, done = stage.iterate(unit, [prep], b0, rule="B", iterations=10)
    assert np.allclose(b[0].numpy(), b_true, atol=1e-3)
    assert done == 2  # the second step is negligible: early stop


def test_rule_c_moves_by_p_max_times_d_and_converges(
        oracle_case: tuple[PinIterate, PinUnit, PinImage, np.ndarray]) -> None:
    stage, unit, prep, b_true = oracle_case
    b0 = stage.initial_params(unit, prep, None)[None]
    b1, _ = stage.iterate(unit, [prep], b0, rule="C", iterations=1)
    d = torch.as_tensor(b_true, dtype=torch.float32) - b0[0]
    p_max = torch.full_like(d, 0.1 / 7)
    p_max[torch.arange(d.shape[0]), d.abs().argmax(1)] = 0.9
    assert torch.allclose(b1[0] - b0[0], p_max * d, atol=1e-3)
    b, done = stage.iterate(unit, [prep], b0, rule="C", iterations=60)
    assert np.allclose(b[0].numpy(), b_true, atol=1e-2) and done < 60


def test_rule_a_walks_unit_steps_and_ends_within_one_step(
        oracle_case: tuple[PinIterate, PinUnit, PinImage, np.ndarray]) -> None:
    stage, unit, prep, b_true = oracle_case
    b0 = torch.zeros(1, 1, 4)
    b1, _ = stage.iterate(unit, [prep], b0, rule="A", iterations=1)
    step = (b1 - b0)[0, 0]
    k = int(np.argmax(np.abs(b_true)))
    assert step[k] == pytest.approx(np.sign(b_true[k])) and int((step != 0).sum()) == 1
    needed = int(np.ceil(np.abs(b_true).sum())) + 2
    b, done = stage.iterate(unit, [prep], b0, rule="A", iterations=needed)
    assert done == needed  # rule A oscillates at the optimum: no early stop
    assert np.abs(b[0, 0].numpy() - b_true).max() <= 1.0 + 1e-4


class _BlobReader(nn.Module):
    """Reads a Gaussian blob's offset from the patch centre (in-plane intensity centroids) as the move in a
    coordinate shape space (``W = I``): its answer is in whatever frame the patches were sampled in."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = patches.double().clamp_min(0.0)
        r = torch.arange(p.shape[-1], dtype=torch.float64) - (p.shape[-1] - 1) / 2.0
        mass = p.sum(dim=(-2, -1))
        along_u = (p * r[:, None]).sum(dim=(-2, -1)) / mass  # plane 0: frame axes (0, 1); plane 1: (0, 2)
        along_v = (p * r[None, :]).sum(dim=(-2, -1)) / mass
        d = torch.stack([along_u[:, 0], along_v[:, 0], along_v[:, 1]], dim=1)
        return d.float(), torch.zeros(d.shape[0], 6)


def test_test_time_views_map_back_to_the_world() -> None:
    # A blob 15 mm from the field-of-view centre of a flipped, permuted image; views rotated up to 10
    # degrees about each axis and scaled by up to 10 % about that centre move it by several frame units. A reader that
    # answers in each view's frame ends on the blob only if every view is mapped back through its own frame.
    shape = (61, 61, 61)
    affine = np.array([[-1.0, 0, 0, 30.0], [0, 0, 1.0, -33.0], [0, 1.0, 0, 7.0], [0, 0, 0, 1]])
    centre = canonical_frame(affine, shape, 1.0)[:3, 3]
    blob = centre + np.array([9.0, -12.0, 0.0])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    dist2 = ((geometry.ijk_to_ras(ijk, affine) - blob) ** 2).sum(-1)
    prep = _ramp_prepared(shape, np.exp(-dist2 / (2 * 2.0**2)).reshape(shape), affine)
    rng = np.random.default_rng(0)
    model = ShapeModel.coordinates((blob - centre) + rng.normal(0.0, 5.0, size=(20, 1, 3)))
    det = PinDetector.create(["a"], "tiny", pixdim=1.0, modality="CT", roi_size=25, rule="B", iterations=20,
                             tolerance_mm=1e-4, n_random_inits=2, init_range=1.0, tta=6, max_rotation_deg=10.0,
                             scale_range=(0.9, 1.1))
    assert isinstance(det, PinDetector)
    stage = det.levels[0]
    stage.units = [PinUnit([0], model, _BlobReader(), np.ones(3), centred=True)]  # type: ignore[arg-type]
    views = stage.views([prep])[0]
    assert views.shape == (7, 4, 4) and np.array_equal(views[0], prep.frame)
    assert np.allclose(views[:, :3, 3], centre)  # rotated and scaled about the field-of-view centre
    scale = np.cbrt(np.linalg.det(views[1:, :3, :3]))
    rot = views[1:, :3, :3] / scale[:, None, None]
    angle = np.degrees(np.arccos(np.clip((np.trace(rot, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.all((scale >= 0.9) & (scale <= 1.1)) and np.all(angle <= 10.0 * math.sqrt(3)) and angle.min() > 0.5
    moved = np.linalg.norm(geometry.apply_affine(np.linalg.inv(views[1]), blob) - (blob - centre))
    assert moved > 1.0  # the views differ from the working frame where the blob is
    start = LandmarkSet(["a"], (blob + np.array([1.5, -1.0, 0.5]))[None], np.ones(1), np.ones(1, dtype=bool))
    out = stage.refine([prep], [start])[0]
    assert np.linalg.norm(out.xyz_mm_ras[0] - blob) < 0.2, out.xyz_mm_ras[0] - blob
    assert out.found[0] and out.scores[0] > 0.99  # every view and start agrees
    assert np.array_equal(stage.views([prep])[0], views)  # drawn from the seed: the same every call


def test_training_shapes_about_the_mean_or_the_truth(rng: np.random.Generator) -> None:
    model = ShapeModel.fit(_latent_shapes(rng, 40, (3.0, 2.0, 1.0, 0.5, 0.4, 0.3), n_landmarks=3, spread=6.0),
                           variance_kept=1.0)
    window = np.full(model.n_modes, 0.5)
    fine = PinUnit([0, 1, 2], model, nn.Linear(1, 1), window, centred=True)
    first = PinUnit([0, 1, 2], model, nn.Linear(1, 1))
    b_true = np.tile(0.2 * model.std, (4000, 1))
    det = PinDetector.create(["a", "b", "c"], "tiny", sample_range=3.0)
    b = training_params(det.config, fine, b_true, np.random.default_rng(1))
    assert np.all(np.abs(b - b_true) <= 3.0 * window + 1e-12)  # within +-3 windows of the truth ...
    assert np.all(np.abs(b) <= det.config.b_limit * model.std + 1e-12)  # ... and of plausible shapes
    assert np.abs((b - b_true).mean(axis=0)).max() < 0.1
    # The first level draws uniformly within +-3 sqrt(lambda) of the mean shape (the paper).
    b0 = training_params(det.config, first, b_true, np.random.default_rng(1))
    assert np.all(np.abs(b0) <= 3.0 * model.std + 1e-12) and np.abs(b0.mean(axis=0)).max() < 0.1 * model.std.max()
    assert np.allclose(b0.std(axis=0), 3.0 * model.std / math.sqrt(3.0), rtol=0.1)


def test_fine_levels_validate_on_the_cases_the_previous_level_brought_within_reach() -> None:
    det = PinDetector.create(["a", "b"], "tiny")
    truth = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    offsets = [1.0, 2.0, 1.5, 40.0, 2.5]  # the fourth case: the previous level failed grossly
    data = [(None, truth.copy(), np.array([True, True])) for _ in offsets]
    starts = [LandmarkSet(["b", "a"], (truth + [0.0, off, 0.0])[::-1], np.ones(2), np.ones(2, dtype=bool))
              for off in offsets]
    # The fifth case's "b" is 100 mm off but not annotated: only "a" counts (answers in another order).
    data[4][2][1] = False
    starts[4] = LandmarkSet(["b", "a"], np.array([[110.0, 2.5, 0.0], [0.0, 2.5, 0.0]]), np.ones(2),
                            np.ones(2, dtype=bool))
    assert reachable(det.landmark_names, data, starts) == [True, True, True, False, True]  # type: ignore[arg-type]
    assert reachable(det.landmark_names, data, [None] * 5) == [True] * 5  # type: ignore[arg-type]


def test_single_landmark_fine_level_after_a_multiple_first_level(tmp_path: Path) -> None:
    table = read_table(HIPPO / "landmarks.csv")
    cases = sorted(table)[:8]
    samples = [Sample(c, HIPPO / "images" / f"{c}.nii.gz", table[c]) for c in cases]
    det = PinDetector.create(table[cases[0]].names, "tiny", pixdim=2.0, fine_factor=2.0, fine_variant="single",
                             max_epochs=1, steps_per_epoch=2)
    report = det.fit(samples[:6], samples[6:], seed=0, progress=False)
    assert len(det.levels[0].units) == 1 and det.levels[0].units[0].shape.n_modes < 12
    fine = det.levels[1].units
    assert [u.landmarks for u in fine] == [[0], [1], [2], [3]]
    assert all(np.array_equal(u.shape.components, np.eye(3)) and u.centred for u in fine)
    assert all(np.asarray(u.window).shape == (3,) and np.all(np.asarray(u.window) >= 1.0) for u in fine)
    assert [r["level"] for r in report["units"]] == [0, 1, 1, 1, 1] and report["fine_variant"] == "single"
    assert all(r["val_cases"] + len(r["val_left_out"]) == 2 for r in report["units"])
    image = read_image(samples[7].image_path)
    stages = det.predict_all(image).stages
    assert [st.name for st in stages] == ["mean_shape", "pin", "pin_fine"]
    det.save(tmp_path)
    assert load_detector(tmp_path, "cpu").predict(image).allclose(det.predict(image), atol_mm=1e-9)
    with pytest.raises(LandmarkError, match="fine_variant 'pairs'"):
        PinConfig(fine_variant="pairs")


# --- learning on a small real set, with partial annotation -------------------------------------------------
def _hippocampus_in_larger_canvas(root: Path, n_cases: int, seed: int) -> list[Sample]:
    """Real MR crops pasted at random offsets (+-9 voxels about the middle) into a 56 x 64 x 56 mm canvas.

    The anatomy (and its landmarks) move inside the field of view, so predicting the mean position is
    poor and a detector has to find the hippocampus.
    """
    rng = np.random.default_rng(seed)
    table = read_table(HIPPO / "landmarks.csv")
    canvas = np.array([56, 64, 56])
    samples = []
    for case in sorted(table)[:n_cases]:
        vol = read_image(HIPPO / "images" / f"{case}.nii.gz")
        size = np.minimum(vol.shape, canvas)
        start = np.clip((canvas - size) // 2 + rng.integers(-9, 10, size=3), 0, canvas - size)
        arr = np.zeros(canvas, dtype=np.float32)
        arr[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = vol.array[
            tuple(slice(0, n) for n in size)]
        path = root / f"{case}.nii.gz"
        write_image(path, arr, np.eye(4))
        move = np.eye(4)
        move[:3, 3] = start
        samples.append(Sample(case, path, table[case].transformed(move @ np.linalg.inv(vol.affine))))
    return samples


def _mean_position(train: list[Sample]) -> LandmarkSet:
    names = train[0].landmarks.names  # type: ignore[union-attr]
    stack = np.stack([np.where(s.landmarks.found[:, None], s.landmarks.xyz_mm_ras, np.nan)  # type: ignore[union-attr]
                      for s in train])
    return LandmarkSet(names, np.nanmean(stack, axis=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PinDetector, list[Sample], list[Sample]]:
    samples = _hippocampus_in_larger_canvas(tmp_path_factory.mktemp("pin_data"), 48, seed=0)
    train, test = samples[:36], samples[36:]
    # The first landmark is missing in every third training case: masked out, never (0, 0, 0).
    partial = []
    for i, s in enumerate(train):
        lm = s.landmarks
        assert lm is not None
        partial.append(Sample(s.case, s.image_path, lm.with_found(lm.found & (np.arange(len(lm)) > 0))
                              if i % 3 == 0 else lm))
    det = PinDetector.create(train[0].landmarks.names, "tiny")  # type: ignore[union-attr]
    det.fit(partial[:30], partial[30:], seed=0, progress=False)
    return det, train, test


def test_registered() -> None:
    assert detector_class("pin") is PinDetector


def test_learns_and_beats_mean_position(trained: tuple[PinDetector, list[Sample], list[Sample]]) -> None:
    det, train, test = trained
    truth = {s.case: s.landmarks for s in test}
    baseline = evaluate({s.case: _mean_position(train) for s in test}, truth)  # type: ignore[arg-type]
    ev = evaluate({s.case: det.predict(read_image(s.image_path)) for s in test}, truth)  # type: ignore[arg-type]
    assert baseline.overall.mre > 6.0  # the random placement makes the mean position poor
    assert ev.overall.mre < 0.5 * baseline.overall.mre, (ev.overall.mre, baseline.overall.mre)
    # The partially annotated landmark is learnt as well as the others (not biased by its gaps).
    name0 = det.landmark_names[0]
    assert ev.per_landmark[name0].mre < 0.5 * baseline.per_landmark[name0].mre
    assert ev.overall.n_missing == 0


def test_partial_training_cases_do_not_bias_the_shape_model(
        trained: tuple[PinDetector, list[Sample], list[Sample]]) -> None:
    det, train, _ = trained
    model = det.units[0].shape
    assert model.n_cases == 20  # the 30 training cases minus the 10 without landmark 0
    frames = [canonical_frame(*_geometry(s), det.pixdim) for s in train[:30]]
    complete = np.stack([geometry.apply_affine(np.linalg.inv(f), s.landmarks.xyz_mm_ras)  # type: ignore[union-attr]
                         for f, s in zip(frames, train[:30], strict=True)])[[i for i in range(30) if i % 3]]
    assert np.allclose(model.mean, complete.mean(axis=0), atol=1e-6)


def _geometry(s: Sample) -> tuple[np.ndarray, tuple[int, int, int]]:
    image = read_image(s.image_path)
    return image.affine, image.shape


def test_stages_scores_and_not_found(trained: tuple[PinDetector, list[Sample], list[Sample]]) -> None:
    det, _, test = trained
    image = read_image(test[0].image_path)
    pred = det.predict_all(image)
    assert [s.name for s in pred.stages] == ["mean_shape", "pin"]
    assert set(pred.latencies) == {"prepare", "mean_shape", "pin"}
    lm = pred.landmarks
    assert lm.found.all() and np.all((lm.scores > 0) & (lm.scores <= 1))
    # The score is exp(-spread^2 / 2 s^2): with a vanishing scale every landmark is "not found".
    strict = PinDetector(det.landmark_names, det.config)
    for mine, theirs in zip(strict.levels, det.levels, strict=True):
        mine.units = theirs.units
    strict.config = dataclasses.replace(det.config, spread_scale_mm=1e-3)  # reaches every stage
    assert not strict.predict(image).found.any()
    # A field of view cut short: landmarks placed outside it come back "not found".
    part = Volume(np.ascontiguousarray(image.array[:, :20]), image.affine)
    cut = det.predict(part)
    outside = ~part.contains_ras(cut.xyz_mm_ras)
    assert outside.any() and not cut.found[outside].any()


def test_save_load_identical(trained: tuple[PinDetector, list[Sample], list[Sample]], tmp_path: Path) -> None:
    det, _, test = trained
    det.save(tmp_path / "model")
    loaded = load_detector(tmp_path / "model", "cpu")
    assert isinstance(loaded, PinDetector) and loaded.config == det.config
    for s in test[:3]:
        image = read_image(s.image_path)
        a, b = det.predict(image), loaded.predict(image)
        assert np.array_equal(a.xyz_mm_ras, b.xyz_mm_ras) and np.array_equal(a.scores, b.scores)
    # A checkpoint written before fine_variance_kept and fine_levels existed fitted both levels with
    # variance_kept and had one fine level: it loads with those values, not with today's defaults.
    payload = torch.load(tmp_path / "model" / "checkpoint.pt", weights_only=False)
    del payload["config"]["fine_variance_kept"], payload["config"]["fine_levels"]
    old = PinDetector.from_checkpoint(payload, "cpu")
    assert isinstance(old, PinDetector) and old.config.fine_variance_kept == det.config.variance_kept != 1.0
    assert old.config.fine_levels == 1
    # ... and before fine_variant: its fine level had the first level's variant.
    payload["config"]["variant"] = "single"
    del payload["config"]["fine_variant"]
    assert PinDetector.upgrade_config(payload["config"])["fine_variant"] == "single"


def _rotation(deg: float, axis: np.ndarray, centre: np.ndarray) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + math.sin(math.radians(deg)) * k + (1 - math.cos(math.radians(deg))) * k @ k
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre
    return m


def test_predictions_follow_rigid_motion(trained: tuple[PinDetector, list[Sample], list[Sample]]) -> None:
    det, _, test = trained
    image = read_image(test[0].image_path)
    ref = det.predict(image)
    # Same voxels stored in another axis order with flips: the same world image, the same answer.
    arr = np.flip(image.array.transpose(2, 0, 1), axis=1)
    perm = np.zeros((4, 4))
    perm[[2, 0, 1], [0, 1, 2]] = 1.0
    perm[3, 3] = 1.0
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1.0, image.shape[0] - 1
    moved = det.predict(Volume(np.ascontiguousarray(arr), image.affine @ perm @ flip))
    assert np.abs(moved.xyz_mm_ras - ref.xyz_mm_ras).max() < 1e-3
    # Translated: the answer translates exactly.
    shift = np.eye(4)
    shift[:3, 3] = [12.5, -40.0, 3.25]
    moved = det.predict(Volume(image.array, shift @ image.affine))
    assert np.abs(moved.xyz_mm_ras - ref.transformed(shift).xyz_mm_ras).max() < 1e-3
    # Resampled to 0.8 mm over the same field of view: the same answer up to interpolation.
    fine = _resample(image, 0.8)
    assert np.linalg.norm(det.predict(fine).xyz_mm_ras - ref.xyz_mm_ras, axis=1).mean() < 0.6
    # Rotated by 5 degrees about the field-of-view centre: the answer rotates with the image.
    centre = canonical_frame(image.affine, image.shape, 1.0)[:3, 3]
    rot = _rotation(5.0, np.array([1.0, 2.0, -1.0]), centre)
    moved = det.predict(Volume(image.array, rot @ image.affine))
    assert np.linalg.norm(moved.xyz_mm_ras - ref.transformed(rot).xyz_mm_ras, axis=1).mean() < 1.2


def _resample(image: Volume, spacing: float) -> Volume:
    from lmk3d.transforms.grid import Grid, image_tensor, sample

    extent = np.asarray(image.shape) * image.spacing_mm
    n = np.round(extent / spacing).astype(int)
    sp = extent / n
    lo, hi = geometry.world_bounds_ras(image.affine, image.shape)
    grid = Grid.around((lo + hi) / 2, n, sp)
    arr = sample(image_tensor(image.array), image.affine, grid, padding_value=0.0)[0, 0].numpy()
    return Volume(arr, grid.affine)


def test_fine_levels_start_from_the_previous_and_improve_it(tmp_path: Path) -> None:
    samples = _hippocampus_in_larger_canvas(tmp_path, 42, seed=0)
    train, test = samples[:36], samples[36:]
    det = PinDetector.create(train[0].landmarks.names, "tiny", fine_factor=4.0, fine_levels=2)  # type: ignore[union-attr]
    report = det.fit(train[:30], train[30:], seed=0, progress=False)
    # The first level needs ~3 mm pixels to see the +-9 mm placements; the fine ones work at the 1 mm spacing.
    assert det.level_pixdims[0] > 2.0 and det.level_pixdims[1:] == [1.0, 1.0]
    assert [r["level"] for r in report["units"]] == [0, 1, 2]
    # Each fine level is trained on the residuals its predecessor leaves: the second window is narrower.
    assert np.mean(det.levels[2].units[0].window) < np.mean(det.levels[1].units[0].window)  # type: ignore[arg-type]
    fine = det.levels[1].units[0]
    assert fine.centred and np.all(np.asarray(fine.window) >= 1.0)
    # The first level keeps 99.5 % of the variance, the fine level every mode (3N = 12 here, 30 cases).
    assert det.units[0].shape.n_modes < 12 and det.units[0].shape.explained >= 0.995
    assert fine.shape.n_modes == 12 and fine.shape.explained == pytest.approx(1.0)
    truth = {s.case: s.landmarks for s in test}
    preds = {s.case: det.predict_all(read_image(s.image_path)) for s in test}
    assert [st.name for st in next(iter(preds.values())).stages] == ["mean_shape", "pin", "pin_fine", "pin_fine2"]
    coarse = evaluate({c: p.stages[1].landmarks for c, p in preds.items()}, truth)  # type: ignore[arg-type]
    second = evaluate({c: p.stages[2].landmarks for c, p in preds.items()}, truth)  # type: ignore[arg-type]
    final = evaluate({c: p.landmarks for c, p in preds.items()}, truth)  # type: ignore[arg-type]
    assert second.overall.mre < 0.9 * coarse.overall.mre, (second.overall.mre, coarse.overall.mre)
    assert final.overall.mre < second.overall.mre + 0.2, (final.overall.mre, second.overall.mre)
    det.save(tmp_path / "model")
    image = read_image(test[0].image_path)
    assert load_detector(tmp_path / "model", "cpu").predict(image).allclose(det.predict(image), atol_mm=1e-9)


# --- variants, options, errors ----------------------------------------------------------------------------
def test_single_landmark_variant_and_grid19_layout(tmp_path: Path) -> None:
    table = read_table(HIPPO / "landmarks.csv")
    cases = sorted(table)[:6]
    samples = [Sample(c, HIPPO / "images" / f"{c}.nii.gz", table[c]) for c in cases]
    det = PinDetector.create(table[cases[0]].names, "tiny", variant="single", max_epochs=1, steps_per_epoch=2,
                             init_layout="grid19", val_statistic="median")
    report = det.fit(samples[:4], samples[4:], seed=0, progress=False)
    assert len(det.units) == 4 and report["modes"] == [3, 3, 3, 3]
    # Epochs were picked by the median validation error, and the report says so.
    assert report["val_statistic"] == "median" and "best_val_median_mm" in report
    assert all("val_median_mm" in u["history"][-1] for u in report["units"])
    assert all(np.array_equal(u.shape.components, np.eye(3)) for u in det.units)
    image = read_image(samples[5].image_path)
    prep = PinImage.from_prepared(det.prepare(image), det.pixdim)
    b0 = det.levels[0].initial_params(det.units[0], prep, None).numpy()
    assert b0.shape == (19, 3) and np.allclose(b0[0], 0.0)
    # The other 18 start a quarter of the field of view away along 1 or 2 axes (clamped to the model's range).
    assert sorted(int(np.count_nonzero(np.abs(r) > 1e-9)) for r in b0[1:]) == [1] * 6 + [2] * 12
    det.save(tmp_path)
    loaded = load_detector(tmp_path, "cpu")
    assert loaded.predict(image).allclose(det.predict(image), atol_mm=1e-9)


def test_fine_step_resolves_finer_levels_down_to_the_image_spacing() -> None:
    table = read_table(HIPPO / "landmarks.csv")
    cases = sorted(table)[:4]
    samples = [Sample(c, HIPPO / "images" / f"{c}.nii.gz", table[c]) for c in cases]
    det = PinDetector.create(table[cases[0]].names, "tiny", pixdim=4.0, fine_factor=2.0, fine_levels=3,
                             fine_step=1.5)

    def truth(s: Sample) -> tuple[np.ndarray, np.ndarray]:
        lm = s.landmarks.reorder(det.landmark_names)  # type: ignore[union-attr]
        return lm.xyz_mm_ras, lm.found

    det.config = resolve_settings(samples, det.config, truth, "MR")
    # 4 mm / 2 = 2 mm, then 2 / 1.5 = 1.333 mm, then 0.889 mm floored at the 1 mm image spacing.
    assert det.level_pixdims == [4.0, 2.0, 1.333, 1.0]
    with pytest.raises(LandmarkError, match="fine_step"):
        PinConfig(fine_step=0.5)


def test_config_and_fit_options_are_checked() -> None:
    with pytest.raises(LandmarkError, match="choose one of A, B, C"):
        PinConfig(rule="D")
    with pytest.raises(LandmarkError, match="choose one of multiple, single"):
        PinConfig(variant="pairs")
    with pytest.raises(LandmarkError, match="val_statistic 'mode'"):
        PinConfig(val_statistic="mode")
    with pytest.raises(LandmarkError, match="unknown profile"):
        PinDetector.create(["a"], "huge")
    det = PinDetector.create(["a"], "tiny")
    with pytest.raises(LandmarkError, match="not been trained"):
        det.predict(Volume(np.zeros((4, 4, 4), dtype=np.float32), np.eye(4)))
    with pytest.raises(LandmarkError, match="accepted: init, device, groups"):
        det.fit([], None, bogus=1)
    with pytest.raises(LandmarkError, match="'scratch' or 'current'"):
        det.fit([], None, init="warm")
