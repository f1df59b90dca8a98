"""World-coordinate resampling of voxel tensors between two grids (CPU or GPU): the one resampler.

Training (``preprocessing.transforms.ResampleToPlanGrid``, in the cached head of the MONAI chain),
validation (the same chain) and inference (``preprocess_for_inference`` into the network grid, and
``pipeline.inference.segment`` back onto the source grid) all call :func:`target_grid` and
:func:`resample_to_grid`, so a case lands on the same network grid wherever it is used.

Why hand-written rather than MONAI ``Spacingd``/``Invertd``: those run through the ``MetaTensor``
transform machinery and, in the standard wiring, on the CPU inside the data loader. The product's
speed target needs one GPU-resident resample into the network grid and one back onto the source
grid, on tensors that are already on the device, with nothing but two affines to describe the
geometry. ``torch.nn.functional.grid_sample`` does the interpolation; this module only builds the
sampling grid correctly (the traps are listed in ``GEOMETRY.md``) and takes an exact shortcut when
the two grids differ only by an axis permutation/flip and an integer shift.

Conventions: arrays are ``(C, X, Y, Z)`` where ``X, Y, Z`` are the voxel indices ``i, j, k`` of a
4x4 voxel->RAS millimetre affine (NIfTI / nibabel / MONAI convention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Padding = str | float

# Above this many grid elements (3 floats per destination voxel) the grid is built slab by slab
# along the destination's last axis, so a 512^3 resample does not need a 1.6 GB grid at once.
_MAX_GRID_VOXELS = 2**24
_PERM_ATOL = 1e-6


def resample_to_grid(
    data: torch.Tensor,
    src_affine_ras: np.ndarray,
    dst_affine_ras: np.ndarray,
    dst_shape: Sequence[int],
    mode: str = "linear",
    padding: Padding = "border",
) -> torch.Tensor:
    """Resample ``data`` from its own grid onto another grid, matching world (RAS mm) positions.

    For every destination voxel ``ijk`` the world point is ``dst_affine_ras @ ijk``; the value is
    taken from the source at continuous index ``inv(src_affine_ras) @ world``.

    Args:
        data: ``(C, X, Y, Z)`` tensor on any device; float32/float16/bfloat16 or an integer dtype
            (integer data is sampled as float32 and rounded back, use ``mode="nearest"`` for labels).
        src_affine_ras: 4x4 voxel->RAS mm affine of ``data``.
        dst_affine_ras: 4x4 voxel->RAS mm affine of the destination grid.
        dst_shape: destination ``(X, Y, Z)`` voxel counts.
        mode: ``"linear"`` (trilinear) or ``"nearest"``.
        padding: value for destination voxels outside the source: ``"border"`` (nearest edge
            voxel), ``"zeros"``, or a number (e.g. -1024.0 for CT air). Along a source axis of
            size 1 (a single slice) the general path always behaves as ``"border"``.

    Returns:
        ``(C, *dst_shape)`` tensor with ``data``'s dtype and device.
    """
    if data.ndim != 4:
        raise ValueError(f"resample_to_grid expects (C, X, Y, Z) data; got shape {tuple(data.shape)}")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest'; got {mode!r}")
    dst_shape = tuple(int(s) for s in dst_shape)
    src = np.asarray(src_affine_ras, dtype=np.float64)
    dst = np.asarray(dst_affine_ras, dtype=np.float64)
    # dst voxel index -> src continuous voxel index, composed in float64 so large origins do
    # not cost precision before the (float32) grid is built.
    dst_to_src = np.linalg.inv(src) @ dst
    fast = _permutation_mapping(dst_to_src)
    if fast is not None:
        return _resample_by_indexing(data, fast, dst_shape, padding)
    return _resample_by_grid_sample(data, dst_to_src, dst_shape, mode, padding)


def target_grid(
    src_affine_ras: np.ndarray, src_shape: Sequence[int], spacing_mm: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A RAS-aligned grid of the given spacing covering the source's field of view.

    The grid's axes point along +R, +A, +S (the "closest canonical" orientation used for
    training), so the network always sees the same anatomical orientation whatever the scanner
    wrote. The extent is the bounding box of the 8 corner voxel *centres* of the source; the grid
    is centred on that box. A RAS-aligned source with the requested spacing maps onto itself.

    Args:
        src_affine_ras: 4x4 voxel->RAS mm affine of the source.
        src_shape: source ``(X, Y, Z)`` voxel counts.
        spacing_mm: target spacing along R, A, S in millimetres.

    Returns:
        ``(dst_affine_ras, dst_shape)``: a 4x4 float64 diagonal-direction affine and ``(X, Y, Z)``.
    """
    src = np.asarray(src_affine_ras, dtype=np.float64)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm must be 3 positive numbers; got {spacing_mm!r}")
    last = np.asarray(src_shape, dtype=np.float64) - 1.0
    corners = np.array([[a, b, c, 1.0] for a in (0, last[0]) for b in (0, last[1]) for c in (0, last[2])])
    world = (src @ corners.T)[:3].T
    lo, hi = world.min(axis=0), world.max(axis=0)
    extent = (hi - lo) / spacing
    # The 1e-4 tolerance keeps an exact multiple of the spacing from gaining a spurious voxel.
    shape = tuple(int(math.ceil(e - 1e-4)) + 1 for e in extent)
    centre = (lo + hi) / 2.0
    origin = centre - (np.asarray(shape) - 1.0) / 2.0 * spacing
    dst = np.eye(4)
    dst[:3, :3] = np.diag(spacing)
    dst[:3, 3] = origin
    return dst, shape  # type: ignore[return-value]


