"""The QC reference of the training cases (pipeline.training.out_of_fold.qc_reference_for)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.qc_reference import QcReference, measure_case
from pipeline.training.out_of_fold import qc_reference_for
from preprocessing.msd import read_msd_dataset
from preprocessing.synthetic import write_msd_dataset


def test_qc_reference_measures_labels_on_the_source_grid(tmp_path):
    write_msd_dataset(tmp_path / "msd", n_train=3, n_test=0, shape=(20, 18, 10), seed=1)
    ds = read_msd_dataset(tmp_path / "msd")
    reference = qc_reference_for(ds.cases, ds.foreground_labels, [0.1, 0.2, 0.3])
    parsed = QcReference.from_json(reference)
    assert parsed.cases == 3 and set(parsed.labels) == set(ds.foreground_labels.values())
    assert parsed.uncertainty_p95 == pytest.approx(np.percentile([0.1, 0.2, 0.3], 95))
    # the same numbers as measuring the first case's files by hand on their own grid
    img = nib.load(str(ds.cases[0].image_paths[0]))
    lab = np.rint(np.asarray(nib.load(str(ds.cases[0].label_path)).dataobj)).astype(np.int32)
    spacing = tuple(float(s) for s in np.linalg.norm(img.affine[:3, :3], axis=0))
    by_hand = measure_case(np.asarray(img.dataobj, np.float32), lab, spacing, ds.foreground_labels)
    one = QcReference.from_json(qc_reference_for(ds.cases[:1], ds.foreground_labels, []))
    assert [lo for lo, _ in one.fov_mm] == pytest.approx(sorted(by_hand.fov_mm))
    name = next(iter(ds.foreground_labels.values()))
    assert one.labels[name].volume_ml[0] == pytest.approx(by_hand.labels[name].volume_ml, rel=1e-3)
    assert qc_reference_for([], ds.foreground_labels, []) == {}
