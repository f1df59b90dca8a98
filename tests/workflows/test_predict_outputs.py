"""`medseg predict`'s outputs: file modes, strict summary.json, MR models on MR series, odd inputs.

Every batch here runs through the real CLI (a Dask LocalCluster, the session's trained bundle)
on series written by the tests. Faults are real files (random bytes for weights, a bundle.json
holding a list, a file name that is not UTF-8); the only monkeypatch is ``shutil.disk_usage``
reporting a full disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from preprocessing.synthetic import DicomSeriesSpec, make_phantom, write_dicom_series, write_nifti
from workflows.cli import main

SHAPE = (40, 40, 20)
SPACING = (1.5, 1.5, 3.0)
#: A NIfTI name that is not UTF-8 (Latin-1 "café"): Python sees it as 'caf\udce9.nii.gz'.
ODD_NAME = os.fsdecode(b"caf\xe9.nii.gz")


def _refuse_constant(name):
    raise ValueError(f"summary.json is not strict JSON: bare {name}")


def _affine(spacing=SPACING):
    return np.diag([*spacing, 1.0])


def _write_series(folder: Path, modality: str, seed: int, n_slices: int | None = None) -> None:
    image, _ = make_phantom(SHAPE, SPACING, modality=modality, seed=seed)
    if n_slices is not None:
        k = SHAPE[2] // 2
        image = image[:, :, k : k + n_slices]
    spec = DicomSeriesSpec(modality=modality, series_number=seed, seed=seed, patient_id=f"PID-{seed}")
    write_dicom_series(image, _affine(), folder, spec)


def _bundle_copy(trained_model, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(trained_model.bundle_dir, out)
    (out / "registry.json").unlink(missing_ok=True)
    return out


def _predict(src: Path, model: Path | str, out: Path, *extra: str) -> int:
    return main(["predict", str(src), "--model", str(model), "--out", str(out), "--workers", "1", *extra])


def _modes(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode)
        for p in out.rglob("*")
        if not p.relative_to(out).parts[0].startswith(".")
    }


@pytest.fixture
def store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(root / "mlartifacts"))
    return root


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def test_mr_model_batch_modes_json_single_slice_and_odd_name(tmp_path, store, trained_model, umask_027):
    """One batch under umask 027 with a bundle whose dataset.json said "MRI".

    MR series are segmented (Modality MR is an MRI), a CT series is skipped with the comparison in
    its reason, a single-slice MR series gets its mask and a picture, a NIfTI whose name is not
    UTF-8 costs nothing: tables written, MLflow run logged; every output has the umask's mode.
    """
    mri = _bundle_copy(trained_model, tmp_path, "mri_bundle")
    plan = json.loads((mri / "plan.json").read_text())
    plan["modalities"] = {"0": "MRI"}
    (mri / "plan.json").write_text(json.dumps(plan))
    src = tmp_path / "scans"
    _write_series(src / "mr", "MR", seed=1)
    _write_series(src / "mr_one_slice", "MR", seed=2, n_slices=1)
    _write_series(src / "ct", "CT", seed=3)
    image, _ = make_phantom(SHAPE, SPACING, modality="MR", seed=4)
    write_nifti(image, _affine(), src / "nifti" / ODD_NAME)
    out = tmp_path / "out"

    assert _predict(src, mri, out, "--experiment", "outputs-mr") == 0

    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    assert len(cases) == 4
    (skipped,) = cases[cases["status"] == "skipped"].itertuples()
    assert "trained on MR images (dataset.json modality 'MRI')" in skipped.reason
    assert "DICOM Modality 'CT'" in skipped.reason and skipped.reason_code == "incompatible_modality"
    ok = cases[cases["status"] == "ok"]
    assert len(ok) == 3, cases[["case_id", "status", "reason"]]
    for case_id in ok["case_id"]:  # the single-slice series too: mask, SEG and a QC picture
        assert (out / case_id / "mask.nii.gz").is_file() and (out / case_id / "qc.png").is_file()
    assert sum((out / c / "seg.dcm").is_file() for c in ok["case_id"]) == 2
    (odd,) = cases[cases["source"].str.endswith(".nii.gz")].itertuples()
    assert odd.source.endswith("caf\\xe9.nii.gz") and odd.status == "ok"  # the byte, written safely

    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse_constant)
    assert summary["cases"] == {"ok": 3, "skipped": 1}
    for label, metrics in summary["per_label"].items():
        assert set(metrics) == {"vol_pred_ml"}, label  # no Dice/HD95/NSD blocks without --labels
        assert metrics["vol_pred_ml"]["ci95"][0] is None or metrics["vol_pred_ml"]["ci95"][0] >= 0

    modes = _modes(out)
    files = [p for p in modes if p.endswith((".nii.gz", ".dcm", ".png", ".csv", ".json"))]
    assert {"cases.csv", "summary.json"} <= set(files) and any(p.endswith("seg.dcm") for p in files)
    assert {p: m for p, m in modes.items() if p in files and m != 0o640} == {}
    assert {p: m for p, m in modes.items() if (out / p).is_dir() and m != 0o750} == {}
    assert not (out / ".staging").exists()

    con = sqlite3.connect(store / "mlflow.db")
    (status,) = con.execute("SELECT status FROM runs WHERE name LIKE 'predict %'").fetchone()
    con.close()
    assert status == "FINISHED"


def test_ingested_images_get_the_umask_mode(tmp_path, umask_027):
    src = tmp_path / "scans"
    _write_series(src / "ct", "CT", seed=5)
    out = tmp_path / "ingested"
    assert main(["ingest", str(src), "--out", str(out)]) == 0
    images = list(out.rglob("*.nii.gz"))
    assert images
    for path in [*images, out / "manifest.csv"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


@pytest.mark.slow  # the clipping itself: tests/pipeline/test_metrics.py; umask 022: test_atomic.py
def test_summary_with_labels_is_strict_json_with_clipped_intervals(tmp_path, store, trained_model):
    src, truth = tmp_path / "scans", tmp_path / "truth"
    for i in range(3):
        image, label = make_phantom(SHAPE, SPACING, modality="CT", seed=10 + i)
        write_nifti(image, _affine(), src / f"case_{i}.nii.gz")
        write_nifti(label.astype(np.uint8), _affine(), truth / f"case_{i}.nii.gz")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _predict(src, trained_model.bundle_dir, out, "--labels", str(truth)) == 0
    finally:
        os.umask(old)
    text = (out / "summary.json").read_text()
    summary = json.loads(text, parse_constant=_refuse_constant)
    liver = summary["per_label"]["liver"]
    assert {"dice", "hd95", "nsd", "vol_pred_ml"} == set(liver)
    for metric in ("dice", "nsd"):
        for label, metrics in summary["per_label"].items():
            lo, hi = metrics[metric]["ci95"]
            assert lo is None or 0.0 <= lo <= hi <= 1.0, (label, metric, lo, hi)
    assert stat.S_IMODE((out / "summary.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "case_0" / "mask.nii.gz").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "case_0").stat().st_mode) == 0o755


def test_nan_weights_give_error_rows_not_background_masks(tmp_path, store, trained_model):
    broken = _bundle_copy(trained_model, tmp_path, "nan_bundle")
    for fold in broken.glob("fold_*.pt"):
        state = torch.load(fold, weights_only=True)
        for value in state.values():
            if value.is_floating_point():
                value.fill_(float("nan"))
        torch.save(state, fold)
    src = tmp_path / "scans"
    image, _ = make_phantom(SHAPE, SPACING, modality="CT", seed=20)
    write_nifti(image, _affine(), src / "nan_case.nii.gz")
    out = tmp_path / "out"
    assert _predict(src, broken, out) == 3
    row = pd.read_csv(out / "cases.csv", keep_default_na=False).set_index("case_id").loc["nan_case"]
    assert row["status"] == "error" and "NaN or infinity" in row["reason"]
    assert row["reason_code"] == "segment:NonFiniteProbabilitiesError"
    assert not (out / "nan_case").exists()


# ---- refused before the batch runs: exit 2, nothing logged ----------------------------------


@pytest.fixture
def one_case(tmp_path) -> Path:
    src = tmp_path / "src"
    image, _ = make_phantom(SHAPE, SPACING, modality="CT", seed=30)
    write_nifti(image, _affine(), src / "one.nii.gz")
    return src


def _no_runs(store: Path) -> bool:
    if not (store / "mlflow.db").exists():
        return True
    con = sqlite3.connect(store / "mlflow.db")
    try:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    except sqlite3.OperationalError:  # no tables yet
        return True
    finally:
        con.close()


def test_out_that_is_a_file_or_under_a_file_is_refused(tmp_path, store, one_case, trained_model, capsys):
    a_file = tmp_path / "cases.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert _predict(one_case, trained_model.bundle_dir, out) == 2
        err = capsys.readouterr().err
        assert str(a_file) in err and "file" in err
    assert a_file.read_text() == "x" and _no_runs(store)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_that_is_not_writable_is_refused(tmp_path, store, one_case, trained_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert _predict(one_case, trained_model.bundle_dir, locked / "out") == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_full_disk_is_refused_up_front(tmp_path, store, one_case, trained_model, monkeypatch, capsys):
    real = shutil.disk_usage

    def full(path):  # fault injection: the disk of --out has 5 MiB left
        usage = real(path)
        return type(usage)(usage.total, usage.total - 5 * 2**20, 5 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", full)
    out = tmp_path / "out"
    assert _predict(one_case, trained_model.bundle_dir, out) == 2
    assert "MiB free" in capsys.readouterr().err
    assert not out.exists() and _no_runs(store)


def test_empty_source_is_exit_2_without_an_mlflow_run(tmp_path, store, trained_model, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    out = tmp_path / "out"
    assert _predict(empty, trained_model.bundle_dir, out) == 2
    assert "no images found in SOURCE" in capsys.readouterr().err
    assert _no_runs(store) and not (out / "cases.csv").exists()


@pytest.mark.parametrize(
    "damage",
    ["random_weights", "bundle_json_list", "bundle_json_no_folds", "weights_of_another_network"],
)
def test_damaged_bundle_is_exit_2_at_start(tmp_path, store, one_case, trained_model, damage, capsys):
    bundle = _bundle_copy(trained_model, tmp_path, "damaged")
    if damage == "random_weights":
        (bundle / "fold_1.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "bundle_json_list":
        (bundle / "bundle.json").write_text("[1, 2, 3]")
    elif damage == "bundle_json_no_folds":
        meta = json.loads((bundle / "bundle.json").read_text())
        del meta["num_folds"]
        (bundle / "bundle.json").write_text(json.dumps(meta))
    else:
        state = torch.load(bundle / "fold_0.pt", weights_only=True)
        name = next(k for k, v in state.items() if v.ndim == 5)
        state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 2)
        torch.save(state, bundle / "fold_0.pt")
    out = tmp_path / "out"
    assert _predict(one_case, bundle, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--model" in err
    expected = {
        "random_weights": "fold_1.pt cannot be loaded",
        "bundle_json_list": "holds a JSON list",
        "bundle_json_no_folds": "'num_folds' must be a whole number >= 1, got None",
        "weights_of_another_network": "fold 0's weights do not fit",
    }[damage]
    assert expected in err
    assert not (out / "one").exists() and _no_runs(store)


def test_unreachable_registry_fails_within_seconds(tmp_path, one_case, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert _predict(one_case, "models:/fixture-phantom@champion", tmp_path / "out") == 2
    assert time.monotonic() - started < 15
    assert "not reachable" in capsys.readouterr().err


def test_registry_model_resolves_after_another_store_was_used_in_the_process(tmp_path, trained_model, monkeypatch):
    """``models:/`` goes through MLflow's global registry URI: an earlier registration in the same
    process (another store) must not make the champion "not found" in the store asked for now."""
    from pipeline.bundle import resolve_bundle_dir
    from pipeline.tracking import set_global_uri

    set_global_uri(f"sqlite:///{tmp_path / 'other.db'}")  # what a previous job in this process left
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_model.tracking_uri)
    folder = resolve_bundle_dir(trained_model.model_uri, cache_dir=tmp_path / "model")
    assert (folder / "bundle.json").is_file()
