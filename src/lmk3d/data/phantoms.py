"""CT-like head-and-neck phantoms with known landmarks, modelled on the PDDCA task of the prior-guided paper.

Each case is an ``int16`` CT volume in Hounsfield units with five landmarks (``LANDMARK_NAMES``):

- ``chin``: the pogonion, the most anterior point of the mental protuberance on the mid-sagittal plane
  (on the outer surface of the mandible);
- ``mand_l``, ``mand_r``: the left (patient left, RAS ``x < 0``) and right mandible angles (gonion), the
  point of the rounded angle between the lower border of the body and the posterior border of the ramus,
  on its bisector, at mid-thickness of the ramus (on the bone surface);
- ``odont_p``: the tip of the odontoid process (dens) of C2, on its axis 1.5 mm inside the apex, so it
  lies on bone at any resolution;
- ``occ_bone``: the opisthion, the mid-sagittal point of the posterior margin of the foramen magnum,
  at mid-depth of the occipital bone (on the bone surface of the foramen).

``chin`` and ``occ_bone`` lie on the mid-sagittal plane (the correlated group of the prior-guided paper,
key-slice axis left-right, ``GROUPS``); the other three are independent.

How a case is made (all of it seeded by ``(seed, index)``, see :func:`make_phantom`):

1. **Shape**: the anatomy is a set of signed-distance primitives (ellipsoids, capsules, elliptic tori,
   an extruded convex polygon for each ramus, a parabolic tube for the mandible body and the dental
   arches...) in three part frames (skull, mandible, cervical spine), with correlated scaling (one
   global size, per-part factors around it) and per-part parameters (mandible width and length, gonial
   angle, ramus height, chin protrusion, mouth opening, neck flexion, dens length, skull thickness...).
2. **Pose**: the patient frame is rotated (pitch up to +-15 degrees, yaw and roll up to +-3, which keeps
   the mid-sagittal pair close to one left-right slice) and translated into the scanner (world) frame.
3. **Image grid**: clinical spacings and sizes per profile (``PROFILES``), one of several axis codes
   (``LPS``, ``RAS``, ``LAS``, ``LPI``; permuted codes in the ``small`` profile), sometimes a gantry tilt
   (an oblique affine), and a field of view placed around the anatomy (sometimes deliberately cutting
   one landmark off; that landmark is then missing from the table).
4. **Rendering**: the primitives are painted in world millimetres through the affine onto a grid at most
   ``coarse_mm`` coarse that is aligned with the image grid (only inside each primitive's bounding box),
   with a linear partial-volume ramp across each surface, then linearly upsampled to the image grid;
   an occasional dental-filling streak artefact, Gaussian noise (sigma 10 to 40 HU) and a CT table are
   added, and the result is rounded to ``int16`` HU.

Example:
    >>> ph = make_phantom(0, 0, PROFILES["small"])
    >>> ph.volume.array.dtype, ph.volume.shape, ph.landmarks.names
    (dtype('int16'), (96, 96, 64), ('chin', 'mand_l', 'mand_r', 'odont_p', 'occ_bone'))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmk3d import geometry
from lmk3d.data.datasets import GROUPS_FILE, LandmarkGroup, write_groups
from lmk3d.errors import LandmarkError
from lmk3d.io.atomic import atomic_write_text
from lmk3d.io.image import Volume, case_id, image_suffix, write_image
from lmk3d.io.table import write_table
from lmk3d.landmarks import LandmarkSet

GENERATOR_VERSION = 1
LANDMARK_NAMES: tuple[str, ...] = ("chin", "mand_l", "mand_r", "odont_p", "occ_bone")
#: The landmark grouping of the prior-guided paper, as written to ``groups.json``; the rest are independent.
GROUPS: tuple[LandmarkGroup, ...] = (LandmarkGroup("mid_sagittal", ("chin", "occ_bone"), "LR"),)
HU_MIN, HU_MAX = -1024, 3071


# --- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomConfig:
    """How cases vary. ``PROFILES`` holds the named ones; ``dataclasses.replace`` makes others.

    Attributes:
        inplane_size: fixed in-plane matrix (clinical CT: 512), or None to derive it from
            ``inplane_fov_mm / spacing``.
        inplane_spacing_mm: uniform range of the in-plane voxel size.
        inplane_fov_mm: uniform range of the in-plane field of view (used when ``inplane_size`` is None).
        slice_spacing_mm: choices of the slice spacing.
        z_fov_mm: uniform range of the cranio-caudal field of view.
        max_slices: upper bound on the number of slices.
        size: a fixed ``(I, J, K)`` matrix; the spacing then follows from the sampled field of view.
        coarse_mm: the anatomy is evaluated on a grid at most this coarse, then upsampled.
        orientations: axis codes to draw from (one letter per array axis, nibabel convention).
        tilt_prob, tilt_deg: probability and largest angle of a gantry tilt (rotation of the grid about
            the left-right axis: an oblique affine).
        cut_prob: probability that the field of view cuts one landmark off (missing from the table).
        artefact_prob: probability of a dental-filling streak artefact.
        table_prob: probability of a CT table below the head.
        noise_hu: uniform range of the noise standard deviation.
        pitch_deg, yaw_deg, roll_deg: largest head rotations about left-right, inferior-superior and
            anterior-posterior axes.
        margin_mm: landmarks stay at least this far inside the field of view (unless cut on purpose).
    """

    inplane_size: int | None = 512
    inplane_spacing_mm: tuple[float, float] = (0.5, 1.2)
    inplane_fov_mm: tuple[float, float] = (240.0, 320.0)
    slice_spacing_mm: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
    z_fov_mm: tuple[float, float] = (160.0, 300.0)
    max_slices: int = 300
    size: tuple[int, int, int] | None = None
    coarse_mm: float = 2.4
    orientations: tuple[str, ...] = ("LPS", "LPS", "RAS", "LAS", "LPI")
    tilt_prob: float = 0.15
    tilt_deg: float = 20.0
    cut_prob: float = 0.1
    artefact_prob: float = 0.25
    table_prob: float = 0.7
    noise_hu: tuple[float, float] = (10.0, 40.0)
    pitch_deg: float = 15.0
    yaw_deg: float = 3.0
    roll_deg: float = 3.0
    margin_mm: float = 15.0


PROFILES: dict[str, PhantomConfig] = {
    # 512 x 512 in-plane at 0.5-1.2 mm, 1-3 mm slices, up to 300 slices: what H&N planning CT looks like.
    "clinical": PhantomConfig(),
    # Moderate volumes (about 140-290 in-plane, 50-110 slices) for benchmarks and training on a CPU.
    "medium": PhantomConfig(inplane_size=None, inplane_spacing_mm=(0.9, 1.5), inplane_fov_mm=(200.0, 260.0),
                            slice_spacing_mm=(2.0, 2.5, 3.0), z_fov_mm=(150.0, 230.0)),
    # 96 x 96 x 64 around the landmarks (about 1.8-2.1 mm x 2.1-2.6 mm) with every orientation trick,
    # for tests.
    "small": PhantomConfig(inplane_size=None, inplane_spacing_mm=(1.8, 2.1), inplane_fov_mm=(170.0, 200.0),
                           slice_spacing_mm=(2.0, 2.5), z_fov_mm=(135.0, 165.0), size=(96, 96, 64),
                           orientations=("LPS", "RAS", "LAS", "LPI", "PLS", "SAR", "ILP"), tilt_prob=0.3,
                           margin_mm=10.0),
}


# --- signed distances (numpy, float32 arrays; negative inside) ----------------------------------------------
Array = np.ndarray
Vec = Sequence[float] | np.ndarray  # a point or a direction, (3,) (or (2,) in a plane)
SDF = Callable[[Array, Array, Array], Array]


def _len2(a: Array, b: Array) -> Array:
    return np.sqrt(a * a + b * b)


def _sd_ellipse(u: Array, v: Array, a: float, b: float) -> Array:
    # First-order distance (implicit value over gradient norm): exact on the axes, close near the curve.
    k0 = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    k1 = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _sd_ellipsoid(x: Array, y: Array, z: Array, r: Vec) -> Array:
    a, b, c = r
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2 + (z / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _extrude(d2: Array, h: Array | float) -> Array:
    """Combine an in-plane distance with an out-of-plane half-distance (a prism / slab)."""
    w0, w1 = d2, h
    return np.minimum(np.maximum(w0, w1), 0.0) + _len2(np.maximum(w0, 0.0), np.maximum(w1, 0.0))


def _smin(a: Array, b: Array, k: float) -> Array:
    """Smooth union (quadratic blend over a band of width ``k``), so skin envelopes have no creases."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


