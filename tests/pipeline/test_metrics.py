"""Metrics cross-checked against medpy and DeepMind surface-distance on anisotropic masks.

Tolerances and why:

* Dice, ASSD vs medpy: same surface definition (6-connected erosion XOR) and same pooled ASSD;
  only float32 (MONAI) vs float64 (medpy) differs -> 1e-4 relative.
* HD95 vs medpy: medpy's ``hd95`` is the 95th percentile of the *pooled* distances, ours (MONAI,
  DeepMind) the max of the two directed 95th percentiles. We compare against
  ``max(percentile(d_pg), percentile(d_gp))`` of medpy's own directed distances (exact up to
  float32), and check medpy's pooled value lies between the two directed percentiles.
* NSD vs DeepMind: MONAI's ``use_subvoxels=True`` reimplements DeepMind's surfel areas -> 1e-3.
* HD95 / ASSD vs DeepMind: DeepMind's surface is made of surfels on voxel corners (dual grid),
  weighted by area; ours is made of boundary voxel centres. The two surfaces sit up to half a
  voxel apart, so agreement within the largest spacing (HD95) / half of it (mean ASSD) is what
  the definitions allow.
"""

from __future__ import annotations

import math

import medpy.metric.binary as medpy_binary
import numpy as np
import pytest
import surface_distance as deepmind

from pipeline.metrics import (
    ReferenceMetrics,
    json_ready,
    reference_metrics,
    segmentation_metrics,
    summarize_metrics,
)

SPACING = (0.7, 1.3, 3.0)
SHAPE = (48, 40, 20)

# medpy keeps its directed distances in a module-level "private" function; using it lets us compare
# the directed HD95 definition against medpy's independent distance-transform implementation.
_medpy_surface_distances = vars(medpy_binary)["__surface_distances"]


def _ellipsoid(centre_mm, radii_mm, spacing=SPACING, shape=SHAPE) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing, strict=True)], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii_mm, strict=True)) <= 1.0


def _pairs():
    """Asymmetric, anisotropic pred/gt pairs of increasing disagreement."""
    rng = np.random.default_rng(7)
    for t in range(3):
        gt = _ellipsoid((16, 25, 30), (9 + t, 12, 18))
        pred = _ellipsoid((17 + t, 24, 33), (8, 13 - t, 15))
        pred[rng.integers(0, SHAPE[0]), rng.integers(0, SHAPE[1]), rng.integers(0, SHAPE[2])] = True
        yield pred, gt


@pytest.mark.parametrize("case", range(3))
def test_cross_check_medpy_and_deepmind(case):
    pred, gt = list(_pairs())[case]
    row = segmentation_metrics(pred.astype(np.uint8), gt.astype(np.uint8), {1: "organ"}, SPACING)[0]

    assert row["dice"] == pytest.approx(medpy_binary.dc(pred, gt), rel=1e-5)
    assert row["iou"] == pytest.approx(medpy_binary.jc(pred, gt), rel=1e-5)
    assert row["assd"] == pytest.approx(medpy_binary.assd(pred, gt, SPACING), rel=1e-4)

    d_pg = _medpy_surface_distances(pred, gt, SPACING, 1)
    d_gp = _medpy_surface_distances(gt, pred, SPACING, 1)
    directed = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assert row["hd95"] == pytest.approx(directed, rel=1e-4)
    pooled = medpy_binary.hd95(pred, gt, SPACING)
    assert min(np.percentile(d_pg, 95), np.percentile(d_gp, 95)) - 1e-6 <= pooled <= row["hd95"] + 1e-4

    sd = deepmind.compute_surface_distances(gt, pred, SPACING)
    assert row["nsd"] == pytest.approx(deepmind.compute_surface_dice_at_tolerance(sd, 2.0), abs=1e-3)
    assert abs(row["hd95"] - deepmind.compute_robust_hausdorff(sd, 95)) <= max(SPACING)
    assert abs(row["assd"] - np.mean(deepmind.compute_average_surface_distance(sd))) <= max(SPACING) / 2


