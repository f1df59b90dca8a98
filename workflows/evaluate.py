"""``medseg evaluate PRED GT --out metrics.csv``: per-case, per-label metrics of predictions.

* PRED holds ``<case_id>.nii.gz`` (or ``.nii``) files or ``<case_id>/mask.nii.gz`` folders (the
  layout ``medseg predict`` writes); GT holds ``<case_id>.nii.gz``.
* One CSV row per (case, label): :data:`COLUMNS`; distances in millimetres from the prediction's
  voxel spacing. A case present on one side only is an ``error`` row; so is an unreadable file.
* A ground truth on a different grid (shape or affine) is resampled (nearest neighbour, world
  coordinates) onto the prediction grid, with a warning and a ``reason`` saying so (and how much of
  the prediction grid it covers, when not all). A ground truth that does not overlap the
  prediction grid at all is an ``error`` row: its Dice 0 would score a mix-up of files.
* Label names come from a ``dataset.json`` (MSD / nnU-Net v2) in GT or its parent folder; without
  one, each case is scored on the label values present in its prediction or ground truth, named by
  their integer value. A case whose masks are both empty then gets one row, label
  :data:`FOREGROUND` (any non-zero value), Dice 1, distances 0, ``empty`` = ``both``. Values in a
  mask that ``dataset.json`` does not declare are not scored; a warning and the ``reason`` say so.
* ``<out stem>_summary.json`` holds :func:`pipeline.metrics.summarize_metrics` of the ok rows.

Exit codes: 0 all cases scored, 3 some error rows, 2 bad arguments (raised as ValueError, before
any case is read: e.g. ``--out`` is a folder).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.metrics import METRIC_NAMES, segmentation_metrics, summarize_metrics
from preprocessing.atomic import write_text_atomic
from preprocessing.errors import DatasetError
from preprocessing.image import GRID_TOL_MM
from preprocessing.image_files import NIFTI_SUFFIXES
from preprocessing.msd import read_dataset_labels
from preprocessing.resample import resample_to_grid
from preprocessing.volume_io import read_volume
from workflows.exit_codes import EXIT_OK, EXIT_PARTIAL

logger = logging.getLogger(__name__)

COLUMNS = (
    "case_id",
    "label",
    "dice",
    "iou",
    "hd95",
    "assd",
    "nsd",
    "vol_pred_ml",
    "vol_gt_ml",
    "empty",
    "status",
    "reason",
)
#: Label name of the single row of a case whose masks are both empty, without a dataset.json.
FOREGROUND = "foreground"
_FULL_COVERAGE = 0.999


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``medseg evaluate`` was asked to do (built from CLI flags).

    Attributes:
        pred_dir: PRED, the predictions (``<case_id>.nii.gz`` or ``<case_id>/mask.nii.gz``).
        gt_dir: GT, the ground truth (``<case_id>.nii.gz``; label names from a ``dataset.json``).
        out: the metrics CSV to write; the summary goes beside it.
        nsd_tolerance_mm: normalised surface distance tolerance, millimetres, > 0.
    """

    pred_dir: Path
    gt_dir: Path
    out: Path
    nsd_tolerance_mm: float = 2.0


def evaluate_command(args: argparse.Namespace) -> int:
    """CLI entry point: :func:`run_evaluate` of the flags; returns the exit code."""
    config = EvaluateConfig(Path(args.pred), Path(args.gt), Path(args.out), float(args.nsd_tolerance))
    return run_evaluate(config)


def run_evaluate(config: EvaluateConfig) -> int:
    """Score every case of PRED against GT; returns the exit code (0 ok, 3 some error rows).

    Raises:
        ValueError: (exit 2) before any case is read: PRED or GT not a folder, a tolerance that is
            not a positive number, an unusable ``out``, no case on either side, a bad ``dataset.json``.
    """
    pred_dir, gt_dir, out, tolerance = config.pred_dir, config.gt_dir, config.out, config.nsd_tolerance_mm
    for name, folder in (("PRED", pred_dir), ("GT", gt_dir)):
        if not folder.is_dir():
            raise ValueError(f"{name} {folder} is not a folder")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"--nsd-tolerance must be a positive number of millimetres; got {tolerance}")
    check_out_path(out)
    preds, gts = find_predictions(pred_dir), find_nifti_cases(gt_dir)
    if not preds and not gts:
        raise ValueError(f"no <case_id>.nii.gz in GT {gt_dir} and no predictions in PRED {pred_dir}")
    labels = labels_from_dataset_json(gt_dir)
    rows: list[dict] = []
    for case_id in tqdm(sorted(set(preds) | set(gts)), desc="evaluate", unit="case", disable=None):
        rows.extend(evaluate_case(case_id, preds.get(case_id), gts.get(case_id), labels, tolerance))
    write_rows_csv(rows, out)
    summary = {
        "nsd_tolerance_mm": tolerance,
        "cases": _case_counts(rows),
        "per_label": summarize_metrics(rows),
    }
    summary_path = out.with_name(f"{_stem(out)}_summary.json")
    write_text_atomic(summary_path, json.dumps(_json_safe(summary), indent=1, allow_nan=False))
    _print_table(summary, out, summary_path)
    return EXIT_PARTIAL if any(r["status"] != "ok" for r in rows) else EXIT_OK


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that cannot become the metrics CSV, before anything is computed.

    Raises:
        ValueError: ``out`` is a folder, or lies under a file.
    """
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the path of the CSV file to write, e.g. {out / 'metrics.csv'}"
        )
    parent = out.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out} lies under {parent}, which is a file; choose another path")


def find_nifti_cases(folder: Path) -> dict[str, Path]:
    """``<case_id>.nii.gz`` / ``<case_id>.nii`` files directly in ``folder`` -> {case_id: path}."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            for suffix in NIFTI_SUFFIXES:
                if path.name.endswith(suffix):
                    found.setdefault(path.name[: -len(suffix)], path)
    return found


