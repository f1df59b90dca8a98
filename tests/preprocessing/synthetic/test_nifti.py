"""Synthetic NIfTI files and the MSD dataset, checked with nibabel, SimpleITK and MONAI's loader."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from monai.data import load_decathlon_datalist

from preprocessing.synthetic import (
    LABEL_NAMES,
    make_phantom,
    orientation_affine,
    write_msd_dataset,
    write_nifti,
)


def test_write_nifti_round_trip_keeps_dtype_and_affine(tmp_path: Path) -> None:
    affine = orientation_affine("oblique", (0.8, 1.1, 2.5), shape=(24, 20, 10))
    image, label = make_phantom((24, 20, 10), seed=0, affine_ras=affine)
    img_path = write_nifti(image, affine, tmp_path / "sub" / "img.nii.gz")
    lab_path = write_nifti(label, affine, tmp_path / "lab.nii")
    img, lab = nib.load(img_path), nib.load(lab_path)
    assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), image)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), label)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    # SimpleITK (LPS) sees the same geometry.
    itk = sitk.ReadImage(str(img_path))
    direction = np.array(itk.GetDirection()).reshape(3, 3) * np.array(itk.GetSpacing())
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ direction, affine[:3, :3], atol=1e-4)
    np.testing.assert_allclose(np.array(itk.GetOrigin()) * [-1, -1, 1], affine[:3, 3], atol=1e-4)
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "sub").glob(".tmp-*"))


def test_qform_differs_from_sform(tmp_path: Path) -> None:
    affine = orientation_affine("axial", (1.5, 1.5, 3.0), shape=(8, 8, 4))
    path = write_nifti(np.zeros((8, 8, 4), np.float32), affine, tmp_path / "q.nii.gz", qform_differs=True)
    img = nib.load(path)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)  # nibabel: sform wins
    assert np.abs(img.get_qform() - affine).max() > 5.0


def _dataset(root: Path, **kwargs: object) -> tuple[Path, dict]:
    path = write_msd_dataset(root, **kwargs)  # type: ignore[arg-type]
    return path, json.loads(path.read_text())


def test_msd_dataset_layout_and_monai_loader(tmp_path: Path) -> None:
    path, meta = _dataset(tmp_path / "msd", n_train=5, n_test=2, shape=(24, 24, 12))
    assert meta["labels"] == {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}
    assert meta["modality"] == meta["channel_names"] == {"0": "CT"}
    assert meta["numTraining"] == 5 and meta["numTest"] == 2
    train = load_decathlon_datalist(str(path), True, "training")
    test = load_decathlon_datalist(str(path), True, "test")
    assert len(train) == 5 and len(test) == 2
    for entry in train + test:
        image, label = nib.load(entry["image"]), nib.load(entry["label"])
        assert image.shape == label.shape == (24, 24, 12)
        np.testing.assert_array_equal(image.affine, label.affine)  # bit-identical geometry
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, *LABEL_NAMES}
    assert Path(train[0]["image"]).name == "case_000.nii.gz"
    assert Path(test[0]["label"]).parent.name == "labelsTs"


def test_msd_patients_have_repeat_cases_and_test_patients_are_new(tmp_path: Path) -> None:
    _, meta = _dataset(tmp_path / "msd", n_train=6, n_test=2, shape=(16, 16, 8))
    train_patients = [e["patient_id"] for e in meta["training"]]
    assert len(set(train_patients)) < len(train_patients)  # some patients have two cases
    assert not {e["patient_id"] for e in meta["test"]} & set(train_patients)
    _, flat = _dataset(tmp_path / "flat", n_train=4, n_test=1, shape=(16, 16, 8), with_patients=False)
    assert len({e["patient_id"] for e in flat["training"]}) == 4


def test_msd_same_seed_same_data(tmp_path: Path) -> None:
    arrays = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path, meta = _dataset(tmp_path / name, n_train=2, n_test=1, shape=(16, 16, 8), seed=seed)
        arrays.append(nib.load(path.parent / meta["training"][1]["image"]).get_fdata())
    assert np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])


def test_msd_multichannel(tmp_path: Path) -> None:
    path, meta = _dataset(tmp_path / "mc", n_train=2, n_test=1, shape=(16, 16, 8), n_channels=2)
    assert meta["channel_names"] == {"0": "CT", "1": "MR"} and meta["tensorImageSize"] == "4D"
    img = nib.load(path.parent / meta["training"][0]["image"])
    assert img.shape == (16, 16, 8, 2)
    data = img.get_fdata()
    assert data[..., 0].min() < -900 and data[..., 1].min() >= 0  # CT and MR contrast of one anatomy
    assert nib.load(path.parent / meta["training"][0]["label"]).shape == (16, 16, 8)


@pytest.mark.parametrize("modality", ["MR"])
def test_msd_mr(tmp_path: Path, modality: str) -> None:
    _, meta = _dataset(tmp_path / "mr", n_train=1, n_test=0, shape=(16, 16, 8), modality=modality)
    assert meta["channel_names"] == {"0": "MR"} and meta["test"] == []
