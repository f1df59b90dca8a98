"""Table-driven bad-input suite: one fixture per bad input, each in a folder next to good inputs.

For every bad input ``medseg ingest`` must give the expected exit code and per-input reason, still
ingest the good series, leave the input tree unchanged (every file hashed, every link and special
file recorded, the listing compared) and leave no partial or temporary file in OUT. The inputs
whose verdict used to differ between commands also go through ``medseg predict`` -- once, all in
one folder -- which must give each the same status and reason as ingest.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from preprocessing.source_tree import printable_path
from preprocessing.synthetic import (
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    write_bad_4d_nifti,
    write_bad_oversized_nifti,
    write_bad_palette_color,
    write_bad_shared_series_uid,
    write_bad_single_slice,
    write_bad_slice_attribute,
    write_bad_special_files,
    write_bad_symlinks,
    write_bad_truncated_header,
    write_dicom_series,
    write_nifti,
)
from workflows.cli import main

SHAPE = (16, 16, 8)
SPACING = (0.8, 1.1, 2.5)
NON_UTF8 = os.fsdecode(b"scan_\xe9")  # Latin-1 e-acute: not UTF-8, a surrogate escape in Python


@dataclass(frozen=True)
class Row:
    """One expected manifest row of a bad input: status, a fragment of the reason, the ok shape."""

    status: str
    reason: str = ""
    shape: str = ""


@dataclass(frozen=True)
class BadInput:
    """A bad input: ``write(folder, elsewhere)`` makes it in ``folder``; ``elsewhere`` is outside SOURCE."""

    name: str
    write: Callable[[Path, Path], object]
    rows: tuple[Row, ...]
    exit_code: int
    unlistable: str = ""  # a subfolder (relative) whose listing fails with PermissionError
    in_predict: bool = True


# Every DICOM fixture has its own seed, hence its own UIDs: all of them share one folder in the
# predict test, where equal SeriesInstanceUIDs would be one series.
def _spacing(value, seed):
    return lambda d, _: write_bad_slice_attribute(d, seed, keyword="PixelSpacing", value=value, shape=SHAPE)


def _last_slice(keyword, value, seed):
    return lambda d, _: write_bad_slice_attribute(
        d, seed, keyword=keyword, value=value, slices="last", shape=SHAPE
    )


def _symlinks(folder: Path, elsewhere: Path) -> None:
    outside = elsewhere / "series_outside_source"
    _good_series(outside, seed=21)
    write_bad_symlinks(folder, outside)


def _non_utf8(folder: Path, _: Path) -> None:
    affine = orientation_affine("axial", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=5, affine_ras=affine)
    write_nifti(image, affine, folder / f"{NON_UTF8}.nii.gz")
    (folder / f"notes_{NON_UTF8}.txt").write_text("not an image")


def _locked(folder: Path, _: Path) -> None:
    _good_series(folder / "locked", seed=22)


SPLIT = "series split: its SeriesInstanceUID is shared by 2 groups of files that differ in"
BAD_INPUTS = [
    BadInput(
        "symlinks",
        _symlinks,
        (
            Row("ok", "", "16x16x8"),  # the folder link out of SOURCE is followed
            Row("skipped", "symlink loop: the link points to a folder that contains it"),
            Row("skipped", "symlink loop (the link resolves to itself)"),
            Row("skipped", "broken symlink"),
        ),
        0,
    ),
    BadInput(
        "frames_of_reference",
        lambda d, _: write_bad_shared_series_uid(d, 41, differ="FrameOfReferenceUID", shape=SHAPE),
        (
            Row("ok", f"{SPLIT} FrameOfReferenceUID", "16x16x8"),
            Row("ok", f"{SPLIT} FrameOfReferenceUID", "16x16x8"),
        ),
        0,
    ),
    BadInput(
        "two_patients",
        lambda d, _: write_bad_shared_series_uid(d, 43, differ="PatientID", shape=SHAPE),
        (Row("ok", f"{SPLIT} PatientID", "16x16x8"), Row("ok", f"{SPLIT} PatientID", "16x16x8")),
        0,
    ),
    BadInput(
        "two_studies",
        lambda d, _: write_bad_shared_series_uid(d, 45, differ="StudyInstanceUID", shape=SHAPE),
        (
            Row("ok", f"{SPLIT} StudyInstanceUID", "16x16x8"),
            Row("ok", f"{SPLIT} StudyInstanceUID", "16x16x8"),
        ),
        0,
    ),
    BadInput(
        "negative_spacing",
        _spacing(["-0.8", "1.1"], 31),
        (Row("error", "PixelSpacing [-0.8, 1.1] is negative"),),
        3,
    ),
    BadInput(
        "huge_spacing",
        _spacing(["1e30", "1e30"], 32),
        (
            Row(
                "error",
                "PixelSpacing [1e+30, 1e+30] mm is outside the plausible physical range 0.001..100 mm",
            ),
        ),
        3,
    ),
    BadInput(
        "tiny_spacing",
        _spacing(["1e-30", "1e-30"], 33),
        (Row("error", "PixelSpacing [1e-30, 1e-30] mm is outside the plausible physical range"),),
        3,
    ),
    BadInput(
        "nan_spacing",
        _spacing(["nan", "nan"], 34),
        (Row("error", "PixelSpacing [nan, nan] is not a finite"),),
        3,
    ),
    BadInput("zero_spacing", _spacing(["0", "0"], 35), (Row("error", "PixelSpacing [0.0, 0.0] is zero"),), 3),
    BadInput(
        "last_slice_without_position",
        _last_slice("ImagePositionPatient", None, 36),
        (
            Row(
                "error",
                "1 of 8 file(s) of the series cannot be placed in the world (slice_007.dcm: no ImagePositionPatient)",
            ),
        ),
        3,
    ),
    BadInput(
        "nan_position",
        _last_slice("ImagePositionPatient", ["nan", "0", "0"], 37),
        (Row("error", "ImagePositionPatient is not finite"),),
        3,
    ),
    BadInput(
        "palette_color",
        lambda d, _: write_bad_palette_color(d, 38, shape=SHAPE),
        (Row("error", "PALETTE COLOR image (PhotometricInterpretation)"),),
        3,
    ),
    BadInput(
        "truncated_header",
        lambda d, _: write_bad_truncated_header(d, 39, shape=SHAPE),
        (
            Row(
                "error",
                "truncated DICOM file: a CT Image Storage object that ends before its image attributes",
            ),
        ),
        3,
    ),
    BadInput(
        "single_slice",
        lambda d, _: write_bad_single_slice(d, 40, size=16),
        (Row("ok", "", "16x16x1"),),
        0,
    ),
    BadInput(
        "nifti_4d",
        lambda d, _: write_bad_4d_nifti(d / "dynamic.nii.gz", shape=SHAPE),
        (Row("error", "4D image with 3 volumes"),),
        3,
    ),
    BadInput(
        "oversized_header",
        lambda d, _: (
            write_bad_oversized_nifti(d / "huge.nii.gz"),
            write_bad_oversized_nifti(d / "huge2.nii"),
        ),
        (
            Row("error", "the header declares 2048x2048x1024 int16 (8,589,934,944 bytes"),
            Row("error", "but the file holds only 1,376 bytes"),
        ),
        3,
    ),
    BadInput(
        "named_pipes",
        lambda d, _: write_bad_special_files(d),
        (
            Row("skipped", "not a regular file (a named pipe (FIFO))"),
            Row("skipped", "not a regular file (a named pipe"),
        ),
        0,
    ),
    BadInput(
        "unlistable_folder",
        _locked,
        (Row("error", "cannot list folder: PermissionError"),),
        3,
        unlistable="locked",
    ),
    BadInput(
        "non_utf8_name",
        _non_utf8,
        (Row("ok", "", "16x16x8"), Row("skipped", "not a DICOM file")),
        0,
        in_predict=False,  # predict's tables are covered by the predict tests
    ),
]


def _good_series(folder: Path, seed: int) -> list[Path]:
    affine = orientation_affine("coronal", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=seed, affine_ras=affine)
    return write_dicom_series(image, affine, folder, DicomSeriesSpec(seed=seed, shuffle_names=True))


def _write_good(source: Path) -> list[Path]:
    """The good inputs next to every bad one: a DICOM series and a NIfTI file."""
    _good_series(source / "good_series", seed=11)
    affine = orientation_affine("axial", SPACING, shape=SHAPE)
    image, _ = make_phantom(SHAPE, seed=12, affine_ras=affine)
    write_nifti(image, affine, source / "good_nifti" / "good_scan.nii.gz")
    return [source / "good_series", source / "good_nifti"]


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` without following links: files hashed, links by target, the rest by type."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            key = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                out[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as fh:
                    out[key] = ("file", hashlib.sha256(fh.read()).hexdigest(), info.st_mtime_ns, info.st_mode)
            else:
                out[key] = (stat.S_IFMT(info.st_mode), info.st_mode)
    return out


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _rows_of(rows: list[dict], folder: Path) -> list[dict]:
    prefix = printable_path(folder)
    return [r for r in rows if r["source"] == prefix or r["source"].startswith(prefix + os.sep)]


def _match(rows: list[dict], expected: tuple[Row, ...], reason_key: str = "reason") -> None:
    left = list(rows)
    for want in expected:
        hit = next(
            (r for r in left if r["status"] == want.status and want.reason in r[reason_key]),
            None,
        )
        assert hit is not None, f"no row like {want} in {[(r['status'], r[reason_key]) for r in left]}"
        if want.shape:
            assert hit["shape"] == want.shape, hit
        left.remove(hit)
    assert not left, f"unexpected rows: {[(r['status'], r[reason_key]) for r in left]}"


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail instead of hanging for ever (a FIFO opened for reading blocks until a writer comes)."""

    def expired(signum, frame):
        raise TimeoutError("the command hung (a special file opened?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _fail_listing(monkeypatch, folders: list[Path]) -> None:
    """Fault injection: listing these folders fails as on a folder without read permission.

    (Tests run as root here, where chmod 000 does not stop reading.)
    """
    real_scandir = os.scandir
    blocked = {os.path.realpath(f) for f in folders}

    def scandir(path="."):
        if not isinstance(path, int) and os.path.realpath(path) in blocked:  # an int is a folder fd
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _assert_out_clean(out: Path) -> None:
    leftovers = [
        p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name or p.name.endswith(".partial")
    ]
    assert not leftovers, leftovers
    assert {p.name for p in out.iterdir()} <= {"images", "manifest.csv"}


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_ingest_gives_each_bad_input_its_reason(bad: BadInput, tmp_path, monkeypatch, deadline):
    source, elsewhere, out = tmp_path / "src", tmp_path / "elsewhere", tmp_path / "out"
    good = _write_good(source)
    bad.write(source / bad.name, elsewhere)
    before = _tree(source), _tree(elsewhere) if elsewhere.exists() else {}
    if bad.unlistable:
        _fail_listing(monkeypatch, [source / bad.name / bad.unlistable])

    code = main(["ingest", str(source), "--out", str(out), "--workers", "1"])

    assert code == bad.exit_code
    rows = _manifest(out)
    _match(_rows_of(rows, source / bad.name), bad.rows)
    for folder in good:  # the good inputs next to it were ingested
        (row,) = _rows_of(rows, folder)
        assert row["status"] == "ok" and (out / row["output"]).is_file(), row
    monkeypatch.undo()
    assert (_tree(source), _tree(elsewhere) if elsewhere.exists() else {}) == before
    _assert_out_clean(out)
    written = {r["output"] for r in rows if r["output"]}
    assert {f"images/{p.name}" for p in (out / "images").iterdir()} == written


def test_out_inside_source_is_never_an_input(tmp_path):
    """OUT (and private .staging/.model folders) inside SOURCE: reruns report the same rows."""
    source = tmp_path / "src"
    good = _write_good(source)
    stray = source / "old_predict" / ".staging" / "case.1"
    write_nifti(
        make_phantom(SHAPE, seed=1)[0], orientation_affine("axial", SPACING, shape=SHAPE), stray / "m.nii.gz"
    )
    out = source / "derived"
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    first = _manifest(out)
    assert len(first) == len(good) and all(r["status"] == "ok" for r in first)
    # A link to OUT from inside SOURCE is the same folder: excluded too.
    (source / "link_to_out").symlink_to(out, target_is_directory=True)
    assert main(["ingest", str(source), "--out", str(out), "--workers", "1"]) == 0
    second = _manifest(out)
    assert [r["case_id"] for r in second] == [r["case_id"] for r in first]
    assert all(r["reason"].startswith("already ingested") for r in second)


def _strip_kind(reason: str) -> str:
    """predict prefixes a read failure's reason with its exception type ("IngestError: ...")."""
    return re.sub(r"^\w+Error: ", "", reason)


def test_predict_gives_the_same_verdicts_as_ingest(tmp_path, trained_model, monkeypatch, deadline):
    """All bad inputs in ONE folder (one predict run): each gets ingest's status and reason."""
    source, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    good = _write_good(source)
    bad_inputs = [b for b in BAD_INPUTS if b.in_predict]
    for bad in bad_inputs:
        bad.write(source / bad.name, elsewhere)
    # A previous prediction inside SOURCE: its masks must not become cases.
    out = source / "predictions"
    old = out / "case-old"
    write_nifti(
        make_phantom(SHAPE, seed=1)[0], orientation_affine("axial", SPACING, shape=SHAPE), old / "mask.nii.gz"
    )
    before = _tree(source)
    _fail_listing(monkeypatch, [source / b.name / b.unlistable for b in bad_inputs if b.unlistable])

    ingest_out = tmp_path / "ingest_out"
    assert main(["ingest", str(source), "--out", str(ingest_out), "--workers", "1"]) == 3
    code = main(
        [
            "predict",
            str(source),
            "--model",
            str(trained_model.bundle_dir),
            "--out",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert code == 3

    ingested = _manifest(ingest_out)
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False, dtype=str).to_dict("records")
    for case in cases:
        case["reason"] = _strip_kind(case["reason"])
    assert not _rows_of(cases, out), "predict took its own earlier outputs as inputs"
    for bad in bad_inputs:
        folder = source / bad.name
        mine, theirs = _rows_of(ingested, folder), _rows_of(cases, folder)
        _match(mine, bad.rows)
        verdicts = sorted((r["status"], r["reason"]) for r in mine)
        assert sorted((r["status"], r["reason"]) for r in theirs) == verdicts, (bad.name, theirs, mine)
        assert sorted(r["case_id"] for r in theirs) == sorted(r["case_id"] for r in mine), bad.name
    for folder in good:
        (row,) = _rows_of(cases, folder)
        assert row["status"] == "ok", row
    monkeypatch.undo()
    after = {k: v for k, v in _tree(source).items() if not k.startswith("predictions")}
    assert after == {k: v for k, v in before.items() if not k.startswith("predictions")}
