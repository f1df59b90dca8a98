"""Temperature scaling and ECE (pipeline.calibration) and the out-of-fold pooling of the folds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax

from pipeline.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    load_samples,
    nll,
    sample_voxels,
    save_samples,
)
from pipeline.training.out_of_fold import calibrate_folds


def _toy(n: int = 20000, k: int = 3, scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits from which the labels are drawn (a calibrated model at scale 1), times ``scale``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, k))
    u = rng.random(n)[:, None]
    labels = (u > np.cumsum(softmax(logits, axis=1), axis=1)).sum(axis=1)
    return (logits * scale).astype(np.float32), np.minimum(labels, k - 1).astype(np.uint8)


def test_ece_by_hand():
    # confidences 0.9, 0.9 (one bin; correct: yes, no) and 0.6, 0.55 (both correct)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    # 0.9-bin: |1 - 1.8| = 0.8; the others |1 - 0.6| + |1 - 0.55| (one bin or two: same sum)
    assert expected_calibration_error(p, y, bins=15) == pytest.approx((0.8 + 0.4 + 0.45) / 4)
    # one bin: |accuracy - mean confidence| = |0.75 - 0.7375|
    assert expected_calibration_error(p, y, bins=1) == pytest.approx(abs(0.75 - 0.7375))
    # two bins (0, 0.5], (0.5, 1]: all in the upper one
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(abs(0.75 - 0.7375))
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int)))


def test_ece_matches_a_plain_loop():
    rng = np.random.default_rng(5)
    p = softmax(rng.normal(0, 2, size=(500, 4)), axis=1)
    y = rng.integers(0, 4, 500)
    conf, hit = p.max(axis=1), p.argmax(axis=1) == y
    expected = 0.0
    for b in range(15):
        inside = (conf > b / 15) & (conf <= (b + 1) / 15)
        if inside.any():
            expected += inside.sum() / 500 * abs(hit[inside].mean() - conf[inside].mean())
    assert expected_calibration_error(p, y) == pytest.approx(expected, abs=1e-12)


def test_over_confident_model_gets_t_above_one_and_lower_ece():
    logits, labels = _toy(scale=10.0)
    result = calibrate(logits, labels)
    assert result["temperature"] > 5.0  # the true factor is 10
    assert result["temperature"] == pytest.approx(10.0, rel=0.15)
    assert result["ece_after"] < result["ece_before"] / 3
    assert result["bins"] == 15 and result["voxels"] == len(labels)
    t = result["temperature"]
    assert nll(logits, labels, t) < min(
        nll(logits, labels, 1.0), nll(logits, labels, t * 1.2), nll(logits, labels, t / 1.2)
    )


def test_calibrated_model_keeps_t_near_one_and_under_confident_gets_t_below_one():
    logits, labels = _toy(seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)
    assert fit_temperature(logits * 0.25, labels) < 0.4
    assert calibrate(np.zeros((0, 3), np.float32), np.zeros(0, np.uint8)) == {}


def test_sample_voxels_is_seeded_bounded_and_aligned():
    logits = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    labels = np.arange(120).reshape(4, 5, 6) % 2
    x, y = sample_voxels(logits, labels, 50, seed=3)
    assert x.shape == (50, 2) and y.shape == (50,) and x.dtype == np.float32 and y.dtype == np.uint8
    flat = x[:, 0].astype(int)  # channel 0's logit is the flat voxel index
    np.testing.assert_array_equal(y, flat % 2)
    np.testing.assert_array_equal(x[:, 1], flat + 120)
    x2, _ = sample_voxels(logits, labels, 50, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, sample_voxels(logits, labels, 50, seed=4)[0])
    assert sample_voxels(logits, labels, 1000, seed=0)[0].shape == (120, 2)
    with pytest.raises(ValueError, match="do not match"):
        sample_voxels(logits, labels[:2], 10, seed=0)


def test_folds_pool_their_saved_samples(tmp_path):
    a, ya = _toy(n=6000, scale=10.0, seed=2)
    b, yb = _toy(n=6000, scale=10.0, seed=3)
    save_samples(tmp_path / "a.npz", a, ya)
    save_samples(tmp_path / "b.npz", b, yb)
    x, y = load_samples(tmp_path / "a.npz")
    np.testing.assert_array_equal(x, a)
    np.testing.assert_array_equal(y, ya)
    pooled = calibrate_folds([str(tmp_path / "a.npz"), "", str(tmp_path / "b.npz")])
    assert pooled == calibrate(np.concatenate([a, b]), np.concatenate([ya, yb]))
    assert calibrate_folds(["", str(tmp_path / "missing.npz")]) == {}
