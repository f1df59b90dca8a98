"""Header-only discovery over a messy hospital export and MSD layouts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from preprocessing.discovery import discover_sources
from preprocessing.synthetic import make_phantom, orientation_affine, write_hospital_folder, write_nifti


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    truths = write_hospital_folder(root, shape=(32, 32, 12), seed=7)
    return root, truths


def test_every_image_object_found_once_with_its_case_id(hospital):
    root, truths = hospital
    items = discover_sources(root)
    ok = {it.case_id: it for it in items if it.status == "ok"}
    assert set(ok) == {t.case_id for t in truths}
    for truth in truths:
        item = ok[truth.case_id]
        assert set(item.paths) == set(truth.files)
        assert item.kind == ("nifti" if truth.kind == "nifti" else "dicom")
        assert item.series_uid == truth.series_uid
        if truth.kind != "nifti":
            assert item.modality == truth.modality


def test_non_images_are_skipped_with_reasons(hospital):
    root, _ = hospital
    skipped = {it.paths[0].name: it.reason for it in discover_sources(root) if it.status == "skipped"}
    reasons = list(skipped.values())
    assert skipped["DICOMDIR"].startswith("DICOMDIR")
    assert skipped["README.txt"].startswith("not a DICOM file")
    assert any(r == "non-image object: structured report (SR)" for r in reasons)
    assert len(skipped) == 4  # DICOMDIR, README, SR, binary junk -- and nothing else


def test_discovery_reads_headers_only(hospital, monkeypatch):
    """Pixel data is never touched during discovery (fault injection: decoding explodes)."""
    root, truths = hospital

    def explode(self):
        raise AssertionError("discovery decoded pixels")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(explode))
    assert sum(it.status == "ok" for it in discover_sources(root)) == len(truths)


def test_header_scan_is_fast(hospital):
    root, _ = hospital
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    start = time.perf_counter()
    discover_sources(root)
    rate = n_files / (time.perf_counter() - start)
    assert rate > 200, (
        f"{rate:.0f} files/s"
    )  # loose floor for a loaded 2-core CI; benchmark has the real number


def test_msd_folder_merges_channels_and_strips_suffix(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "t", "modality": {"0": "T1", "1": "T2"}}))
    affine = orientation_affine("axial", (1.0, 1.0, 2.0), shape=(8, 8, 4))
    image = np.zeros((8, 8, 4), np.float32)
    for folder, case in (("imagesTr", "brain_001"), ("imagesTr", "brain_002"), ("imagesTs", "brain_101")):
        for channel in (1, 0):
            write_nifti(image, affine, tmp_path / folder / f"{case}_{channel:04d}.nii.gz")
    write_nifti(image, affine, tmp_path / "labelsTr" / "brain_001.nii.gz")
    (tmp_path / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    items = discover_sources(tmp_path)
    ok = {it.case_id: it for it in items if it.status == "ok"}
    assert set(ok) == {"brain_001", "brain_002", "brain_101"}  # labels are not images to ingest
    assert [p.name for p in ok["brain_001"].paths] == ["brain_001_0000.nii.gz", "brain_001_0001.nii.gz"]
    assert [it.reason for it in items if it.status == "skipped"] == ["not an image file of an MSD dataset"]


def test_msd_missing_channel_is_an_error(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    image = np.zeros((4, 4, 4), np.float32)
    write_nifti(image, np.eye(4), tmp_path / "imagesTr" / "x_0000.nii.gz")
    write_nifti(image, np.eye(4), tmp_path / "imagesTr" / "x_0002.nii.gz")
    (item,) = discover_sources(tmp_path)
    assert item.status == "error" and "not numbered 0..1" in item.reason


def test_same_file_name_in_two_folders_is_flagged(tmp_path):
    affine = orientation_affine("axial", (1.0, 1.0, 2.0), shape=(8, 8, 4))
    image, _ = make_phantom((8, 8, 4), (1.0, 1.0, 2.0), affine_ras=affine)
    write_nifti(image, affine, tmp_path / "a" / "scan.nii.gz")
    write_nifti(image, affine, tmp_path / "b" / "scan.nii")
    items = discover_sources(tmp_path)
    assert sorted(it.status for it in items) == ["error", "ok"]
    assert "also produced by" in next(it.reason for it in items if it.status == "error")


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        discover_sources(tmp_path / "nope")


def test_parallel_header_scan_gives_the_same_items(hospital, monkeypatch):
    root, _ = hospital
    serial = discover_sources(root, processes=1)
    monkeypatch.setattr("preprocessing.discovery.PARALLEL_SCAN_MIN_FILES", 1)
    parallel = discover_sources(root, processes=2)
    assert [(it.case_id, it.status, it.reason, it.paths) for it in parallel] == [
        (it.case_id, it.status, it.reason, it.paths) for it in serial
    ]


def test_multiframe_without_functional_groups_is_skipped(tmp_path):
    """A cine/2D+t clip (pydicom's 2-frame RLE example) is not a 3D volume: skipped with a reason."""
    source = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    (item,) = discover_sources(source)
    assert item.status == "skipped" and "multi-frame object without functional groups" in item.reason
