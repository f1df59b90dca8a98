"""Streamed ensemble uncertainty equals the direct computation over stacked members; temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.inference.config import InferenceConfig
from pipeline.inference.member_output import MemberOutput
from pipeline.inference.segment import Segmenter
from pipeline.inference.sliding_window import predict_probabilities
from pipeline.inference.uncertainty import UncertaintyAccumulator, case_uncertainty
from preprocessing.image import Volume
from preprocessing.plan import ChannelNormalization, Plan
from tests.pipeline.inference.engine_cases import ROI, conv_net, random_image


def _direct_maps(members: torch.Tensor) -> torch.Tensor:
    """``(3, ...)`` from stacked ``(M, K, ...)`` member probabilities, the textbook way (float64)."""
    p = members.double()
    mean = p.mean(0)
    total = -(mean * torch.log(mean.clamp_min(1e-300))).sum(0)
    expected = -(p * torch.log(p.clamp_min(1e-300))).sum(1).mean(0)
    return torch.stack([total, expected, total - expected]).float()


def _plan(classes: int = 3) -> Plan:
    return Plan(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=ROI,
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "CT"},
        labels={0: "background", **{i: f"l{i}" for i in range(1, classes)}},
        network="test",
    )


def _volume() -> Volume:
    gen = np.random.default_rng(0)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-3.0, 4.0, 1.0]
    return Volume(gen.standard_normal((1, 30, 22, 14)).astype(np.float32), affine, case_id="toy")


def test_accumulator_equals_direct_computation_on_random_members():
    gen = torch.Generator().manual_seed(0)
    members = torch.softmax(3 * torch.randn(6, 4, 9, 7, 5, generator=gen), dim=1)
    members[0, :, 0, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # exact zeros: 0 log 0 = 0
    acc = UncertaintyAccumulator(4)
    for m in members:
        acc.add(m)
    maps = acc.maps()
    assert maps.dtype == torch.float32 and tuple(maps.shape) == (3, 9, 7, 5)
    torch.testing.assert_close(maps, _direct_maps(members), atol=1e-5, rtol=0)
    assert (maps[2] >= 0).all() and (maps[0] <= math.log(4) + 1e-6).all()
    assert acc.nbytes == (4 + 1) * 9 * 7 * 5 * 4  # K + 1 channels, whatever the member count


def test_accumulator_rejects_wrong_shapes_and_empty_maps():
    acc = UncertaintyAccumulator(3)
    with pytest.raises(ValueError, match="before any member"):
        acc.maps()
    with pytest.raises(ValueError, match="expected"):
        acc.add(torch.ones(2, 4, 4, 4) / 2)


def test_streamed_segmenter_maps_equal_stacked_members_of_folds_and_mirrors():
    """Toy case: 2 folds x 8 mirrors; the caller's hook runs too; labels equal the plain path."""
    plan, volume = _plan(), _volume()
    config = InferenceConfig(roi_size=ROI, tta=True, device="cpu", amp=False)
    segmenter = Segmenter(plan, [conv_net(seed=0), conv_net(seed=7)], {}, config)
    plain = segmenter(volume, keep_probabilities=True)
    members: list[MemberOutput] = []
    result = segmenter(volume, keep_probabilities=True, uncertainty=True, on_member=members.append)
    assert len(members) == 16 and plain.uncertainty is None
    assert result.uncertainty is not None and result.probabilities is not None
    stacked = torch.stack([m.probabilities.cpu() for m in members])
    torch.testing.assert_close(result.uncertainty, _direct_maps(stacked), atol=1e-5, rtol=0)
    assert float(result.uncertainty[2].max()) > 1e-3  # folds disagree: not vacuous
    torch.testing.assert_close(result.probabilities, plain.probabilities, atol=1e-5, rtol=1e-5)
    assert (result.labels == plain.labels).mean() > 0.999
    # The memory-budget path (one sweep per member) gives the same maps.
    tight = InferenceConfig(roi_size=ROI, tta=True, device="cpu", amp=False, max_accumulator_bytes=1)
    per_pass = Segmenter(plan, segmenter.networks, {}, tight)(volume, uncertainty=True)
    assert per_pass.uncertainty is not None
    torch.testing.assert_close(per_pass.uncertainty, result.uncertainty, atol=1e-5, rtol=0)
    on_source = result.uncertainty_on_source_grid(slab_voxels=30 * 22 * 3)
    assert on_source.shape == (*volume.spatial_shape, 3) and on_source.dtype == np.float32
    assert np.isfinite(on_source).all()
    np.testing.assert_allclose(on_source, plain_resampled(result), atol=1e-6)


def plain_resampled(segmentation) -> np.ndarray:
    from preprocessing.resample import resample_to_grid

    full = resample_to_grid(
        segmentation.uncertainty, segmentation.network_affine_ras, segmentation.affine_ras,
        segmentation.labels.shape, mode="linear",
    )
    return np.moveaxis(full.numpy(), 0, -1)


def test_single_member_model_has_zero_mutual_information():
    segmenter = Segmenter(_plan(), [conv_net(seed=0)], {}, InferenceConfig(roi_size=ROI, device="cpu", amp=False))
    result = segmenter(_volume(), uncertainty=True)
    assert result.uncertainty is not None
    assert float(result.uncertainty[2].abs().max()) < 1e-6
    torch.testing.assert_close(result.uncertainty[0], result.uncertainty[1], atol=1e-5, rtol=0)
    assert float(result.uncertainty[0].mean()) > 0.01  # a real entropy, not zeros


def test_temperature_one_is_bit_identical_and_temperature_divides_logits():
    image = random_image()[0]
    net = conv_net()
    base = InferenceConfig(roi_size=ROI, device="cpu", amp=False)
    plain = predict_probabilities(image, [net], base)
    same = predict_probabilities(image, [net], InferenceConfig(roi_size=ROI, device="cpu", amp=False, temperature=1.0))
    assert torch.equal(plain, same)
    from pipeline.inference.sliding_window import sliding_window_logits

    logits = sliding_window_logits(image[None], net, base)[0]
    hot = predict_probabilities(image, [net], InferenceConfig(roi_size=ROI, device="cpu", amp=False, temperature=2.5))
    torch.testing.assert_close(hot, torch.softmax(logits / 2.5, dim=0), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        InferenceConfig(temperature=0.0)


def test_case_uncertainty_means_boundary_and_score():
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:9, 3:9, 3:9] = 1  # 6^3 cube: 4^3 interior, 152 surface voxels
    maps = np.zeros((12, 12, 12, 3), np.float32)
    maps[..., 0] = 0.2
    maps[4:8, 4:8, 4:8, 0] = 0.1  # the interior
    result = case_uncertainty(labels, maps, {1: "liver", 2: "kidney"})
    assert result.boundary_mean["liver"] == pytest.approx(0.2, abs=1e-6)
    assert result.mask_mean["liver"] == pytest.approx((64 * 0.1 + 152 * 0.2) / 216, abs=1e-6)
    assert math.isnan(result.mask_mean["kidney"]) and math.isnan(result.boundary_mean["kidney"])
    region = 216 + 6 * 36  # the cube dilated by one voxel (face neighbours): its 6 faces grow
    expected = (64 * 0.1 + (region - 64) * 0.2) / region / math.log(3)
    assert result.score == pytest.approx(expected, abs=1e-5)
    assert 0.0 <= case_uncertainty(labels, np.full_like(maps, 9.0), {1: "liver"}).score <= 1.0
