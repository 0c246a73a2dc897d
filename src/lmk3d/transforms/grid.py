"""Working grids: the one preprocessing path shared by training, validation and inference.

Detectors never reorient or resample the big input array in place. Each stage asks for the image on
a *working grid*: a box of voxels aligned with the RAS axes (the canonical frame), with its own
spacing and size, placed anywhere in world space. Sampling the original array onto such a grid does
orientation, resampling and cropping in one exact trilinear pass (``torch.grid_sample``), for any
input affine (oblique, flipped, anisotropic). A landmark's position on the grid is
``inv(grid.affine) @ world``, so coordinates follow every spatial transform exactly.

Augmentation moves the grid instead of the image: a random rigid/scaling transform ``T`` (world ->
world) gives the grid affine ``T @ grid.affine``; the landmarks stay where they are in world space.

Whole-image grids (the coarse stages) are downsampled; the input is first box-filtered by integer
factors along each array axis (``avg_pool3d``) so that fine noise does not alias.

Example:
    >>> import numpy as np, torch
    >>> g = Grid.around(np.zeros(3), size=(8, 8, 8), spacing_mm=2.0)
    >>> g.shape, g.spacing_mm.tolist()
    ((8, 8, 8), [2.0, 2.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmk3d import geometry
from lmk3d.transforms.block_mean import block_mean


@dataclass(frozen=True, eq=False)
class Grid:
    """A box of voxels in world space.

    Attributes:
        affine: ``(4, 4)`` grid index -> world RAS mm.
        shape: number of voxels along each grid axis.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]

    @property
    def spacing_mm(self) -> np.ndarray:
        return geometry.spacing_from_affine(self.affine)

    @classmethod
    def around(
        cls, centre_ras: np.ndarray, size: Sequence[int] | np.ndarray, spacing_mm: float | Sequence[float]
    ) -> Grid:
        """A RAS-aligned grid of ``size`` voxels centred on a world point."""
        size3 = np.broadcast_to(np.asarray(size, dtype=int), (3,))
        sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        a = np.diag([*sp, 1.0])
        a[:3, 3] = np.asarray(centre_ras, dtype=np.float64) - sp * (size3 - 1) / 2.0
        return cls(a, (int(size3[0]), int(size3[1]), int(size3[2])))

    @classmethod
    def covering(cls, affine: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> Grid:
        """A RAS-aligned grid of ``size`` voxels, isotropic, holding the image's whole field of view.

        The spacing is the smallest that fits the field of view's longest side into the grid; the
        field of view is centred in the grid (the rest is padding, sampled as background).
        """
        lo, hi = geometry.world_bounds_ras(affine, shape)
        size3 = np.broadcast_to(np.asarray(size, dtype=int), (3,))
        spacing = float(np.max((hi - lo) / size3))
        return cls.around((lo + hi) / 2.0, size3, spacing)

    def moved(self, world_transform: np.ndarray) -> Grid:
        """The same grid carried by a world -> world transform (augmentation)."""
        return Grid(np.asarray(world_transform, dtype=np.float64) @ self.affine, self.shape)

    def world_to_grid(self, xyz_mm_ras: np.ndarray) -> np.ndarray:
        return geometry.ras_to_ijk(xyz_mm_ras, self.affine)

    def grid_to_world(self, idx: np.ndarray) -> np.ndarray:
        return geometry.ijk_to_ras(idx, self.affine)


def image_tensor(array: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(I, J, K)`` array -> ``(1, 1, I, J, K)`` float32 tensor on ``device`` (no copy when possible)."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return t.to(device)[None, None]


def antialias(image: torch.Tensor, affine: np.ndarray, target_spacing_mm: float,
              flip: Sequence[int] = ()) -> tuple[torch.Tensor, np.ndarray]:
    """Box-filter and subsample by integer factors so no axis is much finer than the target spacing.

    Args:
        image: ``(1, C, I, J, K)``, any strides (:func:`lmk3d.transforms.block_mean.block_mean` reads a
            strided view on the CPU without copying it first).
        affine: its ijk -> RAS affine.
        flip: axes of ``image`` to read backwards: the result is that of ``image.flip(flip)`` (whose
            affine ``affine`` is), without the flipped copy.

    Returns:
        The reduced image and its affine (voxel ``n`` of the result is the mean of input voxels
        ``n*f .. n*f + f - 1``, centred at index ``n*f + (f - 1) / 2``).
    """
    spacing = geometry.spacing_from_affine(affine)
    factors = [max(1, int(np.floor(target_spacing_mm / s + 1e-6))) for s in spacing]
    factors = [min(f, int(n)) for f, n in zip(factors, image.shape[2:], strict=True)]
    if all(f == 1 for f in factors):
        return (image.flip(list(flip)) if flip else image), np.asarray(affine, dtype=np.float64)
    out = block_mean(image, factors, flip)  # avg_pool3d(ceil_mode=True, count_include_pad=False), bit for bit
    scale = np.diag([*factors, 1.0]).astype(np.float64)
    scale[:3, 3] = (np.asarray(factors) - 1) / 2.0
    return out, np.asarray(affine, dtype=np.float64) @ scale


def sampling_grid(image_affine: np.ndarray, image_shape: Sequence[int], grid_affines: np.ndarray,
                  shape: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates for ``B`` grids of one ``shape``.

    Args:
        image_affine: ``(4, 4)`` of the sampled image; ``image_shape``: its ``(I, J, K)``.
        grid_affines: ``(B, 4, 4)`` grid index -> world.

    Returns:
        ``(B, D, H, W, 3)`` with the last axis ordered (k, j, i) as ``grid_sample`` expects
        (align_corners=True: -1 and 1 are the centres of the first and last voxels).
    """
    inv = np.linalg.inv(geometry.check_affine(image_affine))
    m = torch.as_tensor(inv[None] @ np.asarray(grid_affines, dtype=np.float64), dtype=torch.float32, device=device)
    axes = [torch.arange(int(n), dtype=torch.float32, device=device) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3) grid indices
    ijk = torch.einsum("bij,dhwj->bdhwi", m[:, :3, :3], idx) + m[:, None, None, None, :3, 3]
    size = torch.as_tensor([max(int(n) - 1, 1) for n in image_shape], dtype=torch.float32, device=device)
    norm = 2.0 * ijk / size - 1.0
    return norm.flip(-1)


def _crop_to_grids(image: torch.Tensor, image_affine: np.ndarray, grid_affines: np.ndarray,
                   shape: Sequence[int]) -> tuple[torch.Tensor, np.ndarray] | None:
    """The part of ``image`` (a view) that trilinear sampling on the grids can reach, and its affine.

    A margin of one voxel beyond the grids' extreme points keeps every interpolation inside the crop,
    and the crop is clipped to the image, so sampling it gives exactly what sampling the whole image
    gives (outside the image, the same zero padding). None when no grid point falls near the image.
    Small patches in a large CT then cost what the patches cost, not a pass over the whole volume.
    """
    size = np.asarray(image.shape[2:])
    hi_idx = np.asarray(shape, dtype=np.float64) - 1.0
    corners = np.array([[x, y, z, 1.0] for x in (0.0, hi_idx[0]) for y in (0.0, hi_idx[1]) for z in (0.0, hi_idx[2])])
    inv = np.linalg.inv(geometry.check_affine(image_affine))
    ijk = np.einsum("ij,bjk,ck->bci", inv, np.asarray(grid_affines, dtype=np.float64), corners)[..., :3]
    lo = np.floor(ijk.reshape(-1, 3).min(axis=0)).astype(np.int64) - 1
    hi = np.ceil(ijk.reshape(-1, 3).max(axis=0)).astype(np.int64) + 2
    # At least 2 voxels per axis (when the image has them): grid_sample maps every point of a 1-voxel
    # axis onto that voxel, where the whole image would have given the padding.
    lo = np.clip(lo, 0, np.maximum(size - 2, 0))
    hi = np.clip(hi, 0, size)
    if np.any(hi <= lo):
        return None
    hi = np.minimum(np.maximum(hi, lo + 2), size)
    if np.all(lo == 0) and np.all(hi == size):
        return image, image_affine
    shift = np.eye(4)
    shift[:3, 3] = lo
    view = image[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return view, np.asarray(image_affine, dtype=np.float64) @ shift


def sample(image: torch.Tensor, image_affine: np.ndarray, grids: Sequence[Grid] | Grid,
           padding_value: float | None = None) -> torch.Tensor:
    """Trilinear samples of ``image`` on one or several grids of the same shape.

    Args:
        image: ``(1, C, I, J, K)`` float tensor.
        image_affine: its ijk -> RAS affine.
        grids: one grid, or ``B`` grids of equal shape (e.g. one patch per landmark).
        padding_value: value outside the field of view (default: the image minimum, i.e. air/background).

    Returns:
        ``(B, C, D, H, W)``.
    """
    gs = [grids] if isinstance(grids, Grid) else list(grids)
    shape = gs[0].shape
    if any(g.shape != shape for g in gs):
        raise ValueError("all grids sampled together must have the same shape")
    pad = float(image.amin()) if padding_value is None else float(padding_value)
    affines = np.stack([g.affine for g in gs])
    cropped = _crop_to_grids(image, image_affine, affines, shape)
    if cropped is None:  # every grid lies wholly outside the image
        return torch.full((len(gs), image.shape[1], *shape), pad, dtype=image.dtype, device=image.device)
    image, image_affine = cropped
    coords = sampling_grid(image_affine, image.shape[2:], affines, shape, image.device)
    # Sample (image - pad) with zero padding, then add pad back: outside voxels become ``pad``.
    shifted = image - pad if pad != 0.0 else image
    out = F.grid_sample(shifted.expand(len(gs), *image.shape[1:]), coords, mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out + pad if pad != 0.0 else out


def random_world_transform(
    rng: np.random.Generator, centre_ras: np.ndarray, max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1), max_translation_mm: float = 0.0,
) -> np.ndarray:
    """A random rotation (about each RAS axis), isotropic scaling and translation about ``centre_ras``.

    Drawn once; the same ``(4, 4)`` world transform then moves a grid (image) and nothing else, so
    landmark positions need no change (TorchIO's draw-then-apply idea).
    """
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    s = rng.uniform(*scale_range)
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx * s
    c = np.asarray(centre_ras, dtype=np.float64)
    m[:3, 3] = c - m[:3, :3] @ c + rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    return m