def find_predictions(folder: Path) -> dict[str, Path]:
    """Prediction files: ``<case_id>.nii.gz`` or ``<case_id>/mask.nii.gz`` (the latter wins)."""
    found = find_nifti_cases(folder)
    for sub in sorted(folder.iterdir()):
        mask = sub / "mask.nii.gz"
        if sub.is_dir() and not sub.name.startswith(".") and mask.is_file():
            found[sub.name] = mask
    return found


def labels_from_dataset_json(gt_dir: Path) -> dict[int, str] | None:
    """Foreground labels from ``dataset.json`` in ``gt_dir`` or its parent, or None if there is none.

    Accepts MSD's ``{"0": "background", "1": "liver"}`` and nnU-Net v2's ``{"background": 0, "liver": 1}``
    (parsed by :func:`preprocessing.msd.read_dataset_labels`, the one ``dataset.json`` label parser).
    """
    for candidate in (gt_dir / "dataset.json", gt_dir.parent / "dataset.json"):
        if candidate.is_file():
            try:
                labels = read_dataset_labels(candidate)
            except DatasetError as exc:
                raise ValueError(str(exc)) from exc  # the CLI exits 2 on ValueError
            labels.pop(0, None)
            logger.info("labels from %s: %s", candidate, labels)
            return labels
    return None


def evaluate_case(
    case_id: str,
    pred_path: Path | None,
    gt_path: Path | None,
    labels: dict[int, str] | None,
    tolerance_mm: float,
) -> list[dict]:
    """Metric rows of one case, or a single error row saying what went wrong."""
    if pred_path is None or gt_path is None:
        missing = "prediction (PRED)" if pred_path is None else "ground truth (GT)"
        return [_error_row(case_id, f"no {missing} file for this case")]
    try:
        pred_vol, gt_vol = read_volume(pred_path), read_volume(gt_path)
        pred, gt = _label_array(pred_vol.array, pred_path), _label_array(gt_vol.array, gt_path)
        # Undeclared values are looked for before resampling, which may drop some of them.
        notes = _undeclared_values(case_id, pred, gt, labels) if labels is not None else []
        same_grid = pred.shape == gt.shape and np.allclose(
            pred_vol.affine_ras, gt_vol.affine_ras, atol=GRID_TOL_MM
        )
        if not same_grid:
            gt, note = _gt_on_prediction_grid(case_id, gt, gt_vol.affine_ras, pred.shape, pred_vol.affine_ras)
            notes.append(note)
        # Without dataset.json and nothing on either side: one row for "any label", both empty.
        case_labels = labels if labels is not None else (_present_labels(pred, gt) or {1: FOREGROUND})
        rows = segmentation_metrics(pred, gt, case_labels, pred_vol.spacing_mm, nsd_tolerance_mm=tolerance_mm)
    except Exception as exc:  # one bad case must not stop the batch; the row says why
        logger.error("%s: %s", case_id, exc)
        return [_error_row(case_id, f"{type(exc).__name__}: {exc}")]
    return [
        {
            "case_id": case_id,
            **{k: r[k] for k in ("label", *METRIC_NAMES, "empty")},
            "status": "ok",
            "reason": "; ".join(notes),
        }
        for r in rows
    ]


