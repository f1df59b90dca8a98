"""`medseg predict` end to end through the CLI on a generated hospital folder.

Real parts only: a model trained by `medseg train` into a sqlite MLflow store and fetched back
from the registry, a real Dask LocalCluster, DICOM written with pydicom and read back with
highdicom/nibabel. Mocks appear nowhere; faults are real broken files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from preprocessing.synthetic import write_bad_truncated_nifti, write_hospital_folder, write_nifti
from workflows.cli import main

# CT axial, CT sagittal (uint16), CT coronal (RLE), MR oblique, Enhanced CT, CT JPEG-LS, CT J2K, 2 NIfTI.
N_SERIES = 9


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospital")
    truths = write_hospital_folder(root / "scans", n_series=N_SERIES, seed=3, truth_dir=root / "truth")
    return root / "scans", root / "truth", truths


@pytest.fixture(scope="module")
def batch(hospital, trained_model, tmp_path_factory):
    """One full batch run against the registry model, shared by the assertions below."""
    scans, truth, truths = hospital
    out = tmp_path_factory.mktemp("batch") / "out"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = trained_model.tracking_uri
    try:
        code = main(
            [
                "predict",
                str(scans),
                "--model",
                trained_model.model_uri,
                "--out",
                str(out),
                "--labels",
                str(truth),
                "--workers",
                "2",
                "--experiment",
                "batch-test",
            ]
        )
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = saved or ""
    return code, out, truths


def test_batch_exit_code_and_tables(batch):
    code, out, truths = batch
    assert code == 0
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    by_id = cases.set_index("case_id")
    ct_truths = [t for t in truths if t.modality == "CT"]
    for t in ct_truths:
        assert by_id.loc[t.case_id, "status"] == "ok", by_id.loc[t.case_id, "reason"]
        assert float(by_id.loc[t.case_id, "vol_liver_ml"]) > 0
    mr = [t for t in truths if t.modality == "MR"]
    for t in mr:  # a CT model must not segment an MR series: a deliberate skip with its reason
        assert by_id.loc[t.case_id, "status"] == "skipped"
        assert "trained on CT" in by_id.loc[t.case_id, "reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_label"]["liver"]["dice"]["n"] == len(ct_truths)
    assert {"mean", "std", "median", "ci95"} <= set(summary["per_label"]["liver"]["dice"])


def test_masks_keep_source_geometry_and_land_on_anatomy(batch):
    _, out, truths = batch
    for t in truths:
        if t.modality != "CT":
            continue
        mask_img = nib.load(str(out / t.case_id / "mask.nii.gz"))
        mask = np.asarray(mask_img.dataobj)
        assert mask.shape == t.label.shape, t.kind
        assert mask.dtype == np.uint8
        np.testing.assert_allclose(mask_img.affine, t.affine_ras, atol=1e-3)
        # The liver sits on the patient's right: a left-right flip or axis swap gives Dice near 0.
        assert _dice(mask == 1, t.label == 1) > 0.6, (t.kind, t.orientation)
        assert (out / t.case_id / "qc.png").stat().st_size > 10_000


def test_nifti_mask_copies_source_header_geometry(batch):
    """A NIfTI mask carries the source's sform *and* qform, so any viewer overlays it right."""
    _, out, truths = batch
    nifti = [t for t in truths if t.kind == "nifti"]
    assert nifti
    for t in nifti:
        src = nib.load(str(t.files[0]))
        mask = nib.load(str(out / t.case_id / "mask.nii.gz"))
        np.testing.assert_array_equal(mask.get_sform(), src.get_sform())
        np.testing.assert_array_equal(mask.get_qform(), src.get_qform())
        assert int(mask.header["sform_code"]) == int(src.header["sform_code"])
        assert int(mask.header["qform_code"]) == int(src.header["qform_code"])