@dataclass
class Shape:
    """One primitive: an SDF in its local frame, the local bounding box, and the local -> patient frame.

    ``frame`` may hold a uniform scale ``s``; patient-frame distances are ``s`` times local ones.
    ``frame = None`` means the primitive is given in world (scanner) coordinates.
    """

    sdf: SDF
    lo: np.ndarray
    hi: np.ndarray
    frame: np.ndarray | None

    @property
    def scale(self) -> float:
        if self.frame is None:
            return 1.0
        return float(abs(np.linalg.det(self.frame[:3, :3])) ** (1.0 / 3.0))


def _ellipsoid(c: Vec, r: Vec, frame: np.ndarray | None) -> Shape:
    cx, cy, cz = c
    return Shape(lambda x, y, z: _sd_ellipsoid(x - cx, y - cy, z - cz, r),
                 np.array(c) - r, np.array(c) + r, frame)


def _capsule(a: Vec, b: Vec, r: float, frame: np.ndarray | None) -> Shape:
    pa0 = np.asarray(a, dtype=np.float64)
    ba = np.asarray(b, dtype=np.float64) - pa0
    bb = float(ba @ ba)

    def sdf(x: Array, y: Array, z: Array) -> Array:
        px, py, pz = x - pa0[0], y - pa0[1], z - pa0[2]
        h = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / bb, 0.0, 1.0)
        return np.sqrt((px - ba[0] * h) ** 2 + (py - ba[1] * h) ** 2 + (pz - ba[2] * h) ** 2) - r

    lo = np.minimum(pa0, pa0 + ba) - r
    hi = np.maximum(pa0, pa0 + ba) + r
    return Shape(sdf, lo, hi, frame)


def _cylinder_z(c: Vec, ab: tuple[float, float], z0: float, z1: float, rr: float,
                frame: np.ndarray | None) -> Shape:
    """Elliptic cylinder along z from ``z0`` to ``z1`` with edges rounded by ``rr``."""
    cx, cy = c[0], c[1]
    a, b = ab
    zm, hz = 0.5 * (z0 + z1), 0.5 * (z1 - z0)

    def sdf(x: Array, y: Array, z: Array) -> Array:
        d2 = _sd_ellipse(x - cx, y - cy, a - rr, b - rr)
        return _extrude(d2, np.abs(z - zm) - hz + rr) - rr

    return Shape(sdf, np.array([cx - a, cy - b, z0]), np.array([cx + a, cy + b, z1]), frame)


def _ring(c: Vec, ab: tuple[float, float], r: float, y_max: float | None,
          frame: np.ndarray | None) -> Shape:
    """Elliptic torus in an axial plane (a vertebral arch), kept where ``y <= y_max`` if given."""
    cx, cy, cz = c
    a, b = ab

    def sdf(x: Array, y: Array, z: Array) -> Array:
        d = _len2(_sd_ellipse(x - cx, y - cy, a, b), z - cz) - r
        return d if y_max is None else np.maximum(d, y - y_max)

    top = cy + b + r if y_max is None else min(cy + b + r, y_max)
    return Shape(sdf, np.array([cx - a - r, cy - b - r, cz - r]), np.array([cx + a + r, top, cz + r]), frame)


def _round_box(c: Vec, half: Vec, rr: float, frame: np.ndarray | None) -> Shape:
    cx, cy, cz = c
    hx, hy, hz = (h - rr for h in half)

    def sdf(x: Array, y: Array, z: Array) -> Array:
        qx, qy, qz = np.abs(x - cx) - hx, np.abs(y - cy) - hy, np.abs(z - cz) - hz
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, np.maximum(qy, qz)), 0.0) - rr

    return Shape(sdf, np.array(c) - half, np.array(c) + half, frame)


def _sd_convex_polygon(u: Array, v: Array, verts: np.ndarray) -> Array:
    """Exact signed distance to a convex polygon with counter-clockwise vertices ``(K, 2)``."""
    inside = np.full(u.shape, -np.inf, dtype=u.dtype)
    outside = np.full(u.shape, np.inf, dtype=u.dtype)
    for k in range(len(verts)):
        a, b = verts[k], verts[(k + 1) % len(verts)]
        e = b - a
        length = float(np.hypot(*e))
        pu, pv = u - a[0], v - a[1]
        inside = np.maximum(inside, (pu * e[1] - pv * e[0]) / length)  # outward normal (ey, -ex)
        h = np.clip((pu * e[0] + pv * e[1]) / (length * length), 0.0, 1.0)
        outside = np.minimum(outside, _len2(pu - e[0] * h, pv - e[1] * h))
    return np.where(inside <= 0.0, inside, outside)


def _plate(verts: np.ndarray, r_corner: float, thickness: float, r_edge: float,
           frame: np.ndarray) -> Shape:
    """A convex polygon (local ``y``, ``z``), dilated by ``r_corner``, extruded along local ``x``."""

    def sdf(x: Array, y: Array, z: Array) -> Array:
        d2 = _sd_convex_polygon(y, z, verts) - r_corner
        return _extrude(d2 + r_edge, np.abs(x) - (0.5 * thickness - r_edge)) - r_edge

    pad = r_corner
    lo = np.array([-0.5 * thickness, verts[:, 0].min() - pad, verts[:, 1].min() - pad])
    hi = np.array([0.5 * thickness, verts[:, 0].max() + pad, verts[:, 1].max() + pad])
    return Shape(sdf, lo, hi, frame)


def _arch(y0: float, k: float, x_end: float, thickness: float, z0: float, z1: float, rr: float,
          frame: np.ndarray | None) -> Shape:
    """A U-shaped tube: centre line ``y = y0 - k x^2`` for ``|x| <= x_end``, rounded-rectangle section."""
    zm, hz = 0.5 * (z0 + z1), 0.5 * (z1 - z0)

    def sdf(x: Array, y: Array, z: Array) -> Array:
        dn = (y - (y0 - k * x * x)) / np.sqrt(1.0 + (2.0 * k * x) ** 2)
        q1 = np.abs(dn) - 0.5 * thickness + rr
        q2 = np.abs(z - zm) - hz + rr
        d = _extrude(q1, q2) - rr
        return np.maximum(d, np.abs(x) - x_end)

    lo = np.array([-x_end, y0 - k * x_end * x_end - thickness, z0])
    hi = np.array([x_end, y0 + thickness, z1])
    return Shape(sdf, lo, hi, frame)


def _custom(sdf: SDF, lo: Vec, hi: Vec, frame: np.ndarray | None) -> Shape:
    return Shape(sdf, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), frame)


# --- small linear algebra -------------------------------------------------------------------------------
def _rot_x(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])


def _rot_y(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0], [0, 0, 0, 1.0]])


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _trans(v: Vec) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = v
    return m


def _scale(s: float) -> np.ndarray:
    return np.diag([s, s, s, 1.0])


def _basis(origin: Vec, ex: Vec, ey: Vec, ez: Vec) -> np.ndarray:
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = ex, ey, ez, origin
    return m


def _pt(m: np.ndarray, p: Vec) -> np.ndarray:
    return np.asarray(geometry.apply_affine(m, np.asarray(p, dtype=np.float64)))


