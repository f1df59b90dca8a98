"""Per-label segmentation metrics in millimetres, and their summary over cases.

All overlap and distance metrics come from MONAI (``monai.metrics``); this module only binarises
the label maps, applies the empty-mask conventions below and computes volumes.

Definitions (checked against medpy 0.5.2 and DeepMind ``surface-distance`` 0.1 in the tests):

* **Surface** (HD95, ASSD): the voxels of a mask that are removed by one binary erosion with the
  6-connected cross (``mask XOR erode(mask)``), as in MONAI and medpy. Distances are Euclidean
  between voxel centres scaled by the (anisotropic) spacing, so they are exact millimetres.
* **HD95**: ``max(P95(d(pred->gt)), P95(d(gt->pred)))``, MONAI's ``compute_hausdorff_distance(
  percentile=95)`` -- the same "max of the two directed percentiles" as DeepMind's
  ``compute_robust_hausdorff``. medpy's ``hd95`` takes the 95th percentile of the *pooled* distances
  instead, which is never larger than ours; the tests compare with medpy's directed distances.
* **ASSD**: mean of the pooled directed surface distances (MONAI ``compute_average_surface_distance(
  symmetric=True)``), i.e. Heimann et al. 2009's definition; identical to medpy's ``assd``.
  DeepMind reports the two directed means separately, on its own surfel surface.
* **NSD** (normalised surface Dice, Nikolov et al. 2021): MONAI ``compute_surface_dice`` with
  ``use_subvoxels=True``, which uses DeepMind's surfel areas on the dual grid. *Departure from
  MONAI's default*: its default (``use_subvoxels=False``) counts edge voxels, which weights a
  surface by voxel count rather than area and so depends on the anisotropy of the grid; the
  area-weighted version is the published definition and agrees with DeepMind's to float precision.
  The tolerance is in millimetres (MONAI's docstring says "pixels", but with ``spacing`` given the
  distances it compares against are millimetres).

Empty-mask conventions (``empty`` column: "both", "pred", "gt" or ""):

* both empty: Dice 1, IoU 1, HD95 0, ASSD 0, NSD 1 (a correct "absent").
* one empty: Dice 0, IoU 0, NSD 0 (no boundary is within tolerance), HD95 and ASSD NaN (a distance
  to an empty set is undefined; MONAI would return inf). Summaries exclude NaNs and count them.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from scipy import stats

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "assd", "nsd", "vol_pred_ml", "vol_gt_ml")


@dataclass(frozen=True)
class ReferenceMetrics:
    """One predicted label against its reference label, as a batch case row records it.

    A field added here becomes a ``<field>_<label>`` column of ``cases.csv`` and, when it is in
    :data:`METRIC_NAMES`, a statistic of ``summary.json`` and MLflow (no other edit).

    Attributes:
        dice: Dice coefficient, 0..1.
        hd95: 95th-percentile Hausdorff distance, mm (NaN when one mask is empty).
        nsd: normalised surface Dice at the batch's tolerance, 0..1.
    """

    dice: float
    hd95: float
    nsd: float

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The metric names, in column order (``dice``, ``hd95``, ``nsd``)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_metrics_row(cls, row: Mapping) -> ReferenceMetrics:
        """The recorded metrics of one row of :func:`segmentation_metrics`."""
        return cls(**{name: float(row[name]) for name in cls.names()})


def reference_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: Mapping[int, str],
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, ReferenceMetrics]:
    """label name -> :class:`ReferenceMetrics` (ascending label value); see :func:`segmentation_metrics`."""
    rows = segmentation_metrics(pred, gt, labels, spacing_mm, nsd_tolerance_mm=nsd_tolerance_mm)
    return {str(row["label"]): ReferenceMetrics.from_metrics_row(row) for row in rows}


def segmentation_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: Mapping[int, str],
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
) -> list[dict]:
    """Overlap, surface-distance and volume metrics of one case, one row per label.

    Args:
        pred: predicted label map, shape ``(X, Y, Z)``, integer values.
        gt: reference label map on the same grid, shape ``(X, Y, Z)``.
        labels: label value -> name for the foreground labels to score (0 is background; other
            values in the maps are ignored).
        spacing_mm: voxel spacing along X, Y, Z in millimetres.
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice, millimetres.

    Returns:
        One dict per label (in ascending label value): ``label`` (name), ``label_value``, ``dice``,
        ``iou``, ``hd95`` (mm), ``assd`` (mm), ``nsd``, ``vol_pred_ml``, ``vol_gt_ml``, ``empty``.

    Raises:
        ValueError: if the shapes differ, the arrays are not 3D or the spacing is not 3 positive numbers.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must be 3D arrays of one shape; got {pred.shape} and {gt.shape}")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing_mm must be three positive numbers; got {spacing_mm!r}")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for value in sorted(labels):
        p, g = pred == value, gt == value
        row = {"label": str(labels[value]), "label_value": int(value)}
        row.update(binary_metrics(p, g, spacing, nsd_tolerance_mm))
        row["vol_pred_ml"] = float(p.sum()) * voxel_ml
        row["vol_gt_ml"] = float(g.sum()) * voxel_ml
        rows.append(row)
    return rows


