"""World-coordinate resampling: cross-checked against SimpleITK, landmarks, exact fast path."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from preprocessing.image import ras_to_lps
from preprocessing.resample import _permutation_mapping, resample_to_grid, target_grid


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _affine(rot: np.ndarray, spacing, origin) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _to_sitk(array_xyz: np.ndarray, affine_ras: np.ndarray) -> sitk.Image:
    """Independent geometry path: ITK works in LPS and its arrays are (z, y, x)."""
    aff = ras_to_lps(affine_ras)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (aff[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    return img


def _smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    vol = np.sin(3.1 * x + 1.0) * np.cos(2.3 * y) + 0.7 * z**2 + 0.3 * x * y
    return (vol + 0.01 * rng.standard_normal(shape)).astype(np.float32)


OBLIQUE = _affine(_rotation(np.array([0.3, -0.5, 0.8]), 23.0), (0.9, 1.3, 2.7), (-20.0, 14.0, -33.0))


def test_linear_matches_simpleitk_on_oblique_anisotropic_volume():
    src = _smooth_volume((30, 26, 14))
    dst_aff, dst_shape = target_grid(OBLIQUE, src.shape, (1.5, 1.1, 2.0))
    ours = resample_to_grid(torch.from_numpy(src)[None], OBLIQUE, dst_aff, dst_shape, "linear", "zeros")[0]

    ref_img = _to_sitk(np.zeros(dst_shape, np.float32), dst_aff)
    itk = sitk.Resample(_to_sitk(src, OBLIQUE), ref_img, sitk.Transform(), sitk.sitkLinear, 0.0)
    ref = sitk.GetArrayFromImage(itk).transpose(2, 1, 0)

    # Compare only where the destination point lies well inside the source (ITK and torch differ
    # in how they treat the last half voxel at the border).
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in dst_shape], indexing="ij"), -1).reshape(-1, 3)
    src_idx = (np.linalg.inv(OBLIQUE) @ dst_aff @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    interior = np.all((src_idx > 1) & (src_idx < np.array(src.shape) - 2), axis=1).reshape(dst_shape)
    assert interior.sum() > 1000
    diff = np.abs(ours.numpy() - ref)[interior]
    assert diff.max() < 1e-4, diff.max()
    assert np.abs(ref[interior]).mean() > 0.1  # the comparison is not vacuous


def test_nearest_matches_simpleitk_on_labels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(24, 20, 12)).astype(np.uint8)
    dst_aff, dst_shape = target_grid(OBLIQUE, labels.shape, (0.8, 1.0, 1.7))
    ours = resample_to_grid(torch.from_numpy(labels)[None], OBLIQUE, dst_aff, dst_shape, "nearest", "zeros")[
        0
    ]
    assert ours.dtype == torch.uint8

    ref_img = _to_sitk(np.zeros(dst_shape, np.uint8), dst_aff)
    itk = sitk.Resample(_to_sitk(labels, OBLIQUE), ref_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ref = sitk.GetArrayFromImage(itk).transpose(2, 1, 0)

    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in dst_shape], indexing="ij"), -1).reshape(-1, 3)
    src_idx = (np.linalg.inv(OBLIQUE) @ dst_aff @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    frac = np.abs(src_idx - np.floor(src_idx) - 0.5)
    away_from_ties = np.all(frac > 1e-3, axis=1)
    interior = np.all((src_idx > 0.5) & (src_idx < np.array(labels.shape) - 1.5), axis=1)
    keep = (away_from_ties & interior).reshape(dst_shape)
    assert keep.sum() > 1000
    np.testing.assert_array_equal(ours.numpy()[keep], ref[keep])


def test_identity_round_trip_is_exact():
    src = torch.from_numpy(_smooth_volume((11, 9, 7)))[None]
    out = resample_to_grid(src, OBLIQUE, OBLIQUE, src.shape[1:], "linear")
    assert torch.equal(out, src)


def test_landmark_keeps_world_position_forward_and_back():
    """An off-centre, asymmetric blob keeps its world coordinate through forward and back."""
    shape = (40, 34, 18)
    landmark_world = OBLIQUE @ np.array([29.0, 9.0, 12.0, 1.0])  # off-centre in every axis
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    world = ijk @ OBLIQUE[:3, :3].T + OBLIQUE[:3, 3]
    dist2 = ((world - landmark_world[:3]) ** 2).sum(-1)
    blob = np.exp(-dist2 / (2 * 4.0**2)).astype(np.float32)

    # The truth is the blob's own centre of mass in world mm (the border truncates it slightly).
    truth = (OBLIQUE @ np.r_[_centre_of_mass(blob), 1.0])[:3]
    assert np.linalg.norm(truth - landmark_world[:3]) < 0.5

    dst_aff, dst_shape = target_grid(OBLIQUE, shape, (1.2, 1.2, 1.2))
    fwd = resample_to_grid(torch.from_numpy(blob)[None], OBLIQUE, dst_aff, dst_shape, "linear", "zeros")[0]
    world_dst = (dst_aff @ np.r_[_centre_of_mass(fwd.numpy()), 1.0])[:3]
    assert np.linalg.norm(world_dst - truth) < 0.2
    # A left-right flip of the destination grid would move the landmark by this much:
    centre_x = dst_aff[0, 3] + dst_aff[0, 0] * (dst_shape[0] - 1) / 2
    assert abs(2 * (truth[0] - centre_x)) > 10.0

    back = resample_to_grid(fwd[None], dst_aff, OBLIQUE, shape, "linear", "zeros")[0]
    world_back = (OBLIQUE @ np.r_[_centre_of_mass(back.numpy()), 1.0])[:3]
    assert np.linalg.norm(world_back - truth) < 0.2
    assert np.corrcoef(back.numpy().ravel(), blob.ravel())[0, 1] > 0.99


def _centre_of_mass(vol: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in vol.shape], indexing="ij"), -1)
    w = np.clip(vol, 0, None)
    return (idx * w[..., None]).reshape(-1, 3).sum(0) / w.sum()


def test_permutation_fast_path_is_exact_and_equals_general_path():
    """An LPS-style axial grid (i->L, j->P) onto its RAS-aligned grid: pure flips, no blur."""
    src = torch.from_numpy(_smooth_volume((13, 10, 7)))[None]
    lps_like = _affine(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 2.5), (40.0, 30.0, -10.0))
    dst_aff, dst_shape = target_grid(lps_like, src.shape[1:], (0.8, 0.8, 2.5))
    assert dst_shape == (13, 10, 7)
    mapping = _permutation_mapping(np.linalg.inv(lps_like) @ dst_aff)
    assert mapping == [(0, -1, 12), (1, -1, 9), (2, 1, 0)]
    fast = resample_to_grid(src, lps_like, dst_aff, dst_shape)
    assert torch.equal(fast, src.flip(1).flip(2))

    # Permuted axes plus a shift that pushes part of the grid outside: compare with grid_sample.
    perm_aff = lps_like[:, [2, 0, 1, 3]].copy()
    perm_aff[:3, 3] += perm_aff[:3, 1] * 2  # shift 2 voxels along dst axis 1
    general = _general(src, lps_like, perm_aff, (7, 13, 10), "zeros")
    fast = resample_to_grid(src, lps_like, perm_aff, (7, 13, 10), "linear", "zeros")
    torch.testing.assert_close(fast, general, atol=1e-5, rtol=0)
    assert (fast[:, :, -2:, :] == 0).all()  # shifted beyond the source: padded
    fast_border = resample_to_grid(src, lps_like, perm_aff, (7, 13, 10), "linear", "border")
    torch.testing.assert_close(fast_border, _general(src, lps_like, perm_aff, (7, 13, 10), "border"))
    fast_value = resample_to_grid(src, lps_like, perm_aff, (7, 13, 10), "linear", -5.0)
    assert (fast_value[:, :, -2:, :] == -5.0).all()


def _general(src, src_aff, dst_aff, shape, padding):
    from preprocessing.resample import _resample_by_grid_sample

    return _resample_by_grid_sample(src, np.linalg.inv(src_aff) @ dst_aff, shape, "linear", padding)


def test_constant_padding_value_and_multichannel_half(monkeypatch):
    import preprocessing.resample as rs

    monkeypatch.setattr(rs, "_MAX_GRID_VOXELS", 50)  # force slab-wise grids
    src = torch.from_numpy(np.stack([_smooth_volume((9, 8, 6), s) for s in range(3)]))
    dst_aff = OBLIQUE.copy()
    dst_aff[:3, 3] -= OBLIQUE[:3, 0] * 3.5  # half the grid lies before the source along i
    out = resample_to_grid(src, OBLIQUE, dst_aff, (9, 8, 6), "linear", -1000.0)
    assert out.shape == (3, 9, 8, 6)
    assert (out[:, :2] == -1000.0).all()
    torch.testing.assert_close(out[:, 4:], src[:, :5] * 0.5 + src[:, 1:6] * 0.5, atol=1e-5, rtol=0)
    half = resample_to_grid(src.half(), OBLIQUE, dst_aff, (9, 8, 6), "linear", -1000.0)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, atol=0.5, rtol=1e-2)


def test_target_grid_covers_field_of_view_and_is_ras_aligned():
    aff, shape = target_grid(OBLIQUE, (30, 26, 14), (1.0, 1.5, 2.0))
    np.testing.assert_allclose(aff[:3, :3], np.diag([1.0, 1.5, 2.0]))
    last = np.array([29, 25, 13])
    corners = np.array([[a, b, c, 1] for a in (0, last[0]) for b in (0, last[1]) for c in (0, last[2])])
    idx = (np.linalg.inv(aff) @ OBLIQUE @ corners.T)[:3].T
    assert idx.min() >= -1e-6 and np.all(idx.max(axis=0) <= np.array(shape) - 1 + 1e-6)
    # A RAS-aligned source at the target spacing maps onto itself.
    ras = _affine(np.eye(3), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0))
    aff2, shape2 = target_grid(ras, (10, 11, 12), (1.0, 1.5, 2.0))
    np.testing.assert_allclose(aff2, ras, atol=1e-9)
    assert shape2 == (10, 11, 12)


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        resample_to_grid(torch.zeros(4, 4, 4), np.eye(4), np.eye(4), (4, 4, 4))
    with pytest.raises(ValueError):
        resample_to_grid(torch.zeros(1, 4, 4, 4), np.eye(4), np.eye(4), (4, 4, 4), mode="cubic")
    with pytest.raises(ValueError):
        target_grid(np.eye(4), (4, 4, 4), (1.0, 0.0, 1.0))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    src = torch.from_numpy(_smooth_volume((30, 26, 14)))[None]
    dst_aff, dst_shape = target_grid(OBLIQUE, src.shape[1:], (1.5, 1.1, 2.0))
    cpu = resample_to_grid(src, OBLIQUE, dst_aff, dst_shape)
    gpu = resample_to_grid(src.cuda(), OBLIQUE, dst_aff, dst_shape)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    gpu_half = resample_to_grid(src.cuda().half(), OBLIQUE, dst_aff, dst_shape)
    torch.testing.assert_close(gpu_half.float().cpu(), cpu, atol=2e-2, rtol=0)
