"""Every invalid series is refused with a reason that names the fault (never silently stacked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from preprocessing.dicom.geometry import stack_geometry
from preprocessing.dicom.series import read_dicom_series
from preprocessing.discovery import discover_sources
from preprocessing.errors import GeometryError, IngestError
from preprocessing.synthetic import (
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    write_bad_duplicate_instance,
    write_bad_gantry_tilt,
    write_bad_gap_series,
    write_bad_localizer_in_series,
    write_bad_mismatched_size,
    write_bad_truncated_pixels,
    write_dicom_series,
)

SHAPE = (16, 16, 8)


def _good(folder: Path, orientation: str = "axial", seed: int = 0, **spec) -> list[Path]:
    affine = orientation_affine(orientation, (0.8, 1.1, 2.5), shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=seed, affine_ras=affine)
    return write_dicom_series(image, affine, folder, DicomSeriesSpec(seed=seed, **spec))


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_gap_is_refused(tmp_path):
    files = write_bad_gap_series(tmp_path / "s", shape=SHAPE)
    with pytest.raises(GeometryError, match=r"missing slice\(s\): gap of 5\.000 mm .* spacing is 2\.500 mm"):
        read_dicom_series(files)


def test_uneven_spacing_is_refused(tmp_path):
    files = _good(tmp_path / "s")
    ipp = [float(v) for v in pydicom.dcmread(files[3]).ImagePositionPatient]
    _edit(files[3], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.9])
    with pytest.raises(GeometryError, match="inconsistent slice spacing"):
        read_dicom_series(files)


def test_duplicate_positions_are_refused(tmp_path):
    files = _good(tmp_path / "s")
    ipp = pydicom.dcmread(files[2]).ImagePositionPatient
    _edit(files[5], ImagePositionPatient=ipp)
    with pytest.raises(GeometryError, match="duplicate slice positions"):
        read_dicom_series(files)


def test_duplicate_sop_instance_is_refused(tmp_path):
    files = write_bad_duplicate_instance(tmp_path / "s", shape=SHAPE)
    with pytest.raises(IngestError, match="duplicate SOP instances: 1 file"):
        read_dicom_series(files)


def test_mismatched_rows_columns_are_refused(tmp_path):
    files = write_bad_mismatched_size(tmp_path / "s", shape=SHAPE)
    with pytest.raises(IngestError, match="mismatched rows/columns"):
        read_dicom_series(files)


def test_truncated_pixel_data_is_refused(tmp_path):
    files = write_bad_truncated_pixels(tmp_path / "s", shape=SHAPE)
    with pytest.raises(IngestError, match="truncated or undecodable pixel data"):
        read_dicom_series(files)


def test_truncated_compressed_pixel_data_is_refused(tmp_path):
    files = _good(tmp_path / "s", transfer_syntax=pydicom.uid.RLELossless)
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) - 200])
    with pytest.raises(IngestError, match="truncated or undecodable pixel data"):
        read_dicom_series(files)


def test_gantry_tilt_is_refused(tmp_path):
    files = write_bad_gantry_tilt(tmp_path / "s", shape=SHAPE, tilt_deg=15.0)
    with pytest.raises(GeometryError, match=r"gantry tilt .*\(15\.00 deg"):
        read_dicom_series(files)


def test_small_tilt_is_still_refused():
    """Half a degree over 20 slices is a 2 mm drift: small, but a sheared grid all the same."""
    k = np.arange(20)[:, None]
    positions = k * np.array([0.0, 2.5 * np.tan(np.deg2rad(0.5)), 2.5])
    with pytest.raises(GeometryError, match="gantry tilt"):
        stack_geometry(positions, np.array([1, 0, 0, 0, 1, 0.0]), np.array([1.0, 1.0]))


def test_rounded_positions_are_accepted():
    """Positions written with 2 decimals (some scanners) must not look like a gap or a tilt."""
    k = np.arange(30)[:, None]
    positions = np.round(k * np.array([0.0, 0.0, 1.2345]) + [10.004, -3.337, 0.0], 2)
    geometry = stack_geometry(positions[::-1], np.array([1, 0, 0, 0, 1, 0.0]), np.array([0.7, 0.9]))
    np.testing.assert_allclose(geometry.affine_lps[2, 2], 1.2345, atol=1e-3)
    np.testing.assert_allclose(np.diag(geometry.affine_lps)[:2], [0.9, 0.7])  # column spacing along i


def test_mixed_orientations_in_read_are_refused(tmp_path):
    files = _good(tmp_path / "s")
    _edit(files[1], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(IngestError, match=r"mismatched orientations"):
        read_dicom_series(files)


def test_decimal_jitter_between_slices_is_accepted(tmp_path):
    files = _good(tmp_path / "s", orientation="oblique")
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [f"{float(v) + 4e-6:.8f}" for v in ds.ImageOrientationPatient]
    ds.PixelSpacing = [f"{float(v) + 3e-6:.8f}" for v in ds.PixelSpacing]
    ds.save_as(files[2])
    assert read_dicom_series(files).array.shape == (1, *SHAPE)


def test_invalid_orientation_is_refused(tmp_path):
    files = _good(tmp_path / "s")
    for path in files:
        _edit(path, ImageOrientationPatient=[1, 0, 0, 0.5, 1, 0])
    with pytest.raises(GeometryError, match="not two orthonormal"):
        read_dicom_series(files)


def test_localizer_is_split_off_in_discovery(tmp_path):
    files = write_bad_localizer_in_series(tmp_path / "s", shape=SHAPE)
    items = discover_sources(tmp_path)
    main = [it for it in items if it.status == "ok"]
    skipped = [it for it in items if it.status == "skipped"]
    assert len(main) == 1 and len(skipped) == 1
    assert "split off 1 localizer" in main[0].reason
    assert skipped[0].paths == (files[-1],) and skipped[0].reason.startswith("localizer")
    assert len(main[0].paths) == SHAPE[2]
    read_dicom_series(main[0].paths)  # the remaining stack is a valid volume


def test_two_large_stacks_in_one_series_are_rejected(tmp_path):
    axial = _good(tmp_path / "a")
    uid = pydicom.dcmread(axial[0]).SeriesInstanceUID
    coronal = _good(tmp_path / "c", orientation="coronal", seed=1)
    first = pydicom.dcmread(axial[0])
    for i, path in enumerate(coronal):
        # Same patient, study and frame of reference: only the orientation differs.
        _edit(
            path,
            SeriesInstanceUID=uid,
            SOPInstanceUID=f"1.2.3.{i}",
            StudyInstanceUID=first.StudyInstanceUID,
            FrameOfReferenceUID=first.FrameOfReferenceUID,
        )
    items = discover_sources(tmp_path)
    assert len(items) == 1 and items[0].status == "error"
    assert "mixed orientations: 2 different ImageOrientationPatient stacks (8, 8 slices)" in items[0].reason


def test_enhanced_object_without_frames_is_a_clear_error(tmp_path):
    from pydicom.sequence import Sequence

    from preprocessing.dicom.multiframe import read_multiframe
    from preprocessing.synthetic import (
        DicomSeriesSpec,
        make_phantom,
        orientation_affine,
        write_enhanced_dicom,
    )

    image, _ = make_phantom((32, 32, 4), (1.0, 1.0, 2.0))
    path = write_enhanced_dicom(
        image,
        orientation_affine("axial", (1.0, 1.0, 2.0), shape=(32, 32, 4)),
        tmp_path / "enh.dcm",
        DicomSeriesSpec(),
    )
    ds = pydicom.dcmread(path)
    ds.PerFrameFunctionalGroupsSequence = Sequence([])
    ds.NumberOfFrames = 0
    ds.save_as(path)
    with pytest.raises(IngestError, match="no frames"):
        read_multiframe(pydicom.dcmread(path), path)


def test_reader_refuses_files_of_two_frames_of_reference_without_quoting_values(tmp_path):
    from preprocessing.synthetic import write_bad_shared_series_uid

    for differ in ("FrameOfReferenceUID", "PatientID"):
        files_a, files_b = write_bad_shared_series_uid(tmp_path / differ, differ=differ, shape=SHAPE)
        with pytest.raises(IngestError, match=f"mix 2 different {differ} values") as caught:
            read_dicom_series(files_a + files_b)
        assert "SYNTH-PID" not in str(caught.value)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("PixelSpacing", ["-0.8", "1.1"], r"PixelSpacing \[-0.8, 1.1\] is negative"),
        ("PixelSpacing", ["1e30", "1e30"], "outside the plausible physical range 0.001..100 mm"),
        ("PixelSpacing", ["nan", "1"], "PixelSpacing .* is not a finite number"),
        ("ImagePositionPatient", ["nan", "0", "0"], "ImagePositionPatient is not finite"),
        (
            "ImageOrientationPatient",
            ["nan", "0", "0", "0", "1", "0"],
            "ImageOrientationPatient .* is not finite",
        ),
    ],
)
def test_reader_names_the_tag_of_a_bad_value(tmp_path, keyword, value, message):
    from preprocessing.synthetic import write_bad_slice_attribute

    files = write_bad_slice_attribute(tmp_path / "s", keyword=keyword, value=value, shape=SHAPE)
    with pytest.raises(GeometryError, match=message):
        read_dicom_series(files)


def test_slice_spacing_from_positions_must_be_plausible():
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 250.0]])
    with pytest.raises(GeometryError, match="slice spacing measured from ImagePositionPatient 250"):
        stack_geometry(positions, np.array([1.0, 0, 0, 0, 1, 0]), np.array([1.0, 1.0]))


def test_palette_color_is_refused(tmp_path):
    from preprocessing.synthetic import write_bad_palette_color

    files = write_bad_palette_color(tmp_path / "s", shape=SHAPE)
    assert pydicom.dcmread(files[0]).PhotometricInterpretation == "PALETTE COLOR"
    with pytest.raises(IngestError, match=r"PALETTE COLOR image \(PhotometricInterpretation\)"):
        read_dicom_series(files)