def _permutation_mapping(dst_to_src: np.ndarray) -> list[tuple[int, int, int]] | None:
    """``[(src_axis, sign, offset)]`` per destination axis if the map is a signed permutation.

    Returns None unless ``src_idx[src_axis] = sign * dst_idx[axis] + offset`` holds exactly with
    integer offsets: then the resample is pure indexing (exact, no interpolation).
    """
    lin, trans = dst_to_src[:3, :3], dst_to_src[:3, 3]
    rounded = np.round(lin)
    if not np.allclose(lin, rounded, atol=_PERM_ATOL) or not np.allclose(trans, np.round(trans), atol=1e-4):
        return None
    if not np.array_equal(np.abs(rounded).sum(axis=0), np.ones(3)) or not np.array_equal(
        np.abs(rounded).sum(axis=1), np.ones(3)
    ):
        return None
    out = []
    for d in range(3):
        a = int(np.flatnonzero(rounded[:, d])[0])
        out.append((a, int(rounded[a, d]), int(round(trans[a]))))
    return out


def _resample_by_indexing(
    data: torch.Tensor, mapping: list[tuple[int, int, int]], dst_shape: tuple[int, ...], padding: Padding
) -> torch.Tensor:
    """Exact resample for signed-permutation maps: permute, then gather with clamped indices."""
    perm = [0] + [a + 1 for a, _, _ in mapping]
    out = data.permute(*perm)
    inside = []
    for d, (a, sign, offset) in enumerate(mapping):
        n_src = data.shape[a + 1]
        idx = sign * torch.arange(dst_shape[d], device=data.device) + offset
        inside.append((idx >= 0) & (idx < n_src))
        out = out.index_select(d + 1, idx.clamp(0, n_src - 1))
    if padding != "border":
        value = 0.0 if padding == "zeros" else float(padding)
        mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        if not bool(mask.all()):
            out = torch.where(mask[None], out, torch.as_tensor(value, dtype=out.dtype, device=out.device))
    return out.contiguous()


def _resample_by_grid_sample(
    data: torch.Tensor, dst_to_src: np.ndarray, dst_shape: tuple[int, ...], mode: str, padding: Padding
) -> torch.Tensor:
    """General resample with ``grid_sample``, building the grid slab by slab along dst Z."""
    out_dtype = data.dtype
    work_dtype = data.dtype
    # grid_sample wants the grid in the data's dtype, and a float16 grid is off by up to a quarter
    # voxel on a 512 grid (normalised coordinates near +-1 keep ~11 bits): sample low-precision
    # (and integer) data in float32.
    if data.dtype != torch.float64:
        work_dtype = torch.float32
    src = data.to(work_dtype)
    if padding in ("border", "zeros"):
        pad_mode, value = str(padding), 0.0
    else:
        # Constant padding v: sample the data with zero padding plus a ones channel that says how
        # much of each sample came from inside; out = data + v * (1 - inside). Shifting the data by
        # -v instead would cost float32 precision when |v| >> |data| (CT air at -1024 HU).
        pad_mode, value = "zeros", float(padding)
        if value:
            src = torch.cat([src, torch.ones_like(src[:1])])
    src5 = src.unsqueeze(0)  # (1, C, D=X, H=Y, W=Z)
    n_src = torch.tensor(data.shape[1:], dtype=torch.float64)
    m = torch.as_tensor(dst_to_src[:3], dtype=torch.float64)
    # align_corners=True maps index 0 -> -1 and n-1 -> +1. grid_sample reads the last grid dim as
    # (W, H, D) = (k, j, i): reversed relative to the tensor's axes, hence the flip below.
    scale = 2.0 / torch.clamp(n_src - 1.0, min=1.0)
    m_norm = (m * scale[:, None]).to(torch.float32).to(data.device)
    off_norm = torch.where(n_src > 1, torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.0))
    m_norm[:, 3] += off_norm.to(torch.float32).to(data.device)
    gs_mode = "bilinear" if mode == "linear" else "nearest"
    nx, ny, nz = dst_shape
    slab = max(1, _MAX_GRID_VOXELS // max(1, nx * ny))
    gi = torch.arange(nx, device=data.device, dtype=torch.float32)
    gj = torch.arange(ny, device=data.device, dtype=torch.float32)
    out = torch.empty((src.shape[0], nx, ny, nz), dtype=work_dtype, device=data.device)
    for z0 in range(0, nz, slab):
        gk = torch.arange(z0, min(nz, z0 + slab), device=data.device, dtype=torch.float32)
        coords = (
            m_norm[:, 0].view(3, 1, 1, 1) * gi.view(1, -1, 1, 1)
            + m_norm[:, 1].view(3, 1, 1, 1) * gj.view(1, 1, -1, 1)
            + m_norm[:, 2].view(3, 1, 1, 1) * gk.view(1, 1, 1, -1)
            + m_norm[:, 3].view(3, 1, 1, 1)
        )
        grid = coords.flip(0).permute(1, 2, 3, 0).unsqueeze(0)  # (1, X, Y, slab, 3) as (k, j, i)
        sampled = F.grid_sample(
            src5, grid.to(work_dtype), mode=gs_mode, padding_mode=pad_mode, align_corners=True
        )
        out[..., z0 : z0 + gk.numel()] = sampled[0]
    if value:
        # Round-off in the float32 grid leaves ~1e-7 of "outside" on interior voxels; times a large
        # padding value that would be visible, so fractions below 1e-4 voxel count as inside.
        outside = (1.0 - out[-1:]).masked_fill_(out[-1:] > 1.0 - 1e-4, 0.0)
        out = out[:-1] + value * outside
    if not data.is_floating_point():
        out = torch.round(out)
    return out.to(out_dtype)
