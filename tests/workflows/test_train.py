"""`medseg train` end to end through the CLI, on generated MSD data and a real MLflow store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import pipeline.training.trainer as trainer
from pipeline.bundle import load_bundle
from pipeline.inference.config import InferenceConfig
from pipeline.inference.segment import Segmenter
from pipeline.tracking import tracking_uri
from pipeline.training.validation import dice_per_label
from preprocessing.image import Volume
from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main

# Learns the phantom on CPU in well under a minute per fold (tuned: AdamW 1e-2, no augmentation).
LEARNING_CONFIG = {
    "patch_size": [32, 32, 16],
    "network_options": {"channels": [8, 16, 32], "strides": [1, 2, 2], "deep_supervision": True},
    "optimizer": "adamw",
    "learning_rate": 0.01,
    "val_every": 4,
    "iterations_per_epoch": 10,
    "batch_size": 2,
    "torch_threads": 1,
    "augment": {"enabled": False},
}
TINY_CONFIG = {
    "patch_size": [16, 16, 8],
    "network_options": {"channels": [4, 8, 8], "strides": [1, 2, 2]},
    "optimizer": "adamw",
    "learning_rate": 0.003,
    "val_every": 1,
    "iterations_per_epoch": 2,
    "samples_per_volume": 1,
    "torch_threads": 1,
}


def _config(tmp_path: Path, settings: dict) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def _runs(experiment: str):
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture
def tiny_data(tmp_path):
    root = tmp_path / "tiny"
    write_msd_dataset(root, n_train=4, n_test=0, shape=(24, 24, 12), seed=5)
    return root


def test_train_two_folds_register_and_segment(tmp_path, capsys):
    data = tmp_path / "msd"
    write_msd_dataset(data, n_train=6, n_test=1, shape=(48, 48, 32), seed=0)
    work = tmp_path / "work"
    argv = [
        "train",
        "--data",
        str(data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--epochs",
        "12",
        "--experiment",
        "e2e",
        "--register",
        "phantom-seg",
        "--config",
        _config(tmp_path, LEARNING_CONFIG),
        "--out",
        str(work),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0

    client, parents, children = _runs("e2e")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_dice")
        assert [m.step for m in history] == [4, 8, 12]
        assert {"train_loss", "lr", "val_dice_liver", "val_dice_lesion"} <= set(child.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")}
        assert "checkpoints/checkpoint_best.pt" in artifacts
        assert [a.path for a in client.list_artifacts(child.info.run_id, "qc")] == ["qc/qc_best.png"]
    metrics = parent.data.metrics
    # A broken pipeline (flips, wrong normalisation, label mix-ups) cannot reach this on the small lesion.
    assert metrics["cv_mean_dice"] > 0.6, metrics
    assert {"cv_std_dice", "cv_dice_liver", "cv_dice_kidney", "cv_dice_lesion"} <= set(metrics)
    assert parent.data.params["network"] == "unet" and len(parent.data.params["fingerprint_sha256"]) == 64
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"plan.json", "splits.json"}
    logged_splits = Path(client.download_artifacts(parent.info.run_id, "splits.json", str(tmp_path)))
    assert "patient_" not in logged_splits.read_text()  # hashed groups only
    assert not any("patient" in k.lower() for k in parent.data.params)

    version = client.get_model_version_by_alias("phantom-seg", "champion")
    assert float(version.tags["cv_mean_dice"]) == pytest.approx(metrics["cv_mean_dice"], abs=1e-5)
    assert version.run_id == parent.info.run_id
    _check_calibration_and_qc_reference(metrics, work, capsys.readouterr().out)
    # the registered bundle alone segments the held-out test case, on its own grid
    bundle = load_bundle("models:/phantom-seg@champion")
    image = nib.load(str(data / "imagesTs" / "case_006.nii.gz"))
    truth = np.asarray(nib.load(str(data / "labelsTs" / "case_006.nii.gz")).dataobj).astype(np.uint8)
    volume = Volume(np.asarray(image.dataobj, np.float32)[None], image.affine)
    segmenter = Segmenter(
        bundle.plan,
        bundle.build_networks("cpu"),
        bundle.postprocessing,
        InferenceConfig(roi_size=bundle.patch_size, device="cpu"),
    )
    labels = segmenter(volume).labels
    dice = dice_per_label(labels, truth, bundle.label_names)
    assert labels.shape == truth.shape and dice["liver"] > 0.8, dice
    # calibration and QC reference travel in the registered bundle
    calibration = json.loads((work / "cv_results.json").read_text())["calibration"]
    assert bundle.calibration == calibration and bundle.temperature == calibration["temperature"]
    assert bundle.qc_reference["cases"] == 6 and set(bundle.qc_reference["labels"]) >= {"liver", "lesion"}
    assert bundle.qc_reference["uncertainty_p95"] is not None


def _check_calibration_and_qc_reference(metrics: dict, work: Path, out: str) -> None:
    """The temperature fitted on the pooled out-of-fold voxels: in cv_results.json, MLflow, stdout."""
    calibration = json.loads((work / "cv_results.json").read_text())["calibration"]
    assert set(calibration) == {"temperature", "ece_before", "ece_after", "bins", "voxels"}
    assert calibration["bins"] == 15 and calibration["voxels"] > 1000
    assert 0.05 <= calibration["temperature"] <= 20.0
    # the fit minimises the NLL, which on the fitted voxels leaves ECE no worse by more than noise
    assert calibration["ece_after"] <= calibration["ece_before"] + 0.01, calibration
    for key in ("temperature", "ece_before", "ece_after"):
        assert metrics[key] == pytest.approx(calibration[key], abs=1e-6)
    assert f"calibration: temperature {calibration['temperature']:.4f}" in out
    assert all((work / f"fold_{f}" / "calibration_samples.npz").is_file() for f in (0, 1))


def test_bad_datasets_exit_2_with_reason(tmp_path, tiny_data, capsys):
    (tiny_data / "labelsTr" / "case_001.nii.gz").unlink()
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--out",
        str(tmp_path / "w"),
    ]
    assert main(argv) == 2
    assert "case_001" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--network", "unet"]) == 2
    assert main(["train", "--data", str(tiny_data), "--network", "no-such-net"]) == 2
    bad_yaml = _config(tmp_path, {"learning_rat": 0.1})
    assert main(["train", "--data", str(tiny_data), "--network", "unet", "--config", bad_yaml]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_interrupted_fold_resumes_from_checkpoint_with_stable_splits(tmp_path, tiny_data, monkeypatch):
    work = tmp_path / "work"
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--epochs",
        "3",
        "--fold",
        "0",
        "--experiment",
        "resume",
        "--config",
        _config(tmp_path, TINY_CONFIG),
        "--out",
        str(work),
        "--device",
        "cpu",
    ]
    real_epoch, calls = trainer.train_one_epoch, {"n": 0}

    def interrupted_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C / kill during epoch 3
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted_on_third)
    assert main(argv) == 130
    splits = json.loads((work / "splits.json").read_text())
    state = json.loads((work / "cv_state.json").read_text())
    # patients stay in one fold (write_msd_dataset gives patient 0 cases 0 and 1)
    for fold in splits["folds"]:
        assert ("case_000" in fold["val"]) == ("case_001" in fold["val"])

    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    assert main([*argv, "--resume", "--epochs", "4"]) == 0
    epochs = [json.loads(x)["epoch"] for x in (work / "fold_0" / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # continued at 3, extended to 4
    assert json.loads((work / "splits.json").read_text()) == splits
    assert json.loads((work / "cv_state.json").read_text()) == state  # same MLflow runs
    client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    history = client.get_metric_history(state["fold_run_ids"]["0"], "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert client.get_run(state["fold_run_ids"]["0"]).info.status == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real `mlflow server` subprocess on a free localhost port; MLFLOW_TRACKING_URI points at it."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        # Its own process group: `mlflow server` starts uvicorn, a job runner and huey consumers,
        # which must all stop with it.
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(uri, server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
        yield uri
    finally:
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            server.poll()  # reap the leader, or it lingers in the group as a zombie
            try:
                os.killpg(server.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                server.wait(timeout=5)
                return
            time.sleep(0.3)
        server.poll()


def test_against_mlflow_server(tmp_path, tiny_data, mlflow_server):
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--fold",
        "1",
        "--experiment",
        "server",
        "--register",
        "server-model",
        "--config",
        _config(tmp_path, TINY_CONFIG),
        "--out",
        str(tmp_path / "work"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    client, parents, children = _runs("server")
    assert len(parents) == 1 and len(children) == 1
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_dice")] == [1]
    assert client.get_model_version_by_alias("server-model", "champion").version is not None
    bundle = load_bundle("models:/server-model@champion")
    assert bundle.version == "1" and len(bundle.fold_states) == 1
    # The batch job fetches the champion over HTTP and logs its own run to the same server.
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.load(str(tiny_data / "imagesTr" / "case_000.nii.gz")), str(scans / "server_case.nii.gz"))
    out = tmp_path / "pred"
    argv = ["predict", str(scans), "--model", "models:/server-model@champion", "--out", str(out),
            "--workers", "1", "--experiment", "server-batch"]
    assert main(argv) == 0
    assert (out / "server_case" / "mask.nii.gz").is_file()
    _, batch_runs, _ = _runs("server-batch")
    assert len(batch_runs) == 1 and batch_runs[0].data.metrics["cases_ok"] == 1
    assert batch_runs[0].data.params["model_version"] == "server-model/v1"


def test_parallel_folds_on_dask_against_mlflow_server(tmp_path, tiny_data, mlflow_server):
    """Folds as Dask tasks on a 2-worker local cluster, logging to the server from the workers."""
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--experiment",
        "server-dask",
        "--register",
        "dask-model",
        "--config",
        _config(tmp_path, TINY_CONFIG),
        "--out",
        str(tmp_path / "work"),
        "--device",
        "cpu",
        "--parallel-folds",
        "2",
    ]
    assert main(argv) == 0
    client, parents, children = _runs("server-dask")
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_dice")] == [1, 2]
        assert child.info.status == "FINISHED"
    assert len(load_bundle("models:/dask-model@champion").fold_states) == 2


def _wait_for_health(uri: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("mlflow server exited")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not become healthy")


def test_unreachable_tracking_server_still_trains_and_exits_4(tmp_path, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    work = tmp_path / "work"
    argv = [
        "train",
        "--data",
        str(tiny_data),
        "--network",
        "unet",
        "--folds",
        "2",
        "--epochs",
        "1",
        "--fold",
        "0",
        "--register",
        "m",
        "--config",
        _config(tmp_path, TINY_CONFIG),
        "--out",
        str(work),
        "--device",
        "cpu",
    ]
    assert main(argv) == 4
    assert "unreachable" in capsys.readouterr().out
    assert (work / "fold_0" / "checkpoint_best.pt").is_file()
    assert load_bundle(work / "bundle").label_names == {1: "liver", 2: "kidney", 3: "lesion"}


def test_readme_config_example_is_valid_and_bad_augment_keys_are_clear(tmp_path):
    """The YAML shown in the README must load; a typo in `augment` is a clear ValueError (exit 2)."""
    import re

    from pipeline.training.config import TrainConfig
    from preprocessing.plan import PlanConfig
    from workflows.train_config import load_config_file

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = tmp_path / "readme.yaml"
    example.write_text(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    plan, train, post = load_config_file(example, PlanConfig(), TrainConfig())
    assert plan.patch_size == (96, 96, 64) and train.optimizer == "sgd"
    assert set(post) == {"largest_component"}  # the example forces it (for all labels or per label)
    bad = tmp_path / "bad.yaml"
    bad.write_text("augment: {elastic: true}\n")
    with pytest.raises(ValueError, match="elastic_prob"):
        load_config_file(bad, PlanConfig(), TrainConfig())
