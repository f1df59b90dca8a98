"""``medseg ingest`` end to end on real Dask clusters: outputs, manifest, faults, resume, safety."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from distributed import LocalCluster

from preprocessing.image import pseudonymous_case_id
from preprocessing.synthetic import (
    EVIL_TEXT,
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    write_bad_duplicate_instance,
    write_bad_gantry_tilt,
    write_bad_gap_series,
    write_bad_localizer_in_series,
    write_bad_mismatched_size,
    write_bad_nan_nifti,
    write_bad_path_traversal,
    write_bad_truncated_nifti,
    write_bad_truncated_pixels,
    write_dicom_series,
    write_hospital_folder,
    write_nifti,
)
from workflows.cli import main

SHAPE = (16, 16, 8)


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``root`` (inputs must never change)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    return root, write_hospital_folder(root, shape=(32, 32, 12), seed=3)


def test_cli_ingests_hospital_folder_and_resumes(hospital, tmp_path):
    source, truths = hospital
    before = _snapshot(source)
    out = tmp_path / "out"
    assert main(["ingest", str(source), "--out", str(out), "--workers", "2"]) == 0
    rows = {r["case_id"]: r for r in _manifest(out) if r["status"] == "ok"}
    assert set(rows) == {t.case_id for t in truths}
    for truth in truths:
        img = nib.load(str(out / rows[truth.case_id]["output"]))
        # Exact values and geometry of the written grid (generator truth, itself checked vs SimpleITK).
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), truth.image)
        np.testing.assert_allclose(img.affine, truth.affine_ras, atol=1e-3)
        assert rows[truth.case_id]["shape"] == "32x32x12"
    skipped = [r for r in _manifest(out) if r["status"] == "skipped"]
    assert len(skipped) == 4 and all(r["reason"] for r in skipped)
    assert _snapshot(source) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["images", "manifest.csv"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{t.case_id}.nii.gz" for t in truths)

    # Rerun: everything is already there, nothing is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    reasons = [r["reason"] for r in _manifest(out) if r["status"] == "ok"]
    assert len(reasons) == len(truths) and all(r.startswith("already ingested") for r in reasons)


def _write_bad_folder(root: Path) -> dict[str, str]:
    """One folder with every fault next to good inputs; returns case id -> expected reason text."""
    expected = {}

    def uid_of(files):
        return pseudonymous_case_id(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))

    faults = [
        ("gap", write_bad_gap_series, "missing slice(s): gap of"),
        ("dup", write_bad_duplicate_instance, "duplicate SOP instances"),
        ("size", write_bad_mismatched_size, "mismatched rows/columns"),
        ("trunc", write_bad_truncated_pixels, "truncated or undecodable pixel data"),
        ("tilt", write_bad_gantry_tilt, "gantry tilt"),
    ]
    for seed, (name, writer, reason) in enumerate(faults, start=1):
        expected[uid_of(writer(root / "dicom" / name, seed=seed, shape=SHAPE))] = reason
    # Uneven spacing: one slice moved by a third of the step.
    files = write_bad_gap_series(root / "dicom" / "uneven", seed=9, shape=SHAPE)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.8]
    ds.save_as(files[2])
    expected[uid_of(files)] = "inconsistent slice spacing"
    # Two full stacks of different orientation under one SeriesInstanceUID.
    axial = write_bad_gap_series(root / "dicom" / "two_stacks" / "a", seed=10, shape=SHAPE)
    uid = pydicom.dcmread(axial[0]).SeriesInstanceUID
    affine = orientation_affine("sagittal", (0.8, 1.1, 2.5), shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=10, affine_ras=affine)
    write_dicom_series(
        image,
        affine,
        root / "dicom" / "two_stacks" / "b",
        DicomSeriesSpec(seed=10, series_uid=str(uid), series_number=2),
    )
    expected[pseudonymous_case_id(str(uid))] = "mixed orientations: 2 different"
    write_bad_nan_nifti(root / "nifti" / "nan_scan.nii.gz", shape=SHAPE)
    expected["nan_scan"] = "NaN/Inf"
    write_bad_truncated_nifti(root / "nifti" / "cut_scan.nii.gz", shape=SHAPE)
    expected["cut_scan"] = "cannot read NIfTI"
    return expected


def _write_good_inputs(root: Path) -> list[str]:
    affine = orientation_affine("coronal", (0.8, 1.1, 2.5), shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=11, affine_ras=affine)
    files = write_dicom_series(
        image, affine, root / "dicom" / "good", DicomSeriesSpec(seed=11, shuffle_names=True)
    )
    write_nifti(image, affine, root / "nifti" / "good_scan.nii.gz")
    localizer = write_bad_localizer_in_series(root / "dicom" / "with_localizer", seed=12, shape=SHAPE)
    evil = write_bad_path_traversal(root / "dicom" / "evil", seed=13, shape=SHAPE)
    return [
        pseudonymous_case_id(str(pydicom.dcmread(f[0]).SeriesInstanceUID)) for f in (files, localizer, evil)
    ] + ["good_scan"]


def test_bad_inputs_get_reasons_exit_3_and_good_ones_are_written_on_a_scheduler(tmp_path):
    source = tmp_path / "src"
    expected = _write_bad_folder(source)
    good = _write_good_inputs(source)
    before = _snapshot(source)
    out = tmp_path / "work" / "out"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        code = main(["ingest", str(source), "--out", str(out), "--scheduler", cluster.scheduler_address])
        # Workers of the external cluster did the work (it saw our tasks).
        assert "ingest_item" in cluster.scheduler.task_prefixes
    assert code == 3
    rows = _manifest(out)
    by_case = {r["case_id"]: r for r in rows if r["case_id"]}
    for case_id, reason in expected.items():
        assert by_case[case_id]["status"] == "error", case_id
        assert reason in by_case[case_id]["reason"], by_case[case_id]["reason"]
        assert not (out / "images" / f"{case_id}.nii.gz").exists()
    for case_id in good:
        assert by_case[case_id]["status"] == "ok", by_case[case_id]
        assert (out / "images" / f"{case_id}.nii.gz").is_file()
    localizer_rows = [r for r in rows if r["reason"].startswith("localizer")]
    assert len(localizer_rows) == 1 and localizer_rows[0]["status"] == "skipped"
    assert _snapshot(source) == before
    # The header text "../../etc/evil" steered no path: everything written is under OUT/images.
    written = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert {p.parent for p in written} == {out, out / "images"}
    assert not any("evil" in str(p) for p in written)
    assert not any("evil" in p.name for p in tmp_path.parent.iterdir() if p != tmp_path)
    assert EVIL_TEXT not in (out / "manifest.csv").read_text()


def test_msd_source_with_channel_files(tmp_path):
    source = tmp_path / "Task01"
    (source / "imagesTr").mkdir(parents=True)
    (source / "dataset.json").write_text('{"name": "t"}')
    affine = orientation_affine("axial", (1.0, 1.5, 2.0), shape=SHAPE)
    image, _ = make_phantom(SHAPE, (1.0, 1.5, 2.0), affine_ras=affine)
    for case in ("brain_001", "brain_002"):
        for channel in range(2):
            write_nifti(image + channel, affine, source / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
    write_nifti(image, affine, source / "imagesTs" / "brain_101_0000.nii.gz")
    out = tmp_path / "out"
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "brain_001.nii.gz",
        "brain_002.nii.gz",
        "brain_101.nii.gz",
    ]
    img = nib.load(str(out / "images" / "brain_001.nii.gz"))
    assert img.shape == (*SHAPE, 2)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[..., 1], image + 1)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert {r["shape"] for r in _manifest(out)} == {"16x16x8x2", "16x16x8"}


def test_interrupted_run_resumes_and_out_inside_source_is_not_reingested(tmp_path):
    source = tmp_path / "src"
    affine = orientation_affine("sagittal", (0.8, 1.1, 2.5), shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=2, affine_ras=affine)
    for name in ("a", "b", "c"):
        write_nifti(image, affine, source / f"{name}.nii.gz")
    out = source / "derived"
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    # Simulate a killed run: one output missing, a temporary file left behind; and a foreign,
    # unreadable file where an output should be.
    (out / "images" / "b.nii.gz").unlink()
    (out / "images" / ".b.nii.gz.x1y2.tmp.nii.gz").write_bytes(b"partial")
    (out / "images" / "c.nii.gz").write_bytes(b"not a nifti")
    kept = (out / "images" / "a.nii.gz").stat().st_mtime_ns
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert (out / "images" / "a.nii.gz").stat().st_mtime_ns == kept
    for name in ("b", "c"):
        np.testing.assert_array_equal(nib.load(str(out / "images" / f"{name}.nii.gz")).get_fdata(), image)
    rows = {r["case_id"]: r["reason"] for r in _manifest(out)}
    assert len(rows) == 3  # our own outputs under SOURCE/derived were not taken as inputs
    assert rows["a"].startswith("already ingested") and rows["b"] == rows["c"] == ""


def test_missing_source_is_exit_2(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nifti_named_only_dots_cannot_escape(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    write_nifti(np.zeros(SHAPE, np.float32), np.eye(4), source / "...nii.gz")
    out = tmp_path / "out"
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    (written,) = list((out / "images").iterdir())
    assert written.name.startswith("case-") and written.parent == out / "images"
    assert os.path.commonpath([written, out]) == str(out)
