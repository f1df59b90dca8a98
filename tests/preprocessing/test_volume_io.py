"""NIfTI / NRRD / MHA reading and atomic NIfTI writing: geometry against nibabel and SimpleITK."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing.errors import IngestError
from preprocessing.image import ras_to_lps
from preprocessing.source_item import SourceItem
from preprocessing.synthetic import (
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    write_bad_nan_nifti,
    write_bad_truncated_nifti,
    write_dicom_series,
    write_nifti,
)
from preprocessing.volume_io import load_source_item, read_volume, write_nifti_atomic

SHAPE = (20, 16, 10)
SPACING = (0.7, 0.9, 2.0)


def _phantom(orientation: str = "oblique"):
    affine = orientation_affine(orientation, SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, SPACING, seed=4, affine_ras=affine)
    return image.astype(np.float32), affine


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_nifti_read_keeps_array_and_affine(tmp_path, orientation):
    image, affine = _phantom(orientation)
    path = write_nifti(image, affine, tmp_path / "scan_01.nii.gz")
    volume = read_volume(path)
    reference = nib.load(str(path))
    assert volume.case_id == "scan_01"
    assert np.array_equal(volume.array[0], np.asanyarray(reference.dataobj))
    assert np.array_equal(volume.array[0], image)
    np.testing.assert_array_equal(volume.affine_ras, reference.affine)


def test_nifti_sform_wins_over_a_different_qform(tmp_path):
    image, affine = _phantom()
    path = write_nifti(image, affine, tmp_path / "q.nii.gz", qform_differs=True)
    header = nib.load(str(path)).header
    assert not np.allclose(header.get_qform(), header.get_sform())  # the fixture really differs
    np.testing.assert_allclose(read_volume(path).affine_ras, affine, atol=1e-5)


def test_nifti_scaling_is_applied(tmp_path):
    stored = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 500
    img = nib.Nifti1Image(stored, np.diag([0.7, 0.9, 2.0, 1.0]))
    img.header.set_slope_inter(0.5, -10.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, str(path))
    volume = read_volume(path)
    np.testing.assert_allclose(volume.array[0], stored * 0.5 - 10.0)
    np.testing.assert_allclose(volume.array[0], nib.load(str(path)).get_fdata())


def test_nan_and_truncated_nifti_are_refused(tmp_path):
    with pytest.raises(IngestError, match="NaN/Inf"):
        read_volume(write_bad_nan_nifti(tmp_path / "nan.nii.gz", shape=SHAPE, fraction=0.2))
    with pytest.raises(IngestError, match="cannot read NIfTI"):
        read_volume(write_bad_truncated_nifti(tmp_path / "cut.nii.gz", shape=SHAPE))
    (tmp_path / "junk.nii").write_bytes(b"\0" * 100)
    with pytest.raises(IngestError, match="cannot read NIfTI"):
        read_volume(tmp_path / "junk.nii")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_converted_from_lps(tmp_path, suffix):
    image, affine = _phantom("oblique")
    aff_lps = ras_to_lps(affine)
    spacing = np.linalg.norm(aff_lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(image.transpose(2, 1, 0))  # (x, y, z) -> sitk's (z, y, x)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((aff_lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(aff_lps[:3, 3].tolist())
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(img, str(path))
    volume = read_volume(path)
    assert np.array_equal(volume.array[0], image)
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-6)
    assert volume.case_id == "scan"


def test_write_nifti_atomic_round_trip(tmp_path):
    image, affine = _phantom()
    path = write_nifti_atomic(image, affine, tmp_path / "out" / "case.nii.gz")
    img = nib.load(str(path))
    assert np.array_equal(np.asanyarray(img.dataobj), image)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    # Both forms carry the geometry, so readers preferring the qform agree.
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-4)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["case.nii.gz"]  # no temporaries left
    # Independent reader: SimpleITK sees the same world position of voxel (3, 5, 7).
    itk = sitk.ReadImage(str(path))
    world_lps = np.array(itk.TransformIndexToPhysicalPoint((3, 5, 7)))
    np.testing.assert_allclose(world_lps * [-1, -1, 1], (affine @ [3, 5, 7, 1])[:3], atol=1e-3)


def test_write_nifti_atomic_multichannel_and_dtype(tmp_path):
    data = np.zeros((*SHAPE, 2), dtype=np.float64)
    path = write_nifti_atomic(data, np.eye(4), tmp_path / "mc.nii.gz")
    assert nib.load(str(path)).get_data_dtype() == np.float32
    path = write_nifti_atomic(data[..., 0], np.eye(4), tmp_path / "u8.nii.gz", dtype=np.uint8)
    assert nib.load(str(path)).shape == SHAPE and nib.load(str(path)).get_data_dtype() == np.uint8


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    image, affine = _phantom()
    path = write_nifti_atomic(image, affine, tmp_path / "case.nii.gz")
    before = path.read_bytes()

    def broken(self, fh):  # fault injection: the disk fills up mid-write
        fh.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", broken)
    with pytest.raises(OSError, match="No space"):
        write_nifti_atomic(image * 2, affine, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_load_source_item_merges_msd_channels(tmp_path):
    image, affine = _phantom("axial")
    p0 = write_nifti(image, affine, tmp_path / "c_0000.nii.gz")
    p1 = write_nifti(image + 1, affine, tmp_path / "c_0001.nii.gz")
    volume = load_source_item(SourceItem("nifti", "c", (p0, p1)))
    assert volume.array.shape == (2, *SHAPE) and volume.case_id == "c"
    assert np.array_equal(volume.array[1], image + 1)
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    p2 = write_nifti(image, shifted, tmp_path / "d_0001.nii.gz")
    with pytest.raises(IngestError, match="different grid"):
        load_source_item(SourceItem("nifti", "d", (p0, p2)))


def test_header_declaring_more_than_the_file_holds_is_refused_before_allocating(tmp_path):
    """8 GiB declared, 1 KiB held: refused from the header and the file size, before any data is read."""
    from preprocessing.synthetic import write_bad_oversized_nifti

    for name in ("huge.nii.gz", "huge.nii"):
        with pytest.raises(IngestError, match=r"declares 2048x2048x1024 int16 .* holds only 1,376 bytes"):
            read_volume(write_bad_oversized_nifti(tmp_path / name))


def test_multi_member_gzip_nifti_is_counted_not_refused(tmp_path):
    """ISIZE is that of the last gzip member only: the streaming count decides, and the file is fine."""
    import gzip

    image, affine = _phantom("axial")
    raw = write_nifti(image, affine, tmp_path / "one.nii")
    data = raw.read_bytes()
    path = tmp_path / "two_members.nii.gz"
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert np.array_equal(read_volume(path).array[0], image)


def test_volume_larger_than_available_memory_is_refused(tmp_path, monkeypatch):
    import preprocessing.volume_io as volume_io

    image, affine = _phantom("axial")
    path = write_nifti(image, affine, tmp_path / "scan.nii.gz")
    monkeypatch.setattr(volume_io, "_available_memory", lambda: 1000)
    with pytest.raises(IngestError, match="GiB of memory; only 0.0 GiB are available"):
        read_volume(path)


def test_4d_nifti_is_an_image_only_where_dataset_json_declares_its_channels(tmp_path):
    image, affine = _phantom("axial")
    path = write_nifti(np.stack([image, image + 1, image + 2], axis=-1), affine, tmp_path / "t.nii.gz")
    with pytest.raises(IngestError, match="4D image with 3 volumes"):
        load_source_item(SourceItem("nifti", "t", (path,)))
    with pytest.raises(IngestError, match="dataset.json declares 2 channels"):
        load_source_item(SourceItem("nifti", "t", (path,), meta={"declared_channels": 2}))
    volume = load_source_item(SourceItem("nifti", "t", (path,), meta={"declared_channels": 3}))
    assert volume.array.shape == (3, *SHAPE) and np.array_equal(volume.array[2], image + 2)
    # One volume on the 4th axis is a 3D image.
    single = write_nifti(image[..., np.newaxis], affine, tmp_path / "s.nii.gz")
    assert load_source_item(SourceItem("nifti", "s", (single,))).array.shape == (1, *SHAPE)


@pytest.mark.parametrize("zoom", [1e-30, 1e30])
def test_implausible_nifti_voxel_size_is_refused(tmp_path, zoom):
    from preprocessing.errors import GeometryError

    path = write_nifti(np.zeros((4, 4, 4), np.float32), np.diag([zoom, 1.0, 1.0, 1.0]), tmp_path / "z.nii")
    with pytest.raises(GeometryError, match=r"voxel size in the NIfTI header \(pixdim/sform\) of z.nii"):
        read_volume(path)


def test_loading_a_dicom_item_keeps_its_dicom_source(tmp_path):
    """The item's case id wins, and the reader's DicomSource reaches the caller (the SEG writer)."""
    image, affine = _phantom("axial")
    files = write_dicom_series(image, affine, tmp_path / "series", DicomSeriesSpec(seed=3))
    volume = load_source_item(SourceItem("dicom", "case-x", tuple(reversed(files)), modality="CT"))
    assert volume.case_id == "case-x"
    assert volume.dicom is not None and list(volume.dicom.files) == files  # slice order, not input order
    assert len(volume.dicom.headers) == len(files)
