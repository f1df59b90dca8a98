"""DICOM SEG round trips: written with our writer, read back with highdicom onto the same voxels.

The source series are written here with plain pydicom (independent of the project's synthetic
generator), with shuffled file names and InstanceNumbers, anisotropic in-plane spacing and axial,
sagittal and oblique orientations. SimpleITK confirms the test's own grid convention; highdicom
reads the SEG back per source instance and as a world-placed volume. The writer takes the
files, headers and slice order from the reader (``read_dicom_series(paths).dicom``).
"""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.writers.dicom_seg import write_dicom_seg
from preprocessing.dicom.series import read_dicom_series
from preprocessing.errors import GeometryError
from preprocessing.image import DicomSource

SHAPE = (20, 14, 9)  # (X=columns, Y=rows, Z=slices)
SPACING = (0.6, 0.9, 2.5)  # column spacing, row spacing, slice spacing (mm): all different
LABELS = {1: "liver", 3: "lesion"}  # sparse values on purpose: segment numbers are 1, 2


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


ORIENTATIONS = {
    # columns of R: row direction r, column direction c, slice normal n = r x c (LPS)
    "axial": np.eye(3),
    "sagittal": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "oblique": _rotation(0, 25) @ _rotation(2, -35),
}


def _affine_lps(orientation: str) -> np.ndarray:
    rot = ORIENTATIONS[orientation]
    assert np.allclose(np.cross(rot[:, 0], rot[:, 1]), rot[:, 2])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(SPACING)
    aff[:3, 3] = (-12.5, 30.25, -71.0)
    return aff


def _write_series(folder, affine_lps, image, seed=0) -> list[tuple]:
    """One CT file per slice k; returns [(path, SOPInstanceUID)] in slice order k."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    n = image.shape[2]
    names, numbers = rng.permutation(n), rng.permutation(n) + 1
    r = affine_lps[:3, 0] / SPACING[0]
    c = affine_lps[:3, 1] / SPACING[1]
    out = []
    for k in range(n):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "TEST^SEG", "P1", "19800101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.PositionReferenceIndicator = "", "TEST", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, int(numbers[k])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in affine_lps @ np.array([0, 0, k, 1.0])][:3]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{SPACING[1]}", f"{SPACING[0]}"]  # [row spacing, column spacing]
        ds.SliceThickness = f"{SPACING[2]}"
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = "0", "1", "120"
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T.astype(np.int16)).tobytes()
        path = folder / f"img{names[k]:03d}"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, uid))
    return out


def _asymmetric_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:9, 3:12, 1:6] = 1  # off-centre block: a flip along any axis moves it
    mask[2:5, 3:6, 6] = 1  # a step on one side only
    mask[15:18, 9:13, 4:8] = 3  # lesion near the high-i, high-j, high-k corner
    return mask


def _source(paths) -> DicomSource:
    """The reader's record of the files, headers and slice order of ``paths`` (any order)."""
    source = read_dicom_series(list(paths)).dicom
    assert source is not None
    return source


def _seg_in_our_grid(seg, affine_lps) -> np.ndarray:
    """Place highdicom's world-positioned SEG volume back onto our (i, j, k) grid via world coordinates."""
    vol = seg.get_volume(combine_segments=True, relabel=False)
    idx = np.argwhere(vol.array > 0)
    world = vol.affine @ np.c_[idx, np.ones(len(idx))].T
    ours = np.linalg.inv(affine_lps) @ world
    assert np.allclose(ours, np.round(ours), atol=1e-3), "SEG voxels fall between our voxel centres"
    ours = np.round(ours[:3]).astype(int)
    out = np.zeros(SHAPE, np.uint8)
    out[tuple(ours)] = vol.array[tuple(idx.T)]
    return out


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "oblique"])
def test_seg_lands_on_the_same_voxels(tmp_path, orientation):
    affine = _affine_lps(orientation)
    image = np.random.default_rng(1).integers(-100, 200, SHAPE)
    files = _write_series(tmp_path / "src", affine, image)
    paths = [p for p, _ in files]

    # The test's convention (i=column, j=row, k=sorted slice) is what SimpleITK reads, too.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "src")))
    ref = reader.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(ref).transpose(2, 1, 0), image)
    assert np.allclose(ref.TransformIndexToPhysicalPoint((3, 5, 7)), (affine @ [3, 5, 7, 1])[:3], atol=1e-4)

    mask = _asymmetric_mask()
    shuffled = [paths[i] for i in np.random.default_rng(2).permutation(len(paths))]
    out = write_dicom_seg(
        mask, _source(shuffled), LABELS, tmp_path / "out" / "seg.dcm", algorithm_version="9.9"
    )

    seg = hd.seg.segread(out)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["liver", "lesion"]
    desc = seg.get_segment_description(1)
    assert desc.algorithm_identification[0].AlgorithmVersion == "9.9"
    assert seg.FrameOfReferenceUID == pydicom.dcmread(paths[0]).FrameOfReferenceUID

    # Per source instance, in slice order k: frame (rows, cols) == mask[:, :, k].T
    uids = [uid for _, uid in files]
    per_instance = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    for s, value in enumerate(sorted(LABELS)):
        expected = (mask == value).transpose(2, 1, 0)
        assert np.array_equal(per_instance[..., s], expected), f"segment {s + 1} off its voxels"
    # and in the world: the SEG volume placed by its own geometry lands on our grid
    assert np.array_equal(_seg_in_our_grid(seg, affine), np.where(mask == 3, 2, mask))


