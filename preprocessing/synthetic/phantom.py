"""Seeded abdominal phantoms (CT in HU, MR in arbitrary units) with label maps, and grid affines.

The anatomy is defined in *world* (RAS mm) coordinates and sampled on whatever voxel grid is
asked for, so an axial, a sagittal and an oblique series of the same seed show the same patient.
That is what lets a model trained on axial data be evaluated on a sagittal series, and what makes
a reader's orientation bug visible: the structures are deliberately asymmetric (liver on the
patient's right, a single kidney on the left and posterior, lesion off-centre in the liver).

Public: :data:`LABEL_NAMES`, :func:`make_phantom`, :func:`orientation_affine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

LABEL_NAMES: dict[int, str] = {1: "liver", 2: "kidney", 3: "lesion"}
"""Foreground labels of the phantom; 0 is background."""

# Tissue values. CT in Hounsfield units; MR in arbitrary scanner units (T2-ish: lesion bright).
_CT_VALUES = {"air": -1000.0, "fat": -90.0, "body": 30.0, "liver": 90.0, "kidney": 180.0}
_CT_VALUES |= {"lesion": -20.0}
_MR_VALUES = {"air": 0.0, "fat": 700.0, "body": 300.0, "liver": 180.0, "kidney": 550.0}
_MR_VALUES |= {"lesion": 900.0}
_NOISE_SIGMA = {"CT": 12.0, "MR": 18.0}
_TEXTURE_AMPLITUDE = {"CT": 10.0, "MR": 25.0}

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
# DICOM (LPS) row and column direction cosines of the conventional scanner orientations.
# The slice normal r x c is then +z (axial), -x (sagittal: toward the patient's right), +y (coronal).
_IOP_LPS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


def orientation_affine(
    orientation: str,
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0),
    origin_ras: tuple[float, float, float] | None = None,
    *,
    shape: tuple[int, int, int] = (48, 48, 32),
    oblique_deg: float = 20.0,
) -> np.ndarray:
    """Voxel->RAS affine of a scanner-like grid.

    Column index ``i`` runs along the DICOM row cosine, ``j`` along the column cosine and ``k``
    along their cross product (the slice normal), so the grid written as DICOM reads back with
    exactly this affine. ``oblique`` is the axial grid rotated by ``oblique_deg`` about the
    patient's left-right axis (a tilted axial acquisition, not a gantry shear).

    Args:
        orientation: "axial", "sagittal", "coronal" or "oblique".
        spacing_mm: spacing along i, j, k in mm (i = DICOM column direction).
        origin_ras: RAS mm position of voxel (0, 0, 0). ``None`` centres the grid of ``shape``
            on a slightly off-zero point (so origins are never trivially zero).
        shape: grid size ``(X, Y, Z)``, only used to centre the grid when ``origin_ras`` is None.
        oblique_deg: rotation of the oblique grid in degrees.

    Returns:
        4x4 float64 affine mapping ``(i, j, k, 1)`` to RAS mm.
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}; got {orientation!r}")
    if orientation == "oblique":
        row, col = np.array(_IOP_LPS["axial"][0]), np.array(_IOP_LPS["axial"][1])
        t = np.deg2rad(oblique_deg)
        rot_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        row, col = rot_x @ row, rot_x @ col
    else:
        row, col = (np.array(v) for v in _IOP_LPS[orientation])
    normal = np.cross(row, col)
    directions_lps = np.stack([row, col, normal], axis=1)
    directions_ras = np.diag([-1.0, -1.0, 1.0]) @ directions_lps
    affine = np.eye(4)
    affine[:3, :3] = directions_ras * np.asarray(spacing_mm, dtype=np.float64)[None, :]
    if origin_ras is None:
        centre_voxel = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
        world_centre = np.array([2.5, -4.0, 7.5])
        affine[:3, 3] = world_centre - affine[:3, :3] @ centre_voxel
    else:
        affine[:3, 3] = np.asarray(origin_ras, dtype=np.float64)
    return affine


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in world mm: centre (RAS), semi-axes (mm) and a rotation (3x3, columns = axes)."""

    centre: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray

    def radius(self, points: np.ndarray) -> np.ndarray:
        """Normalised ellipsoidal radius of ``points`` (..., 3): < 1 inside, 1 on the surface."""
        local = (points - self.centre) @ self.rotation / self.semi_axes
        return np.sqrt(np.sum(local**2, axis=-1))

    def soft_inside(self, points: np.ndarray, edge_mm: float) -> np.ndarray:
        """Partial-volume membership in [0, 1]; the edge is a ramp about ``edge_mm`` wide."""
        dist_mm = (self.radius(points) - 1.0) * float(np.min(self.semi_axes))
        return np.clip(0.5 - dist_mm / max(edge_mm, 1e-6), 0.0, 1.0)


def _rotation_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def _anatomy(seed: int, half_extent_mm: np.ndarray, centre_ras: np.ndarray) -> dict[str, _Ellipsoid]:
    """Structures of one synthetic patient; sizes are fractions of the body half extent (R, A, S)."""
    rng = np.random.default_rng([seed, 17])
    h = half_extent_mm

    def jitter(scale: float, n: int = 3) -> np.ndarray:
        return rng.uniform(-scale, scale, n)

    body = _Ellipsoid(centre_ras, h * np.array([0.88, 0.68, 50.0]), np.eye(3))
    # Liver: big, on the patient's right (+R in RAS) and anterior; rotated so it is not axis-aligned.
    liver_c = centre_ras + h * (np.array([0.36, 0.08, 0.12]) + jitter(0.05))
    liver = _Ellipsoid(
        liver_c,
        h * np.array([0.38, 0.40, 0.55]) * (1 + jitter(0.08)),
        _rotation_z(25 + 8 * rng.uniform(-1, 1)),
    )
    # One kidney on the patient's left (-R), posterior (-A), lower (-S): breaks every mirror symmetry.
    kid_c = centre_ras + h * (np.array([-0.42, -0.34, -0.22]) + jitter(0.04))
    kidney = _Ellipsoid(
        kid_c,
        h * np.array([0.16, 0.22, 0.40]) * (1 + jitter(0.08)),
        _rotation_z(-30 + 8 * rng.uniform(-1, 1)),
    )
    # Lesion inside the liver, off its centre toward anterior-superior.
    les_c = liver_c + h * (np.array([0.08, 0.12, 0.14]) + jitter(0.03))
    lesion = _Ellipsoid(les_c, h * np.full(3, 0.17) * (1 + jitter(0.1)), np.eye(3))
    # No bone on purpose: intensity normalisation that clips at foreground percentiles (nnU-Net's
    # CT scheme) maps bone onto the bright kidney, and a tiny test network then confuses the two.
    return {"body": body, "liver": liver, "kidney": kidney, "lesion": lesion}


def _grid_points(affine_ras: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS mm coordinates of every voxel centre, shape (X, Y, Z, 3)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine_ras[:3, :3].T + affine_ras[:3, 3]


def _default_half_extent(
    affine_ras: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Body half extent (R, A, S mm) and centre fitted to the grid's world bounding box."""
    corners = np.array(
        [[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
    )
    world = corners @ affine_ras[:3, :3].T + affine_ras[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    half = (hi - lo) / 2.0
    # A single slice has no extent along its normal; borrow the in-plane size so the body exists.
    return np.maximum(half, 0.5 * half.max()), (hi + lo) / 2.0


def make_phantom(
    shape: tuple[int, int, int] = (48, 48, 32),
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0),
    modality: str = "CT",
    seed: int = 0,
    *,
    affine_ras: np.ndarray | None = None,
    body_half_extent_mm: tuple[float, float, float] | None = None,
    noise_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a seeded abdominal phantom and its label map on a voxel grid.

    Structures (see :data:`LABEL_NAMES`): liver (1, patient's right, anterior), kidney (2, one only,
    patient's left, posterior, inferior), lesion (3, inside the liver), plus unlabelled body,
    subcutaneous fat ring (no bone, see ``_anatomy``). Smooth texture, partial-volume edges, Gaussian
    noise (CT) or Rician-like noise and a multiplicative bias field (MR). Positions and sizes vary a
    little with ``seed``; the same seed always gives identical arrays.

    Args:
        shape: grid size ``(X, Y, Z)`` (voxel indices i, j, k).
        spacing_mm: voxel spacing (mm) of the default axial grid; ignored if ``affine_ras`` is given.
        modality: "CT" (values in HU, air -1000) or "MR" (arbitrary non-negative units).
        seed: anatomy and noise seed.
        affine_ras: voxel->RAS affine of the grid to sample on; default
            ``orientation_affine("axial", spacing_mm, shape=shape)``.
        body_half_extent_mm: half size (R, A, S) of the body box in mm, centred on the grid's world
            centre; default fits the grid's world bounding box. Pass the same value for several grids
            of one patient so they show identical anatomy in world space.
        noise_seed: seed of texture, noise and bias field; default ``seed``. Use one anatomy
            ``seed`` with several noise seeds for repeat scans or channels of one patient.

    Returns:
        ``(image, label)``: float32 ``(X, Y, Z)`` and uint8 ``(X, Y, Z)`` with values in {0, 1, 2, 3}.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR'; got {modality!r}")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if affine_ras is None:
        affine_ras = orientation_affine("axial", spacing_mm, shape=shape)
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    half, centre = _default_half_extent(affine_ras, shape)
    if body_half_extent_mm is not None:
        half = np.asarray(body_half_extent_mm, dtype=np.float64)
        centre = np.array([2.5, -4.0, 7.5])  # the world centre used by orientation_affine
    parts = _anatomy(seed, half, centre)
    points = _grid_points(affine_ras, shape)
    label = _label_map(parts, points)
    image = _intensities(parts, points, affine_ras, modality, seed if noise_seed is None else noise_seed)
    return image.astype(np.float32), label


def _label_map(parts: dict[str, _Ellipsoid], points: np.ndarray) -> np.ndarray:
    """Hard labels at voxel centres; later structures overwrite earlier ones (lesion wins in liver)."""
    label = np.zeros(points.shape[:3], dtype=np.uint8)
    inside_body = parts["body"].radius(points) < 1.0
    for value, name in LABEL_NAMES.items():
        label[(parts[name].radius(points) < 1.0) & inside_body] = value
    return label


def _intensities(
    parts: dict[str, _Ellipsoid], points: np.ndarray, affine_ras: np.ndarray, modality: str, seed: int
) -> np.ndarray:
    """Blend tissue values with partial-volume memberships, then add texture, bias and noise."""
    values = _CT_VALUES if modality == "CT" else _MR_VALUES
    spacing = np.linalg.norm(affine_ras[:3, :3], axis=0)
    edge_mm = float(np.mean(spacing))
    rng = np.random.default_rng([seed, 29])
    shape = points.shape[:3]

    body_w = parts["body"].soft_inside(points, edge_mm)
    # Subcutaneous fat: a ring just inside the body outline.
    inner = _Ellipsoid(parts["body"].centre, parts["body"].semi_axes * np.array([0.88, 0.85, 1.0]), np.eye(3))
    fat_w = body_w * (1.0 - inner.soft_inside(points, edge_mm))
    image = values["air"] * (1 - body_w) + values["fat"] * fat_w + values["body"] * (body_w - fat_w)
    for name in ("kidney", "liver", "lesion"):
        w = parts[name].soft_inside(points, edge_mm) * body_w
        tissue = np.full(shape, values[name])
        if name in ("liver", "kidney"):
            smooth = gaussian_filter(rng.standard_normal(shape), sigma=1.5)
            tissue = tissue + _TEXTURE_AMPLITUDE[modality] * 2.0 * smooth / (smooth.std() + 1e-6)
        image = image * (1 - w) + tissue * w
    noise = rng.standard_normal(shape) * _NOISE_SIGMA[modality]
    if modality == "MR":
        image = image * _bias_field(points, rng)
        # Magnitude of a complex signal with Gaussian noise: Rician, never negative.
        image = np.hypot(image + noise, rng.standard_normal(shape) * _NOISE_SIGMA[modality])
    else:
        image = image + noise
    return image


def _bias_field(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field (about +-15 %) varying linearly and quadratically across the grid."""
    p = points - points.reshape(-1, 3).mean(axis=0)
    p = p / (np.abs(p).reshape(-1, 3).max(axis=0) + 1e-6)
    coef = rng.uniform(-0.1, 0.1, 6)
    field = 1.0 + p @ coef[:3] + 0.05 * (p**2) @ np.sign(coef[3:])
    return field
