"""MSD dataset reading and validation: layouts, patients, and the clear errors for bad datasets."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from preprocessing.errors import DatasetError
from preprocessing.msd import load_case_arrays, read_msd_dataset
from preprocessing.synthetic import write_msd_dataset


def _save(array, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture
def msd(tmp_path):
    root = tmp_path / "msd"
    write_msd_dataset(root, n_train=4, n_test=0, shape=(20, 18, 10), seed=3)
    return root


def test_reads_synthetic_dataset_with_patients(msd):
    ds = read_msd_dataset(msd)
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001", "case_002", "case_003"]
    assert ds.labels == {0: "background", 1: "liver", 2: "kidney", 3: "lesion"}
    assert ds.modalities == {0: "CT"}
    # write_msd_dataset gives patient 0 two cases
    assert ds.cases[0].patient_id == ds.cases[1].patient_id != ds.cases[2].patient_id
    image, label, affine = load_case_arrays(ds.cases[0])
    assert image.shape == (1, 20, 18, 10) and image.dtype == np.float32
    assert label.shape == (20, 18, 10) and set(np.unique(label)) <= {0, 1, 2, 3}
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.5, 1.5, 3.0))


def test_channel_files_and_patients_csv(tmp_path):
    root = tmp_path / "mc"
    aff = np.diag([2.0, 1.0, 3.0, 1.0])
    for case in ("a", "b"):
        for ch in range(2):
            _save(np.full((6, 5, 4), ch + 1, np.float32), aff, root / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
        _save(np.zeros((6, 5, 4), np.uint8), aff, root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"name": "mc", "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "bg", "1": "x"}})
    )
    (root / "patients.csv").write_text("case_id,patient_id\na,p1\nb,p2\n")
    ds = read_msd_dataset(root)
    assert ds.num_channels == 2 and [c.patient_id for c in ds.cases] == ["p1", "p2"]
    image, _, _ = load_case_arrays(ds.cases[1])
    assert image.shape == (2, 6, 5, 4) and image[1].mean() == 2.0


def test_four_d_multichannel(tmp_path):
    root = tmp_path / "4d"
    write_msd_dataset(root, n_train=2, n_test=0, shape=(12, 10, 8), n_channels=2, with_patients=False)
    ds = read_msd_dataset(root)
    image, label, _ = load_case_arrays(ds.cases[0])
    assert image.shape == (2, 12, 10, 8) and label.shape == (12, 10, 8)


def test_missing_label(msd):
    (msd / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_002.*no label"):
        read_msd_dataset(msd)


def test_undeclared_label_value(msd):
    path = msd / "labelsTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(DatasetError, match=r"case_001.*\[7\].*not declared"):
        read_msd_dataset(msd)


def test_shape_mismatch(msd):
    path = msd / "labelsTr" / "case_003.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(path))
    with pytest.raises(DatasetError, match="case_003.*shape"):
        read_msd_dataset(msd)


def test_affine_mismatch(msd):
    path = msd / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[0, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(path))
    with pytest.raises(DatasetError, match="case_000.*different affines"):
        read_msd_dataset(msd)


def test_empty_dataset_and_missing_json(tmp_path, msd):
    with pytest.raises(DatasetError, match="no dataset.json"):
        read_msd_dataset(tmp_path / "nothing")
    for p in (msd / "imagesTr").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="no training cases"):
        read_msd_dataset(msd)


@pytest.mark.parametrize(
    "labels",
    [{"0": "background", "1": "liver", "2": "kidney"}, {"background": 0, "liver": 1, "kidney": "2"}],
    ids=["msd", "nnunet_v2"],
)
def test_dataset_labels_in_both_styles(tmp_path, labels):
    from preprocessing.msd import read_dataset_labels

    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": labels}))
    assert read_dataset_labels(path) == {0: "background", 1: "liver", 2: "kidney"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"name": "x"}', "missing or empty 'labels'"),
        ('{"labels": {"liver": "one"}}', "neither MSD style"),
        ('{"labels": {"liver": [1, 2]}}', "region lists are not supported"),
    ],
)
def test_dataset_labels_errors_name_the_file_and_the_problem(tmp_path, content, message):
    from preprocessing.msd import read_dataset_labels

    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        read_dataset_labels(path)
    assert str(path) in str(info.value)
