"""``medseg evaluate`` through the real CLI entry point, on small anisotropic NIfTI label maps."""

from __future__ import annotations

import json
import math

import medpy.metric.binary as medpy_binary
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from workflows.cli import main
from workflows.evaluate import COLUMNS

SHAPE = (24, 20, 10)
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 1.1, 0, -12.0], [0, 0, 2.5, 4.0], [0, 0, 0, 1]])
SPACING = (0.8, 1.1, 2.5)


def _truth() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:12, 4:14, 2:7] = 1
    lab[15:20, 10:16, 5:8] = 2
    return lab


def _read(csv_path) -> pd.DataFrame:
    text = {c: str for c in ("case_id", "label", "empty", "status", "reason")}
    return pd.read_csv(csv_path, dtype=text).fillna({"empty": "", "reason": ""})


def _save(array, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))


@pytest.fixture
def dataset(tmp_path):
    """GT in an MSD-like labelsTs/ with dataset.json one level up; PRED in both supported layouts."""
    root = tmp_path / "Task01"
    (root / "labelsTs").mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver", "2": "kidney"}})
    )
    truth = _truth()
    for case in ("case_a", "case_b", "case_c", "case_only_gt"):
        _save(truth, AFFINE, root / "labelsTs" / f"{case}.nii.gz")
    pred_dir = tmp_path / "pred"
    shifted = np.roll(truth, 1, axis=0)  # 1 voxel (0.8 mm) off along i
    _save(shifted, AFFINE, pred_dir / "case_a.nii.gz")
    _save(truth, AFFINE, pred_dir / "case_b" / "mask.nii.gz")
    missed = truth.copy()
    missed[missed == 2] = 0
    _save(missed, AFFINE, pred_dir / "case_c.nii.gz")
    return root / "labelsTs", pred_dir, shifted, truth


def test_evaluate_rows_summary_and_exit_code(dataset, tmp_path, capsys):
    gt_dir, pred_dir, shifted, truth = dataset
    out = tmp_path / "report" / "metrics.csv"
    code = main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out), "--nsd-tolerance", "1.0"])
    assert code == 3  # case_only_gt has no prediction
    table = _read(out)
    assert tuple(table.columns) == COLUMNS
    assert len(table) == 3 * 2 + 1
    err = table[table.case_id == "case_only_gt"].iloc[0]
    assert err.status == "error" and "no prediction" in err.reason

    a_liver = table[(table.case_id == "case_a") & (table.label == "liver")].iloc[0]
    assert a_liver.dice == pytest.approx(medpy_binary.dc(shifted == 1, truth == 1), rel=1e-5)
    assert a_liver.hd95 == pytest.approx(0.8, abs=1e-4)  # millimetres, from the NIfTI spacing
    assert a_liver.vol_gt_ml == pytest.approx((truth == 1).sum() * np.prod(SPACING) / 1000, rel=1e-5)
    b = table[table.case_id == "case_b"]
    assert (b.dice == 1).all() and (b.status == "ok").all()  # the <case>/mask.nii.gz layout was found
    c_kidney = table[(table.case_id == "case_c") & (table.label == "kidney")].iloc[0]
    assert c_kidney["empty"] == "pred" and c_kidney.dice == 0 and math.isnan(c_kidney.hd95)

    summary = json.loads((out.parent / "metrics_summary.json").read_text())
    assert summary["cases"] == {"ok": 3, "error": 1}
    assert summary["per_label"]["liver"]["dice"]["n"] == 3
    assert summary["per_label"]["kidney"]["hd95"]["n_nan"] == 1
    assert "liver" in capsys.readouterr().out


def test_mismatched_grid_is_resampled_onto_prediction(tmp_path):
    truth = _truth()
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(truth, AFFINE, pred_dir / "x.nii.gz")
    # Same world labels stored with i reversed: a different affine and array, identical anatomy.
    flipped = AFFINE.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = AFFINE[:3, :] @ [SHAPE[0] - 1, 0, 0, 1]
    _save(truth[::-1], flipped, gt_dir / "x.nii.gz")
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 0
    table = _read(out)
    assert list(table.label) == ["1", "2"]  # no dataset.json: integer values present
    assert (table.dice == 1).all()
    assert table.reason.str.contains("resampled").all()