def test_multiframe_source(tmp_path):
    affine = _affine_lps("oblique")
    image = np.random.default_rng(3).integers(-100, 200, SHAPE)
    files = _write_series(tmp_path / "src", affine, image)
    singles = [pydicom.dcmread(p) for p, _ in files]
    rng = np.random.default_rng(4)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [singles[i] for i in rng.permutation(len(singles))], generate_uid(), 2, generate_uid(), 1
    )
    mf_path = tmp_path / "enhanced.dcm"
    enhanced.save_as(mf_path, enforce_file_format=True)

    mask = _asymmetric_mask()
    out = write_dicom_seg(mask, _source([mf_path]), LABELS, tmp_path / "seg.dcm")
    seg = hd.seg.segread(out)
    assert np.array_equal(_seg_in_our_grid(seg, affine), np.where(mask == 3, 2, mask))
    assert seg.SeriesInstanceUID != enhanced.SeriesInstanceUID


def test_empty_mask_and_bad_shapes(tmp_path):
    files = _write_series(tmp_path / "src", _affine_lps("axial"), np.zeros(SHAPE))
    paths = [p for p, _ in files]
    source = _source(paths)
    out = write_dicom_seg(np.zeros(SHAPE, np.uint8), source, LABELS, tmp_path / "empty.dcm")
    assert not hd.seg.segread(out).pixel_array.any()
    with pytest.raises(GeometryError, match="does not match"):
        write_dicom_seg(np.zeros(SHAPE[::-1], np.uint8), source, LABELS, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_dciodvfy_reports_no_errors(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not on PATH (Debian/Ubuntu: apt-get install dicom3tools)")
    files = _write_series(tmp_path / "src", _affine_lps("oblique"), np.zeros(SHAPE))
    out = write_dicom_seg(_asymmetric_mask(), _source(p for p, _ in files), LABELS, tmp_path / "seg.dcm")
    result = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == [], report
    assert "Segmentation" in report  # dciodvfy recognised the IOD it checked


@pytest.mark.parametrize("layout", ["series", "enhanced"])
def test_with_project_generator_and_reader(tmp_path, layout):
    """The contract with ingestion: a mask on read_dicom_series' grid goes back onto the right voxels."""
    synthetic = pytest.importorskip("preprocessing.synthetic", reason="H2's generator not present")
    series = pytest.importorskip("preprocessing.dicom.series", reason="H3's reader not present")
    rot = ORIENTATIONS["oblique"]
    affine_ras = np.eye(4)
    affine_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot * np.asarray(SPACING)
    affine_ras[:3, 3] = (10.0, -20.0, 5.0)
    image = np.random.default_rng(5).normal(0, 50, SHAPE).astype(np.float32)
    spec = synthetic.DicomSeriesSpec(shuffle_names=True, shuffle_instance_numbers=True)
    if layout == "series":
        paths = synthetic.write_dicom_series(image, affine_ras, tmp_path / "src", spec)
        paths = [paths[i] for i in np.random.default_rng(6).permutation(len(paths))]
    else:  # frames stored in a shuffled order: only the per-frame positions tell where they go
        paths = [
            synthetic.write_enhanced_dicom(image, affine_ras, tmp_path / "mf.dcm", spec, shuffle_frames=True)
        ]
    volume = series.read_dicom_series(list(paths))
    mask = _asymmetric_mask()
    assert volume.spatial_shape == mask.shape
    assert volume.dicom is not None
    out = write_dicom_seg(mask, volume.dicom, LABELS, tmp_path / "seg.dcm")
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_ras
    assert np.array_equal(_seg_in_our_grid(hd.seg.segread(out), affine_lps), np.where(mask == 3, 2, mask))


def test_labelmap_type_round_trip(tmp_path):
    """LABELMAP SEGs read back onto the same voxels (not dciodvfy-checked: the installed dicom3tools
    predates the Label Map Segmentation IOD and reports it as unknown)."""
    affine = _affine_lps("sagittal")
    files = _write_series(tmp_path / "src", affine, np.zeros(SHAPE))
    mask = _asymmetric_mask()
    out = write_dicom_seg(
        mask, _source(p for p, _ in files), LABELS, tmp_path / "seg.dcm", segmentation_type="LABELMAP"
    )
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "LABELMAP"
    assert np.array_equal(_seg_in_our_grid(seg, affine), np.where(mask == 3, 2, mask))


def test_the_readers_slice_order_is_the_segs_frame_order(tmp_path):
    """The writer sorts nothing: frame ``frame_of_slice[k]`` (file k) gets mask slice k."""
    affine = _affine_lps("sagittal")
    files = _write_series(tmp_path / "src", affine, np.random.default_rng(5).integers(-100, 200, SHAPE))
    shuffled = [files[i] for i in np.random.default_rng(6).permutation(len(files))]
    source = _source(p for p, _ in shuffled)
    assert all("PixelData" not in ds for ds in source.headers)  # headers only: no second parse
    # Handing the slices over in another order moves the segments with them: nothing re-sorts them.
    reversed_source = DicomSource(source.files[::-1], source.headers[::-1], source.frame_of_slice)
    mask = _asymmetric_mask()
    seg = hd.seg.segread(write_dicom_seg(mask, reversed_source, LABELS, tmp_path / "reversed.dcm"))
    uids = [str(ds.SOPInstanceUID) for ds in source.headers]  # slice order k
    per_instance = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    assert np.array_equal(per_instance[..., 0], (mask == 1).transpose(2, 1, 0)[::-1])


def test_a_slice_order_that_is_not_one_slice_per_frame_is_refused(tmp_path):
    files = _write_series(tmp_path / "src", _affine_lps("axial"), np.zeros(SHAPE))
    source = _source(p for p, _ in files)
    broken = DicomSource(source.files, source.headers, (0,) * len(source.files))
    with pytest.raises(GeometryError, match="one slice per frame"):
        write_dicom_seg(_asymmetric_mask(), broken, LABELS, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()
