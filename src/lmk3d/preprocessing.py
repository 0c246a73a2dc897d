"""One prepared image per request: orientation, modality, intensity map, resampling on demand.

Every stage of every detector, in training, validation and inference, reads the image through one
:class:`PreparedImage`, made once by :meth:`PreparedImage.from_volume` (the pipeline runner does it
per request; training per case) and passed to the stages. Nothing is cached on the detector.

* **Orientation.** The voxels are viewed with their axes pointing to R, A and S (flips undone, the
  storage order kept; a Fortran-ordered NIfTI array is taken as its C-ordered transpose). Only the
  view changes, never the world positions: sampling happens in world space through the affine.
  The box filter's blocks then start at the same anatomical side whatever the storage order. The
  flips are not copied: the tensor keeps the stored voxels (no copy of a 512 x 512 x 300 CT) and
  records which axes run backwards; the box filter counts its blocks from the R/A/S end of those
  axes and only its (small) output is flipped.
* **Modality.** One rule (:func:`guess_modality`): CT when the image holds air, i.e. its 1st
  percentile is below ``CT_AIR_THRESHOLD_HU`` (-500 HU: air is about -1000 HU, soft tissue above
  -100, and MR intensities are never that negative). A model fixes the modality when it is trained
  and stores it; the guess applies to the first training image only.
* **Intensity.** :func:`lmk3d.transforms.intensity.fit_intensity` (CT: the HU window; MR: the
  0.5th-99.5th percentiles), fitted once on the whole image.
* **Resampling.** Grids at any spacing (:meth:`sample`): the image is box-filtered by integer factors
  first (anti-aliasing; only the part the grids reach), then trilinearly sampled; the filtered
  copies are kept in the object for the other stages of the same request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmk3d import geometry
from lmk3d.errors import LandmarkError
from lmk3d.io.image import Volume
from lmk3d.transforms.block_mean import block_mean
from lmk3d.transforms.grid import Grid, antialias, image_tensor, sample
from lmk3d.transforms.intensity import IntensityMap, fit_intensity

#: 1st-percentile intensity below which an image is taken for CT (air at about -1000 HU).
CT_AIR_THRESHOLD_HU = -500.0
MODALITIES = ("CT", "MR")


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the image holds air (1st percentile below ``CT_AIR_THRESHOLD_HU``), else ``"MR"``.

    Reads a subsample of about a million voxels, so it costs little on a whole CT.
    """
    a = np.asarray(array)
    step = max(1, int(round((a.size / 1_000_000) ** (1 / 3))))
    sub = a[::step, ::step, ::step] if a.ndim == 3 else a.ravel()
    return "CT" if float(np.percentile(sub, 1.0)) < CT_AIR_THRESHOLD_HU else "MR"


def resolve_modality(configured: str, fitted: str | None, array: np.ndarray | None = None) -> str:
    """The modality to use: the config's unless ``"auto"``, else the one fixed in training, else a guess."""
    if configured in MODALITIES:
        return configured
    if configured != "auto":
        raise LandmarkError(f"unknown modality {configured!r}; choose CT, MR or auto")
    if fitted in MODALITIES:
        return str(fitted)
    if array is None:
        raise LandmarkError("the modality is chosen when training; this model has not been trained")
    return guess_modality(array)


