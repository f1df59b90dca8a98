"""Temperature scaling of the network's logits and the expected calibration error (ECE).

Training fits one temperature ``T > 0`` on the pooled out-of-fold validation voxels (a seeded
subsample of each validation case, :func:`sample_voxels`) by minimising the negative
log-likelihood of ``softmax(logits / T)`` (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017); inference divides the logits by ``T`` before the softmax
(``InferenceConfig.temperature``).

One scalar, not one temperature per class: a scalar ``T`` keeps the argmax of every voxel, so
calibration changes the probabilities and the uncertainty but never a mask or a Dice score; a
per-class vector would move decision boundaries that the post-processing decision and the
cross-validation Dice were measured on, for a gain in NLL that the per-case review does not need.
The NLL of ``logits * b`` is convex in ``b = 1/T``, so a bounded 1-D search finds its minimum.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from preprocessing.atomic import atomic_path

#: Equal-width bins of the maximum probability for the ECE.
ECE_BINS = 15
#: Search range of the temperature (beyond it the model is broken, not mis-calibrated).
T_RANGE = (0.05, 20.0)


def sample_voxels(
    logits: torch.Tensor, labels: np.ndarray, max_voxels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform subsample of a case's voxels (bounded memory for the pooled fit).

    Args:
        logits: ``(K, X, Y, Z)`` float logits of one network (any device).
        labels: ``(X, Y, Z)`` integer reference labels on the same grid.
        max_voxels: at most this many voxels (all of them when the case has fewer).
        seed: seed of the draw (the same case and seed give the same voxels).

    Returns:
        ``(n, K)`` float32 logits and ``(n,)`` uint8 labels.
    """
    k = logits.shape[0]
    if tuple(logits.shape[1:]) != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {labels.shape}")
    n = labels.size
    idx = np.arange(n)
    if n > max_voxels:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_voxels, replace=False))
    flat = logits.detach().reshape(k, -1)
    picked = flat[:, torch.from_numpy(idx).to(flat.device)].float().cpu().numpy().T
    return np.ascontiguousarray(picked, dtype=np.float32), labels.reshape(-1)[idx].astype(np.uint8)


def save_samples(path: str | Path, logits: np.ndarray, labels: np.ndarray) -> None:
    """Write ``(n, K)`` logits and ``(n,)`` labels atomically (``.npz``)."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, logits=logits.astype(np.float32), labels=labels.astype(np.uint8))


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``(logits, labels)`` written by :func:`save_samples`."""
    with np.load(path) as data:
        return data["logits"], data["labels"]


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins of the maximum probability (confidence).

    ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``; bin ``b`` holds the confidences
    in ``(b/bins, (b+1)/bins]`` (the first bin also holds 0).

    Args:
        probabilities: ``(n, K)`` class probabilities per voxel.
        labels: ``(n,)`` reference class per voxel.
        bins: number of bins.
    """
    if len(labels) == 0:
        return math.nan
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(
        np.bincount(which, weights=correct, minlength=bins)
        - np.bincount(which, weights=confidence, minlength=bins)
    )
    return float(gap.sum() / len(labels)) if count.sum() else math.nan


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` at ``labels``."""
    logp = log_softmax(logits.astype(np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels.astype(np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in :data:`T_RANGE` minimising :func:`nll` (bounded search on ``log T``)."""
    lo, hi = (math.log(t) for t in T_RANGE)
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def calibrate(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Fit the temperature and measure the ECE before and after (the bundle's ``calibration``).

    Args:
        logits: ``(n, K)`` pooled out-of-fold logits.
        labels: ``(n,)`` their reference classes.
        bins: ECE bins.

    Returns:
        ``{"temperature", "ece_before", "ece_after", "bins", "voxels"}``; ``{}`` without voxels.
    """
    if len(labels) == 0:
        return {}
    temperature = fit_temperature(logits, labels)
    before = expected_calibration_error(softmax(logits.astype(np.float64), axis=1), labels, bins)
    after = expected_calibration_error(softmax(logits.astype(np.float64) / temperature, axis=1), labels, bins)
    return {
        "temperature": round(temperature, 6),
        "ece_before": round(before, 6),
        "ece_after": round(after, 6),
        "bins": bins,
        "voxels": len(labels),
    }
