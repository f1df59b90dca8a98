"""One batch case: the modality check, the typed row and its columns, the writers from one list."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from pipeline import case_runner, writers
from pipeline.case_folder import read_case_record
from pipeline.case_row import CaseRow, error_kind
from pipeline.case_runner import CaseConfig, CaseInFlight, write_case
from pipeline.compatibility import model_incompatibility
from pipeline.inference.config import InferenceConfig
from pipeline.inference.segment import Segmentation
from pipeline.metrics import ReferenceMetrics
from pipeline.writers.base import SegmentedCase
from pipeline.writers.qc_picture import QcPictureWriter
from preprocessing.errors import GeometryError
from preprocessing.image import Volume
from preprocessing.source_item import SourceItem
from preprocessing.synthetic import write_nifti


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
    [
        ("MRI", "CT", "MR", "CT"),
        ("FLAIR", "CT", "MR", "CT"),
        ("CT", "MR", "CT", "MR"),
        ("PET", "CT", "PT", "CT"),
        ("CT", "PT", "CT", "PT"),
    ],
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
    with caplog.at_level(logging.WARNING, logger="pipeline.compatibility"):
        assert model_incompatibility(_volume("MR"), _bundle("SPECTRAL_XYZ")) == ("", "")
    assert "SPECTRAL_XYZ" in caplog.text and "not a known imaging modality" in caplog.text


def test_channel_count_is_checked_first():
    code, reason = model_incompatibility(_volume("MR", channels=2), _bundle("MRI"))
    assert code == "incompatible_channels" and "expects 1 channel(s), image has 2" in reason


def test_error_kind_carries_no_text_of_the_case():
    assert error_kind(GeometryError("gap in /data/SMITH JOHN/ct")) == "GeometryError"
    assert error_kind(MemoryError()) == "out_of_memory"


# --- the typed row and its one flattening -------------------------------------------------------


def _finished_row() -> CaseRow:
    return CaseRow(
        case_id="c1",
        source="/data/c1.nii.gz",
        kind="nifti",
        reason="split series",
        model_fingerprint="abc",
        stage_seconds={"read": 0.5, "segment": 1.25, "write": 0.125},
        seconds=1.875,
        volumes_ml={"liver": 12.5, "left_kidney": 0.0},
        metrics={
            "liver": ReferenceMetrics(dice=0.9, hd95=2.0, nsd=0.95),
            "left_kidney": ReferenceMetrics(dice=0.0, hd95=math.nan, nsd=0.0),
        },
    )


def test_a_row_flattens_to_the_columns_of_cases_csv_in_their_order():
    record = _finished_row().to_record()
    assert list(record) == [
        "case_id", "source", "kind", "status", "reason", "reason_code", "model_fingerprint",
        "vol_liver_ml", "vol_left_kidney_ml",
        "dice_liver", "hd95_liver", "nsd_liver", "dice_left_kidney", "hd95_left_kidney", "nsd_left_kidney",
        "seconds_read", "seconds_segment", "seconds_write", "seconds",
    ]  # fmt: skip
    assert record["vol_liver_ml"] == 12.5 and record["dice_liver"] == 0.9 and record["seconds"] == 1.875
    # A row no model touched records no fingerprint and no stage times.
    assert list(CaseRow("c2", status="skipped", reason_code="discovery_skipped").to_record()) == [
        "case_id", "source", "kind", "status", "reason", "reason_code", "seconds",
    ]  # fmt: skip


def test_a_case_json_record_reads_back_to_the_same_row_and_columns():
    row = _finished_row()
    back = CaseRow.from_record(json.loads(json.dumps(row.to_record())))  # NaN survives as json writes it
    assert back.metrics["liver"] == row.metrics["liver"] and math.isnan(back.metrics["left_kidney"].hd95)
    assert back.volumes_ml == row.volumes_ml and back.stage_seconds == row.stage_seconds
    assert json.dumps(back.to_record()) == json.dumps(row.to_record())
    unknown = {**CaseRow("c3").to_record(), "iou_liver": 0.5}  # a column this version does not know
    assert CaseRow.from_record(unknown).to_record()["iou_liver"] == 0.5


# --- writers come from one list ----------------------------------------------------------------

LABELS = {1: "liver", 2: "lesion"}


class _TextWriter:
    """A writer as a next issue would add one: a file of its own, optionally behind a flag."""

    name, title, filename = "label_list", "label list", "labels.txt"
    optional, flag, help = False, "", ""
    needs_probabilities, fails_case = False, True

    def applies_to(self, case: SegmentedCase) -> bool:
        return True

    def write(self, case: SegmentedCase, path: Path) -> Path:
        present = sorted(int(v) for v in np.unique(case.segmentation.labels) if v in case.label_names)
        path.write_text(",".join(case.label_names[v] for v in present))
        return path


class _OptionalWriter(_TextWriter):
    name, filename, optional, flag, help = "extra", "extra.txt", True, "--save-extra", "also write extra.txt"


def _case(tmp_path: Path) -> tuple[CaseInFlight, CaseConfig]:
    image = np.random.default_rng(0).normal(0, 50, (12, 10, 6)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    source = write_nifti(image, affine, tmp_path / "src" / "c1.nii.gz")
    labels = np.zeros(image.shape, np.uint8)
    labels[2:6, 2:6, 1:4] = 1
    item = SourceItem(kind="nifti", case_id="c1", paths=(source,))
    work = CaseInFlight(
        item=item,
        row=CaseRow(case_id="c1", source=str(source), kind="nifti", model_fingerprint="fp"),
        volume=Volume(image[None], affine, case_id="c1"),
        segmentation=Segmentation(labels, affine),
        seconds={"read": 0.1, "segment": 0.2},
    )
    config = CaseConfig(
        bundle_dir="unused", out_dir=str(tmp_path / "out"), inference=InferenceConfig(roi_size=(8, 8, 8))
    )
    return work, config


@pytest.fixture
def no_model(monkeypatch):
    """The write stage's model metadata without a model bundle."""
    bundle = SimpleNamespace(label_names=LABELS, name="toy", version_tag="v1")
    monkeypatch.setattr(case_runner, "load_bundle_cached", lambda *args: bundle)


