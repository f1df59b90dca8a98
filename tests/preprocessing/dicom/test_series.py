"""read_dicom_series: geometry and values against the generator's truth and independent readers.

Independent references: SimpleITK's ImageSeriesReader (GDCM), dcm2niix, and pydicom's own
modality LUT for per-slice rescale. Grids are anisotropic in-plane (0.7 x 0.9 mm) so a
PixelSpacing swap cannot hide, and the phantom is left-right asymmetric.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from preprocessing.dicom.series import read_dicom_series
from preprocessing.errors import IngestError
from preprocessing.image import lps_to_ras
from preprocessing.synthetic import (
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    stored_values,
    write_dicom_series,
    write_enhanced_dicom,
)

SHAPE = (40, 32, 12)
SPACING = (0.7, 0.9, 2.0)
ORIENTATIONS = ["axial", "sagittal", "coronal", "oblique"]


def _series(tmp_path: Path, orientation: str, **spec_changes):
    affine = orientation_affine(orientation, SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, SPACING, "CT", seed=1, affine_ras=affine)
    spec = DicomSeriesSpec(shuffle_names=True, shuffle_instance_numbers=True, seed=3, **spec_changes)
    files = write_dicom_series(image, affine, tmp_path / orientation, spec)
    expected = stored_values(image, spec).astype(np.float64) * spec.rescale_slope + float(
        spec.rescale_intercept or 0
    )
    return files, affine, expected, spec


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both readers' grids brought to the closest RAS orientation (flips/permutations only)."""
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    out = nib.orientations.apply_orientation(array, transform)
    inv = nib.orientations.inv_ornt_aff(transform, array.shape)
    return out, affine @ inv


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    affine_lps[:3, 3] = img.GetOrigin()
    return array, lps_to_ras(affine_lps)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_geometry_matches_truth_and_simpleitk(tmp_path, orientation):
    files, affine, expected, _ = _series(tmp_path, orientation)
    volume = read_dicom_series(files)
    # Same grid as written: exact voxel values and the generator's affine.
    assert volume.array.shape == (1, *SHAPE)
    assert np.array_equal(volume.array[0], expected)
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-3)
    np.testing.assert_allclose(volume.spacing_mm, SPACING, atol=1e-4)
    assert volume.modality == "CT" and volume.array.dtype == np.int16
    # Independent reader (GDCM), compared after bringing both to the same orientation.
    ref_array, ref_affine = _sitk_read(files[0].parent)
    ours, ours_aff = _canonical(volume.array[0], volume.affine_ras)
    theirs, theirs_aff = _canonical(ref_array, ref_affine)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(ours_aff, theirs_aff, atol=1e-3)


def test_slice_files_follow_position_not_names(tmp_path):
    files, affine, _, _ = _series(tmp_path, "axial")
    volume = read_dicom_series(list(reversed(files)))
    # write_dicom_series returns files in k order; InstanceNumbers and names are shuffled.
    assert volume.dicom is not None and list(volume.dicom.files) == files
    assert volume.dicom.frame_of_slice == tuple(range(len(files))) and not volume.dicom.multiframe
    assert not hasattr(volume, "meta")  # the DICOM source is typed (Volume.dicom)
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-3)


def test_left_right_landmark_in_world(tmp_path):
    """Liver (1) is on the patient's right, kidney (2) on the left: RAS x(liver) > x(kidney)."""
    affine = orientation_affine("sagittal", SPACING, shape=SHAPE)
    image, label = make_phantom(SHAPE, SPACING, "CT", seed=1, affine_ras=affine)
    files = write_dicom_series(image, affine, tmp_path / "s", DicomSeriesSpec(shuffle_names=True))
    volume = read_dicom_series(files)
    world = {}
    for value in (1, 2):
        ijk = np.argwhere(label == value).mean(axis=0)
        world[value] = volume.affine_ras @ np.append(ijk, 1.0)
        np.testing.assert_allclose(world[value][:3], (affine @ np.append(ijk, 1.0))[:3], atol=1e-3)
    assert world[1][0] > world[2][0] + 5.0  # RAS +x is the patient's right


@pytest.mark.parametrize(
    ("syntax", "codec"),
    [(RLELossless, None), (JPEGLSLossless, "jpeg_ls"), (JPEG2000Lossless, "openjpeg")],
    ids=["rle", "jpegls", "j2k"],
)
def test_compressed_transfer_syntaxes(tmp_path, syntax, codec):
    if codec:
        pytest.importorskip(codec)  # optional decoders (pyjpegls, pylibjpeg-openjpeg)
    files, affine, expected, _ = _series(tmp_path, "coronal", transfer_syntax=syntax)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    volume = read_dicom_series(files, decode_threads=2)
    assert np.array_equal(volume.array[0], expected)
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-3)


