"""What one case looks like in numbers, and the training fingerprint that predicted cases are held against.

:func:`measure_case` turns an image and its label map (source grid) into :class:`CaseMeasurements`:
per label the volume, the number of connected components, the intensity mean/std inside it and the
voxels it has on the field-of-view boundary; for the image its spacing, field of view and intensity
percentiles. Training measures every training case on its reference labels and
:func:`build_qc_reference` condenses them (with the out-of-fold uncertainty scores) into a
:class:`QcReference`, stored in ``bundle.json`` under ``"qc_reference"`` (:meth:`QcReference.to_json`).
Prediction measures each case on its predicted labels and :func:`pipeline.qc_flags.flag_case`
compares the two.

Nothing here holds a case id, a path or free text: only label names and numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

#: Format of :meth:`QcReference.to_json` (bumped when its keys change meaning).
QC_REFERENCE_FORMAT = 1
#: Intensity percentiles are taken on at most this many voxels (a regular stride through the image):
#: exact enough for a fingerprint, and a 512x512x400 CT costs milliseconds, not seconds.
_MAX_PERCENTILE_SAMPLES = 2_000_000
_PERCENTILES = {"p1": 1.0, "p50": 50.0, "p99": 99.0}
# 26-connectivity: a structure that touches itself at a corner is one structure.
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LabelMeasurements:
    """One label of one case.

    Attributes:
        voxels: number of voxels with this label.
        volume_ml: their volume in mL.
        components: connected components (26-connectivity); 0 when the label is absent.
        intensity_mean / intensity_std: image intensity inside the label (channel 0; NaN when absent).
        border_voxels: label voxels on the six faces of the field of view (a structure cut by it).
    """

    voxels: int
    volume_ml: float
    components: int
    intensity_mean: float
    intensity_std: float
    border_voxels: int

    @property
    def present(self) -> bool:
        return self.voxels > 0

    @property
    def touches_border(self) -> bool:
        """Any voxel on the boundary (:mod:`pipeline.qc_flags` flags it from a minimum count on)."""
        return self.border_voxels > 0


@dataclass(frozen=True)
class CaseMeasurements:
    """One case: the image's geometry and intensities, and each label.

    Attributes:
        spacing_mm: voxel spacing along X, Y, Z of the source grid (mm).
        fov_mm: field of view along X, Y, Z (shape x spacing, mm).
        intensity: ``{"p1", "p50", "p99"}`` -> image intensity percentile (channel 0, whole image).
        labels: label name -> :class:`LabelMeasurements` (every label of the model, present or not).
    """

    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    intensity: dict[str, float]
    labels: dict[str, LabelMeasurements] = field(default_factory=dict)


def measure_case(
    image: np.ndarray,
    labels: np.ndarray,
    spacing_mm: tuple[float, float, float],
    label_names: Mapping[int, str],
) -> CaseMeasurements:
    """Measure a case on its own (source) grid.

    Args:
        image: ``float (X, Y, Z)`` intensities (channel 0: HU for CT, scanner units for MR).
        labels: ``int (X, Y, Z)`` label map on the same grid (predicted or reference).
        spacing_mm: voxel spacing along X, Y, Z in mm.
        label_names: foreground label value -> name (background 0 excluded).

    Returns:
        The case's :class:`CaseMeasurements`.
    """
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} are not on one grid")
    values = np.asarray(image, dtype=np.float64).ravel()
    flat = np.asarray(labels).ravel().astype(np.int64)
    size = max([*label_names, int(flat.max(initial=0))]) + 1
    counts = np.bincount(flat, minlength=size)
    sums = np.bincount(flat, weights=values, minlength=size)
    squares = np.bincount(flat, weights=values * values, minlength=size)
    border = np.bincount(_faces(np.asarray(labels)).astype(np.int64), minlength=size)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    measured = {}
    for value, name in label_names.items():
        n = int(counts[value])
        mean = float(sums[value] / n) if n else math.nan
        var = float(squares[value] / n - mean * mean) if n else math.nan
        measured[name] = LabelMeasurements(
            voxels=n,
            volume_ml=round(n * voxel_ml, 3),
            components=_components(np.asarray(labels) == value) if n else 0,
            intensity_mean=mean,
            intensity_std=math.sqrt(max(var, 0.0)) if n else math.nan,
            border_voxels=int(border[value]),
        )
    step = max(1, values.size // _MAX_PERCENTILE_SAMPLES)
    percentiles = np.percentile(values[::step], list(_PERCENTILES.values()))
    spacing = tuple(float(s) for s in spacing_mm)
    return CaseMeasurements(
        spacing_mm=spacing,  # type: ignore[arg-type]
        fov_mm=tuple(float(n) * s for n, s in zip(labels.shape, spacing, strict=True)),  # type: ignore[arg-type]
        intensity={k: float(v) for k, v in zip(_PERCENTILES, percentiles, strict=True)},
        labels=measured,
    )


def _faces(labels: np.ndarray) -> np.ndarray:
    """Labels of the voxels on the six faces, flattened (edge voxels appear on two faces)."""
    return np.concatenate(
        [labels[i].ravel() for i in (0, -1)]
        + [labels[:, j].ravel() for j in (0, -1)]
        + [labels[:, :, k].ravel() for k in (0, -1)]
    )


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=_CONNECTIVITY)[1])


@dataclass(frozen=True)
class LabelReference:
    """One label over the training cases.

    Attributes:
        present_fraction: fraction of training cases that have the label.
        volume_ml: ``(min, max)`` volume over the cases that have it.
        components_max: most components in one training case.
        intensity_mean: mean over cases of the mean intensity inside the label.
        intensity_std: mean over cases of the intensity std inside the label (the within-label scale
            a case's mean is judged in).
    """

    present_fraction: float
    volume_ml: tuple[float, float]
    components_max: int
    intensity_mean: float
    intensity_std: float


@dataclass(frozen=True)
class QcReference:
    """The training fingerprint (:func:`build_qc_reference`), stored in the bundle.

    Attributes:
        cases: number of training cases measured.
        labels: label name -> :class:`LabelReference`.
        spacing_mm: ``(min, max)`` per spacing, sorted smallest first (so an axial and a sagittal
            grid of one scanner compare equal).
        fov_mm: ``(min, max)`` per field-of-view extent, sorted smallest first.
        intensity: ``"p1"/"p50"/"p99"`` -> ``(p1, p99)`` over cases of that per-case percentile.
        intensity_span: median over cases of ``p99 - p1`` (the scale intensity margins are taken in).
        uncertainty_p95: 95th percentile of the out-of-fold case uncertainty scores (None: none known).
    """

    cases: int
    labels: dict[str, LabelReference]
    spacing_mm: tuple[tuple[float, float], ...]
    fov_mm: tuple[tuple[float, float], ...]
    intensity: dict[str, tuple[float, float]]
    intensity_span: float
    uncertainty_p95: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``bundle.json["qc_reference"]``); NaN becomes ``None``."""
        return {
            "format": QC_REFERENCE_FORMAT,
            "cases": self.cases,
            "labels": {
                name: {
                    "present_fraction": ref.present_fraction,
                    "volume_ml": list(ref.volume_ml),
                    "components_max": ref.components_max,
                    "intensity_mean": _json_number(ref.intensity_mean),
                    "intensity_std": _json_number(ref.intensity_std),
                }
                for name, ref in self.labels.items()
            },
            "spacing_mm": [list(r) for r in self.spacing_mm],
            "fov_mm": [list(r) for r in self.fov_mm],
            "intensity": {k: list(v) for k, v in self.intensity.items()},
            "intensity_span": self.intensity_span,
            "uncertainty_p95": _json_number(self.uncertainty_p95),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QcReference:
        """The reference of :meth:`to_json` (raises ``ValueError`` for a dict of another format)."""
        if data.get("format") != QC_REFERENCE_FORMAT:
            raise ValueError(f"qc_reference format {data.get('format')!r} is not {QC_REFERENCE_FORMAT}")
        labels = {
            name: LabelReference(
                present_fraction=float(ref["present_fraction"]),
                volume_ml=_pair(ref["volume_ml"]),
                components_max=int(ref["components_max"]),
                intensity_mean=_number(ref["intensity_mean"]),
                intensity_std=_number(ref["intensity_std"]),
            )
            for name, ref in data["labels"].items()
        }
        p95 = data.get("uncertainty_p95")
        return cls(
            cases=int(data["cases"]),
            labels=labels,
            spacing_mm=tuple(_pair(r) for r in data["spacing_mm"]),
            fov_mm=tuple(_pair(r) for r in data["fov_mm"]),
            intensity={k: _pair(v) for k, v in data["intensity"].items()},
            intensity_span=float(data["intensity_span"]),
            uncertainty_p95=None if p95 is None else float(p95),
        )


def build_qc_reference(
    measurements: Sequence[CaseMeasurements], uncertainty_scores: Sequence[float] = ()
) -> QcReference:
    """Condense the training cases' measurements into the reference predicted cases are held against.

    Args:
        measurements: one per training case, measured on its reference labels.
        uncertainty_scores: out-of-fold case uncertainty scores (any NaN ignored; empty: no
            ``high_uncertainty`` flag later).
    """
    if not measurements:
        raise ValueError("build_qc_reference needs the measurements of at least one training case")
    names = list(dict.fromkeys(name for m in measurements for name in m.labels))
    labels = {
        name: _label_reference([m.labels[name] for m in measurements if name in m.labels]) for name in names
    }
    intensity = {
        key: _pair(np.percentile([m.intensity[key] for m in measurements], [1.0, 99.0]))
        for key in _PERCENTILES
    }
    spans = [m.intensity["p99"] - m.intensity["p1"] for m in measurements]
    scores = np.asarray([s for s in uncertainty_scores if s is not None and math.isfinite(s)], dtype=float)
    return QcReference(
        cases=len(measurements),
        labels=labels,
        spacing_mm=_sorted_ranges([m.spacing_mm for m in measurements]),
        fov_mm=_sorted_ranges([m.fov_mm for m in measurements]),
        intensity=intensity,
        intensity_span=float(np.median(spans)),
        uncertainty_p95=float(np.percentile(scores, 95.0)) if scores.size else None,
    )


def _label_reference(cases: list[LabelMeasurements]) -> LabelReference:
    present = [c for c in cases if c.present]
    return LabelReference(
        present_fraction=len(present) / len(cases) if cases else 0.0,
        volume_ml=(min(c.volume_ml for c in present), max(c.volume_ml for c in present))
        if present
        else (0.0, 0.0),
        components_max=max((c.components for c in cases), default=0),
        intensity_mean=float(np.mean([c.intensity_mean for c in present])) if present else math.nan,
        intensity_std=float(np.mean([c.intensity_std for c in present])) if present else math.nan,
    )


def _sorted_ranges(values: list[tuple[float, float, float]]) -> tuple[tuple[float, float], ...]:
    ordered = np.sort(np.asarray(values, dtype=float), axis=1)
    return tuple(
        (float(lo), float(hi)) for lo, hi in zip(ordered.min(axis=0), ordered.max(axis=0), strict=True)
    )


def _pair(values: Any) -> tuple[float, float]:
    lo, hi = values
    return float(lo), float(hi)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
