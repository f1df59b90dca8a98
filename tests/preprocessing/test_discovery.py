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
    monkeypatch.setattr("preprocessing.dicom.scan.PARALLEL_SCAN_MIN_FILES", 1)
    parallel = discover_sources(root, processes=2)
    assert [(it.case_id, it.status, it.reason, it.paths) for it in parallel] == [
        (it.case_id, it.status, it.reason, it.paths) for it in serial
    ]


def test_multiframe_without_functional_groups_is_skipped(tmp_path):
    """A cine/2D+t clip (pydicom's 2-frame RLE example) is not a 3D volume: skipped with a reason."""
    source = Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    (item,) = discover_sources(source)
    assert item.status == "skipped" and "multi-frame object without functional groups" in item.reason


# --- input rules: special files, links, unlistable and excluded folders, split series ---------


def _series(folder: Path, seed: int = 0) -> list[Path]:
    from preprocessing.synthetic import DicomSeriesSpec, write_dicom_series

    affine = orientation_affine("axial", (1.0, 1.0, 2.0), shape=(8, 8, 4))
    image, _ = make_phantom((8, 8, 4), (1.0, 1.0, 2.0), seed=seed, affine_ras=affine)
    return write_dicom_series(image, affine, folder, DicomSeriesSpec(seed=seed))


def test_special_files_and_links_each_get_a_row(tmp_path):
    import os

    from preprocessing.synthetic import write_bad_special_files, write_bad_symlinks

    source, outside = tmp_path / "src", tmp_path / "outside"
    files = _series(source / "real")
    _series(outside / "linked", seed=1)
    write_bad_special_files(source / "pipes")
    write_bad_symlinks(source / "links", outside / "linked")
    (source / "links" / "again").symlink_to(source / "real", target_is_directory=True)
    (source / "links" / "a_file_again.dcm").symlink_to(files[0])
    items = discover_sources(source)  # no hang (FIFOs never opened), no crash (loops)
    rows = {str(it.paths[0].relative_to(source)): (it.status, it.reason) for it in items if it.status != "ok"}
    assert rows["pipes/scan.dcm"][1].startswith("not a regular file (a named pipe (FIFO))")
    assert rows["links/back_to_parent"][1].startswith("symlink loop: the link points to a folder")
    assert rows["links/self_loop.dcm"][1].startswith("symlink loop (the link resolves to itself)")
    assert rows["links/broken.nii.gz"][1].startswith("broken symlink")
    # Links into SOURCE are not followed: their targets are read where they lie, once.
    assert rows["links/again"][1].startswith("symlink to a folder inside SOURCE")
    assert rows["links/a_file_again.dcm"][1].startswith("symlink to a file inside SOURCE")
    assert all(status == "skipped" for status, _ in rows.values())
    ok = [it for it in items if it.status == "ok"]
    # The series behind the link out of SOURCE is read (once), the real one once.
    assert sorted(len(it.paths) for it in ok) == [4, 4]
    assert {os.path.dirname(str(it.paths[0].relative_to(source))) for it in ok} == {
        "real",
        "links/linked_series",
    }
    # A second link out of SOURCE to the same folder is not read twice.
    (source / "links" / "z_same_again").symlink_to(outside / "linked", target_is_directory=True)
    again = [it for it in discover_sources(source) if it.paths[0].name == "z_same_again"]
    expected = f"the same folder was already read as {source / 'links' / 'linked_series'}; read once"
    assert [it.reason for it in again] == [expected]


def test_a_fifo_given_as_source_is_skipped_not_opened(tmp_path):
    import os

    os.mkfifo(tmp_path / "scan.dcm")
    (item,) = discover_sources(tmp_path / "scan.dcm")
    assert item.status == "skipped" and "named pipe" in item.reason


def test_unlistable_folder_is_an_error_row(tmp_path, monkeypatch):
    import os

    _series(tmp_path / "ok")
    _series(tmp_path / "locked", seed=1)
    real = os.scandir

    def scandir(path="."):  # fault injection: tests run as root, where chmod 000 still reads
        if not isinstance(path, int) and Path(path) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = discover_sources(tmp_path)
    assert [it.status for it in items] == ["ok", "error"]
    assert (
        items[1].paths == (tmp_path / "locked",) and "cannot list folder: PermissionError" in items[1].reason
    )


def test_out_and_private_folders_are_not_scanned(tmp_path):
    image = np.zeros((4, 4, 4), np.float32)
    for name in ("scan", "out/images/old", ".staging/x/mask", "sub/.model/weights"):
        write_nifti(image, np.eye(4), tmp_path / f"{name}.nii.gz")
    items = discover_sources(tmp_path, exclude=[tmp_path / "out"])
    assert [it.case_id for it in items] == ["scan"]


def test_series_sharing_a_uid_splits_by_identity_with_stable_ids(tmp_path):
    from preprocessing.image import pseudonymous_case_id
    from preprocessing.synthetic import write_bad_shared_series_uid

    files_a, files_b = write_bad_shared_series_uid(
        tmp_path / "s", differ="FrameOfReferenceUID", shape=(8, 8, 4)
    )
    both = [it for it in discover_sources(tmp_path) if it.status == "ok"]
    assert sorted(len(it.paths) for it in both) == [4, 4]  # never one 8-slice volume
    for it in both:
        ds = pydicom.dcmread(it.paths[0], stop_before_pixels=True)
        key = "/".join(
            str(ds[k].value)
            for k in ("SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID", "PatientID")
        )
        assert it.case_id == pseudonymous_case_id(key)  # depends on the part's own headers only
        assert "series split" in it.reason and "FrameOfReferenceUID" in it.reason
        assert "SYNTH-PID" not in it.reason  # values of identity tags are never quoted
    (alone,) = discover_sources(tmp_path / "s" / "a")
    assert alone.case_id == pseudonymous_case_id(alone.series_uid) and alone.reason == ""
    assert alone.case_id not in {it.case_id for it in both}  # a rerun can never resume the wrong part


def test_unplaceable_slice_errors_the_series_but_2d_images_are_skipped(tmp_path):
    files = _series(tmp_path / "placed")
    ds = pydicom.dcmread(files[-1])
    del ds.ImagePositionPatient
    ds.save_as(files[-1])
    flat = _series(tmp_path / "flat", seed=1)
    for path in flat:  # a series of plain 2D pictures: no geometry anywhere
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(path)
    items = discover_sources(tmp_path)
    (error,) = [it for it in items if it.status == "error"]
    assert len(error.paths) == 4 and "(slice_003.dcm: no ImagePositionPatient)" in error.reason
    skipped = [it for it in items if it.status == "skipped"]
    assert len(skipped) == 4 and all(
        it.reason.startswith("2D image without patient geometry") for it in skipped
    )


def test_truncated_image_file_is_reported_as_truncated(tmp_path):
    from preprocessing.synthetic import write_bad_truncated_header

    write_bad_truncated_header(tmp_path / "s", shape=(8, 8, 4))
    (item,) = discover_sources(tmp_path / "s")
    assert item.status == "error" and len(item.paths) == 4
    assert "truncated DICOM file: a CT Image Storage object" in item.reason
    lone = tmp_path / "lone.dcm"
    lone.write_bytes(item.paths[0].read_bytes()[:200])  # cut inside the file meta
    (cut,) = discover_sources(lone)
    assert cut.status == "error" and "truncated DICOM file" in cut.reason