# --- case parameters ------------------------------------------------------------------------------------
#: name -> (mean, sd, low, high); lengths in mm, angles in degrees, scales relative.
SHAPE_PRIOR: dict[str, tuple[float, float, float, float]] = {
    "scale": (1.0, 0.05, 0.88, 1.12),
    "skull_scale": (1.0, 0.02, 0.95, 1.05),  # relative to "scale": correlated part sizes
    "mand_scale": (1.0, 0.04, 0.9, 1.1),
    "spine_scale": (1.0, 0.03, 0.92, 1.08),
    "mand_half_width": (46.0, 2.3, 40.0, 52.0),
    "mand_body_length": (72.0, 3.5, 63.0, 81.0),
    "mand_body_height": (30.0, 2.0, 25.0, 35.0),
    "mand_thickness": (11.0, 0.8, 9.0, 13.0),
    "gonial_angle_deg": (122.0, 4.0, 112.0, 132.0),
    "mand_plane_deg": (25.0, 3.0, 17.0, 33.0),
    "ramus_height": (52.0, 3.0, 44.0, 60.0),
    "chin_protrusion": (2.5, 0.8, 1.0, 4.5),
    "mouth_open_deg": (1.5, 1.2, 0.0, 4.0),
    "menton_y": (80.0, 3.0, 72.0, 88.0),
    "menton_z": (-72.0, 3.0, -80.0, -64.0),
    "cranium_a": (70.0, 3.0, 62.0, 78.0),
    "cranium_b": (90.0, 3.5, 80.0, 100.0),
    "cranium_c": (80.0, 3.5, 70.0, 90.0),
    "skull_thickness": (6.5, 0.8, 4.5, 8.5),
    "fm_half_width": (15.0, 1.0, 12.5, 17.5),
    "fm_half_length": (17.5, 1.2, 14.5, 20.5),
    "dens_length": (16.5, 1.2, 13.5, 19.5),
    "neck_flexion_deg": (0.0, 3.0, -6.0, 6.0),
    "spine_dy": (0.0, 1.5, -4.0, 4.0),
    "spine_dz": (0.0, 1.5, -4.0, 4.0),
    "fat_mm": (7.0, 2.5, 3.0, 12.0),
    "neck_a": (55.0, 4.0, 45.0, 65.0),
    "neck_b": (58.0, 4.0, 48.0, 68.0),
}

#: tissue -> (mean HU, sd HU) drawn per case.
HU_PRIOR: dict[str, tuple[float, float]] = {
    "air": (-1000.0, 0.0),
    "fat": (-100.0, 10.0),
    "soft": (45.0, 5.0),
    "brain": (35.0, 3.0),
    "csf": (8.0, 3.0),
    "eye": (12.0, 4.0),
    "orbit_fat": (-90.0, 8.0),
    "skull_cortical": (1400.0, 90.0),
    "diploe": (650.0, 70.0),
    "petrous": (1600.0, 100.0),
    "facial_bone": (600.0, 60.0),
    "mand_cortical": (1500.0, 90.0),
    "mand_cancellous": (550.0, 60.0),
    "teeth": (2300.0, 150.0),
    "vert_cortical": (950.0, 70.0),
    "vert_cancellous": (280.0, 40.0),
    "disc": (85.0, 8.0),
    "hyoid": (700.0, 60.0),
    "table": (250.0, 40.0),
    "filling": (3000.0, 0.0),
}


@dataclass
class PhantomCase:
    """Everything that defines one case (JSON-able through :meth:`to_dict`).

    Attributes:
        case: case id (``hn_0007``).
        seed, index: the generator seed and the case index; ``(seed, index)`` seeds everything.
        shape: shape parameters (``SHAPE_PRIOR`` keys).
        hu: tissue intensities in HU (``HU_PRIOR`` keys).
        patient_to_world: ``(4, 4)`` rigid map from the patient frame (origin at the foramen magnum,
            RAS axes, mid-sagittal plane ``x = 0``) to world RAS mm.
        size: image matrix ``(I, J, K)``.
        affine: ``(4, 4)`` ijk -> world RAS mm.
        noise_hu: noise standard deviation.
        artefact: the dental-filling artefact (``{"xyz_mm_ras": ..., "amplitude_hu": ..., ...}``) or None.
        table_y_mm: world y of the CT table top, or None without a table.
        cut: the landmark the field of view was placed to cut off, or None.
        orientation: the axis code the grid was built from (before any tilt).
        tilt_deg: gantry tilt (0 = none).
    """

    case: str
    seed: int
    index: int
    shape: dict[str, float]
    hu: dict[str, float]
    patient_to_world: np.ndarray
    size: tuple[int, int, int]
    affine: np.ndarray
    noise_hu: float
    artefact: dict[str, Any] | None = None
    table_y_mm: float | None = None
    cut: str | None = None
    orientation: str = "RAS"
    tilt_deg: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patient_to_world"] = np.asarray(self.patient_to_world).round(9).tolist()
        d["affine"] = np.asarray(self.affine).round(9).tolist()
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhantomCase:
        kw = dict(d)
        kw["patient_to_world"] = np.asarray(d["patient_to_world"], dtype=np.float64)
        kw["affine"] = np.asarray(d["affine"], dtype=np.float64)
        kw["size"] = tuple(int(v) for v in d["size"])
        return cls(**kw)


@dataclass
class Phantom:
    """A generated case: the image, its landmarks (missing ones not found) and its parameters."""

    volume: Volume
    landmarks: LandmarkSet
    params: PhantomCase
    anatomy: Anatomy = field(repr=False)


# --- the anatomy ----------------------------------------------------------------------------------------
@dataclass
class Layer:
    """Shapes painted as one union, in coats: ``(tissue, hu, inset_mm)`` painted in order.

    A cortical bone with a cancellous core is one layer with two coats, ``(cortical, 1500, 0)`` and
    ``(cancellous, 550, 2.5)``: the union's distance is computed once and shrunk by the inset.
    """

    shapes: list[Shape]
    coats: list[tuple[str, float, float]]


@dataclass
class Anatomy:
    """Painting order (``layers``), named structures for queries, and the landmarks.

    ``landmarks_patient``: ``{name: (3,)}`` in the patient frame (mm).
    """

    layers: list[Layer]
    structures: dict[str, list[Shape]]
    landmarks_patient: dict[str, np.ndarray]
    patient_to_world: np.ndarray

    def landmarks_world(self) -> dict[str, np.ndarray]:
        return {n: _pt(self.patient_to_world, p) for n, p in self.landmarks_patient.items()}

    def sdf(self, structure: str, xyz_mm_ras: np.ndarray) -> np.ndarray:
        """Signed distance (mm, negative inside) from world points ``(N, 3)`` to a named structure.

        Structures: ``mandible``, ``skull``, ``c2`` (the axis with its dens), ``spine``, ``teeth``.
        """
        if structure not in self.structures:
            raise KeyError(f"unknown structure {structure!r}; choose one of {', '.join(self.structures)}")
        pts = np.asarray(xyz_mm_ras, dtype=np.float64).reshape(-1, 3)
        best = np.full(len(pts), np.inf)
        world_to_patient = np.linalg.inv(self.patient_to_world)
        for sh in self.structures[structure]:
            to_local = np.linalg.inv(sh.frame) @ world_to_patient if sh.frame is not None else np.eye(4)
            loc = geometry.apply_affine(to_local, pts).reshape(-1, 3)
            d = sh.sdf(loc[:, 0], loc[:, 1], loc[:, 2]) * sh.scale
            best = np.minimum(best, d)
        return best


