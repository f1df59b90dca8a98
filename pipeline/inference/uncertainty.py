"""Voxel-wise ensemble uncertainty, streamed over members, and its per-case summary.

Members are the fold networks x TTA mirrorings (``MemberOutput``). For member probabilities
``p_m`` (``m = 1..M``) and their mean ``p̄``, with natural logarithms:

- total uncertainty ``H[p̄] = -sum_k p̄_k log p̄_k`` (entropy of the mean, the predictive entropy);
- expected entropy ``E_m H[p_m]`` (aleatoric part);
- mutual information ``H[p̄] - E_m H[p_m]`` (>= 0, epistemic part: disagreement of members).

:class:`UncertaintyAccumulator` is exact and keeps only ``K + 1`` channels on the network grid
(the sum of the probabilities and the sum of the member entropies), never one tensor per member.
:func:`case_uncertainty` summarises the maps of a case per label and as one score in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

#: Channel order of the maps (``maps()[c]``, ``uncertainty.nii.gz[..., c]``).
UNCERTAINTY_CHANNELS: tuple[str, str, str] = ("total", "expected_entropy", "mutual_information")


class UncertaintyAccumulator:
    """Exact streamed ensemble uncertainty over ``(K, X', Y', Z')`` member probabilities.

    Holds the sum of the member probabilities (K channels) and the sum of the member entropies
    (1 channel), float32, on the device of the first member; :meth:`add` allocates at most one
    more channel temporarily.

    Args:
        num_classes: K, the number of classes (channels) of each member.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes = int(num_classes)
        self.members = 0
        self.sum_probabilities: torch.Tensor | None = None
        self.sum_entropy: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (``(K + 1) * voxels * 4`` once a member was added)."""
        held = (self.sum_probabilities, self.sum_entropy)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def add(self, probabilities: torch.Tensor) -> None:
        """Add one member's ``float (K, X', Y', Z')`` probabilities (not kept, not modified)."""
        if probabilities.ndim != 4 or int(probabilities.shape[0]) != self.num_classes:
            raise ValueError(
                f"expected ({self.num_classes}, X, Y, Z) probabilities; got shape {tuple(probabilities.shape)}"
            )
        if self.sum_probabilities is None:
            self.sum_probabilities = torch.zeros(probabilities.shape, dtype=torch.float32, device=probabilities.device)
            self.sum_entropy = torch.zeros(probabilities.shape[1:], dtype=torch.float32, device=probabilities.device)
        elif probabilities.shape != self.sum_probabilities.shape:
            raise ValueError(
                f"member shape {tuple(probabilities.shape)} differs from {tuple(self.sum_probabilities.shape)}"
            )
        assert self.sum_entropy is not None
        p = probabilities.to(self.sum_probabilities.device, torch.float32)
        self.sum_probabilities.add_(p)
        self.sum_entropy.add_(_entropy(p))
        self.members += 1

    def maps(self) -> torch.Tensor:
        """``float32 (3, X', Y', Z')``: total, expected entropy, mutual information (nats).

        Raises:
            ValueError: no member was added.
        """
        if self.sum_probabilities is None or self.sum_entropy is None:
            raise ValueError("UncertaintyAccumulator.maps() before any member was added")
        n = float(self.members)
        out = torch.empty((3, *self.sum_probabilities.shape[1:]), dtype=torch.float32, device=self.sum_entropy.device)
        out[0] = _entropy(self.sum_probabilities, scale=1.0 / n)
        torch.div(self.sum_entropy, n, out=out[1])
        # Jensen: H[mean] >= mean H; the clamp removes float round-off below zero.
        torch.sub(out[0], out[1], out=out[2]).clamp_(min=0.0)
        return out


def _entropy(p: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``-sum_k q_k log q_k`` with ``q = scale * p`` of ``(K, ...)``, channel by channel.

    Never more than two extra channels of memory (no K-channel temporary).
    """
    out = torch.zeros(p.shape[1:], dtype=torch.float32, device=p.device)
    for k in range(int(p.shape[0])):
        q = p[k] * scale if scale != 1.0 else p[k]
        out.add_(torch.special.entr(q))
    return out


@dataclass(frozen=True)
class CaseUncertainty:
    """The uncertainty summary of one case (from :func:`case_uncertainty`).

    Attributes:
        score: mean normalised total uncertainty over the predicted foreground and its one-voxel
            outer shell, in ``[0, 1]`` (see :func:`case_uncertainty`).
        mask_mean: label name -> mean total uncertainty (nats) inside the predicted mask (NaN
            when the label is absent).
        boundary_mean: label name -> mean total uncertainty (nats) on the mask's one-voxel
            surface (NaN when the label is absent).
    """

    score: float
    mask_mean: dict[str, float] = field(default_factory=dict)
    boundary_mean: dict[str, float] = field(default_factory=dict)


def case_uncertainty(
    labels: np.ndarray, maps: np.ndarray, label_names: Mapping[int, str]
) -> CaseUncertainty:
    """Per-label means of the total uncertainty and a per-case score.

    Score: the total uncertainty (channel 0) divided by its maximum ``log K`` (``K`` = the
    foreground labels + background) and averaged over the predicted foreground dilated by one
    voxel (the mask plus its outer shell, where boundary errors sit); over the whole image when
    nothing is predicted. Clipped to ``[0, 1]``: 0 = every member certain, 1 = uniform.

    Args:
        labels: ``uint8 (X, Y, Z)`` predicted label map on the source grid.
        maps: ``float (X, Y, Z, 3)`` uncertainty maps on the same grid (channels
            :data:`UNCERTAINTY_CHANNELS`).
        label_names: foreground label value -> name.

    Returns:
        :class:`CaseUncertainty` (values rounded to 1e-6).
    """
    from scipy import ndimage  # heavy-ish; only when a case is summarised

    if maps.shape[:3] != labels.shape or maps.ndim != 4:
        raise ValueError(f"maps {maps.shape} do not match labels {labels.shape} + (3,)")
    total = maps[..., 0]
    mask_mean: dict[str, float] = {}
    boundary_mean: dict[str, float] = {}
    for value, name in label_names.items():
        mask = labels == value
        surface = mask & ~ndimage.binary_erosion(mask)
        mask_mean[name] = _mean(total, mask)
        boundary_mean[name] = _mean(total, surface)
    foreground = np.isin(labels, list(label_names))
    region = ndimage.binary_dilation(foreground) if foreground.any() else np.ones(labels.shape, dtype=bool)
    classes = max(len(label_names) + 1, max(label_names, default=0) + 1, 2)
    score = min(1.0, max(0.0, _mean(total, region) / math.log(classes)))
    return CaseUncertainty(round(score, 6), mask_mean, boundary_mean)


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return math.nan
    return round(float(values[where].mean(dtype=np.float64)), 6)
