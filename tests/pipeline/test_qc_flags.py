"""Each QC flag on synthetic measurements: it fires on its fault, and only then; risk_score."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.qc_flags import FLAG_NAMES, FLAG_WEIGHTS, QcFlag, flag_case, risk_score, top_flag
from pipeline.qc_reference import CaseMeasurements, LabelMeasurements, build_qc_reference


def _label(voxels: int = 1000, components: int = 1, mean: float = 90.0, border: int = 0) -> LabelMeasurements:
    return LabelMeasurements(voxels, voxels * 0.01, components, mean, 10.0, border)


def _case(**labels: LabelMeasurements) -> CaseMeasurements:
    return CaseMeasurements(
        spacing_mm=(1.0, 1.0, 3.0),
        fov_mm=(100.0, 100.0, 90.0),
        intensity={"p1": -1000.0, "p50": 30.0, "p99": 200.0},
        labels={"liver": _label(), "kidney": _label(500, mean=180.0), **labels},
    )


REFERENCE = build_qc_reference([_case(), _case(liver=_label(1200, components=2))], [0.1, 0.2, 0.3])


def _names(case: CaseMeasurements, score: float | None = None, reference=REFERENCE) -> list[str]:
    return [f.name for f in flag_case(case, reference, score)]


def test_a_case_like_training_has_no_flag():
    assert _names(_case(liver=_label(1100)), score=0.2) == []


@pytest.mark.parametrize(
    ("case", "flag", "words"),
    [
        (_case(kidney=_label(0, components=0)), "empty_label", "kidney: absent"),
        (_case(liver=_label(100)), "volume_outlier", "liver: 1.0 mL outside training [10.0, 12.0]"),
        (_case(liver=_label(3000)), "volume_outlier", "widened to [5.0, 24.0]"),
        (_case(liver=_label(components=5)), "component_outlier", "5 components > training max 2 + 2"),
        (_case(liver=_label(border=25)), "touches_border", "liver: 25 voxels"),
        (
            _case(liver=_label(mean=-90.0)),
            "intensity_mismatch",
            "liver: mean intensity -90.0 vs training 90.0",
        ),
    ],
)
def test_each_label_flag_fires_with_a_reason_naming_what_against_what(case, flag, words):
    flags = flag_case(case, REFERENCE, None)
    assert [f.name for f in flags] == [flag]
    assert words in flags[0].reason


def test_image_flags_fire_on_intensity_percentiles_and_spacing():
    inverted = dataclasses.replace(_case(), intensity={"p1": -200.0, "p50": -30.0, "p99": 1000.0})
    flags = flag_case(inverted, REFERENCE, None)
    assert [f.name for f in flags] == ["intensity_mismatch"] and "p99 1000.0 outside training" in flags[
        0
    ].reason
    slightly = dataclasses.replace(_case(), intensity={"p1": -1000.0, "p50": 60.0, "p99": 250.0})
    assert _names(slightly) == []  # within 10 % of the p1..p99 span (120)
    coarse = dataclasses.replace(_case(), spacing_mm=(1.0, 1.0, 5.0))
    assert _names(coarse) == ["spacing_out_of_range"]
    sagittal = dataclasses.replace(_case(), spacing_mm=(3.0, 1.0, 1.0))  # same spacings, another order
    assert _names(sagittal) == []


def test_high_uncertainty_is_above_the_out_of_fold_p95_only():
    assert _names(_case(), score=0.5) == ["high_uncertainty"]
    assert _names(_case(), score=0.25) == []
    no_scores = build_qc_reference([_case()], [])
    assert _names(_case(), score=0.99, reference=no_scores) == []


def test_without_a_reference_only_touches_border_runs():
    faulty = _case(liver=_label(10, components=9, mean=-500.0, border=30), kidney=_label(0, components=0))
    assert _names(faulty, score=1.0, reference=None) == ["touches_border"]


def test_one_flag_per_name_lists_every_label_and_flags_keep_their_order():
    case = _case(liver=_label(border=30, components=9), kidney=_label(500, mean=180.0, border=40))
    flags = flag_case(case, REFERENCE, None)
    assert [f.name for f in flags] == ["component_outlier", "touches_border"]
    assert "liver" in flags[1].reason and "kidney" in flags[1].reason
    assert set(FLAG_NAMES) == set(FLAG_WEIGHTS)


def test_risk_score_is_the_sum_of_weights_plus_the_uncertainty_score():
    flags = (QcFlag("empty_label", "a"), QcFlag("touches_border", "b"))
    assert risk_score(flags, 0.25) == pytest.approx(3.0 + 1.0 + 0.25)
    assert risk_score(flags, None) == pytest.approx(4.0)
    assert risk_score((), float("nan")) == 0.0
    assert risk_score((QcFlag("from_a_newer_version", ""),), None) == 1.0
    assert top_flag(flags) == flags[0] and top_flag(()) is None