def build_anatomy(shape: dict[str, float], hu: dict[str, float], patient_to_world: np.ndarray,
                  table_y_mm: float | None = None) -> Anatomy:
    """The primitives of one case and its landmarks, from its shape parameters (``SHAPE_PRIOR`` keys)."""
    g = shape["scale"]
    f_skull = _scale(g * shape["skull_scale"])
    layers: list[Layer] = []
    structures: dict[str, list[Shape]] = {}

    def add(tissue: str | list[tuple[str, float]], shapes: list[Shape], structure: str | None = None) -> None:
        coats = [(tissue, 0.0)] if isinstance(tissue, str) else tissue
        layers.append(Layer(shapes, [(t, hu[t], inset) for t, inset in coats]))
        if structure:
            structures.setdefault(structure, []).extend(shapes)

    # ---- mandible frame: origin at the menton, lower border in z = 0, x lateral, y forward -----------------
    hw, blen = shape["mand_half_width"], shape["mand_body_length"]
    bh, bt = shape["mand_body_height"], shape["mand_thickness"]
    gam = np.deg2rad(shape["gonial_angle_deg"])
    neutral = (_trans(np.array([0.0, shape["menton_y"], shape["menton_z"]]) * g * shape["skull_scale"])
               @ _rot_x(-shape["mand_plane_deg"]) @ _scale(g * shape["mand_scale"]))
    y0 = -0.5 * bt  # body centre line at the symphysis (outer front surface at y = 0)
    y_go = -blen
    k = (y0 - y_go) / hw**2
    phi = 14.0  # rami converge forwards
    r_go = 5.0
    # Ramus: a convex polygon (a = forward along the ramus plane, z = up) dilated by r_go.
    u2 = np.array([np.cos(gam), np.sin(gam)])  # up the posterior border
    n2 = np.array([np.sin(gam), -np.cos(gam)])  # into the ramus
    bis = (np.array([1.0, 0.0]) + u2) / np.linalg.norm(np.array([1.0, 0.0]) + u2)
    g_core = bis * r_go / np.sin(gam / 2)
    t0 = shape["ramus_height"] * u2 + r_go * n2
    t1 = t0 + 24.0 * n2
    verts = np.array([g_core, [30.0, r_go], [30.0, bh - 6.0], t1, t0])
    gonion_2d = g_core - r_go * bis
    condyle_2d = t0 + 5.0 * u2 + 9.0 * n2
    cond_local = {}
    ramus_frames = {}
    for s, side in ((-1.0, "l"), (1.0, "r")):
        ea = np.array([-s * np.sin(np.deg2rad(phi)), np.cos(np.deg2rad(phi)), 0.0])
        en = np.array([s * np.cos(np.deg2rad(phi)), s * np.sin(np.deg2rad(phi)), 0.0])
        origin = np.array([s * hw, y_go, 0.0])
        ramus_frames[side] = _basis(origin, en, ea, [0.0, 0.0, 1.0])
        cond_local[side] = _pt(ramus_frames[side], [-3.0, condyle_2d[0], condyle_2d[1]])
    # Mouth opening: rotate about the axis through both condyles (the hinge of the TMJ).
    hinge = 0.5 * (_pt(neutral, cond_local["l"]) + _pt(neutral, cond_local["r"]))
    f_mand = _trans(hinge) @ _rot_x(-shape["mouth_open_deg"]) @ _trans(-hinge) @ neutral
    x_body_end = np.sqrt(max(y0 - y_go - 17.0, 1.0) / k)
    prot = shape["chin_protrusion"]
    z_chin = 9.0
    mand_parts = [
        _arch(y0, k, x_body_end, bt, 0.0, bh, 3.0, f_mand),
        _ellipsoid([0.0, prot - 6.0, z_chin], [14.0, 6.0, 9.0], f_mand),  # mental protuberance
    ]
    for side in ("l", "r"):
        fr = f_mand @ ramus_frames[side]
        mand_parts.append(_plate(verts, r_go, 9.0, 2.0, fr))
        mand_parts.append(_ellipsoid(cond_local[side], [10.0, 5.0, 6.0], f_mand))
        mand_parts.append(_capsule([0.0, t1[0] - 2.0, t1[1] - 4.0], [0.0, t1[0] + 6.0, t1[1] + 10.0], 3.0, fr))
    x_teeth = np.sqrt(max(y0 - y_go - 30.0, 1.0) / k)
    lower_teeth = [_arch(y0 - 1.0, k, x_teeth, 8.0, bh - 2.0, bh + 9.0, 2.0, f_mand)]
    upper_teeth = [_arch(y0 + 0.5, k * 0.95, x_teeth, 8.5, bh + 9.0, bh + 19.0, 2.0, neutral)]
    maxilla = [_arch(y0 + 1.0, k * 0.95, x_teeth + 4.0, 13.0, bh + 17.0, bh + 32.0, 4.0, neutral)]

    chin = _pt(f_mand, [0.0, prot, z_chin])
    gonion = {side: _pt(f_mand @ ramus_frames[side], [0.0, gonion_2d[0], gonion_2d[1]]) for side in ("l", "r")}

    # ---- skull (patient frame scaled about the foramen magnum) ---------------------------------------------
    ca, cb, cc = shape["cranium_a"], shape["cranium_b"], shape["cranium_c"]
    th = shape["skull_thickness"]
    centre = np.array([0.0, 8.0, 48.0])
    fm_a, fm_b, fm_y = shape["fm_half_width"], shape["fm_half_length"], 0.0

    def z_base(x: Array, y: Array) -> Array:
        # Skull base: posterior fossa floor at z = -3, rising to the anterior fossa over the orbits (about
        # +32) in front, lower again laterally between the two (the middle fossae).
        lateral = 1.0 / (1.0 + np.exp(-(np.abs(x) - 25.0) / 6.0))
        front = 1.0 / (1.0 + np.exp(-(y - 30.0) / 8.0))
        middle = 1.0 / (1.0 + np.exp(-(y - 5.0) / 6.0)) * (1.0 - 1.0 / (1.0 + np.exp(-(y - 50.0) / 5.0)))
        return -3.0 + 35.0 * front - 22.0 * lateral * middle

    def cranium_outer(x: Array, y: Array, z: Array) -> Array:
        e = _sd_ellipsoid(x - centre[0], y - centre[1], z - centre[2], (ca, cb, cc))
        return np.maximum(e, (z_base(x, y) - z) * 0.9)

    def cranium_inner(x: Array, y: Array, z: Array) -> Array:
        e = _sd_ellipsoid(x - centre[0], y - centre[1], z - centre[2], (ca - th, cb - th, cc - th))
        return np.maximum(e, (z_base(x, y) + th - z) * 0.9)

    def foramen(x: Array, y: Array, z: Array) -> Array:
        # The foramen magnum: an elliptic hole through the floor of the posterior fossa only.
        return np.maximum(_sd_ellipse(x, y - fm_y, fm_a, fm_b), z - 12.0)

    def skull_shell(x: Array, y: Array, z: Array) -> Array:
        shell = np.maximum(cranium_outer(x, y, z), -cranium_inner(x, y, z))
        return np.maximum(shell, -foramen(x, y, z))

    sk_lo, sk_hi = centre - [ca, cb, cc + 10], centre + [ca, cb, cc]
    skull = _custom(skull_shell, sk_lo, sk_hi, f_skull)
    brain = _custom(cranium_inner, sk_lo, sk_hi, f_skull)
    y_op = fm_y - fm_b
    occ = _pt(f_skull, [0.0, y_op, float(z_base(np.array(0.0), np.array(y_op))) + 0.5 * th])

    # ---- cervical spine frame: flexion about the atlanto-occipital joint ---------------------------------
    pivot = np.array([0.0, 8.0, -5.0]) * g
    f_spine = (_trans(pivot + [0.0, shape["spine_dy"], shape["spine_dz"]]) @ _rot_x(shape["neck_flexion_deg"])
               @ _trans(-pivot) @ _scale(g * shape["spine_scale"]))
    dens_r = 5.0
    c2_top = -27.0
    apex_z = c2_top + shape["dens_length"]
    dens_axis = np.array([0.0, -0.17, 0.985])  # tilted slightly backwards
    dens_base = np.array([0.0, 14.0, c2_top])
    dens_top = dens_base + dens_axis * (apex_z - c2_top - dens_r) / dens_axis[2]
    apex = dens_top + dens_r * dens_axis
    c2 = [
        _cylinder_z([0.0, 13.0], (9.0, 8.0), -42.0, c2_top, 2.0, f_spine),
        _capsule(dens_base, dens_top, dens_r, f_spine),
        _ring([0.0, -3.0, -33.0], (15.0, 13.0), 3.5, 6.0, f_spine),
        _capsule([2.5, -16.0, -35.0], [3.0, -33.0, -41.0], 4.0, f_spine),
        _capsule([-2.5, -16.0, -35.0], [-3.0, -33.0, -41.0], 4.0, f_spine),
        _ellipsoid([15.0, 8.0, -26.0], [7.0, 9.0, 5.0], f_spine),
        _ellipsoid([-15.0, 8.0, -26.0], [7.0, 9.0, 5.0], f_spine),
    ]
    c1 = [
        _ring([0.0, 0.0, -16.0], (21.0, 24.5), 4.0, None, f_spine),
        _ellipsoid([17.0, 6.0, -15.0], [7.0, 10.0, 8.0], f_spine),
        _ellipsoid([-17.0, 6.0, -15.0], [7.0, 10.0, 8.0], f_spine),
        _capsule([22.0, 4.0, -15.0], [36.0, 2.0, -15.0], 4.0, f_spine),
        _capsule([-22.0, 4.0, -15.0], [-36.0, 2.0, -15.0], 4.0, f_spine),
    ]
    lower: list[Shape] = []
    discs: list[Shape] = [_cylinder_z([0.0, 13.5], (9.0, 8.0), -47.0, -42.0, 1.5, f_spine)]
    lordosis = (14.0, 15.0, 15.0, 13.0, 10.0)
    for i, yc in enumerate(lordosis):  # C3..C7
        z1 = -47.0 - 18.0 * i
        z0 = z1 - 13.0
        zc = 0.5 * (z0 + z1)
        a, b = 9.5 + 0.4 * i, 8.0 + 0.1 * i
        lower += [
            _cylinder_z([0.0, yc], (a, b), z0, z1, 2.0, f_spine),
            _ring([0.0, yc - 16.0, zc], (14.0, 11.0), 3.0, yc - 6.0, f_spine),
            _capsule([0.0, yc - 26.0, zc], [0.0, yc - 38.0 - 2.0 * i, zc - 8.0], 3.5, f_spine),
            _capsule([10.0, yc - 6.0, zc], [27.0, yc - 4.0, zc], 3.5, f_spine),
            _capsule([-10.0, yc - 6.0, zc], [-27.0, yc - 4.0, zc], 3.5, f_spine),
        ]
        discs.append(_cylinder_z([0.0, yc], (a, b), z0 - 5.0, z0, 1.5, f_spine))
    odont = _pt(f_spine, apex - 1.5 * dens_axis)

    # ---- soft tissue envelopes (patient frame scaled with the skull) ------------------------------------------
    na, nb = shape["neck_a"], shape["neck_b"]
    f_soft = f_skull
    neck_top = -10.0

    def body(x: Array, y: Array, z: Array) -> Array:
        head = _sd_ellipsoid(x - centre[0], y - centre[1], z - centre[2], (ca + 8.0, cb + 8.0, cc + 8.0))
        face = _sd_ellipsoid(x, y - 52.0, z - 2.0, (62.0, 60.0, 50.0))
        neck = _extrude(_sd_ellipse(x, y - 2.0, na, nb), np.maximum(z - neck_top, -400.0 - z))
        nose = _sd_ellipsoid(x, y - 110.0, z + 2.0, (12.0, 14.0, 20.0))
        # The jaw follows the mandible (its own frame), so the chin always has soft tissue around it.
        jx = to_jaw[0, 0] * x + to_jaw[0, 1] * y + to_jaw[0, 2] * z + to_jaw[0, 3]
        jy = to_jaw[1, 0] * x + to_jaw[1, 1] * y + to_jaw[1, 2] * z + to_jaw[1, 3]
        jz = to_jaw[2, 0] * x + to_jaw[2, 1] * y + to_jaw[2, 2] * z + to_jaw[2, 3]
        jaw = _sd_ellipsoid(jx, jy + 40.0, jz - 14.0, (60.0, 52.0, 30.0)) * jaw_scale
        d = _smin(_smin(_smin(head, face, 12.0), neck, 25.0), jaw, 12.0)
        return _smin(d, nose, 6.0)

    to_jaw = (np.linalg.inv(f_mand) @ f_soft).astype(np.float32)
    jaw_scale = np.float32(shape["mand_scale"] / shape["skull_scale"])
    body_lo, body_hi = np.array([-95.0, -100.0, -400.0]), np.array([95.0, 130.0, 145.0])
    fat_t = shape["fat_mm"]
    add([("fat", 0.0), ("soft", fat_t)], [_custom(body, body_lo, body_hi, f_soft)])
    add("brain", [brain])
    add("csf", [_ellipsoid([11.0, 8.0, 55.0], [5.0, 24.0, 8.0], f_skull),
                _ellipsoid([-11.0, 8.0, 55.0], [5.0, 24.0, 8.0], f_skull)])
    add("orbit_fat", [_ellipsoid([32.0, 80.0, 16.0], [15.0, 17.0, 14.0], f_skull),
                      _ellipsoid([-32.0, 80.0, 16.0], [15.0, 17.0, 14.0], f_skull)])
    add("eye", [_ellipsoid([32.0, 87.0, 16.0], [11.5, 11.5, 11.5], f_skull),
                _ellipsoid([-32.0, 87.0, 16.0], [11.5, 11.5, 11.5], f_skull)])
    add("facial_bone", [_ellipsoid([26.0, 64.0, -8.0], [16.0, 19.0, 16.0], f_skull),
                        _ellipsoid([-26.0, 64.0, -8.0], [16.0, 19.0, 16.0], f_skull),
                        _round_box([0.0, 76.0, 2.0], [13.0, 23.0, 20.0], 4.0, f_skull),  # nasal walls
                        _ellipsoid([0.0, 62.0, -22.0], [22.0, 28.0, 3.5], f_skull),  # hard palate
                        _capsule([42.0, 70.0, 8.0], [58.0, 22.0, 4.0], 4.0, f_skull),  # zygomatic arches
                        _capsule([-42.0, 70.0, 8.0], [-58.0, 22.0, 4.0], 4.0, f_skull)] + maxilla)
    add("air", [_ellipsoid([26.0, 64.0, -8.0], [13.0, 16.0, 13.0], f_skull),  # maxillary sinuses
                _ellipsoid([-26.0, 64.0, -8.0], [13.0, 16.0, 13.0], f_skull),
                _round_box([5.5, 77.0, 2.0], [4.5, 20.0, 17.0], 3.0, f_skull),  # nasal cavity either side of
                _round_box([-5.5, 77.0, 2.0], [4.5, 20.0, 17.0], 3.0, f_skull),  # the septum
                _capsule([0.0, 56.0, 0.0], [0.0, 36.0, -8.0], 7.0, f_skull),  # nasopharynx
                _capsule([0.0, 34.0, -8.0], [0.0, 33.0, -55.0], 7.0, f_skull),  # oropharynx
                _capsule([0.0, 33.0, -55.0], [0.0, 42.0, -95.0], 7.5, f_skull),  # larynx
                _capsule([0.0, 42.0, -95.0], [0.0, 46.0, -400.0], 8.5, f_skull)])  # trachea
    add([("skull_cortical", 0.0), ("diploe", 0.3 * th)], [skull], "skull")
    add("petrous", [_capsule([18.0, 18.0, 8.0], [50.0, -6.0, 10.0], 7.0, f_skull),
                    _capsule([-18.0, 18.0, 8.0], [-50.0, -6.0, 10.0], 7.0, f_skull),
                    _ellipsoid([48.0, -10.0, -6.0], [9.0, 10.0, 14.0], f_skull),  # mastoids
                    _ellipsoid([-48.0, -10.0, -6.0], [9.0, 10.0, 14.0], f_skull),
                    _ellipsoid([13.0, 9.0, -6.0], [6.0, 10.0, 5.0], f_skull),  # occipital condyles
                    _ellipsoid([-13.0, 9.0, -6.0], [6.0, 10.0, 5.0], f_skull)])
    add("teeth", upper_teeth + lower_teeth, "teeth")
    add([("mand_cortical", 0.0), ("mand_cancellous", 2.5)], mand_parts, "mandible")
    add("hyoid", [_arch(52.0, 0.03, 18.0, 4.0, -66.0, -60.0, 1.5, f_skull)])
    add("disc", discs)
    add([("vert_cortical", 0.0), ("vert_cancellous", 1.5)], c1 + c2 + lower, "spine")
    structures["c2"] = list(c2)
    if table_y_mm is not None:
        add("table", [_round_box([0.0, table_y_mm - 3.0, 0.0], [220.0, 3.0, 2000.0], 1.0, None)])

    landmarks = {"chin": chin, "mand_l": gonion["l"], "mand_r": gonion["r"], "odont_p": odont, "occ_bone": occ}
    return Anatomy(layers, structures, landmarks, np.asarray(patient_to_world, dtype=np.float64))


