"""report.html: one row per case, pictures that resolve, escaping, the MLflow variant without paths
or free text; and the provenance that case.json gains."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from pipeline.case_folder import CaseModel, publish_case, read_case_record
from pipeline.case_row import CaseRow
from pipeline.inference.uncertainty import CaseUncertainty
from pipeline.metrics import ReferenceMetrics
from pipeline.qc_flags import QcFlag
from pipeline.report import MLFLOW_REPORT_FILE, REPORT_FILE, write_batch_report
from pipeline.writers.qc_picture import write_qc_picture

HOSTILE = '<script>alert("x")</script> /data/SMITH^JOHN/ct & co.dcm'
MODEL = {
    "name": "liver-net",
    "version": "liver-net/v3",
    "date": "2026-12-01T10:00:00+00:00",
    "uri": "/models/x",
}


class _Page(HTMLParser):
    """Rows of the two tables, and every img src / a href, by table."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.rows, self.images, self.links, self.scripts = None, {}, [], [], 0
        self.headers: dict[str, list[str]] = {}
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
            self.rows[self.table], self.headers[self.table] = [], []
        elif tag == "tr" and "data-case-id" in attrs:
            self.rows[self.table].append(attrs["data-case-id"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "th":
            self._in_th = True
            self.headers[self.table].append("")
        elif tag == "script":
            self.scripts += 1
            assert "src" not in attrs, "no external script: the page must work offline"

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.headers[self.table][-1] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _tiny_png(path: Path, colour=(230, 159, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1200, 510), colour).save(path)


def _batch(out: Path) -> list[CaseRow]:
    flagged = CaseRow(
        "case-a",
        source="/data/SMITH^JOHN/a.nii.gz",
        volumes_ml={"liver": 1500.25, "tumour": 0.0},
        metrics={"liver": ReferenceMetrics(0.91, 4.2, 0.88), "tumour": ReferenceMetrics(0.0, math.nan, 0.0)},
        uncertainty=CaseUncertainty(0.42, {"liver": 0.1}, {"liver": 0.3}),
        flags=(QcFlag("empty_label", "tumour absent <b>"), QcFlag("touches_border", "liver: 30 voxels")),
        qc_checked=True,
    )
    clean = CaseRow("case-b", source="/data/DOE^JANE/b.nii.gz", volumes_ml={"liver": 1300.0}, qc_checked=True)
    noted = CaseRow(
        "case&c",
        volumes_ml={"liver": 1200.0},
        reason=f"QC picture skipped: {HOSTILE}",
        reason_code="qc_picture_skipped:OSError",
    )
    failed = CaseRow("case-d", source=HOSTILE, status="error", reason=HOSTILE, reason_code="read:IngestError")
    skipped = CaseRow(
        "case-e", status="skipped", reason="modality MR, model is CT", reason_code="incompatible_modality"
    )
    for row in (flagged, clean, noted):
        _tiny_png(out / row.case_id / "qc.png")
    return [flagged, clean, noted, failed, skipped]


def test_report_has_one_row_per_case_and_its_pictures_resolve(tmp_path):
    rows = _batch(tmp_path)
    path = write_batch_report(tmp_path, rows, MODEL)
    assert path == tmp_path / REPORT_FILE
    page = _parse(path)
    assert page.rows["cases"] == [r.case_id for r in rows]  # one row per case, in batch order
    assert page.rows["failures"] == ["case-d", "case-e"]
    assert len(page.images) == 3  # the three cases with a picture
    for ref in page.images + page.links:
        assert not ref.startswith(("http:", "https:", "//", "/")), ref  # relative: nothing fetched
        assert (tmp_path / unquote(ref)).is_file(), f"{ref} does not resolve inside OUT"
    assert "case%26c/qc.png" in page.links  # a URL, not a raw name
    text = path.read_text()
    for shown in ("liver-net", "liver-net/v3", "2026-12-01T10:00:00+00:00", "1500.2", "0.910", "0.42"):
        assert shown in text
    headers = page.headers["cases"]
    assert {"liver mL", "dice liver", "hd95 liver mm", "nsd tumour", "uncertainty", "risk", "flags"} <= set(
        headers
    )
    assert page.scripts == 1 and "addEventListener" in text  # the sorting, inline
    assert list(tmp_path.glob(".*")) == []  # atomic: no temporary file left


def test_hostile_reason_and_flag_text_are_escaped(tmp_path):
    path = write_batch_report(tmp_path, _batch(tmp_path), MODEL)
    text = path.read_text()
    assert "<script>alert" not in text and "tumour absent <b>" not in text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert "tumour absent &lt;b&gt;" in text and "case&amp;c" in text
    assert "SMITH^JOHN/ct &amp; co.dcm" in text  # the local page shows the failure's source and reason
    assert "/models/x" in text


def test_mlflow_variant_has_no_source_path_or_reason_text_and_embeds_pictures(tmp_path):
    rows = _batch(tmp_path)
    path = write_batch_report(tmp_path, rows, MODEL, for_mlflow=True)
    assert path == tmp_path / MLFLOW_REPORT_FILE
    text = path.read_text()
    for secret in ("SMITH", "DOE", "/data/", "alert", "skipped:", "modality MR", "/models/x"):
        assert secret not in text.replace("qc_picture_skipped:OSError", ""), secret
    for code in ("read:IngestError", "incompatible_modality", "qc_picture_skipped:OSError"):
        assert code in text
    page = _parse(path)
    assert page.rows["cases"] == [r.case_id for r in rows] and page.links == []
    assert len(page.images) == 3
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(thumb.size) <= 480 and thumb.getpixel((5, 5)) == (230, 159, 0)
    elsewhere = write_batch_report(
        tmp_path, rows, MODEL, for_mlflow=True, path=tmp_path / "x" / "report.html"
    )
    assert elsewhere.read_text() == text


def test_report_of_real_qc_pictures_and_of_an_empty_batch(tmp_path):
    image = np.zeros((20, 20, 8), np.float32)
    mask = np.zeros((20, 20, 8), np.uint8)
    mask[5:10, 5:10, 2:6] = 1
    (tmp_path / "c1").mkdir()
    write_qc_picture(image, mask, np.eye(4), {1: "liver"}, tmp_path / "c1" / "qc.png")
    page = _parse(
        write_batch_report(tmp_path, [CaseRow("c1", volumes_ml={"liver": 0.1})], {}, for_mlflow=True)
    )
    assert page.rows["cases"] == ["c1"] and page.images[0].startswith("data:image/png")
    empty = write_batch_report(tmp_path / "none", [], {"name": "m"})
    assert "Every case was segmented" in empty.read_text()


def test_case_json_records_model_time_and_labels_and_reads_back_the_same_row(tmp_path):
    row = CaseRow("c1", source="/data/a.nii.gz", volumes_ml={"liver": 12.5}, model_fingerprint="abc")
    staging = tmp_path / ".staging" / "c1.1.1"
    publish_case(row, staging, tmp_path, CaseModel("liver-net", "liver-net/v3", {2: "tumour", 1: "liver"}))
    record = json.loads((tmp_path / "c1" / "case.json").read_text())
    assert record["model_name"] == "liver-net" and record["model_version"] == "liver-net/v3"
    assert record["label_names"] == {"1": "liver", "2": "tumour"}
    assert record["written_utc"].endswith("+00:00")
    back = read_case_record(tmp_path, "c1")
    assert back.to_record() == row.to_record()  # provenance is not a column of cases.csv
    assert back.extra == {}


@pytest.mark.parametrize("for_mlflow", [False, True])
def test_report_rows_sort_keys_are_numbers_or_empty(tmp_path, for_mlflow):
    text = write_batch_report(tmp_path, _batch(tmp_path), MODEL, for_mlflow=for_mlflow).read_text()
    assert 'data-sort="nan"' not in text and 'class="num" data-sort=""' in text  # NaN HD95 sorts last


def test_the_batch_report_is_a_review_aid_its_failure_is_a_warning(tmp_path, monkeypatch, caplog):
    from pipeline import report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_batch_report", broken)
    assert report.write_batch_report_or_warn(tmp_path, _batch(tmp_path), MODEL) is None
    assert "report.html not written" in caplog.text and "disk full" in caplog.text
    monkeypatch.undo()
    assert report.write_batch_report_or_warn(tmp_path, [], MODEL) == tmp_path / REPORT_FILE
