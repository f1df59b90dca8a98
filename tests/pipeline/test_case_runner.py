"""The modality check of a batch case compares imaging modalities, not spellings."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.case_runner import error_kind, model_incompatibility
from preprocessing.errors import GeometryError
from preprocessing.image import Volume


def _volume(modality: str, channels: int = 1) -> Volume:
    return Volume(np.zeros((channels, 4, 4, 4), np.float32), np.eye(4), case_id="c", modality=modality)


def _bundle(modality: str, in_channels: int = 1):
    return SimpleNamespace(modality=modality, in_channels=in_channels)


@pytest.mark.parametrize(
    "dataset_name", ["MRI", "MR", "T1", "T1w", "t1gd", "T2", "T2w", "FLAIR", "ADC", "DWI", "mri", " T2 "]
)
def test_msd_mr_channel_names_segment_dicom_mr(dataset_name):
    assert model_incompatibility(_volume("MR"), _bundle(dataset_name)) == ("", "")


@pytest.mark.parametrize(
    ("dataset_name", "series", "want", "have"),
    [("MRI", "CT", "MR", "CT"), ("FLAIR", "CT", "MR", "CT"), ("CT", "MR", "CT", "MR"), ("PET", "CT", "PT", "CT"),
     ("CT", "PT", "CT", "PT")],
)
def test_different_imaging_modalities_are_refused_saying_what_was_compared(dataset_name, series, want, have):
    code, reason = model_incompatibility(_volume(series), _bundle(dataset_name))
    assert code == "incompatible_modality"
    assert f"trained on {want} images (dataset.json modality '{dataset_name}')" in reason
    assert f"this series is {have} (DICOM Modality '{series}')" in reason


@pytest.mark.parametrize(("dataset_name", "series"), [("CT", "CT"), ("PET", "PT"), ("CT", ""), ("", "MR")])
def test_same_or_unknown_series_modality_is_accepted(dataset_name, series):
    assert model_incompatibility(_volume(series), _bundle(dataset_name)) == ("", "")


def test_unknown_name_warns_instead_of_refusing(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.case_runner"):
        assert model_incompatibility(_volume("MR"), _bundle("SPECTRAL_XYZ")) == ("", "")
    assert "SPECTRAL_XYZ" in caplog.text and "not a known imaging modality" in caplog.text


def test_channel_count_is_checked_first():
    code, reason = model_incompatibility(_volume("MR", channels=2), _bundle("MRI"))
    assert code == "incompatible_channels" and "expects 1 channel(s), image has 2" in reason


def test_error_kind_carries_no_text_of_the_case():
    assert error_kind(GeometryError("gap in /data/SMITH JOHN/ct")) == "GeometryError"
    assert error_kind(MemoryError()) == "out_of_memory"
