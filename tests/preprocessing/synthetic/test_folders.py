"""The hospital export folder: every image object reads back (SimpleITK / nibabel) as its truth says."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from preprocessing.image import pseudonymous_case_id
from preprocessing.synthetic import DEFAULT_PATIENTS, LABEL_NAMES, SeriesTruth, write_hospital_folder


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[SeriesTruth]]:
    root = tmp_path_factory.mktemp("hospital")
    truth_dir = root.parent / f"{root.name}_truth"
    return root, truth_dir, write_hospital_folder(root, truth_dir=truth_dir, shape=(40, 40, 12))


def _read_back(truth: SeriesTruth) -> tuple[np.ndarray, np.ndarray]:
    """Array (X, Y, Z) and RAS affine as an independent reader sees the object."""
    if truth.kind == "nifti":
        img = nib.load(truth.files[0])
        return np.asarray(img.dataobj), img.affine
    if truth.kind == "enhanced":
        itk = sitk.ReadImage(str(truth.files[0]))
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in truth.files])
        itk = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.array(itk.GetDirection()).reshape(3, 3) * np.array(itk.GetSpacing())
    affine[:3, 3] = itk.GetOrigin()
    return sitk.GetArrayFromImage(itk).transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def test_contents_and_kinds(hospital: tuple[Path, Path, list[SeriesTruth]]) -> None:
    root, _, truths = hospital
    assert len(truths) == 9
    assert {t.kind for t in truths} == {"dicom", "enhanced", "nifti"}
    assert {t.orientation for t in truths} == {"axial", "sagittal", "coronal", "oblique"}
    assert {t.modality for t in truths} == {"CT", "MR"}
    assert len({t.transfer_syntax for t in truths if t.kind != "nifti"}) >= 4  # raw, RLE, JPEG-LS, J2K
    dicom_files = [p for t in truths if t.kind != "nifti" for p in t.files]
    assert all(p.suffix == "" and p.is_file() for p in dicom_files)
    assert max(len(p.relative_to(root).parts) for p in dicom_files) >= 5  # nested folders
    folders = {p.parent for p in dicom_files}
    assert any(sum(t.kind == "dicom" and t.files[0].parent == f for t in truths) >= 2 for f in folders)
    assert (root / "DICOMDIR").is_file() and (root / "PAT1" / "README.txt").is_file()
    written = {p for p in root.rglob("*") if p.is_file()}
    extra = written - set(dicom_files) - {p for t in truths for p in t.files}
    modalities = set()
    for path in extra:
        try:
            modalities.add(pydicom.dcmread(path).Modality)
        except pydicom.errors.InvalidDicomError:
            modalities.add("not dicom")
    assert modalities == {"SR", "not dicom"}


def test_every_object_reads_back_as_its_truth(hospital: tuple[Path, Path, list[SeriesTruth]]) -> None:
    _, _, truths = hospital
    for truth in truths:
        array, affine = _read_back(truth)
        assert array.shape == truth.label.shape == truth.image.shape, truth.description
        np.testing.assert_allclose(affine, truth.affine_ras, atol=1e-5, err_msg=truth.description)
        np.testing.assert_allclose(array, truth.image, atol=1e-3, err_msg=truth.description)
        assert set(np.unique(truth.label)) == {0, *LABEL_NAMES}, truth.description
        assert truth.label_names == LABEL_NAMES


def test_truth_labels_and_case_ids(hospital: tuple[Path, Path, list[SeriesTruth]]) -> None:
    _, truth_dir, truths = hospital
    for truth in truths:
        if truth.kind == "nifti":
            assert truth.series_uid == "" and truth.case_id == truth.files[0].name.removesuffix(".nii.gz")
        else:
            assert truth.case_id == pseudonymous_case_id(truth.series_uid)
            ds = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
            assert ds.SeriesInstanceUID == truth.series_uid
            assert (
                ds.PatientName == truth.identity["patient_name"]
                and ds.PatientID == truth.identity["patient_id"]
            )
        saved = nib.load(truth_dir / f"{truth.case_id}.nii.gz")
        np.testing.assert_array_equal(np.asarray(saved.dataobj), truth.label)
        np.testing.assert_allclose(saved.affine, truth.affine_ras, atol=1e-5)
    identities = {t.identity["patient_id"] for t in truths if t.kind != "nifti"}
    assert identities == {p.patient_id for p in DEFAULT_PATIENTS}


def test_one_patient_same_anatomy_in_all_orientations(hospital: tuple[Path, Path, list[SeriesTruth]]) -> None:
    _, _, truths = hospital
    pid = DEFAULT_PATIENTS[0].patient_id
    liver_centroids = []
    for truth in truths:
        if truth.identity.get("patient_id") == pid:
            ijk = np.argwhere(truth.label == 1).mean(axis=0)
            liver_centroids.append(truth.affine_ras[:3, :3] @ ijk + truth.affine_ras[:3, 3])
    assert len(liver_centroids) >= 3
    assert np.ptp(np.array(liver_centroids), axis=0).max() < 3.0  # mm, despite different grids


def test_deterministic_names_and_uids(tmp_path: Path) -> None:
    a = write_hospital_folder(tmp_path / "a", n_series=3, shape=(32, 32, 6))
    b = write_hospital_folder(tmp_path / "b", n_series=3, shape=(32, 32, 6))
    c = write_hospital_folder(tmp_path / "c", n_series=3, seed=1, shape=(32, 32, 6))
    assert [t.series_uid for t in a] == [t.series_uid for t in b]
    assert [p.name for t in a for p in t.files] == [p.name for t in b for p in t.files]
    assert not {t.series_uid for t in a} & {t.series_uid for t in c}
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