def canonical_view(array: np.ndarray, affine: np.ndarray, flip_axes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A view of ``array`` (and its affine) whose axes point to R, A or S, storage order kept.

    Fortran-ordered arrays are first taken as their C-ordered transpose (the affine's columns
    reversed to match), so nothing is copied across strides; flipped axes are then flipped back
    (unless ``flip_axes`` is False: models trained before the shared preprocessing box-filtered in
    storage order, and keep doing so to predict exactly as they did).
    """
    a, aff = array, np.asarray(affine, dtype=np.float64)
    if not a.flags.c_contiguous and a.flags.f_contiguous:
        a = a.T
        aff = aff[:, [2, 1, 0, 3]]
    if not flip_axes:
        return a, aff
    import nibabel as nib

    ornt = nib.orientations.io_orientation(aff)
    for axis in range(3):
        if ornt[axis, 1] < 0:
            a = np.flip(a, axis=axis)
            flip = np.eye(4)
            flip[axis, axis], flip[axis, 3] = -1.0, a.shape[axis] - 1
            aff = aff @ flip
    return a, aff


def axis_flips(affine: np.ndarray) -> tuple[bool, bool, bool]:
    """Which array axes of ``affine`` run against R, A or S (the axes :func:`canonical_view` flips)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return (bool(ornt[0, 1] < 0), bool(ornt[1, 1] < 0), bool(ornt[2, 1] < 0))


def flip_index(flipped: Sequence[bool], size: Sequence[int]) -> np.ndarray:
    """``(4, 4)`` index map between a box of ``size`` voxels and the same box with the ``flipped`` axes
    reversed (its own inverse): ``affine @ flip_index(...)`` is the affine of the reversed box."""
    m = np.eye(4)
    for axis, f in enumerate(flipped):
        if f:
            m[axis, axis], m[axis, 3] = -1.0, float(size[axis] - 1)
    return m


def _pool_segments(view: torch.Tensor, kernel: Sequence[int], lead: Sequence[int]) -> torch.Tensor:
    """``avg_pool3d`` of ``view`` whose blocks along axis ``a`` start after a partial block of ``lead[a]`` voxels."""
    segments = [[(0, r, r), (r, int(view.shape[2 + a]), k)] if r else [(0, int(view.shape[2 + a]), k)]
                for a, (k, r) in enumerate(zip(kernel, lead, strict=True))]

    def pool(a: tuple[int, int, int], b: tuple[int, int, int], c: tuple[int, int, int]) -> torch.Tensor:
        k = (a[2], b[2], c[2])
        return block_mean(view[:, :, a[0]:a[1], b[0]:b[1], c[0]:c[1]], k)

    def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    return join([join([join([pool(a, b, c) for c in segments[2]], 4) for b in segments[1]], 3) for a in segments[0]], 2)


def dense_copy(view: torch.Tensor, dims: Sequence[int] = ()) -> torch.Tensor:
    """A C-ordered copy of ``view`` reversed along ``dims``: the values of ``view.flip(dims)`` (or of a clone).

    On the CPU numpy copies a strided float view 2-2.5 times faster than torch does on one thread (0.02 s
    against 0.05 s for the 24 M voxels of the fine level's crop of a 512 x 512 x 200 image), so CPU tensors
    are copied through numpy (they share memory with it); others, and tensors that autograd follows, by torch.
    """
    if view.device.type != "cpu" or view.requires_grad or view.is_conj() or view.is_neg():
        return view.flip(list(dims)) if dims else view.clone(memory_format=torch.contiguous_format)
    index = tuple(slice(None, None, -1) if axis in dims else slice(None) for axis in range(view.dim()))
    return torch.from_numpy(np.array(view.numpy()[index], order="C", copy=True))  # a copy even when contiguous


def pool_from_end(view: torch.Tensor, factors: Sequence[int], flipped: Sequence[bool]) -> torch.Tensor:
    """Box filter of a ``(1, C, I, J, K)`` view whose ``flipped`` axes run backwards, returned unflipped.

    Along a flipped axis of ``n`` voxels the blocks of ``f`` are counted from its end (where the unflipped
    view starts), so the leading ``r = n % f`` voxels form the partial block that the unflipped view has
    last. The result is the block means of the flipped copy (``avg_pool3d`` with ``ceil_mode``, partial
    blocks averaged over their voxels), without making that copy: ``avg_pool3d`` would copy a view cut
    past the first ``r`` voxels (it is not contiguous), so the view is filtered in two passes, sub-blocks
    of ``gcd(r, f)`` voxels (they tile both kinds of block) straight from it, then their means on the much
    smaller result. The means differ from one pass over the flipped copy in the last bits; the shipped
    models' answers were measured with these two passes, so they stay, although
    :func:`~lmk3d.transforms.block_mean.block_mean` could now make the one pass without the copy.

    Example:
        >>> x = torch.arange(5.0).reshape(1, 1, 5, 1, 1)  # stored backwards: the unflipped view is 4 3 2 1 0
        >>> pool_from_end(x, (2, 1, 1), (True, False, False)).flatten().tolist()
        [3.5, 1.5, 0.0]
    """
    sizes = [int(n) for n in view.shape[2:]]
    lead = [n % int(f) if flip else 0 for n, f, flip in zip(sizes, factors, flipped, strict=True)]
    first = [math.gcd(r, int(f)) if r else int(f) for r, f in zip(lead, factors, strict=True)]
    out = block_mean(view, first)
    if any(lead):
        second = [int(f) // k for f, k in zip(factors, first, strict=True)]
        out = _pool_segments(out, second, [r // k for r, k in zip(lead, first, strict=True)])
    dims = [2 + axis for axis in range(3) if flipped[axis]]
    return out.flip(dims) if dims else out


def grid_corners(g: Grid) -> np.ndarray:
    """World positions ``(8, 3)`` of a grid's corner voxel centres (the grid is their convex hull)."""
    n = np.asarray(g.shape, dtype=np.float64) - 1.0
    idx = np.array([[x, y, z] for x in (0.0, n[0]) for y in (0.0, n[1]) for z in (0.0, n[2])])
    return g.grid_to_world(idx)


def box_corners(lo_ras: np.ndarray, hi_ras: np.ndarray) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a world box."""
    return np.array([[x, y, z] for x in (lo_ras[0], hi_ras[0]) for y in (lo_ras[1], hi_ras[1])
                     for z in (lo_ras[2], hi_ras[2])])


def index_box(points_ras: np.ndarray, affine: np.ndarray, size: Sequence[int], margin: np.ndarray,
              align: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index range ``[lo, hi)`` of an array (``affine``, ``size``) holding ``points_ras`` plus ``margin`` voxels.

    ``lo`` and ``hi`` are rounded out to multiples of ``align`` (box-filter blocks) and clipped to the
    array; each axis keeps at least 2 voxels (or the whole axis), enough for trilinear sampling.
    """
    n = np.asarray(size, dtype=int)
    ijk = geometry.ras_to_ijk(points_ras, affine).reshape(-1, 3)
    lo = (np.floor(ijk.min(axis=0)).astype(int) - margin) // align * align
    hi = -((-(np.ceil(ijk.max(axis=0)).astype(int) + margin + 1)) // align) * align
    lo = np.clip(lo, 0, np.maximum(n - 2, 0))
    hi = np.clip(hi, np.minimum(lo + 2, n), n)
    return lo, hi


def crop(t: torch.Tensor, lo: np.ndarray, hi: np.ndarray) -> torch.Tensor:
    """``t[..., lo:hi]`` over the last three axes."""
    return t[..., int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]


def index_shift(lo: np.ndarray) -> np.ndarray:
    """Index translation: voxel 0 of a crop starting at ``lo`` is voxel ``lo`` of the array."""
    m = np.eye(4)
    m[:3, 3] = lo
    return m


@dataclass(eq=False)
class PreparedImage:
    """One image ready for every stage: raw voxels on the device, in the canonical view, and its maps.

    Attributes:
        tensor: ``(1, 1, I, J, K)`` raw intensities: the canonical view, except that the axes marked in
            ``flipped`` run backwards (as stored: undoing them would copy the whole image).
        affine: ``(4, 4)`` ijk -> world RAS mm of the canonical view.
        shape: ``(I, J, K)``.
        modality: ``"CT"`` or ``"MR"``.
        intensity: the intensity map fitted on the whole image.
        background: the image's darkest raw value (what lies outside the field of view).
        source_affine, source_shape: the image as it was given (fields of view, working frames).
        reduced: box-filtered copies by integer factors, made on demand and kept.
        flipped: per axis, whether ``tensor`` holds it reversed (canonical index ``i`` is ``I - 1 - i``).

    Read the voxels through :meth:`box` (or :meth:`sample`, :meth:`at_spacing`, :meth:`normalised`), which
    hand back a tensor together with its own affine.
    """

    tensor: torch.Tensor
    affine: np.ndarray
    shape: tuple[int, int, int]
    modality: str
    intensity: IntensityMap
    background: float
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    reduced: dict[tuple[int, ...], tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict)
    flipped: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def from_volume(cls, volume: Volume, modality: str, device: str | torch.device = "cpu",
                    flip_axes: bool = True) -> PreparedImage:
        """Prepare ``volume`` once; ``modality`` must already be resolved (see :func:`resolve_modality`).

        ``flip_axes``: see :func:`canonical_view` (True for every model trained since).
        """
        if modality not in MODALITIES:
            raise LandmarkError(f"modality must be resolved to CT or MR before preprocessing, got {modality!r}")
        array, affine = canonical_view(volume.array, volume.affine, flip_axes=False)  # C-ordered, as stored
        shape = (int(array.shape[0]), int(array.shape[1]), int(array.shape[2]))
        flipped = axis_flips(affine) if flip_axes else (False, False, False)
        canonical_affine = canonical_view(volume.array, volume.affine, flip_axes)[1]  # views: nothing copied
        t = image_tensor(array, device)  # no copy of a float32 image on the CPU
        return cls(t, canonical_affine, shape, modality, fit_intensity(volume.array, modality), float(t.amin()),
                   np.asarray(volume.affine, dtype=np.float64), tuple(int(s) for s in volume.shape),  # type: ignore[arg-type]
                   flipped=flipped)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def spacing_mm(self) -> np.ndarray:
        return geometry.spacing_from_affine(self.affine)

    def centre_ras(self) -> np.ndarray:
        """The world position ``(3,)`` of the centre voxel."""
        return geometry.ijk_to_ras((np.asarray(self.shape) - 1) / 2.0, self.affine)

    def factors(self, spacing_mm: float) -> tuple[int, ...]:
        """The box filter's integer factors per array axis for sampling at ``spacing_mm``."""
        return tuple(max(1, int(np.floor(spacing_mm / s + 1e-6))) for s in self.spacing_mm)

    def box(self, lo: np.ndarray, hi: np.ndarray, spacing_mm: float) -> tuple[torch.Tensor, np.ndarray]:
        """The canonical index box ``[lo, hi)`` box-filtered for ``spacing_mm``, and its ijk -> world affine.

        The blocks start at ``lo`` (callers align it to :meth:`factors`). Where every factor is 1 the
        result is a view of ``tensor`` (with the stored axis directions; its affine says so), else a
        filtered copy in the canonical view.
        """
        lo, hi = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
        n, flips = np.asarray(self.shape), np.asarray(self.flipped)
        view = crop(self.tensor, np.where(flips, n - hi, lo), np.where(flips, n - lo, hi))
        affine = self.affine @ index_shift(lo)
        if not flips.any():
            return antialias(view, affine, float(spacing_mm))  # a crop is filtered straight from the view
        size = hi - lo
        factors = [min(f, int(m)) for f, m in zip(self.factors(spacing_mm), size, strict=True)]
        if all(f == 1 for f in factors):
            return view, affine @ flip_index(self.flipped, size)
        if not view.is_contiguous():
            # A crop: filtered as its flipped copy always was (one pass from the flipped ends), without the copy.
            return antialias(view, affine, float(spacing_mm), flip=[2 + a for a in range(3) if self.flipped[a]])
        scale = np.diag([*factors, 1.0]).astype(np.float64)
        scale[:3, 3] = (np.asarray(factors) - 1) / 2.0  # as :func:`lmk3d.transforms.grid.antialias`
        return pool_from_end(view, factors, self.flipped), affine @ scale

    def at_spacing(self, spacing_mm: float) -> tuple[torch.Tensor, np.ndarray]:
        """The whole image box-filtered for ``spacing_mm`` (kept for reuse) and its affine."""
        key = self.factors(spacing_mm)
        if key not in self.reduced:
            self.reduced[key] = self.box(np.zeros(3, dtype=int), np.asarray(self.shape), float(spacing_mm))
        return self.reduced[key]

    def sample(self, grids: Sequence[Grid], spacing_mm: float) -> torch.Tensor:
        """Normalised intensities on ``grids`` (equal shapes): ``(B, 1, D, H, W)``.

        Filters only the part of the image the grids reach (blocks aligned with the whole image's, so
        the values are the same), unless the whole filtered image is already kept.
        """
        grids = list(grids)
        corners = np.concatenate([grid_corners(g) for g in grids])
        key = self.factors(spacing_mm)
        if key in self.reduced:
            src, a = self.reduced[key]
        else:
            f = np.asarray(key)
            lo, hi = index_box(corners, self.affine, self.shape, 2 * f + 2, f)
            src, a = self.box(lo, hi, float(spacing_mm))
        lo, hi = index_box(corners, a, tuple(src.shape[2:]), np.ones(3, dtype=int), np.ones(3, dtype=int))
        out = self.intensity(sample(crop(src, lo, hi), a @ index_shift(lo), grids, padding_value=self.background))
        # MONAI returns a MetaTensor, whose per-operation bookkeeping doubles the networks' CPU time (a
        # plain tensor is asked for by type, so that importing this module does not import MONAI).
        return out if type(out) is torch.Tensor else out.as_subclass(torch.Tensor)

    def cropped(self, spacing_mm: float, lo_ras: np.ndarray, hi_ras: np.ndarray) -> PreparedImage:
        """A copy holding only the box ``[lo, hi]`` (world RAS mm) of the image reduced for ``spacing_mm``.

        Training keeps this instead of whole large images; sampling inside the box is unchanged.
        """
        t, a = self.at_spacing(spacing_mm)
        lo, hi = index_box(box_corners(lo_ras, hi_ras), a, tuple(t.shape[2:]), np.ones(3, dtype=int),
                           np.ones(3, dtype=int))
        part = crop(t, lo, hi)
        out_affine = a @ index_shift(lo)
        flips = axis_flips(out_affine) if any(self.flipped) else (False, False, False)
        dims = [2 + axis for axis in range(3) if flips[axis]]
        # A copy in the canonical view (a view of the stored voxels may run backwards).
        part = dense_copy(part, dims)
        out_affine = out_affine @ flip_index(flips, part.shape[2:])
        return PreparedImage(part, out_affine, (int(part.shape[2]), int(part.shape[3]), int(part.shape[4])),
                             self.modality, self.intensity, self.background, self.source_affine, self.source_shape,
                             {(1, 1, 1): (part, out_affine)})

    def normalised(self, spacing_mm: float, roi_ras: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[torch.Tensor, np.ndarray, float]:
        """The image box-filtered for ``spacing_mm`` and intensity-mapped, stored minus its background.

        For stages that sample with ``grid_sample``'s zero padding: adding the returned background back
        gives samples outside the field of view the background value.

        Args:
            roi_ras: optional world box ``(lo, hi)``: only the voxels inside it (the crop starts on a
                box-filter block boundary, so its blocks are the whole image's).

        Returns:
            ``(1, 1, I', J', K')`` contiguous tensor, its ijk -> world affine, the mapped background.
        """
        size = np.asarray(self.shape)
        lo, hi = np.zeros(3, dtype=int), size
        if roi_ras is not None:
            ijk = geometry.ras_to_ijk(box_corners(*roi_ras), self.affine)
            factor = np.asarray(self.factors(spacing_mm))
            lo = np.clip(np.floor(ijk.min(axis=0)).astype(int) - 1, 0, size - 1) // factor * factor
            hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 2, lo + 2, size)
        t, aff = self.box(lo, hi, spacing_mm)
        if t.untyped_storage().data_ptr() == self.tensor.untyped_storage().data_ptr():
            t = dense_copy(t)  # a view of the prepared image, which the in-place steps must not touch
        # The map ([lo, hi] -> [0, 1], clipped for CT) in place: its out-of-place MONAI form costs
        # several passes over a full-resolution CT.
        m = self.intensity
        t.sub_(m.lo).mul_(1.0 / (m.hi - m.lo))
        if m.clip:
            t.clamp_(0.0, 1.0)
        pad = float(m(torch.tensor([self.background])).min())
        t.sub_(pad)
        return t.contiguous(), aff, pad


__all__ = ["CT_AIR_THRESHOLD_HU", "PreparedImage", "axis_flips", "canonical_view", "dense_copy", "flip_index",
           "guess_modality", "pool_from_end", "resolve_modality"]