def test_dicom_seg_reads_back_onto_the_mask(batch):
    _, out, truths = batch
    dicom = [t for t in truths if t.kind in ("dicom", "enhanced") and t.modality == "CT"]
    assert dicom
    for t in dicom:
        seg = hd.seg.segread(str(out / t.case_id / "seg.dcm"))
        mask = np.asarray(nib.load(str(out / t.case_id / "mask.nii.gz")).dataobj)
        assert seg.SeriesInstanceUID != t.series_uid
        names = [s.SegmentLabel for s in seg.SegmentSequence]
        assert names[0] == "liver"
        # Every liver voxel of the mask is one set pixel of segment 1 in the SEG.
        frames = [
            f
            for f in seg.PerFrameFunctionalGroupsSequence
            if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        ]
        assert frames
        seg_liver = int(
            sum(
                np.count_nonzero(seg.pixel_array[i])
                for i, f in enumerate(seg.PerFrameFunctionalGroupsSequence)
                if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
            )
        )
        assert seg_liver == int(np.count_nonzero(mask == 1))


def test_batch_is_one_mlflow_run_with_tables_and_pictures(batch, trained_model):
    _, out, truths = batch
    client = MlflowClient(tracking_uri=trained_model.tracking_uri, registry_uri=trained_model.tracking_uri)
    exp = client.get_experiment_by_name("batch-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["model_name"] == "fixture-phantom"
    assert run.data.metrics["cases_ok"] == sum(t.modality == "CT" for t in truths)
    assert "dice_liver_mean" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cases.csv", "cases.json", "failures.csv", "summary.json", "qc"} <= top
    qc = {a.path for a in client.list_artifacts(run.info.run_id, "qc")}
    assert qc == {f"qc/{t.case_id}.png" for t in truths if t.modality == "CT"}


def test_rerun_is_idempotent(batch, hospital, trained_model):
    code, out, _ = batch
    scans, truth, _ = hospital
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")}
    assert (
        main(
            [
                "predict",
                str(scans),
                "--model",
                str(trained_model.bundle_dir),
                "--out",
                str(out),
                "--workers",
                "1",
                "--experiment",
                "batch-rerun",
            ]
        )
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")} == before


def test_failing_cases_are_rows_and_the_batch_goes_on(tmp_path, trained_model, hospital):
    _, _, truths = hospital
    src = tmp_path / "mixed"
    src.mkdir()
    good = next(t for t in truths if t.kind == "nifti")
    write_nifti(good.image, good.affine_ras, src / "good_case.nii.gz")
    write_bad_truncated_nifti(src / "broken_case.nii.gz")
    two_channel = np.stack([good.image, good.image], axis=-1)
    write_nifti(two_channel, good.affine_ras, src / "two_channels.nii.gz")
    out = tmp_path / "out"
    code = main(
        ["predict", str(src), "--model", str(trained_model.bundle_dir), "--out", str(out), "--workers", "1"]
    )
    assert code == 3
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False).set_index("case_id")
    assert cases.loc["good_case", "status"] == "ok"
    assert (out / "good_case" / "mask.nii.gz").is_file()
    assert cases.loc["broken_case", "status"] == "error" and cases.loc["broken_case", "reason"]
    assert cases.loc["two_channels", "status"] in ("skipped", "error")
    assert "channel" in cases.loc["two_channels", "reason"]
    assert not (out / "broken_case").exists()


def test_unreachable_tracking_server_still_writes_outputs(
    tmp_path, trained_model, hospital, monkeypatch, caplog
):
    _, _, truths = hospital
    src = tmp_path / "one"
    src.mkdir()
    good = next(t for t in truths if t.kind == "nifti")
    write_nifti(good.image, good.affine_ras, src / "only_case.nii.gz")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    out = tmp_path / "out"
    started = time.monotonic()
    code = main(
        ["predict", str(src), "--model", str(trained_model.bundle_dir), "--out", str(out), "--workers", "1"]
    )
    assert code == 4
    assert time.monotonic() - started < 120  # no minutes of retry backoff
    assert (out / "only_case" / "mask.nii.gz").is_file() and (out / "cases.csv").is_file()
    assert "NOT logged" in caplog.text


def test_bad_arguments_exit_2(tmp_path, trained_model):
    assert (
        main(
            [
                "predict",
                str(tmp_path / "nope"),
                "--model",
                str(trained_model.bundle_dir),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    (tmp_path / "src").mkdir()
    assert (
        main(
            [
                "predict",
                str(tmp_path / "src"),
                "--model",
                str(tmp_path / "no_bundle"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_killed_batch_leaves_no_partial_outputs_and_resumes(tmp_path, trained_model, hospital):
    scans, _, truths = hospital
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "predict",
        str(scans),
        "--model",
        str(trained_model.bundle_dir),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'k.db'}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not list(out.glob("*/case.json")):
            time.sleep(0.2)
        assert list(out.glob("*/case.json")), "the batch never finished a case"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Dask scheduler and workers
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")}
    assert len(finished) < sum(t.modality == "CT" for t in truths), "killed too late to test resume"
    for case_dir in out.iterdir():
        if case_dir.is_dir() and not case_dir.name.startswith("."):
            assert (case_dir / "case.json").is_file(), f"partial case folder {case_dir.name}"
    code = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert code.returncode == 0, code.stdout[-2000:] + code.stderr[-2000:]
    assert "resuming" in code.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/mask.nii.gz")}
    assert all(after[c] == t for c, t in finished.items())  # finished cases were not redone
    assert len(after) == sum(t.modality == "CT" for t in truths)
    staging = out / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_predict_on_an_existing_dask_scheduler(tmp_path, trained_model, hospital):
    """`--scheduler tcp://...` sends the cases to a cluster we did not start, and leaves it running."""
    from distributed import Client, LocalCluster

    _, _, truths = hospital
    src = tmp_path / "two"
    src.mkdir()
    for i, t in enumerate(t for t in truths if t.kind == "nifti"):
        write_nifti(t.image, t.affine_ras, src / f"remote_{i}.nii.gz")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        out = tmp_path / "out"
        code = main(["predict", str(src), "--model", str(trained_model.bundle_dir), "--out", str(out),
                     "--scheduler", cluster.scheduler_address])
        assert code == 0
        with Client(cluster.scheduler_address) as client:  # still up: the job did not close it
            assert len(client.scheduler_info()["workers"]) == 1
    cases = pd.read_csv(out / "cases.csv", keep_default_na=False)
    assert list(cases["status"]) == ["ok"] * len(cases) and len(cases) >= 2


def test_save_probabilities_with_tta_on_the_source_grid(tmp_path, trained_model, hospital):
    _, _, truths = hospital
    good = next(t for t in truths if t.kind == "nifti")
    src = tmp_path / "src"
    src.mkdir()
    write_nifti(good.image, good.affine_ras, src / "prob_case.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", str(src), "--model", str(trained_model.bundle_dir), "--out", str(out),
                 "--workers", "1", "--save-probabilities", "--tta", "--overlap", "0.25"]) == 0
    probs_img = nib.load(str(out / "prob_case" / "probabilities.nii.gz"))
    probs = np.asarray(probs_img.dataobj)
    mask = np.asarray(nib.load(str(out / "prob_case" / "mask.nii.gz")).dataobj)
    assert probs.shape == (*mask.shape, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(probs_img.affine, good.affine_ras, atol=1e-3)
    # the mask is the argmax (up to the largest-component clean-up, which only removes voxels)
    argmax = probs.argmax(axis=-1)
    kept = mask > 0
    assert np.array_equal(argmax[kept], mask[kept])


def test_rerun_with_another_model_redoes_cases(tmp_path, trained_model, hospital, capsys):
    """Resume keys on the model too: another bundle's masks are replaced, not silently kept."""
    import shutil

    import torch

    _, _, truths = hospital
    good = next(t for t in truths if t.kind == "nifti")
    src = tmp_path / "src"
    src.mkdir()
    write_nifti(good.image, good.affine_ras, src / "model_case.nii.gz")
    other = tmp_path / "other_bundle"
    shutil.copytree(trained_model.bundle_dir, other)
    state = torch.load(other / "fold_0.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01
    torch.save(state, other / "fold_0.pt")
    out = tmp_path / "out"
    argv = ["predict", str(src), "--out", str(out), "--workers", "1", "--model"]
    assert main([*argv, str(trained_model.bundle_dir)]) == 0
    first = json.loads((out / "model_case" / "case.json").read_text())
    assert main([*argv, str(other)]) == 0
    second = json.loads((out / "model_case" / "case.json").read_text())
    assert second["model_fingerprint"] != first["model_fingerprint"]
    assert "made by another model" in capsys.readouterr().out
    mtime = (out / "model_case" / "mask.nii.gz").stat().st_mtime_ns
    assert main([*argv, str(other)]) == 0  # same model again: nothing to redo
    assert (out / "model_case" / "mask.nii.gz").stat().st_mtime_ns == mtime
    assert not (out / ".staging").exists() or not any((out / ".staging").iterdir())
