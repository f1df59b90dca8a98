"""QC flags end to end: a training fingerprint of clean phantoms flags broken cases and ranks them first.

Train-free part: the reference comes from :func:`measure_case` over clean synthetic phantoms (their
reference labels, as training measures them); an inverted, a cropped and a noisy case are measured
and flagged like predicted ones. Then one real ``medseg predict`` with the fixture model shows the
``flags`` column and ``review.csv``.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from pipeline.case_row import CaseRow
from pipeline.qc_flags import flag_case
from pipeline.qc_reference import build_qc_reference, measure_case
from pipeline.review import write_review_queue
from preprocessing.synthetic import LABEL_NAMES, make_phantom, orientation_affine, write_nifti
from workflows.cli import main

SPACING = (1.5, 1.5, 3.0)


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(seed=seed, spacing_mm=SPACING)


def _cropped(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The phantom cut along X through the middle of the liver."""
    image, labels = _phantom(seed)
    cut = int(np.median(np.nonzero(labels == 1)[0]))
    return image[cut:], labels[cut:]


def _noisy(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy image noise, and the speckled label map a model makes of it (8 % of voxels relabelled)."""
    image, labels = _phantom(seed)
    rng = np.random.default_rng(seed)
    image = image + rng.normal(0.0, 400.0, image.shape).astype(np.float32)
    speckle = rng.random(labels.shape) < 0.08
    labels = labels.copy()
    labels[speckle] = rng.integers(0, 4, int(speckle.sum()))
    return image, labels


def test_broken_cases_get_the_right_flag_and_rank_above_clean_ones(tmp_path):
    reference = build_qc_reference(
        [measure_case(*_phantom(seed), SPACING, LABEL_NAMES) for seed in range(6)], []
    )
    cases = {
        "clean-a": _phantom(10),
        "clean-b": _phantom(11),
        "inverted": (lambda im_lab: (-im_lab[0], im_lab[1]))(_phantom(12)),
        "cropped": _cropped(13),
        "noisy": _noisy(14),
    }
    rows = []
    for case_id, (image, labels) in cases.items():
        flags = flag_case(measure_case(image, labels, SPACING, LABEL_NAMES), reference, None)
        rows.append(CaseRow(case_id, flags=flags, qc_checked=True))
    names = {row.case_id: {f.name for f in row.flags} for row in rows}
    assert names["clean-a"] == set() and names["clean-b"] == set(), names
    assert "intensity_mismatch" in names["inverted"], names
    assert "touches_border" in names["cropped"], names
    assert "component_outlier" in names["noisy"], names
    review = pd.read_csv(write_review_queue(tmp_path, rows), keep_default_na=False)
    assert set(review["case_id"][:3]) == {"inverted", "cropped", "noisy"}
    assert review["case_id"][3:].tolist() == ["clean-a", "clean-b"]
    assert all(review["top_reason"][:3] != "") and all(review["top_reason"][3:] == "")


def test_medseg_predict_writes_flags_and_the_review_queue(trained_model, tmp_path):
    scans = tmp_path / "scans"
    affine = orientation_affine("axial", SPACING, shape=(48, 48, 32))
    for seed in (21, 22):
        write_nifti(_phantom(seed)[0], affine, scans / f"clean{seed}.nii.gz")
    cropped, _ = _cropped(23)  # same grid, origin unchanged: a scan that starts inside the liver
    write_nifti(cropped, affine, scans / "cropped.nii.gz")
    out = tmp_path / "out"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = trained_model.tracking_uri
    try:
        code = main(["predict", str(scans), "--model", trained_model.model_uri, "--out", str(out),
                     "--workers", "1", "--experiment", "flags-test"])  # fmt: skip
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = saved or ""
    review_text = (out / "review.csv").read_text() if (out / "review.csv").is_file() else "no review.csv"
    assert code == 0, review_text
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False).set_index("case_id")
    assert "flags" in cases.columns and "flag_reasons" in cases.columns
    review = pd.read_csv(out / "review.csv", keep_default_na=False)
    assert sorted(review["case_id"]) == sorted(cases.index)
    assert "touches_border" in cases.loc["cropped", "flags"].split(";"), cases.loc["cropped", "flag_reasons"]
    risk = review.set_index("case_id")["risk"].astype(float)
    assert risk["cropped"] == risk.max() > 0, review  # the bundle may hold a training fingerprint: more flags
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flags"]["flag_touches_border"] >= 1 and summary["flags"]["cases_flagged"] >= 1
