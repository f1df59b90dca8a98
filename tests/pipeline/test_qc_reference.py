"""measure_case on hand-made label maps; build_qc_reference and its JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.qc_reference import QcReference, build_qc_reference, measure_case

NAMES = {1: "liver", 2: "kidney"}


def _case(offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[2:5, 2:5, 2:5] = 1  # 27 voxels
    labels[7:9, 7:9, 7:9] = 1  # a second component, 8 voxels
    labels[0:2, 5:7, 5:7] = 2  # 8 voxels, 4 of them on the x = 0 face
    image = np.full(labels.shape, 10.0 + offset)
    image[labels == 1] = 100.0 + offset
    image[labels == 2] = 200.0
    return image, labels


def test_measure_case_counts_volumes_components_intensities_and_border_voxels():
    image, labels = _case()
    m = measure_case(image, labels, (2.0, 1.0, 0.5), NAMES)
    liver, kidney = m.labels["liver"], m.labels["kidney"]
    assert liver.voxels == 35 and liver.volume_ml == pytest.approx(35 * 1.0 / 1000)
    assert liver.components == 2 and kidney.components == 1
    assert liver.intensity_mean == pytest.approx(100.0) and liver.intensity_std == pytest.approx(
        0.0, abs=1e-6
    )
    assert liver.border_voxels == 0 and not liver.touches_border
    assert kidney.border_voxels == 4 and kidney.touches_border
    assert m.spacing_mm == (2.0, 1.0, 0.5) and m.fov_mm == (20.0, 10.0, 5.0)
    assert m.intensity["p50"] == pytest.approx(10.0) and m.intensity["p99"] == pytest.approx(
        100.0
    )  # kidney: 0.8 % of voxels


def test_an_absent_label_is_measured_as_empty():
    image, labels = _case()
    labels[labels == 2] = 0
    kidney = measure_case(image, labels, (1.0, 1.0, 1.0), NAMES).labels["kidney"]
    assert not kidney.present and kidney.components == 0 and math.isnan(kidney.intensity_mean)


def test_reference_condenses_cases_and_survives_strict_json():
    cases = [measure_case(*_case(offset), (1.0, 1.0, 1.0 + offset / 10), NAMES) for offset in (0.0, 1.0, 2.0)]
    absent_image, absent = _case()
    absent[absent == 2] = 0
    cases.append(measure_case(absent_image, absent, (1.0, 1.0, 1.0), NAMES))
    ref = build_qc_reference(cases, [0.1, 0.2, float("nan"), 0.3])
    assert ref.cases == 4 and ref.labels["kidney"].present_fraction == 0.75
    assert ref.labels["liver"].components_max == 2
    assert ref.labels["liver"].volume_ml == (0.035, 0.042)  # 35 voxels of 1 to 1.2 µL
    assert ref.spacing_mm[-1] == pytest.approx((1.0, 1.2))  # the largest spacing of each case
    assert ref.uncertainty_p95 == pytest.approx(np.percentile([0.1, 0.2, 0.3], 95))
    text = json.dumps(ref.to_json(), allow_nan=False)
    assert QcReference.from_json(json.loads(text)) == ref


def test_reference_without_uncertainty_scores_has_no_p95_and_needs_cases():
    ref = build_qc_reference([measure_case(*_case(), (1.0, 1.0, 1.0), NAMES)], [])
    assert ref.uncertainty_p95 is None
    assert QcReference.from_json(ref.to_json()).uncertainty_p95 is None
    with pytest.raises(ValueError, match="at least one"):
        build_qc_reference([], [])
    with pytest.raises(ValueError, match="format"):
        QcReference.from_json({"format": 99})
