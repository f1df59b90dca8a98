"""QC flags of a predicted case, each with a reason, and the risk score that orders the review queue.

:func:`flag_case` holds a case's :class:`~pipeline.qc_reference.CaseMeasurements` (on its predicted
labels) against the training fingerprint (:class:`~pipeline.qc_reference.QcReference`) and its
uncertainty score. The flags (:data:`FLAG_NAMES`, fixed identifiers: they may go to MLflow, the
reasons stay in the output folder):

- ``empty_label``: a label that nearly every training case has (>= 90 %) is absent;
- ``volume_outlier``: a present label's volume outside the training ``[min, max]`` widened to
  ``[min x 0.5, max x 2]``;
- ``component_outlier``: more connected components than the training maximum + 2;
- ``touches_border``: a label has >= 20 voxels on the field-of-view boundary (cut by it); needs no
  reference;
- ``high_uncertainty``: the case's uncertainty score above the out-of-fold 95th percentile;
- ``intensity_mismatch``: an image intensity percentile (p1, p50, p99) outside the training range of
  that percentile widened by 10 % of the training's p1..p99 span, or a label's mean intensity more
  than 3 within-label stds from training (inverted contrast, another phase or modality);
- ``spacing_out_of_range``: a voxel spacing (sorted smallest first) outside the training range
  widened to ``[min / 1.5, max x 1.5]``.

One flag per name and case; its reason lists every label that raised it. The margins are the
fields of :class:`QcThresholds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.qc_reference import CaseMeasurements, QcReference

#: Weight of each flag in :func:`risk_score`, and the fixed flag names (in this order).
FLAG_WEIGHTS: dict[str, float] = {
    "empty_label": 3.0,
    "intensity_mismatch": 3.0,
    "volume_outlier": 2.0,
    "high_uncertainty": 2.0,
    "component_outlier": 1.0,
    "touches_border": 1.0,
    "spacing_out_of_range": 1.0,
}
FLAG_NAMES: tuple[str, ...] = tuple(FLAG_WEIGHTS)


@dataclass(frozen=True)
class QcFlag:
    """One reason to look at a case: ``name`` from :data:`FLAG_NAMES`, ``reason`` says what was
    measured against what (label names and numbers only)."""

    name: str
    reason: str


@dataclass(frozen=True)
class QcThresholds:
    """The margins of the flags (the defaults are the ones documented in this module)."""

    empty_presence: float = 0.9
    volume_low: float = 0.5
    volume_high: float = 2.0
    component_margin: int = 2
    border_min_voxels: int = 20
    intensity_margin: float = 0.1
    label_intensity_stds: float = 3.0
    label_intensity_min_voxels: int = 20
    spacing_factor: float = 1.5


def flag_case(
    measurements: CaseMeasurements,
    reference: QcReference | None,
    uncertainty_score: float | None,
    thresholds: QcThresholds = QcThresholds(),
) -> tuple[QcFlag, ...]:
    """The QC flags of one case, in :data:`FLAG_NAMES` order.

    Args:
        measurements: the case measured on its predicted labels (source grid).
        reference: the bundle's training fingerprint; ``None`` (an older bundle): only the flags
            that need none (``touches_border``) run.
        uncertainty_score: the case's uncertainty score (``None``: not computed).
        thresholds: the margins.
    """
    found: dict[str, list[str]] = {}
    _touches_border(measurements, thresholds, found)
    if reference is not None:
        _label_flags(measurements, reference, thresholds, found)
        _image_flags(measurements, reference, thresholds, found)
        p95 = reference.uncertainty_p95
        if uncertainty_score is not None and p95 is not None and uncertainty_score > p95:
            found.setdefault("high_uncertainty", []).append(
                f"uncertainty score {uncertainty_score:.3f} > out-of-fold p95 {p95:.3f}"
            )
    return tuple(QcFlag(name, "; ".join(found[name])) for name in FLAG_NAMES if name in found)


def risk_score(flags: Iterable[QcFlag], uncertainty_score: float | None) -> float:
    """``sum(FLAG_WEIGHTS[flag.name] for each flag) + uncertainty score`` (0 when not computed).

    The weights put flags that usually mean a wrong result (an empty organ, another contrast) above
    those that often are benign (a cut at the field of view); the score in ``[0, 1]`` orders cases
    with the same flags. Unknown flag names (a newer version's) weigh 1.
    """
    total = sum(FLAG_WEIGHTS.get(flag.name, 1.0) for flag in flags)
    if uncertainty_score is not None and math.isfinite(uncertainty_score):
        total += float(uncertainty_score)
    return round(total, 4)


def top_flag(flags: Iterable[QcFlag]) -> QcFlag | None:
    """The flag with the largest weight (the first of equals), or ``None``."""
    ordered = sorted(flags, key=lambda f: -FLAG_WEIGHTS.get(f.name, 1.0))
    return ordered[0] if ordered else None


def _touches_border(m: CaseMeasurements, t: QcThresholds, found: dict[str, list[str]]) -> None:
    for name, label in m.labels.items():
        if label.border_voxels >= t.border_min_voxels:
            found.setdefault("touches_border", []).append(
                f"{name}: {label.border_voxels} voxels on the field-of-view boundary (>= {t.border_min_voxels})"
            )


def _label_flags(m: CaseMeasurements, ref: QcReference, t: QcThresholds, found: dict[str, list[str]]) -> None:
    for name, label in m.labels.items():
        known = ref.labels.get(name)
        if known is None:
            continue
        if not label.present:
            if known.present_fraction >= t.empty_presence:
                found.setdefault("empty_label", []).append(
                    f"{name}: absent, present in {known.present_fraction:.0%} of training cases"
                )
            continue
        lo, hi = known.volume_ml[0] * t.volume_low, known.volume_ml[1] * t.volume_high
        if known.present_fraction > 0 and not lo <= label.volume_ml <= hi:
            found.setdefault("volume_outlier", []).append(
                f"{name}: {label.volume_ml:.1f} mL outside training [{known.volume_ml[0]:.1f}, "
                f"{known.volume_ml[1]:.1f}] mL widened to [{lo:.1f}, {hi:.1f}]"
            )
        if label.components > known.components_max + t.component_margin:
            found.setdefault("component_outlier", []).append(
                f"{name}: {label.components} components > training max {known.components_max}"
                f" + {t.component_margin}"
            )
        scale = known.intensity_std
        if label.voxels >= t.label_intensity_min_voxels and math.isfinite(scale) and scale > 0:
            off = abs(label.intensity_mean - known.intensity_mean) / scale
            if off > t.label_intensity_stds:
                found.setdefault("intensity_mismatch", []).append(
                    f"{name}: mean intensity {label.intensity_mean:.1f} vs training {known.intensity_mean:.1f}"
                    f" ({off:.1f} within-label stds > {t.label_intensity_stds:g})"
                )


def _image_flags(m: CaseMeasurements, ref: QcReference, t: QcThresholds, found: dict[str, list[str]]) -> None:
    margin = t.intensity_margin * ref.intensity_span
    for key, (lo, hi) in ref.intensity.items():
        value = m.intensity.get(key)
        if value is not None and not lo - margin <= value <= hi + margin:
            found.setdefault("intensity_mismatch", []).append(
                f"image intensity {key} {value:.1f} outside training [{lo:.1f}, {hi:.1f}] +- {margin:.1f}"
            )
    spacing = sorted(m.spacing_mm)
    for axis, (value, (lo, hi)) in enumerate(zip(spacing, ref.spacing_mm, strict=False)):
        low, high = lo / t.spacing_factor, hi * t.spacing_factor
        if not low <= value <= high:
            found.setdefault("spacing_out_of_range", []).append(
                f"spacing #{axis + 1} (sorted) {value:.2f} mm outside training [{lo:.2f}, {hi:.2f}] mm"
                f" widened to [{low:.2f}, {high:.2f}]"
            )
