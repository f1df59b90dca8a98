"""No patient data leaves the hospital's folders: scan the whole MLflow store after a batch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pydicom

from preprocessing.synthetic import DicomSeriesSpec, write_bad_truncated_nifti, write_hospital_folder
from workflows.cli import main

PATIENTS = (
    DicomSeriesSpec(
        patient_name="ZQXWEIRD^PHIONE",
        patient_id="PHI-ID-987654",
        birth_date="19420317",
        accession="ACCPHI4242",
    ),
    DicomSeriesSpec(
        patient_name="QUUXNAME^PHITWO",
        patient_id="PHI-ID-123789",
        birth_date="19381109",
        accession="ACCPHI5353",
    ),
)


def _identifiers(truths) -> set[str]:
    found = {v for t in truths for v in t.identity.values() if v and len(v) > 5}
    found |= {"ZQXWEIRD", "QUUXNAME", "PHI-ID-987654", "PHI-ID-123789", "19420317", "ACCPHI4242"}
    for t in truths:
        if t.kind == "nifti":
            continue
        for f in t.files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            found |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    return found


def _store_text(root: Path) -> list[tuple[str, str]]:
    """Every string in the sqlite store and every artifact file (name and content)."""
    texts: list[tuple[str, str]] = []
    con = sqlite3.connect(root / "mlflow.db")
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in con.execute(f'SELECT * FROM "{table}"'):
            texts.append((f"db:{table}", " ".join(str(v) for v in row)))
    con.close()
    for path in (root / "mlartifacts").rglob("*"):
        texts.append((f"artifact name {path}", str(path.relative_to(root))))
        if path.is_file():
            texts.append((f"artifact {path}", path.read_bytes().decode("latin-1")))
    return texts


def test_no_identifier_reaches_mlflow(tmp_path, monkeypatch, trained_model):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "store" / "mlartifacts"))
    (tmp_path / "store").mkdir()
    truths = write_hospital_folder(tmp_path / "scans", n_series=5, seed=21, patients=PATIENTS)
    # A folder named after the patient, as exports often are: paths must not leak either.
    code = main(
        [
            "predict",
            str(tmp_path / "scans"),
            "--model",
            str(trained_model.bundle_dir),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--experiment",
            "phi-scan",
        ]
    )
    assert code == 0
    secrets = _identifiers(truths)
    assert len(secrets) > 10
    texts = _store_text(tmp_path / "store")
    assert any("cases.csv" in where for where, _ in texts), "nothing was logged: the scan proves nothing"
    leaks = [(where, s) for where, text in texts for s in secrets if s in text]
    assert not leaks, leaks[:5]
    # The hospital side keeps the link: the SEG objects carry the patient and the source UIDs.
    seg_files = list((tmp_path / "out").glob("*/seg.dcm"))
    assert seg_files and pydicom.dcmread(seg_files[0]).PatientID.startswith("PHI-ID-")


#: A hospital export named after the patient, with spaces, quotes and non-ASCII letters.
ODD_FOLDERS = ("SMITH JOHN MIDDLE 19231117", "\"QUOTED\" O'NEIL ÅSTRÖM")
FOLDER_WORDS = ("SMITH", "JOHN", "MIDDLE", "19231117", "QUOTED", "NEIL", "ÅSTRÖM")


def _spellings(word: str) -> set[str]:
    """``word`` as it could appear in a store: text, UTF-8 bytes read as Latin-1, JSON and CSV escapes."""
    return {
        word,
        word.encode("utf-8").decode("latin-1"),
        json.dumps(word)[1:-1],
        word.encode("ascii", "backslashreplace").decode("ascii"),
        word.encode("utf-8").decode("ascii", "backslashreplace"),
    }


def test_folder_names_with_spaces_quotes_and_accents_do_not_reach_mlflow(tmp_path, monkeypatch, trained_model):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "store" / "mlartifacts"))
    (tmp_path / "store").mkdir()
    export = tmp_path / "scans" / ODD_FOLDERS[0] / ODD_FOLDERS[1]
    # CT axial, CT sagittal, CT coronal and an MR series (skipped by the CT model, with its reason)
    write_hospital_folder(export, n_series=4, seed=22, patients=PATIENTS)
    # Failing inputs inside the patient's folders: their local reasons quote these paths.
    write_bad_truncated_nifti(export / "PAT1" / "broken scan.nii.gz")
    (export / "PAT2" / "empty.dcm").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path / "scans"), "--model", str(trained_model.bundle_dir),
                 "--out", str(out), "--workers", "1", "--experiment", "phi-folders"])
    assert code == 3  # the broken NIfTI is an error row; everything else ran
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    local_reasons = " ".join(cases["reason"])
    assert "SMITH JOHN MIDDLE" in local_reasons  # the hospital keeps the full reason with its path
    assert set(cases.loc[cases["status"] != "ok", "reason_code"]) and all(cases.loc[cases["status"] != "ok", "reason_code"])
    texts = _store_text(tmp_path / "store")
    logged = [where for where, _ in texts]
    assert any("cases.csv" in w for w in logged) and any("failures.csv" in w for w in logged)
    secrets = {s for word in FOLDER_WORDS for s in _spellings(word)}
    leaks = [(where, s) for where, text in texts for s in secrets if s in text]
    assert not leaks, leaks[:5]
