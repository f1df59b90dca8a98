"""Validation during training: whole-volume sliding-window inference and Dice per label.

Uses the project's one sliding-window engine (``pipeline.inference.sliding_window.predict_probabilities``),
the same code path batch prediction uses, on volumes preprocessed by the validation chain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from torch import nn

from pipeline.inference.config import InferenceConfig
from pipeline.inference.postprocessing import OofDice, keep_largest_component
from pipeline.inference.sliding_window import predict_probabilities, sliding_window_logits
from pipeline.training.checkpoint import load_checkpoint


@dataclass(frozen=True)
class ValidationCase:
    """A preprocessed validation volume: image ``(C, X, Y, Z)`` float32, label ``(X, Y, Z)`` uint8, RAS affine."""

    case_id: str
    image: torch.Tensor
    label: np.ndarray
    affine_ras: np.ndarray


@dataclass
class ValidationResult:
    """Mean foreground Dice over labels (each label averaged over cases) and the first case's prediction.

    ``oof_dice`` (only with ``validate(..., largest_component=True)``): per case, per label, the
    Dice ``{"without": ..., "with": ...}`` keeping only the largest connected component, the
    input of the per-label post-processing decision (``pipeline.inference.postprocessing``).
    """

    mean_dice: float
    per_label: dict[str, float]
    per_case: dict[str, dict[str, float]] = field(default_factory=dict)
    first_prediction: np.ndarray | None = None
    oof_dice: OofDice = field(default_factory=dict)


#: ``on_case(case, logits (K, X, Y, Z), probabilities (K, X, Y, Z), prediction (X, Y, Z) uint8)``:
#: what :func:`validate` hands out per case when asked (the out-of-fold calibration and uncertainty).
CaseHook = Callable[[ValidationCase, torch.Tensor, torch.Tensor, np.ndarray], None]


def dice_per_label(pred: np.ndarray, gt: np.ndarray, labels: Mapping[int, str]) -> dict[str, float]:
    """Dice of each foreground label ``(X, Y, Z)`` maps, MONAI ``compute_dice``.

    Same empty-mask convention as ``pipeline.metrics``: both empty -> 1, one empty -> 0. (The
    full ``segmentation_metrics`` also computes surface distances, too slow for every epoch.)
    """
    out = {}
    for value, name in labels.items():
        p, g = pred == value, gt == value
        if not p.any() and not g.any():
            out[name] = 1.0
            continue
        y_pred = torch.from_numpy(p.astype(np.float32))[None, None]
        y = torch.from_numpy(g.astype(np.float32))[None, None]
        out[name] = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False).item())
    return out


def validate(
    model: nn.Module,
    cases: Sequence[ValidationCase],
    labels: Mapping[int, str],
    config: InferenceConfig,
    largest_component: bool = False,
    on_case: CaseHook | None = None,
) -> ValidationResult:
    """Segment every validation case with ``model`` and score it.

    Args:
        model: the network (switched to eval mode here and back to train mode after).
        cases: preprocessed validation volumes.
        labels: foreground label value -> name.
        config: sliding-window settings (ROI = plan patch size).
        largest_component: also score each label with only its largest connected component
            kept (``ValidationResult.oof_dice``). One label's component removal turns voxels
            into background only, so cleaning all labels at once gives each label's Dice as if
            it alone were cleaned.
        on_case: called per case with its logits, probabilities and prediction (see
            :data:`CaseHook`); the logits cost one more sweep only when ``config.tta`` is on.
    """
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    oof: OofDice = {}
    first = None
    try:
        for case in cases:
            probs, logits = _case_outputs(model, case, config, on_case is not None)
            pred = torch.argmax(probs, dim=0).to(torch.uint8).cpu().numpy()
            if first is None:
                first = pred
            per_case[case.case_id] = dice_per_label(pred, case.label, labels)
            if largest_component:
                cleaned = dice_per_label(keep_largest_component(pred, list(labels)), case.label, labels)
                oof[case.case_id] = {
                    name: {"without": per_case[case.case_id][name], "with": cleaned[name]}
                    for name in labels.values()
                }
            if on_case is not None and logits is not None:
                on_case(case, logits, probs, pred)
    finally:
        model.train(was_training)
    per_label = {name: float(np.mean([d[name] for d in per_case.values()])) for name in labels.values()}
    mean = float(np.mean(list(per_label.values()))) if per_label else math.nan
    return ValidationResult(mean, per_label, per_case, first, oof)


def _case_outputs(
    model: nn.Module, case: ValidationCase, config: InferenceConfig, want_logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities ``(K, X, Y, Z)`` of one case, and its logits when asked for.

    Without TTA the engine's probabilities are the softmax of the blended logits (the same sweep,
    bit for bit), so the logits come for free; with TTA they need a sweep of their own.
    """
    if not want_logits:
        return predict_probabilities(case.image, [model], config), None
    logits = sliding_window_logits(case.image[None], model, config)[0]
    if config.tta:
        return predict_probabilities(case.image, [model], config), logits
    scaled = logits / config.temperature if config.temperature != 1.0 else logits
    return torch.softmax(scaled, dim=0), logits


def out_of_fold_dice(
    model: nn.Module,
    best: Path,
    cases: Sequence[ValidationCase],
    labels: Mapping[int, str],
    inference: InferenceConfig,
    on_case: CaseHook | None = None,
) -> OofDice:
    """The best checkpoint's Dice on the fold's validation cases, without and with largest component.

    One more pass of the validation engine with the best weights (the epoch loop's model holds
    the last epoch's): the out-of-fold predictions on which ``medseg train`` decides the
    post-processing per label. Loads the best weights into ``model``. ``on_case`` as in
    :func:`validate` (the calibration voxels and uncertainty scores of these predictions).
    """
    if not cases or not best.is_file():
        return {}
    model.load_state_dict(load_checkpoint(best, map_location=inference.device)["model"])
    return validate(model, cases, labels, inference, largest_component=True, on_case=on_case).oof_dice