def test_a_writer_added_to_the_list_writes_its_file_into_the_case_folder(tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(writers, "WRITERS", (*writers.WRITERS, _TextWriter()))
    work, config = _case(tmp_path)
    assert work.segmentation is not None
    labels = work.segmentation.labels
    row = write_case(work, config)
    folder = tmp_path / "out" / "c1"
    assert row.status == "ok", row.reason
    assert (folder / "labels.txt").read_text() == "liver"
    assert {p.name for p in folder.iterdir()} == {"mask.nii.gz", "qc.png", "labels.txt", "case.json"}
    mask = nib.load(folder / "mask.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj), labels) and mask.get_data_dtype() == np.uint8
    liver_ml = round(4 * 4 * 3 * (1.5 * 1.5 * 3.0) / 1000, 3)
    assert read_case_record(tmp_path / "out", "c1").volumes_ml == {"liver": liver_ml, "lesion": 0.0}


def test_an_optional_writer_runs_only_when_enabled_and_brings_its_flag(tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(writers, "WRITERS", (*writers.WRITERS, _OptionalWriter()))
    work, config = _case(tmp_path / "off")
    assert write_case(work, config).status == "ok"
    assert not (tmp_path / "off" / "out" / "c1" / "extra.txt").exists()
    work, config = _case(tmp_path / "on")
    write_case(work, CaseConfig(**{**config.__dict__, "outputs": frozenset({"extra"})}))
    assert (tmp_path / "on" / "out" / "c1" / "extra.txt").is_file()

    from workflows.cli import build_parser
    from workflows.predict import PredictConfig, _loggable_params

    args = build_parser().parse_args(["predict", "src", "--model", "m", "--out", "o", "--save-extra"])
    assert args.save_extra is True and args.save_probabilities is False
    params = _loggable_params(PredictConfig(Path("s"), "m", Path("o"), outputs=frozenset({"extra"})))
    assert params["save_extra"] is True and params["save_probabilities"] is False


def test_a_failing_writer_fails_the_case_and_leaves_no_folder(tmp_path, monkeypatch, no_model):
    broken = _TextWriter()
    broken.write = lambda case, path: (_ for _ in ()).throw(OSError("disk gone"))  # type: ignore[method-assign]
    monkeypatch.setattr(writers, "WRITERS", (*writers.WRITERS, broken))
    work, config = _case(tmp_path)
    row = write_case(work, config)
    assert (row.status, row.reason_code) == ("error", "write:OSError")
    assert not (tmp_path / "out" / "c1").exists()


def test_a_failed_qc_picture_leaves_the_case_ok_with_a_note(tmp_path, monkeypatch, no_model, caplog):
    def fail(self, case, path):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(QcPictureWriter, "write", fail)
    work, config = _case(tmp_path)
    work.row.reason = "split series"
    row = write_case(work, config)
    assert row.status == "ok"
    assert row.reason == "split series; QC picture skipped: RuntimeError: no fonts"
    assert row.reason_code == "qc_picture_skipped:RuntimeError"
    assert (tmp_path / "out" / "c1" / "mask.nii.gz").is_file()
    assert "QC picture skipped" in caplog.text