def _gt_on_prediction_grid(
    case_id: str, gt: np.ndarray, gt_affine: np.ndarray, pred_shape: tuple, pred_affine: np.ndarray
) -> tuple[np.ndarray, str]:
    """Resample the ground truth (nearest) onto the prediction grid; refuse a grid that misses it.

    Returns:
        The resampled ``(X, Y, Z)`` int32 label map and the note for the ``reason`` column.

    Raises:
        ValueError: no prediction voxel lies inside the ground truth's grid.
    """
    logger.warning(
        "%s: ground truth grid (shape %s) differs from the prediction grid (shape %s) in shape or "
        "affine; resampling it (nearest) onto the prediction grid",
        case_id,
        gt.shape,
        tuple(pred_shape),
    )
    # Shifted by one so that 0 marks "outside the ground truth's grid" after zero padding.
    shifted = resample_to_grid(
        torch.from_numpy(gt[None].astype(np.int32) + 1),
        gt_affine,
        pred_affine,
        pred_shape,
        mode="nearest",
        padding="zeros",
    )[0].numpy()
    inside = shifted > 0
    coverage = float(inside.mean())
    if coverage == 0 or _grids_are_disjoint(gt.shape, gt_affine, pred_shape, pred_affine):
        raise ValueError(
            "the ground truth's grid does not overlap the prediction's grid (no common voxel in "
            "world coordinates): not the same scan, or a wrong affine in one of the files"
        )
    note = "ground truth resampled (nearest) onto the prediction grid"
    if coverage < _FULL_COVERAGE:
        note += f"; it covers {100 * coverage:.0f}% of that grid (the rest counts as background)"
    return np.where(inside, shifted - 1, 0).astype(np.int32), note


def _grids_are_disjoint(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray) -> bool:
    """True when the voxel boxes of two grids are separated along an axis of either grid."""

    def corners(shape) -> np.ndarray:  # (4, 8) homogeneous voxel-box corners, half a voxel out
        lo, hi = [-0.5] * 3, [n - 0.5 for n in shape]
        grid = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
        return np.vstack([grid, np.ones(grid.shape[1])])

    for (shape_s, aff_s), (shape_o, aff_o) in (
        ((shape_a, affine_a), (shape_b, affine_b)),
        ((shape_b, affine_b), (shape_a, affine_a)),
    ):
        in_s = (np.linalg.inv(aff_s) @ aff_o @ corners(shape_o))[:3]  # other's corners, self's index space
        if np.any(in_s.max(axis=1) < -0.5) or np.any(in_s.min(axis=1) > np.asarray(shape_s) - 0.5):
            return True
    return False


def _undeclared_values(case_id: str, pred: np.ndarray, gt: np.ndarray, labels: dict[int, str]) -> list[str]:
    """Notes (and warnings) for mask values that ``dataset.json`` does not declare (not scored)."""
    notes = []
    for side, array in (("ground truth", gt), ("prediction", pred)):
        extra = sorted(int(v) for v in np.unique(array) if v != 0 and int(v) not in labels)
        if extra:
            logger.warning(
                "%s: %s label value(s) %s are not declared in dataset.json and are not scored",
                case_id,
                side,
                extra,
            )
            notes.append(f"{side} label value(s) {extra} not in dataset.json, not scored")
    return notes


def _label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """(1, X, Y, Z) label volume -> (X, Y, Z) int32; refuses multi-channel and non-integer values."""
    if array.shape[0] != 1:
        raise ValueError(f"{path.name}: a label map has one channel, this file has {array.shape[0]}")
    data = np.asarray(array[0])
    rounded = np.rint(data)
    if data.dtype.kind == "f" and not np.allclose(data, rounded, atol=1e-3):
        raise ValueError(f"{path.name}: voxel values are not integer labels (probabilities?)")
    return rounded.astype(np.int32)


def _present_labels(pred: np.ndarray, gt: np.ndarray) -> dict[int, str]:
    values = np.union1d(np.unique(pred), np.unique(gt))
    return {int(v): str(int(v)) for v in values if v != 0}


def _error_row(case_id: str, reason: str) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(case_id=case_id, status="error", reason=reason)
    return row


def write_rows_csv(rows: list[dict], path: Path) -> Path:
    """Write rows with :data:`COLUMNS` atomically; floats with 6 significant digits, NaN as ``nan``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text_atomic(path, buffer.getvalue())


def _case_counts(rows: list[dict]) -> dict[str, int]:
    statuses: dict[str, str] = {}
    for r in rows:
        if statuses.get(r["case_id"]) != "error":
            statuses[r["case_id"]] = r["status"]
    return {s: sum(1 for v in statuses.values() if v == s) for s in ("ok", "error")}


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(path.suffix)] if path.suffix else name


def _json_safe(value):
    """NaN -> None so the summary is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_table(summary: dict, out: Path, summary_path: Path) -> None:
    counts = summary["cases"]
    print(f"cases: {counts['ok']} ok, {counts['error']} error")
    header = f"{'label':<16}{'n':>4}  {'Dice mean±sd':>14}  {'HD95 median':>11}  {'NSD mean':>8}"
    print(header)
    print("-" * len(header))
    for label, stats in summary["per_label"].items():
        dice, hd95, nsd = stats["dice"], stats["hd95"], stats["nsd"]
        sd = 0.0 if math.isnan(dice["std"]) else dice["std"]
        print(
            f"{label[:16]:<16}{dice['n']:>4}  {dice['mean']:>8.3f}±{sd:<5.3f}  "
            f"{hd95['median']:>8.2f} mm  {nsd['mean']:>8.3f}"
        )
    print(f"metrics: {out}\nsummary: {summary_path}")