def test_spacing_is_applied_per_axis():
    """A shift along the 3 mm axis must cost 3 mm per voxel, not 0.7 or 1.3 (axis order matters)."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[10:30, 10:30, 5:12] = 1
    pred = np.roll(gt, 1, axis=2)
    row = segmentation_metrics(pred, gt, {1: "box"}, SPACING)[0]
    assert row["hd95"] == pytest.approx(3.0, abs=1e-4)
    shifted_x = segmentation_metrics(np.roll(gt, 1, axis=0), gt, {1: "box"}, SPACING)[0]
    assert shifted_x["hd95"] == pytest.approx(0.7, abs=1e-4)
    # 1 voxel along z (3 mm) is outside a 2 mm tolerance for the top/bottom faces, inside 3.5 mm.
    assert row["nsd"] < 0.95
    assert segmentation_metrics(pred, gt, {1: "box"}, SPACING, nsd_tolerance_mm=3.5)[0]["nsd"] == 1.0


def test_volumes_multilabel_and_identity():
    gt = np.zeros(SHAPE, np.uint8)
    gt[5:15, 5:15, 2:6] = 1
    gt[20:30, 20:25, 10:12] = 3
    rows = segmentation_metrics(gt.copy(), gt, {1: "liver", 3: "lesion"}, SPACING)
    assert [r["label"] for r in rows] == ["liver", "lesion"]
    assert [r["label_value"] for r in rows] == [1, 3]
    voxel_ml = np.prod(SPACING) / 1000
    assert rows[0]["vol_gt_ml"] == pytest.approx(400 * voxel_ml)
    assert rows[1]["vol_pred_ml"] == pytest.approx(100 * voxel_ml)
    for r in rows:
        assert (r["dice"], r["iou"], r["hd95"], r["assd"], r["nsd"], r["empty"]) == (1, 1, 0, 0, 1, "")


def test_empty_mask_conventions():
    gt = np.zeros(SHAPE, np.uint8)
    gt[5:15, 5:15, 2:6] = 1
    empty = np.zeros_like(gt)
    labels = {1: "a", 2: "absent"}
    missed = segmentation_metrics(empty, gt, labels, SPACING)
    assert missed[0]["empty"] == "pred" and missed[0]["dice"] == 0 and missed[0]["nsd"] == 0
    assert math.isnan(missed[0]["hd95"]) and math.isnan(missed[0]["assd"])
    both = missed[1]
    assert (both["dice"], both["iou"], both["hd95"], both["assd"], both["nsd"], both["empty"]) == (
        1,
        1,
        0,
        0,
        1,
        "both",
    )
    false_pos = segmentation_metrics(gt, empty, labels, SPACING)[0]
    assert false_pos["empty"] == "gt" and false_pos["dice"] == 0 and math.isnan(false_pos["hd95"])
    assert false_pos["vol_gt_ml"] == 0 and false_pos["vol_pred_ml"] > 0


def test_bad_inputs_raise():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(a, np.zeros((4, 4, 5), np.uint8), {1: "x"}, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, a, {1: "x"}, (1, 0, 1))


def test_summarize_metrics_t_interval_and_nans():
    rows = [
        {"label": "liver", "dice": 0.8, "hd95": 2.0},
        {"label": "liver", "dice": 0.9, "hd95": math.nan},
        {"label": "liver", "dice": 0.7, "hd95": 4.0},
        {"label": "liver", "dice": 0.1, "hd95": 9.0, "status": "error"},
        {"label": "kidney", "dice": 0.5, "hd95": 1.0},
        {"label": "kidney", "dice": 0.7},  # hd95 not measured: not counted
    ]
    s = summarize_metrics(rows, metrics=("dice", "hd95"))
    dice = s["liver"]["dice"]
    assert dice["n"] == 3 and dice["n_nan"] == 0
    assert dice["mean"] == pytest.approx(0.8) and dice["median"] == pytest.approx(0.8)
    assert dice["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert dice["ci95"] == pytest.approx([0.8 - half, 1.0])  # 0.8 + half > 1: clipped to Dice's range
    hd = s["liver"]["hd95"]
    assert hd["n"] == 2 and hd["n_nan"] == 1 and hd["mean"] == pytest.approx(3.0)
    single = s["kidney"]["hd95"]
    assert single["n"] == 1 and single["n_nan"] == 0
    assert math.isnan(single["std"]) and all(math.isnan(v) for v in single["ci95"])


def test_masks_touching_the_array_border_match_peers():
    """Our crop to the union box must not change anything when structures touch the array edge."""
    gt = np.zeros(SHAPE, bool)
    gt[0:10, 5:30, 0:8] = True
    pred = np.zeros(SHAPE, bool)
    pred[0:12, 3:28, 1 : SHAPE[2]] = True
    row = segmentation_metrics(pred.astype(np.uint8), gt.astype(np.uint8), {1: "edge"}, SPACING)[0]
    assert row["dice"] == pytest.approx(medpy_binary.dc(pred, gt), rel=1e-5)
    assert row["assd"] == pytest.approx(medpy_binary.assd(pred, gt, SPACING), rel=1e-4)
    sd = deepmind.compute_surface_distances(gt, pred, SPACING)
    assert row["nsd"] == pytest.approx(deepmind.compute_surface_dice_at_tolerance(sd, 2.0), abs=1e-3)


def test_summary_omits_unmeasured_metrics_and_clips_bounded_intervals():
    # Dice near 1 with a spread: the raw t-interval's top is above 1; tiny volumes: bottom below 0.
    rows = [
        {"label": "liver", "dice": d, "nsd": d, "vol_pred_ml": v}
        for d, v in ((1.0, 0.01), (0.6, 5.0), (1.0, 0.02))
    ]
    s = summarize_metrics(rows)
    assert set(s["liver"]) == {"dice", "nsd", "vol_pred_ml"}  # no hd95/iou/... blocks of NaN
    for metric in ("dice", "nsd"):
        lo, hi = s["liver"][metric]["ci95"]
        assert 0.0 <= lo < hi == 1.0
    assert s["liver"]["vol_pred_ml"]["ci95"][0] == 0.0


def test_json_ready_summary_is_strict_json():
    import json

    s = summarize_metrics([{"label": "liver", "dice": 0.5, "hd95": math.nan}])

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    text = json.dumps(json_ready(s), allow_nan=False)
    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["liver"]["dice"]["std"] is None and parsed["liver"]["dice"]["ci95"] == [None, None]
    assert parsed["liver"]["hd95"]["n_nan"] == 1 and parsed["liver"]["hd95"]["mean"] is None


def test_reference_metrics_are_the_recorded_subset_of_the_metric_rows():
    pred = np.zeros((8, 8, 8), np.uint8)
    gt = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6], gt[2:6, 2:6, 3:7] = 1, 1
    labels = {2: "lesion", 1: "liver"}
    typed = reference_metrics(pred, gt, labels, (1.0, 1.0, 2.0))
    rows = segmentation_metrics(pred, gt, labels, (1.0, 1.0, 2.0))
    assert list(typed) == ["liver", "lesion"]  # ascending label value, as the columns go
    assert ReferenceMetrics.names() == ("dice", "hd95", "nsd")
    for row in rows:
        assert typed[row["label"]] == ReferenceMetrics(dice=row["dice"], hd95=row["hd95"], nsd=row["nsd"])
    assert typed["liver"].dice == pytest.approx(0.75)
    assert typed["lesion"] == ReferenceMetrics(
        dice=1.0, hd95=0.0, nsd=1.0
    )  # absent from both: a correct "absent"
