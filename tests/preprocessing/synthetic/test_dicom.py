"""Synthetic DICOM read back by independent readers (SimpleITK/GDCM, pydicom, dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from preprocessing.synthetic import (
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    stored_values,
    write_dicom_series,
    write_enhanced_dicom,
    write_text_sr,
)

SHAPE = (32, 36, 8)  # >= 32 pixels in plane: the JPEG 2000 encoder needs it
SPACING = (0.8, 1.1, 2.5)  # anisotropic in plane: a PixelSpacing swap changes the geometry
ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")


def _sitk_affine_ras(img: sitk.Image) -> np.ndarray:
    direction = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK world is LPS


def _sitk_array(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)


def _expected(image: np.ndarray, spec: DicomSeriesSpec) -> np.ndarray:
    return stored_values(image, spec) * spec.rescale_slope + float(spec.rescale_intercept or 0.0)


CASES = [
    pytest.param("CT", True, ExplicitVRLittleEndian, 1.0, id="ct-int16"),
    pytest.param("CT", False, RLELossless, 1.0, id="ct-uint16-rle"),
    pytest.param("CT", True, JPEGLSLossless, 1.0, id="ct-int16-jpegls"),
    pytest.param("CT", False, JPEG2000Lossless, 1.0, id="ct-uint16-j2k"),
    pytest.param("MR", False, ExplicitVRLittleEndian, 0.25, id="mr-fractional-slope"),
]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize(("modality", "signed", "syntax", "slope"), CASES)
def test_series_round_trip_with_simpleitk(
    tmp_path: Path, orientation: str, modality: str, signed: bool, syntax: str, slope: float
) -> None:
    affine = orientation_affine(orientation, SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, modality=modality, seed=1, affine_ras=affine)
    spec = DicomSeriesSpec(
        modality=modality,
        signed=signed,
        transfer_syntax=syntax,
        rescale_slope=slope,
        shuffle_names=True,
        shuffle_instance_numbers=True,
    )
    paths = write_dicom_series(image, affine, tmp_path, spec)
    assert len(paths) == SHAPE[2] and all(p.suffix == "" for p in paths)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))  # GDCM sorts by position
    img = reader.Execute()
    np.testing.assert_allclose(_sitk_affine_ras(img), affine, atol=1e-6)
    np.testing.assert_allclose(_sitk_array(img), _expected(image, spec), atol=1e-4)
    lowest = float(spec.rescale_intercept or 0.0) + slope * np.iinfo(np.int16 if signed else np.uint16).min
    representable = image >= lowest  # uint16 with intercept -1024 clips air noise below -1024 HU
    assert representable.mean() > 0.9
    np.testing.assert_allclose(
        _expected(image, spec)[representable], image[representable], atol=slope / 2 + 1e-4
    )


def test_headers(tmp_path: Path) -> None:
    affine = orientation_affine("axial", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=0, affine_ras=affine)
    spec = DicomSeriesSpec(signed=False, shuffle_instance_numbers=True, series_number=7)
    paths = write_dicom_series(image, affine, tmp_path, spec)
    datasets = [pydicom.dcmread(p) for p in paths]  # no force=True: proper preamble and file meta
    first = datasets[0]
    assert first.file_meta.MediaStorageSOPClassUID == CTImageStorage == first.SOPClassUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert [float(v) for v in first.PixelSpacing] == [1.1, 0.8]  # [row spacing (j), column spacing (i)]
    assert (first.Rows, first.Columns) == (SHAPE[1], SHAPE[0])
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.5
    assert first.PixelRepresentation == 0 and float(first.RescaleIntercept) == -1024.0
    assert (
        first.BitsAllocated == 16 and first.HighBit == 15 and first.PhotometricInterpretation == "MONOCHROME2"
    )
    assert (first.PatientName, first.PatientID, first.PatientBirthDate) == (
        "DOE^JANE^SYNTH",
        "SYNTH-PID-0001",
        "19700101",
    )
    assert first.AccessionNumber == "SYNTHACC01" and first.SeriesNumber == 7
    instance_numbers = [int(ds.InstanceNumber) for ds in datasets]
    assert sorted(instance_numbers) == list(range(1, SHAPE[2] + 1))
    assert instance_numbers != sorted(instance_numbers)  # deliberately not in spatial order
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), 2.5)
    assert np.allclose([float(ds.SliceLocation) for ds in datasets], z)
    assert len({ds.SOPInstanceUID for ds in datasets}) == SHAPE[2]
    assert {ds.SeriesInstanceUID for ds in datasets} == {spec.series_uid}
    assert np.array_equal(first.pixel_array, stored_values(image, spec)[:, :, 0].T)


def test_uids_are_deterministic_per_seed() -> None:
    a, b, c = DicomSeriesSpec(seed=1), DicomSeriesSpec(seed=1), DicomSeriesSpec(seed=2)
    assert (a.study_uid, a.series_uid, a.frame_of_reference_uid) == (
        b.study_uid,
        b.series_uid,
        b.frame_of_reference_uid,
    )
    assert a.study_uid != c.study_uid and a.series_uid != c.series_uid
    assert a.instance_uid(0) == b.instance_uid(0) != a.instance_uid(1)
    other = a.with_series(2, "SYNTH OTHER")
    assert other.study_uid == a.study_uid and other.series_uid != a.series_uid
    assert pydicom.uid.UID(a.series_uid).is_valid


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_files_decode_with_pydicom(tmp_path: Path, syntax: str) -> None:
    affine = orientation_affine("axial", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=0, affine_ras=affine)
    spec = DicomSeriesSpec(transfer_syntax=syntax)
    paths = write_dicom_series(image, affine, tmp_path, spec)
    ds = pydicom.dcmread(paths[3])
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.SOPInstanceUID == spec.instance_uid(3)  # compressing kept our UID
    assert np.array_equal(ds.pixel_array, stored_values(image, spec)[:, :, 3].T)


def test_small_jpeg2000_frame_is_refused_with_reason(tmp_path: Path) -> None:
    affine = orientation_affine("axial", SPACING, shape=(16, 40, 2))
    with pytest.raises(ValueError, match="JPEG 2000"):
        write_dicom_series(
            np.zeros((16, 40, 2), np.float32),
            affine,
            tmp_path,
            DicomSeriesSpec(transfer_syntax=JPEG2000Lossless),
        )


def test_sheared_affine_is_refused(tmp_path: Path) -> None:
    affine = orientation_affine("axial", SPACING, shape=SHAPE)
    affine[1, 2] = 0.5  # slice axis not perpendicular to the plane: no single IOP can say this
    with pytest.raises(ValueError, match="orthogonal"):
        write_dicom_series(np.zeros(SHAPE, np.float32), affine, tmp_path, DicomSeriesSpec())


@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_enhanced_per_frame_geometry(tmp_path: Path, modality: str, shuffle: bool) -> None:
    affine = orientation_affine("oblique", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, modality=modality, seed=0, affine_ras=affine)
    spec = DicomSeriesSpec(
        modality=modality, transfer_syntax=RLELossless if modality == "CT" else ExplicitVRLittleEndian
    )
    path = write_enhanced_dicom(image, affine, tmp_path / "enhanced", spec, shuffle_frames=shuffle)
    ds = pydicom.dcmread(path)
    assert ds.NumberOfFrames == SHAPE[2]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    slope = float(shared.PixelValueTransformationSequence[0].RescaleSlope)
    intercept = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(iop[:3] * col_spacing, lps[:3, 0], atol=1e-6)
    np.testing.assert_allclose(iop[3:] * row_spacing, lps[:3, 1], atol=1e-6)
    frames = ds.pixel_array * slope + intercept
    expected = _expected(image, spec)
    seen = []
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        k = int(round(np.dot(ipp - lps[:3, 3], lps[:3, 2]) / SPACING[2] ** 2))
        np.testing.assert_allclose(ipp, (lps @ [0, 0, k, 1])[:3], atol=1e-6)  # on the grid, no shear
        assert np.array_equal(frames[f], expected[:, :, k].T)  # frame f is slice k
        seen.append(k)
    assert sorted(seen) == list(range(SHAPE[2]))
    assert (seen != sorted(seen)) == shuffle


def test_enhanced_ct_reads_with_simpleitk(tmp_path: Path) -> None:
    affine = orientation_affine("coronal", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=0, affine_ras=affine)
    spec = DicomSeriesSpec()
    path = write_enhanced_dicom(image, affine, tmp_path / "enh", spec)
    assert pydicom.dcmread(path).SOPClassUID == EnhancedCTImageStorage
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_sitk_affine_ras(img), affine, atol=1e-6)
    np.testing.assert_allclose(_sitk_array(img), _expected(image, spec), atol=1e-4)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
def test_objects_pass_dciodvfy(tmp_path: Path) -> None:
    affine = orientation_affine("sagittal", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=0, affine_ras=affine)
    files = [
        write_dicom_series(image, affine, tmp_path / "ct", DicomSeriesSpec())[0],
        write_dicom_series(image, affine, tmp_path / "mr", DicomSeriesSpec(modality="MR"))[0],
        write_enhanced_dicom(image, affine, tmp_path / "enh_ct", DicomSeriesSpec()),
        write_enhanced_dicom(image, affine, tmp_path / "enh_mr", DicomSeriesSpec(modality="MR")),
        write_text_sr(tmp_path / "sr", DicomSeriesSpec(series_number=9)),
    ]
    assert pydicom.dcmread(files[1]).SOPClassUID == MRImageStorage
    for path in files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)
