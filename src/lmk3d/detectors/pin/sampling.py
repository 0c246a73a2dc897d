"""PIN's view of an image: the working frame, the image at a level's pixel size, 2.5D patches, update rules.

:class:`PinImage` is built from the request's shared
:class:`~lmk3d.preprocessing.PreparedImage` (made once per request or training case and read by
every level): :meth:`~lmk3d.preprocessing.PreparedImage.normalised` box-filters and maps the
intensities, and the working frame comes from the image as given (``source_affine``,
``source_shape``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmk3d import geometry
from lmk3d.detectors.pin.config import RULES
from lmk3d.errors import LandmarkError
from lmk3d.preprocessing import PreparedImage


def canonical_frame(affine: np.ndarray, shape: Sequence[int], pixdim: float) -> np.ndarray:
    """The working frame: frame coordinates -> world RAS mm, ``(4, 4)``.

    Axes along R, A, S (the canonical frame of the shared working grids), unit ``pixdim`` mm, origin at
    the centre of the image's field of view. The world frame, not the image's axes, is the anatomy's
    frame: a gantry tilt or an oblique slab says how the image was acquired, not how the patient lies.
    """
    lo, hi = geometry.world_bounds_ras(geometry.check_affine(affine), shape)
    frame = np.diag([float(pixdim)] * 3 + [1.0])
    # The axis-aligned bounds of a box's corners are symmetric about the box centre, for any rotation.
    frame[:3, 3] = (lo + hi) / 2.0
    return frame



@dataclass(eq=False)
class PinImage:
    """One image at one level's pixel size, ready for patch sampling.

    Attributes:
        tensor: ``(1, 1, I, J, K)`` box-filtered, intensity-normalised image, minus ``pad``.
        ijk_from_world: ``(4, 4)`` inverse of the (filtered) image affine.
        frame: ``(4, 4)`` working frame -> world RAS mm.
        half_extent: ``(3,)`` half the field of view along the frame axes, in frame units.
        pad: value outside the field of view (the normalised background).
        pixdim: the frame unit in mm.
    """

    tensor: torch.Tensor
    ijk_from_world: np.ndarray
    frame: np.ndarray
    half_extent: np.ndarray
    pad: float
    pixdim: float = 1.0

    @classmethod
    def from_prepared(cls, image: PreparedImage, pixdim: float,
                      roi_ras: tuple[np.ndarray, np.ndarray] | None = None) -> PinImage:
        """The image filtered to about ``pixdim`` mm and normalised, with its working frame.

        Args:
            image: the request's prepared image (one per request, shared by every level).
            pixdim: the level's frame unit in mm.
            roi_ras: optional world box ``(lo, hi)``: only the voxels inside it (a fine level looks
                near the previous answer only). The frame, the intensity map and the box-filter blocks
                still come from the whole image, so the result is the same inside the box.
        """
        t, aff, pad = image.normalised(float(pixdim), roi_ras)
        shape = image.source_shape
        frame = canonical_frame(image.source_affine, shape, pixdim)
        box = np.array([[x, y, z] for x in (-0.5, shape[0] - 0.5) for y in (-0.5, shape[1] - 0.5)
                        for z in (-0.5, shape[2] - 0.5)])
        in_frame = geometry.apply_affine(np.linalg.inv(frame), geometry.ijk_to_ras(box, image.source_affine))
        return cls(t, np.linalg.inv(aff), frame, np.abs(in_frame).max(axis=0), pad, float(pixdim))


def plane_offsets(roi_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Frame-unit offsets of the three orthogonal planes: ``(3, s, s, 3)``.

    Plane 0 spans frame axes (0, 1) (normal 2, "axial"), plane 1 spans (0, 2), plane 2 spans (1, 2).
    """
    r = torch.arange(roi_size, dtype=torch.float32, device=device) - (roi_size - 1) / 2.0
    u, v = torch.meshgrid(r, r, indexing="ij")
    z = torch.zeros_like(u)
    return torch.stack([torch.stack([u, v, z], -1), torch.stack([u, z, v], -1), torch.stack([z, u, v], -1)])


def extract_patches(prep: PinImage, centres: torch.Tensor, frames: torch.Tensor | None, roi_size: int) -> torch.Tensor:
    """Three orthogonal planes through each point, all points in one ``grid_sample`` call.

    Args:
        prep: the image.
        centres: ``(B, L, 3)`` frame coordinates (e.g. ``B`` initialisations of ``L`` landmarks).
        frames: ``(B, 4, 4)`` frame -> world per row (augmentation moves them), or None for ``prep.frame``.
        roi_size: ``s``.

    Returns:
        ``(B, 3L, s, s)``; channels ``3l .. 3l + 2`` are landmark ``l``'s three planes.
    """
    dev = prep.tensor.device
    b, n = centres.shape[:2]
    inv = torch.as_tensor(prep.ijk_from_world, dtype=torch.float32, device=dev)
    if frames is None:
        m = (inv @ torch.as_tensor(prep.frame, dtype=torch.float32, device=dev))[None].expand(b, 4, 4)
    else:
        m = inv[None] @ frames.to(device=dev, dtype=torch.float32)
    pts = centres.to(dev, torch.float32)[:, :, None, None, None, :] + plane_offsets(roi_size, dev)  # (B,L,3,s,s,3)
    # grid_sample takes (x, y, z) = (k, j, i): the rows of m in reverse give the voxel indices in that order
    # directly (each index is still its own row's dot product, so the values are those of ijk, reversed).
    kji = m[:, [2, 1, 0]]
    grid = torch.einsum("bij,blpuvj->blpuvi", kji[:, :, :3], pts) + kji[:, None, None, None, None, :, 3]
    size = torch.as_tensor([max(int(d) - 1, 1) for d in prep.tensor.shape[:1:-1]], dtype=torch.float32, device=dev)
    grid = (2.0 * grid / size - 1.0).reshape(1, b * n * 3, roi_size, roi_size, 3)
    # The tensor holds image - pad: zero padding, then + pad, gives outside samples the background value.
    out = F.grid_sample(prep.tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(b, n * 3, roi_size, roi_size) + prep.pad


# --- update rules ---------------------------------------------------------------------------------
def update_step(d: torch.Tensor, logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The move in shape space for one iteration.

    Args:
        d: ``(B, n_b)`` regressed displacement.
        logits: ``(B, 2 n_b)`` direction logits (class ``2i``: ``+`` mode ``i``; ``2i + 1``: ``-``).
        rule: ``"A"``: one unit (one frame voxel) along the most probable direction; ``"B"``: ``d``;
            ``"C"``: ``P_max * d`` with ``P_max_i = max(P(+i), P(-i))``.

    Returns:
        ``(B, n_b)``.
    """
    if rule == "B":
        return d
    p = torch.softmax(logits.float(), dim=1)
    if rule == "C":
        return torch.maximum(p[:, 0::2], p[:, 1::2]) * d
    if rule == "A":
        c = p.argmax(dim=1)
        step = torch.zeros_like(d)
        sign = 1.0 - 2.0 * (c % 2).to(d.dtype)
        step[torch.arange(d.shape[0], device=d.device), c // 2] = sign
        return step
    raise LandmarkError(f"unknown update rule {rule!r}; choose one of {', '.join(RULES)}")



__all__ = ["PinImage", "canonical_frame", "extract_patches", "plane_offsets", "update_step"]
