"""`medseg demo` (what `make demo` runs) end to end, shortened to a few epochs."""

from __future__ import annotations

import pandas as pd
import pydicom
from mlflow.tracking import MlflowClient

from pipeline.tracking import tracking_uri
from workflows.cli import main


def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "6", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "=== demo summary ==="):
        assert step in printed
    assert "mlflow ui --backend-store-uri" in printed
    assert (out / "ingested" / "manifest.csv").is_file()
    cases = pd.read_csv(out / "predictions" / "cases.csv", keep_default_na=False)
    ok = cases[cases["status"] == "ok"]
    assert len(ok) >= 7  # every CT series and NIfTI file of the generated hospital folder
    assert cases["status"].ne("error").all(), cases[["case_id", "reason"]]
    dicom_cases = [c for c in ok["case_id"] if (out / "predictions" / c / "seg.dcm").is_file()]
    assert len(dicom_cases) >= 5
    seg = pydicom.dcmread(out / "predictions" / dicom_cases[0] / "seg.dcm", stop_before_pixels=True)
    assert seg.Modality == "SEG"
    # Even six short epochs find the liver; a broken pipeline (flip, wrong grid) would not.
    assert ok["dice_liver"].astype(float).mean() > 0.5
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"case_id", "label", "dice", "hd95", "nsd"} <= set(metrics.columns)
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    assert client.get_model_version_by_alias("medseg-demo", "champion") is not None
    assert client.get_experiment_by_name("medseg-demo-predict") is not None