def test_big_endian_equals_little_endian():
    little = read_dicom_series([Path(get_testdata_file("MR_small.dcm"))])
    big = read_dicom_series([Path(get_testdata_file("MR_small_bigendian.dcm"))])
    assert big.array.shape == little.array.shape == (1, 64, 64, 1)
    assert np.array_equal(big.array, little.array)
    np.testing.assert_allclose(big.affine_ras, little.affine_ras)


def test_pydicom_example_ct_in_hu():
    """CT_small: our single-slice read equals pydicom's modality LUT, transposed to (i, j)."""
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    volume = read_dicom_series([path])
    assert np.array_equal(volume.array[0, :, :, 0], apply_modality_lut(ds.pixel_array, ds).T)
    np.testing.assert_allclose(
        volume.affine_ras[:3, 3], [-1, -1, 1] * np.array(ds.ImagePositionPatient, float)
    )


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_enhanced_multiframe_matches_single_frame(tmp_path, orientation):
    affine = orientation_affine(orientation, SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, SPACING, "MR", seed=2, affine_ras=affine)
    spec = DicomSeriesSpec(modality="MR", seed=5)
    path = write_enhanced_dicom(image, affine, tmp_path / "enhanced", spec, shuffle_frames=True)
    single = read_dicom_series(write_dicom_series(image, affine, tmp_path / "single", spec))
    multi = read_dicom_series([path])
    assert np.array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine_ras, affine, atol=1e-3)
    assert multi.dicom is not None and multi.dicom.multiframe and multi.dicom.files == (path,)
    assert sorted(multi.dicom.frame_of_slice) == list(range(SHAPE[2]))
    assert multi.dicom.frame_of_slice != tuple(range(SHAPE[2]))  # frames really were shuffled
    # The header kept for the SEG writer must not keep the pixel data alive.
    (header,) = multi.dicom.headers
    assert "PixelData" not in header and getattr(header, "_pixel_array", None) is None


def test_per_slice_rescale_and_fractional_slope(tmp_path):
    files, _, _, _ = _series(tmp_path, "axial", rescale_slope=0.5, rescale_intercept=-1000.25)
    # Give one slice its own slope/intercept, as some scanners do.
    ds = pydicom.dcmread(files[3])
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-7"
    ds.save_as(files[3])
    volume = read_dicom_series(files)
    assert volume.array.dtype == np.float32
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        expected = apply_modality_lut(ds.pixel_array, ds).T
        np.testing.assert_allclose(volume.array[0, :, :, k], expected, rtol=0, atol=1e-3)


def test_integer_rescale_widens_when_int16_overflows(tmp_path):
    files, _, expected, _ = _series(
        tmp_path, "axial", signed=False, rescale_slope=1.0, rescale_intercept=-1024
    )
    for path in files:  # push values so that raw - 1024 leaves int16's range
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = "32000"
        ds.save_as(path)
    volume = read_dicom_series(files)
    assert volume.array.dtype == np.int32
    assert volume.array.max() > 32767
    assert np.array_equal(volume.array[0], expected + 1024 + 32000)


def test_matches_dcm2niix_world_corners(tmp_path):
    dcm2niix = pytest.importorskip("dcm2niix")
    files, _, _, _ = _series(tmp_path, "oblique")
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        [dcm2niix.bin, "-z", "n", "-f", "series", "-o", str(out), str(files[0].parent)],
        check=True,
        capture_output=True,
    )
    img = nib.load(str(out / "series.nii"))
    volume = read_dicom_series(files)
    theirs, theirs_aff = _canonical(np.asarray(img.dataobj), img.affine)
    ours, ours_aff = _canonical(volume.array[0], volume.affine_ras)
    assert theirs.shape == ours.shape
    np.testing.assert_array_equal(theirs, ours)
    # World coordinates of the 8 corners of the volume agree.
    corners = np.array(
        [
            [i, j, k, 1]
            for i in (0, ours.shape[0] - 1)
            for j in (0, ours.shape[1] - 1)
            for k in (0, ours.shape[2] - 1)
        ],
        dtype=float,
    ).T
    np.testing.assert_allclose((ours_aff @ corners)[:3], (theirs_aff @ corners)[:3], atol=1e-3)


def test_empty_and_unreadable_inputs(tmp_path):
    with pytest.raises(IngestError, match="empty series"):
        read_dicom_series([])
    junk = tmp_path / "junk"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(IngestError, match="cannot read DICOM"):
        read_dicom_series([junk])