# --- sampling a case ---------------------------------------------------------------------------------------
_AXIS_LETTERS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def axes_from_code(code: str) -> np.ndarray:
    """``(3, 3)`` whose column ``i`` is the world direction of array axis ``i`` (``'LPS'`` -> diag(-1,-1,1))."""
    code = code.upper()
    ok = len(code) == 3 and all(c in _AXIS_LETTERS for c in code)
    if not ok or len({int(np.argmax(np.abs(_AXIS_LETTERS[c]))) for c in code}) != 3:
        raise LandmarkError(f"bad axis code {code!r}; use one letter of R/L, A/P and S/I each, e.g. LPS")
    return np.array([_AXIS_LETTERS[c] for c in code], dtype=np.float64).T


def _draw_shape(rng: np.random.Generator) -> dict[str, float]:
    out = {}
    for name, (mean, sd, lo, hi) in SHAPE_PRIOR.items():
        out[name] = float(np.clip(rng.normal(mean, sd), lo, hi))
    return out


def _place_fov(lmk: np.ndarray, axes: np.ndarray, extent: np.ndarray, prefer: np.ndarray, vertex: np.ndarray,
               margin: float, rng: np.random.Generator, cut: int | None) -> tuple[np.ndarray, bool]:
    """Centre of the field of view (world) along each grid axis; ``cut``: index of a landmark to leave out.

    In-plane, the field of view is centred near ``prefer`` (the middle of the head and neck); cranio-caudally
    it starts just above the ``vertex`` in most cases (a head-and-neck scan), or anywhere that keeps the
    landmarks ``margin`` inside. Returns the centre and whether the requested cut could be made.
    """
    centre_coords = np.zeros(3)
    others = np.ones(len(lmk), dtype=bool)
    if cut is not None:
        others[cut] = False
    cut_done = cut is None
    order = rng.permutation(3)
    plan: dict[int, float] = {}
    if cut is not None:
        for ax in order:
            q = lmk @ axes[:, ax]
            h = 0.5 * extent[ax]
            qo, qt = q[others], q[cut]
            inner = 8.0
            for side in rng.permutation(2):
                if side == 0 and qt < qo.min() - inner - 6.0:  # cut on the low side of this axis
                    lo_edge = rng.uniform(qt + 6.0, qo.min() - inner)
                    c = lo_edge + h
                    if c + h >= qo.max() + inner:
                        plan[ax] = c
                elif side == 1 and qt > qo.max() + inner + 6.0:
                    hi_edge = rng.uniform(qo.max() + inner, qt - 6.0)
                    c = hi_edge - h
                    if c - h <= qo.min() - inner:
                        plan[ax] = c
                if ax in plan:
                    break
            if plan:
                cut_done = True
                break
    for ax in range(3):
        if ax in plan:
            centre_coords[ax] = plan[ax]
            continue
        q = lmk[others] @ axes[:, ax] if cut_done and cut is not None else lmk @ axes[:, ax]
        h = 0.5 * extent[ax]
        lo, hi = q.max() - h + margin, q.min() + h - margin
        p = float(prefer @ axes[:, ax]) + rng.normal(0.0, 8.0)
        if lo > hi:  # too small a field of view for the margin: centre on the landmarks
            centre_coords[ax] = 0.5 * (q.max() + q.min())
        elif abs(axes[2, ax]) > 0.7:  # the cranio-caudal axis
            up = float(np.sign(axes[2, ax]))
            if rng.random() < 0.6:
                c = float(vertex @ axes[:, ax]) + up * rng.uniform(5.0, 25.0) - up * h
                centre_coords[ax] = float(np.clip(c, lo, hi))
            else:
                centre_coords[ax] = rng.uniform(lo, hi)
        else:
            centre_coords[ax] = float(np.clip(p, lo, hi))
    return axes @ centre_coords, cut_done


