"""Each DICOM write_bad_* helper really produces the fault it names (else ingestion tests prove nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from preprocessing.synthetic import (
    EVIL_TEXT,
    write_bad_duplicate_instance,
    write_bad_gantry_tilt,
    write_bad_gap_series,
    write_bad_localizer_in_series,
    write_bad_mismatched_size,
    write_bad_path_traversal,
    write_bad_truncated_pixels,
)


def _headers(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _positions(datasets: list[pydicom.Dataset]) -> np.ndarray:
    return np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])


def test_gap(tmp_path: Path) -> None:
    paths = write_bad_gap_series(tmp_path)
    assert len(paths) == 11 and sorted(tmp_path.iterdir()) == sorted(paths)
    z = np.sort(_positions(_headers(paths))[:, 2])
    steps = np.round(np.diff(z), 3)
    assert sorted(set(steps.tolist())) == [2.5, 5.0] and list(steps).count(5.0) == 1


def test_duplicate_instance(tmp_path: Path) -> None:
    datasets = _headers(write_bad_duplicate_instance(tmp_path))
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(uids) == 13 and len(set(uids)) == 12


def test_localizer_in_series(tmp_path: Path) -> None:
    datasets = _headers(write_bad_localizer_in_series(tmp_path))
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({tuple(ds.ImageOrientationPatient) for ds in datasets}) == 2
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert "LOCALIZER" in datasets[-1].ImageType
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind


def test_mismatched_size(tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in write_bad_mismatched_size(tmp_path)]
    sizes = [(ds.Rows, ds.Columns) for ds in datasets]
    assert len(set(sizes)) == 2 and sizes.count((32, 28)) == 1
    assert all(ds.pixel_array.shape == (ds.Rows, ds.Columns) for ds in datasets)  # each file self-consistent


def test_truncated_pixels(tmp_path: Path) -> None:
    paths = write_bad_truncated_pixels(tmp_path)
    failures = 0
    for path in paths:
        pydicom.dcmread(path, stop_before_pixels=True)  # headers always parse
        try:
            _ = pydicom.dcmread(path).pixel_array
        except (ValueError, EOFError, OSError):
            failures += 1
    assert failures == 1


def test_gantry_tilt(tmp_path: Path) -> None:
    datasets = _headers(write_bad_gantry_tilt(tmp_path, tilt_deg=15.0))
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    steps = np.diff(_positions(datasets), axis=0)
    angles = np.degrees(np.arccos(steps @ normal / np.linalg.norm(steps, axis=1)))
    np.testing.assert_allclose(angles, 15.0, atol=1e-3)
    assert len({tuple(ds.ImageOrientationPatient) for ds in datasets}) == 1


def test_path_traversal(tmp_path: Path) -> None:
    datasets = _headers(write_bad_path_traversal(tmp_path))
    first = datasets[0]
    assert (
        first.PatientID
        == first.SeriesDescription
        == first.StudyDescription
        == EVIL_TEXT
        == str(first.PatientName)
    )
    assert all(p.parent == tmp_path for p in tmp_path.rglob("*"))  # the writer itself did not traverse