def binary_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], nsd_tolerance_mm: float
) -> dict:
    """Dice, IoU, HD95, ASSD, NSD and the ``empty`` flag of two boolean masks ``(X, Y, Z)``.

    See the module docstring for definitions and empty-mask conventions.
    """
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0, "empty": "both"}
    if not (has_p and has_g):
        return {
            "dice": 0.0,
            "iou": 0.0,
            "hd95": math.nan,
            "assd": math.nan,
            "nsd": 0.0,
            "empty": "gt" if has_p else "pred",
        }
    # Crop to the union's bounding box plus one background voxel. Exact: everything outside is
    # background in both masks, and the one-voxel margin keeps every boundary (and every subvoxel
    # surfel) inside; at the array border nothing changes. Keeps the cost proportional to the
    # structure instead of the scan (a 512x512x300 CT per label).
    box = _union_box(pred | gt)
    pred, gt = pred[box], gt[box]
    # MONAI wants batch-first one-hot tensors (B, C, X, Y, Z); one foreground channel here.
    y_pred = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None]
    spacing = [float(s) for s in spacing_mm]
    with warnings.catch_warnings():
        # Empty masks are handled above; MONAI's empty-class warnings would only be noise.
        warnings.simplefilter("ignore", UserWarning)
        # MONAI 1.6 calls its own deprecated get_mask_edges(always_return_as_numpy=...) internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
        iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = compute_surface_dice(
            y_pred,
            y,
            [float(nsd_tolerance_mm)],
            include_background=True,
            spacing=spacing,
            use_subvoxels=True,
        )
    return {
        "dice": float(dice.item()),
        "iou": float(iou.item()),
        "hd95": float(hd95.item()),
        "assd": float(assd.item()),
        "nsd": float(nsd.item()),
        "empty": "",
    }


def _union_box(union: np.ndarray) -> tuple[slice, ...]:
    """Slices of the bounding box of ``union`` grown by one voxel, clipped to the array."""
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


#: Metrics with a bounded range, ``(low, high)``: their confidence intervals are clipped to it
#: (a t-interval of Dice near 1 can otherwise exceed 1, of a small volume go below 0).
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "dice": (0.0, 1.0),
    "iou": (0.0, 1.0),
    "nsd": (0.0, 1.0),
    "hd95": (0.0, math.inf),
    "assd": (0.0, math.inf),
    "vol_pred_ml": (0.0, math.inf),
    "vol_gt_ml": (0.0, math.inf),
}


def summarize_metrics(rows: Iterable[Mapping], metrics: Sequence[str] = METRIC_NAMES) -> dict:
    """Per-label summary of metric rows (from one or many cases).

    Rows whose ``status`` is present and not ``"ok"`` are skipped (error rows of ``medseg evaluate``).
    NaNs (distances with an empty mask) are excluded from the statistics and counted in ``n_nan``;
    a metric key missing from a row is simply not counted, and a metric missing from every row of
    a label (not computed, e.g. Dice without reference labels) is left out of that label's summary.

    The 95% confidence interval is the Student-t interval of the mean,
    ``mean +- t(0.975, n-1) * std / sqrt(n)`` with the sample standard deviation (ddof=1),
    clipped to the metric's range (:data:`METRIC_BOUNDS`: Dice, IoU and NSD in [0, 1], distances
    and volumes >= 0); it is deterministic (unlike a bootstrap) and ``[nan, nan]`` when ``n < 2``.

    Returns:
        ``{label: {metric: {"mean", "std", "median", "ci95": [lo, hi], "n", "n_nan"}}}``; ``std`` is
        the sample standard deviation (NaN when ``n < 2``). All values are plain floats/ints; NaN
        marks an undefined value (write with :func:`json_ready` for strict JSON).
    """
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        per_label = values.setdefault(str(row["label"]), {})
        for m in metrics:
            if m in row:  # absent = not measured (not counted); present but NaN/None/"" = counted in n_nan
                v = row[m]
                per_label.setdefault(m, []).append(math.nan if v is None or v == "" else float(v))
    return {
        label: {
            m: _describe(np.asarray(per_metric[m], dtype=np.float64), METRIC_BOUNDS.get(m))
            for m in metrics
            if m in per_metric
        }
        for label, per_metric in values.items()
    }


def json_ready(value):  # noqa: ANN001, ANN201 (any JSON-like tree)
    """A copy of a dict/list tree with non-finite floats (NaN, inf) as ``None``, numpy scalars as Python.

    ``json.dumps(json_ready(x), allow_nan=False)`` is then strict JSON: bare ``NaN`` is rejected by
    Python's strict parser and by every JavaScript client.
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _describe(values: np.ndarray, bounds: tuple[float, float] | None = None) -> dict:
    finite = values[~np.isnan(values)]
    n = int(finite.size)
    nan = math.nan
    if n == 0:
        return {"mean": nan, "std": nan, "median": nan, "ci95": [nan, nan], "n": 0, "n_nan": int(values.size)}
    mean = float(finite.mean())
    std = float(finite.std(ddof=1)) if n > 1 else nan
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
        if bounds is not None and math.isfinite(half):
            ci = [min(max(v, bounds[0]), bounds[1]) for v in ci]
    else:
        ci = [nan, nan]
    return {
        "mean": mean,
        "std": std,
        "median": float(np.median(finite)),
        "ci95": ci,
        "n": n,
        "n_nan": int(values.size - n),
    }
