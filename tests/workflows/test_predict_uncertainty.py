"""`medseg predict --uncertainty` end to end: uncertainty.nii.gz on the source grid, its columns in cases.csv."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd

from preprocessing.plan import read_plan
from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main


def test_predict_uncertainty_writes_maps_on_the_source_grid_and_columns(tmp_path, trained_model):
    data = tmp_path / "msd"
    write_msd_dataset(data, n_train=1, n_test=0, shape=(44, 40, 28), seed=11)
    src = tmp_path / "src"
    src.mkdir()
    image_path = next((data / "imagesTr").glob("*.nii.gz"))
    shutil.copy(image_path, src / "unc_case.nii.gz")
    source = nib.load(str(src / "unc_case.nii.gz"))
    out = tmp_path / "out"
    assert main(["predict", str(src), "--model", str(trained_model.bundle_dir), "--out", str(out),
                 "--workers", "1", "--uncertainty", "--tta", "--overlap", "0.25"]) == 0
    maps_img = nib.load(str(out / "unc_case" / "uncertainty.nii.gz"))
    maps = np.asarray(maps_img.dataobj)
    assert maps.shape == (*source.shape[:3], 3) and maps.dtype == np.float32
    np.testing.assert_allclose(maps_img.affine, source.affine, atol=1e-3)
    assert np.isfinite(maps).all() and maps.min() >= -1e-6
    classes = len(read_plan(trained_model.bundle_dir / "plan.json").labels)
    assert maps[..., 0].max() <= math.log(classes) + 1e-4
    np.testing.assert_allclose(maps[..., 2], maps[..., 0] - maps[..., 1], atol=1e-4)  # MI = total - expected
    assert maps[..., 2].max() > 0  # 2 folds x 8 mirrors disagree somewhere
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    row = cases.iloc[0]
    assert row["status"] == "ok"
    assert 0.0 <= float(row["uncertainty"]) <= 1.0
    mask_cols = [c for c in cases.columns if c.startswith("unc_mask_")]
    boundary_cols = [c for c in cases.columns if c.startswith("unc_boundary_")]
    assert mask_cols and len(mask_cols) == len(boundary_cols)
    present = [c for c in mask_cols if row[c] != "" and not math.isnan(float(row[c]))]
    assert present, "no label predicted: the column check would be vacuous"
    record = json.loads((out / "unc_case" / "case.json").read_text())
    assert record["uncertainty"] == float(row["uncertainty"])