def test_unreadable_file_is_an_error_row(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(_truth(), AFFINE, gt_dir / "bad.nii.gz")
    pred_dir.mkdir()
    (pred_dir / "bad.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 3
    row = _read(out).iloc[0]
    assert row.status == "error" and row.reason


def test_bad_arguments_exit_2(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    assert (
        main(["evaluate", str(tmp_path / "nope"), str(tmp_path / "gt"), "--out", str(tmp_path / "m.csv")])
        == 2
    )
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "gt"),
                str(tmp_path / "gt"),
                "--out",
                str(tmp_path / "m.csv"),
                "--nsd-tolerance",
                "-1",
            ]
        )
        == 2
    )
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_out_that_is_a_folder_is_refused_before_any_case(tmp_path, capsys, caplog):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(_truth(), AFFINE, pred_dir / "x.nii.gz")
    _save(_truth(), AFFINE, gt_dir / "x.nii.gz")
    folder = tmp_path / "report"
    folder.mkdir()
    with caplog.at_level("INFO"):
        assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []
    (tmp_path / "a_file").write_text("")
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(tmp_path / "a_file" / "m.csv")]) == 2
    assert "which is a file" in capsys.readouterr().err


def test_both_masks_empty_without_dataset_json_is_one_foreground_row(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    empty = np.zeros(SHAPE, np.uint8)
    _save(empty, AFFINE, pred_dir / "blank.nii.gz")
    _save(empty, AFFINE, gt_dir / "blank.nii.gz")
    _save(_truth(), AFFINE, pred_dir / "full.nii.gz")
    _save(_truth(), AFFINE, gt_dir / "full.nii.gz")
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 0
    table = _read(out)
    blank = table[table.case_id == "blank"]
    assert len(blank) == 1
    row = blank.iloc[0]
    assert row.label == "foreground" and row.status == "ok" and row["empty"] == "both"
    assert row.dice == 1 and row.hd95 == 0 and row.assd == 0 and row.nsd == 1
    assert sorted(table[table.case_id == "full"].label) == ["1", "2"]


def test_ground_truth_off_the_prediction_grid_is_an_error_row(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(_truth(), AFFINE, pred_dir / "x.nii.gz")
    elsewhere = AFFINE.copy()
    elsewhere[:3, 3] += [0.0, 0.0, 500.0]  # half a metre up: another scan's grid
    _save(_truth(), elsewhere, gt_dir / "x.nii.gz")
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 3
    table = _read(out)
    assert len(table) == 1
    row = table.iloc[0]
    assert row.status == "error" and "does not overlap" in row.reason


def test_ground_truth_partly_off_the_grid_says_how_much_it_covers(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _save(_truth(), AFFINE, pred_dir / "x.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] += AFFINE[:3, 2] * (SHAPE[2] // 2)  # half the slices overlap
    _save(_truth(), shifted, gt_dir / "x.nii.gz")
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)]) == 0
    reason = _read(out).reason.iloc[0]
    assert "resampled" in reason and "covers 50% of that grid" in reason


def test_ground_truth_values_not_in_dataset_json_are_reported(dataset, tmp_path, caplog):
    gt_dir, pred_dir, _, truth = dataset
    extra = truth.copy()
    extra[0:2, 0:2, 0:2] = 7  # no label 7 in dataset.json
    _save(extra, AFFINE, gt_dir / "case_b.nii.gz")
    out = tmp_path / "m.csv"
    with caplog.at_level("WARNING"):
        main(["evaluate", str(pred_dir), str(gt_dir), "--out", str(out)])
    b = _read(out)
    b = b[b.case_id == "case_b"]
    assert (b.status == "ok").all() and list(b.label) == ["liver", "kidney"]
    assert b.reason.str.contains(r"ground truth label value\(s\) \[7\] not in dataset.json").all()
    assert "[7] are not declared in dataset.json" in caplog.text