def sample_case(seed: int, index: int, config: PhantomConfig) -> PhantomCase:
    """Draw every parameter of case ``index`` of the set made with ``seed`` (deterministic)."""
    rng = np.random.default_rng([int(seed), int(index), GENERATOR_VERSION])
    shape = _draw_shape(rng)
    hu = {t: float(rng.normal(m, s)) for t, (m, s) in HU_PRIOR.items()}
    bone_gain = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
    for t in ("skull_cortical", "diploe", "petrous", "facial_bone", "mand_cortical", "mand_cancellous",
              "vert_cortical", "vert_cancellous", "hyoid"):
        hu[t] *= bone_gain
    pose = (_trans([rng.uniform(-20, 20), rng.uniform(-40, 40), rng.uniform(-250, 50)])
            @ _rot_z(rng.uniform(-config.yaw_deg, config.yaw_deg))
            @ _rot_y(rng.uniform(-config.roll_deg, config.roll_deg))
            @ _rot_x(rng.uniform(-config.pitch_deg, config.pitch_deg)))
    anatomy = build_anatomy(shape, hu, pose)
    lmk = np.array([anatomy.landmarks_world()[n] for n in LANDMARK_NAMES])

    code = str(rng.choice(config.orientations))
    axes = axes_from_code(code)
    tilt = 0.0
    if rng.random() < config.tilt_prob:
        tilt = float(rng.uniform(5.0, config.tilt_deg) * rng.choice([-1.0, 1.0]))
        axes = _rot_x(tilt)[:3, :3] @ axes
    slice_axis = int(np.argmax(np.abs(axes[2])))
    s_in = rng.uniform(*config.inplane_spacing_mm)
    dz = float(rng.choice(config.slice_spacing_mm))
    z_fov = rng.uniform(*config.z_fov_mm)
    if config.inplane_size is not None:
        n_in, fov_in = config.inplane_size, config.inplane_size * s_in
    else:
        fov_in = rng.uniform(*config.inplane_fov_mm)
        n_in = int(round(fov_in / s_in))
    nz = int(min(config.max_slices, round(z_fov / dz)))
    size = [n_in, n_in, n_in]
    size[slice_axis] = nz
    spacing = np.full(3, fov_in / n_in)
    spacing[slice_axis] = dz
    if config.size is not None:
        fov = np.array(size) * spacing
        size = list(config.size)
        spacing = fov / np.array(size)
    size_t = (int(size[0]), int(size[1]), int(size[2]))
    extent = np.array(size_t) * spacing

    cut = None
    if rng.random() < config.cut_prob:
        cut = int(rng.choice([0, 1, 2]))  # chin (inferior edge) or one mandible angle (lateral edge)
    prefer = _pt(pose, [0.0, 25.0, -20.0])
    vertex = _pt(pose @ _scale(shape["scale"] * shape["skull_scale"]), [0.0, 8.0, 48.0 + shape["cranium_c"] + 8.0])
    centre, cut_done = _place_fov(lmk, axes, extent, prefer, vertex, config.margin_mm, rng, cut)
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(spacing)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(size_t) - 1) / 2.0)

    artefact = None
    if rng.random() < config.artefact_prob:
        # A filling in a molar or premolar of either arch; its position is taken from the arch geometry.
        side = rng.choice([-1.0, 1.0])
        x_t = float(rng.uniform(12.0, 26.0))
        upper = bool(rng.random() < 0.5)
        y0 = -0.5 * shape["mand_thickness"]
        k = (y0 + shape["mand_body_length"]) / shape["mand_half_width"] ** 2
        z_t = shape["mand_body_height"] + (14.0 if upper else 5.0)
        g = shape["scale"]
        m_frame = (_trans(np.array([0.0, shape["menton_y"], shape["menton_z"]]) * g * shape["skull_scale"])
                   @ _rot_x(-shape["mand_plane_deg"]) @ _scale(g * shape["mand_scale"]))
        xyz = _pt(pose @ m_frame, [side * x_t, y0 - k * x_t * x_t, z_t])
        artefact = {"xyz_mm_ras": [float(v) for v in xyz], "radius_mm": float(rng.uniform(1.5, 3.0)),
                    "amplitude_hu": float(rng.uniform(250.0, 700.0)), "n_streaks": int(rng.integers(10, 24)),
                    "phase": float(rng.uniform(0, np.pi))}
    table_y = None
    if rng.random() < config.table_prob:
        back = [_pt(pose, p)[1] for p in ([0.0, -95.0, 40.0], [0.0, -60.0, -80.0], [0.0, -85.0, -10.0])]
        table_y = float(min(back) - rng.uniform(6.0, 25.0))
    return PhantomCase(case=f"hn_{index:04d}", seed=int(seed), index=int(index), shape=shape, hu=hu,
                       patient_to_world=pose, size=size_t, affine=affine,
                       noise_hu=float(rng.uniform(*config.noise_hu)), artefact=artefact, table_y_mm=table_y,
                       cut=LANDMARK_NAMES[cut] if (cut is not None and cut_done) else None,
                       orientation=code, tilt_deg=tilt)


