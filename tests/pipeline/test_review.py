"""review.csv order and columns; the flags columns of CaseRow; flag counts."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.case_row import CaseRow
from pipeline.qc_flags import QcFlag
from pipeline.review import REVIEW_COLUMNS, flag_counts, write_review_queue


def _rows() -> list[CaseRow]:
    clean = CaseRow("clean", qc_checked=True)
    border = CaseRow("border", flags=(QcFlag("touches_border", "liver: 30 voxels"),), qc_checked=True)
    inverted = CaseRow(
        "inverted",
        flags=(QcFlag("touches_border", "kidney: 21 voxels"), QcFlag("intensity_mismatch", "p1 -200")),
        qc_checked=True,
    )
    failed = CaseRow(
        "failed", status="error", reason="/data/SMITH JOHN/x.dcm broken", reason_code="read:IngestError"
    )
    skipped = CaseRow("skipped", status="skipped", reason_code="discovery_skipped")
    return [clean, skipped, border, failed, inverted]


def test_review_queue_puts_failures_first_then_risk_then_unsegmented(tmp_path):
    path = write_review_queue(tmp_path, _rows())
    table = pd.read_csv(path, keep_default_na=False)
    assert tuple(table.columns) == REVIEW_COLUMNS
    assert table["case_id"].tolist() == ["failed", "inverted", "border", "clean", "skipped"]
    inverted = table.iloc[1]
    assert float(inverted["risk"]) == 4.0 and inverted["flags"] == "touches_border;intensity_mismatch"
    assert inverted["top_reason"] == "p1 -200"  # the heaviest flag's reason
    assert table.iloc[0]["top_reason"] == "read:IngestError"  # a code, never the free text
    assert "SMITH" not in path.read_text()
    assert float(table.iloc[3]["risk"]) == 0.0 and table.iloc[4]["risk"] == ""


def test_flags_columns_round_trip_through_case_json():
    row = _rows()[4]
    record = row.to_record()
    assert record["flags"] == "touches_border;intensity_mismatch"
    back = CaseRow.from_record(json.loads(json.dumps(record)))
    assert back.flags == row.flags and back.qc_checked
    assert json.dumps(back.to_record()) == json.dumps(record)
    clean = CaseRow.from_record(CaseRow("clean", qc_checked=True).to_record())
    assert clean.flags == () and clean.qc_checked and clean.to_record()["flags"] == ""
    assert "flags" not in CaseRow("unchecked").to_record()  # older rows keep their columns


def test_flag_counts_count_segmented_cases_by_fixed_flag_name():
    counts = flag_counts([*_rows(), CaseRow("odd", flags=(QcFlag("not a flag name", ""),))])
    assert counts["cases_flagged"] == 3 and counts["flag_touches_border"] == 2
    assert counts["flag_intensity_mismatch"] == 1 and counts["flag_empty_label"] == 0
    assert all(key == "cases_flagged" or key.startswith("flag_") and " " not in key for key in counts)