# --- rendering ---------------------------------------------------------------------------------------------
def _upsample_axis(a: np.ndarray, axis: int, factor: int, n_out: int) -> np.ndarray:
    """Linear interpolation along one axis from a grid of every ``factor``-th sample to ``n_out`` samples."""
    if factor == 1:
        return a[(slice(None),) * axis + (slice(0, n_out),)]
    m = a.shape[axis]
    pos = np.arange(n_out, dtype=np.float64) / factor
    i0 = np.minimum(pos.astype(np.int64), m - 2)
    w = (pos - i0).astype(np.float32)
    shape = list(a.shape)
    shape[axis] = n_out
    out = np.empty(shape, dtype=np.float32)
    src, step, dst = np.moveaxis(a, axis, 0), np.moveaxis(np.diff(a, axis=axis), axis, 0), np.moveaxis(out, axis, 0)
    for i in range(n_out):  # plane by plane: no full-size temporaries
        np.multiply(step[i0[i]], w[i], out=dst[i])
        dst[i] += src[i0[i]]
    return out


def _paint(img: np.ndarray, c2w: np.ndarray, world_to_patient: np.ndarray, layer: Layer,
           ramp_mm: float) -> None:
    """Blend a layer's coats into ``img`` (coarse grid) with a linear partial-volume ramp across surfaces."""
    to_patient = world_to_patient @ c2w
    pad_mm = ramp_mm + 1.0
    lo = np.array(img.shape)
    hi = np.zeros(3, dtype=int)
    c2ls = []
    for sh in layer.shapes:  # the union's box in grid indices, from each shape's padded local box
        c2l = np.linalg.inv(sh.frame) @ to_patient if sh.frame is not None else c2w
        c2ls.append(c2l)
        lo_l, hi_l = sh.lo - pad_mm / sh.scale, sh.hi + pad_mm / sh.scale
        corners = np.array([[x, y, z] for x in (lo_l[0], hi_l[0]) for y in (lo_l[1], hi_l[1])
                            for z in (lo_l[2], hi_l[2])])
        idx = geometry.apply_affine(np.linalg.inv(c2l), corners)
        lo = np.minimum(lo, np.floor(idx.min(axis=0)).astype(int))
        hi = np.maximum(hi, np.ceil(idx.max(axis=0)).astype(int) + 1)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, img.shape)
    if np.any(hi <= lo):
        return
    ii = [np.arange(lo[d], hi[d], dtype=np.float32) for d in range(3)]
    d: np.ndarray | None = None
    for sh, c2l in zip(layer.shapes, c2ls, strict=True):
        m = c2l.astype(np.float32)
        coords = [m[r, 0] * ii[0][:, None, None] + m[r, 1] * ii[1][None, :, None]
                  + m[r, 2] * ii[2][None, None, :] + m[r, 3] for r in range(3)]
        ds = sh.sdf(*coords) * np.float32(sh.scale)
        d = ds if d is None else np.minimum(d, ds)
    assert d is not None
    block = img[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    inv_ramp = np.float32(1.0 / ramp_mm)
    for _tissue, hu, inset in layer.coats:
        alpha = np.clip(np.float32(0.5) - (d + np.float32(inset)) * inv_ramp, 0.0, 1.0)
        block += (np.float32(hu) - block) * alpha


def _streaks(img: np.ndarray, affine: np.ndarray, art: dict[str, Any]) -> None:
    """Dental-filling streaks: alternating bright/dark rays in the slices around the filling (fine grid)."""
    axes = affine[:3, :3]
    slice_axis = int(np.argmax(np.abs(axes[2] / np.linalg.norm(axes, axis=0))))
    centre = geometry.ras_to_ijk(np.asarray(art["xyz_mm_ras"]), affine)
    spacing = geometry.spacing_from_affine(affine)
    half = max(1, int(np.ceil(4.0 / spacing[slice_axis])))
    k0 = int(round(centre[slice_axis]))
    ks = [k for k in range(k0 - half, k0 + half + 1) if 0 <= k < img.shape[slice_axis]]
    if not ks:
        return
    plane = [a for a in range(3) if a != slice_axis]
    u = (np.arange(img.shape[plane[0]]) - centre[plane[0]]) * spacing[plane[0]]
    v = (np.arange(img.shape[plane[1]]) - centre[plane[1]]) * spacing[plane[1]]
    uu, vv = np.meshgrid(u, v, indexing="ij")
    r = np.hypot(uu, vv)
    theta = np.arctan2(vv, uu)
    rays = np.cos(art["n_streaks"] * theta + art["phase"]) * np.exp(-r / 70.0) * (r > 3.0)
    for k in ks:
        weight = 1.0 - abs(k - centre[slice_axis]) * spacing[slice_axis] / 6.0
        sl: list[Any] = [slice(None)] * 3
        sl[slice_axis] = k
        img[tuple(sl)] += (art["amplitude_hu"] * max(weight, 0.0) * rays).astype(np.float32)


def render(params: PhantomCase, coarse_mm: float = 2.4) -> tuple[np.ndarray, Anatomy]:
    """Paint one case: ``(I, J, K)`` int16 HU array (nibabel order of ``params.affine``) and its anatomy."""
    anatomy = build_anatomy(params.shape, params.hu, params.patient_to_world, params.table_y_mm)
    size = np.array(params.size)
    spacing = geometry.spacing_from_affine(params.affine)
    # Coarse grid aligned with the image grid: every f-th voxel, f chosen so it is at most coarse_mm.
    factors = np.maximum(1, np.floor(coarse_mm / spacing + 1e-6)).astype(int)
    if int(np.prod(size)) <= 2_000_000:  # small images: evaluate exactly on the voxels
        factors[:] = 1
    m = np.where(factors > 1, -(-(size - 1) // factors) + 1, size)
    c2w = params.affine @ np.diag([*factors.astype(float), 1.0])
    coarse_spacing = spacing * factors
    # The ramp is the partial-volume blur: at least ~1 mm, and wide enough not to alias on the coarse grid.
    ramp = float(max(1.2, 0.9 * coarse_spacing.max()))
    img = np.full(tuple(int(v) for v in m), params.hu["air"], dtype=np.float32)
    w2p = np.linalg.inv(params.patient_to_world)
    for layer in anatomy.layers:
        _paint(img, c2w, w2p, layer, ramp)
    if params.artefact is not None:
        art = params.artefact
        filling = Layer([_ellipsoid(art["xyz_mm_ras"], [art["radius_mm"]] * 3, None)],
                        [("filling", params.hu["filling"], 0.0)])
        _paint(img, c2w, w2p, filling, ramp)
    for ax in (2, 1, 0):  # the full-size pass last, along axis 0, whose planes are contiguous
        img = _upsample_axis(img, ax, int(factors[ax]), int(size[ax]))
    img = np.ascontiguousarray(img)
    if params.artefact is not None:
        _streaks(img, params.affine, params.artefact)
    _add_noise(img, params.noise_hu, np.random.default_rng([params.seed, params.index, GENERATOR_VERSION, 1]))
    np.clip(img, HU_MIN, HU_MAX, out=img)
    np.rint(img, out=img)
    return img.astype(np.int16), anatomy


def _add_noise(img: np.ndarray, sigma: float, rng: np.random.Generator, chunk: int = 1 << 20) -> None:
    """White Gaussian noise, drawn as random windows of one pool of normals.

    Drawing a fresh normal per voxel costs about a second for 512x512x200 on a slow CPU; windows of a pool
    a few chunks long are independent within a chunk and look alike to any detector.
    """
    flat = img.reshape(-1)
    n = flat.size
    pool = rng.standard_normal(min(n, 4 * chunk), dtype=np.float32) * np.float32(sigma)
    if n <= pool.size:
        flat += pool[:n]
        return
    offsets = rng.integers(0, pool.size - chunk + 1, size=-(-n // chunk))
    for c, off in enumerate(offsets):
        start = c * chunk
        stop = min(start + chunk, n)
        flat[start:stop] += pool[off:off + stop - start]


def make_phantom(seed: int, index: int, config: PhantomConfig | None = None) -> Phantom:
    """Generate case ``index`` of the set made with ``seed`` (the same pair always gives the same case)."""
    cfg = config or PROFILES["clinical"]
    params = sample_case(seed, index, cfg)
    array, anatomy = render(params, cfg.coarse_mm)
    volume = Volume(array, params.affine)
    world = anatomy.landmarks_world()
    xyz = np.array([world[n] for n in LANDMARK_NAMES])
    inside = volume.contains_ras(xyz)
    return Phantom(volume, LandmarkSet(LANDMARK_NAMES, xyz, found=inside), params, anatomy)


# --- writing a set -----------------------------------------------------------------------------------------
def generate(out: str | os.PathLike[str], n: int, seed: int = 0, config: PhantomConfig | None = None,
             profile: str = "clinical", progress: Callable[[str], None] | None = print) -> list[Phantom]:
    """Write ``n`` cases to ``out``: ``images/<case>.nii.gz``, ``landmarks.csv``, ``groups.json``, ``phantoms.json``.

    The folder then reads like ``../shared/data/hippocampus`` (see :func:`lmk3d.data.datasets.load_dataset`).
    Only the landmarks inside each field of view are in ``landmarks.csv``.

    Args:
        out: the folder (created if needed).
        n: number of cases, named ``hn_0000`` ... (case ``i`` depends only on ``seed`` and ``i``).
        seed: the set's seed.
        config: the variation; default: ``PROFILES[profile]``.
        profile: the profile's name (recorded in ``phantoms.json``).
        progress: called with one line per case (None: silent).

    Returns:
        The phantoms, without their arrays (``volume.array`` is replaced by a 1-voxel stub to free memory).

    Raises:
        LandmarkError: an unknown profile, or ``out/images`` already holds images of other cases.
    """
    if config is None and profile not in PROFILES:
        raise LandmarkError(f"unknown phantom profile {profile!r}; choose one of {', '.join(PROFILES)}")
    cfg = config or PROFILES[profile]
    root = Path(out)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"hn_{i:04d}" for i in range(n)]
    foreign = sorted(case_id(p) for p in images.iterdir()
                     if image_suffix(p) and not p.name.startswith(".") and case_id(p) not in names)
    if foreign:
        raise LandmarkError(f"{images}: already holds images of other cases ({', '.join(foreign[:5])}...); "
                            "write the phantoms to an empty folder")
    table: dict[str, LandmarkSet] = {}
    cases: list[dict[str, Any]] = []
    made: list[Phantom] = []
    for i in range(n):
        t0 = time.perf_counter()
        ph = make_phantom(seed, i, cfg)
        t1 = time.perf_counter()
        write_image(images / f"{ph.params.case}.nii.gz", ph.volume)
        t2 = time.perf_counter()
        table[ph.params.case] = ph.landmarks
        cases.append(ph.params.to_dict())
        if progress:
            missing = [nm for nm, f in zip(ph.landmarks.names, ph.landmarks.found, strict=True) if not f]
            progress(f"{ph.params.case}: {'x'.join(map(str, ph.volume.shape))} "
                     f"{'x'.join(f'{s:.2f}' for s in ph.volume.spacing_mm)} mm {''.join(ph.volume.axcodes)}"
                     f"{' missing ' + ','.join(missing) if missing else ''}  "
                     f"({t1 - t0:.1f} s generate, {t2 - t1:.1f} s write)")
        made.append(Phantom(Volume(np.zeros((1, 1, 1), np.int16), ph.volume.affine), ph.landmarks, ph.params,
                            ph.anatomy))
    write_table(root / "landmarks.csv", table, with_scores=False)
    write_groups(root / GROUPS_FILE, GROUPS, LANDMARK_NAMES)
    meta = {"generator": "lmk3d.data.phantoms", "version": GENERATOR_VERSION, "seed": int(seed), "n": int(n),
            "profile": profile if cfg == PROFILES.get(profile) else f"{profile} (modified)",
            "config": dataclasses.asdict(cfg),
            "landmarks": list(LANDMARK_NAMES), "cases": cases}
    atomic_write_text(root / "phantoms.json", json.dumps(meta, indent=1) + "\n")
    return made


def read_phantom_meta(root: str | os.PathLike[str]) -> dict[str, PhantomCase]:
    """``{case: PhantomCase}`` from a phantom folder's ``phantoms.json``."""
    p = Path(root) / "phantoms.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkError(f"{p}: no such file; not a phantom folder") from None
    except json.JSONDecodeError as e:
        raise LandmarkError(f"{p}: not valid JSON ({e})") from None
    return {c["case"]: PhantomCase.from_dict(c) for c in doc.get("cases", [])}


def parse_size(text: str) -> tuple[int, int, int]:
    """``'96,96,64'`` or ``'96x96x64'`` -> ``(96, 96, 64)``."""
    parts = text.replace("x", ",").split(",")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 8:
        raise LandmarkError(f"bad size {text!r}; give three integers of at least 8, e.g. 96,96,64")
    return (vals[0], vals[1], vals[2])


# --- preview figure ------------------------------------------------------------------------------------------
def preview(volume: Volume, landmarks: LandmarkSet, path: str | os.PathLike[str], title: str = "",
            half_mm: float = 90.0, pixel_mm: float = 0.5, window: tuple[float, float] = (-600.0, 1200.0)) -> Path:
    """Orthogonal slices (axial, coronal, sagittal; world-aligned) through each landmark, with the landmarks.

    Axial and coronal views are radiological (patient right on the left); sagittal views have anterior on
    the left. Other landmarks within 3 mm of a plane are drawn too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    found = [i for i in range(len(landmarks)) if landmarks.found[i]]
    fig, axs = plt.subplots(len(found), 3, figsize=(9.6, 3.2 * len(found)), squeeze=False)
    t = np.arange(-half_mm, half_mm + 1e-6, pixel_mm)
    inv = np.linalg.inv(volume.affine)
    views = [  # (name, horizontal world axis & sign, vertical world axis & sign, fixed axis, labels)
        ("axial", (0, -1.0), (1, 1.0), 2, ("R", "L", "P", "A")),
        ("coronal", (0, -1.0), (2, 1.0), 1, ("R", "L", "I", "S")),
        ("sagittal", (1, -1.0), (2, 1.0), 0, ("A", "P", "I", "S")),
    ]
    colours = ["#ff3030", "#30c0ff", "#ffd000", "#40ff60", "#ff60ff"]
    for row, li in enumerate(found):
        p = landmarks.xyz_mm_ras[li]
        for col, (vname, (ha, hs), (va, vs), fixed, lab) in enumerate(views):
            hh, vv = np.meshgrid(t, t, indexing="xy")
            pts = np.zeros(hh.shape + (3,))
            pts[..., fixed] = p[fixed]
            pts[..., ha] = p[ha] + hs * hh
            pts[..., va] = p[va] + vs * vv[::-1]
            ijk = pts.reshape(-1, 3) @ inv[:3, :3].T + inv[:3, 3]
            vals = ndimage.map_coordinates(volume.array.astype(np.float32), ijk.T, order=1, cval=-1024.0)
            ax = axs[row, col]
            ax.imshow(vals.reshape(hh.shape), cmap="gray", vmin=window[0], vmax=window[1],
                      extent=(-half_mm, half_mm, -half_mm, half_mm))
            for lj in found:
                q = landmarks.xyz_mm_ras[lj]
                if abs(q[fixed] - p[fixed]) > 3.0:
                    continue
                x, y = hs * (q[ha] - p[ha]), vs * (q[va] - p[va])
                if max(abs(x), abs(y)) < half_mm:
                    c = colours[lj % len(colours)]
                    ax.plot(x, y, "+", color=c, ms=14 if lj == li else 9, mew=2)
                    ax.plot(x, y, "o", mfc="none", color=c, ms=16 if lj == li else 10, mew=1)
                    ax.text(x + 4, y + 4, landmarks.names[lj], color=c, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.01, 0.5, lab[0], color="w", fontsize=8, transform=ax.transAxes, va="center")
            ax.text(0.97, 0.5, lab[1], color="w", fontsize=8, transform=ax.transAxes, va="center")
            ax.text(0.5, 0.01, lab[2], color="w", fontsize=8, transform=ax.transAxes, ha="center")
            ax.text(0.5, 0.93, lab[3], color="w", fontsize=8, transform=ax.transAxes, ha="center")
            ax.set_title(f"{landmarks.names[li]}: {vname}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.985))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
