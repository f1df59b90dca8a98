"""`medseg train` on bad inputs: a clear reason and exit code 2, never a traceback or a broken model.

Table-driven: each row writes its own fixture into tmp_path, runs the real CLI and checks the exit
code, the reason text, that nothing was registered and that no MLflow run is left RUNNING (and, for
refusals that must come before any work, that no work folder was made).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import pipeline.training.trainer as trainer
from pipeline.bundle import ModelBundleError, bundle_from_checkpoints
from pipeline.tracking import Tracker
from pipeline.tracking_registry import register_bundle
from preprocessing.plan import read_plan
from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main

SHAPE = (16, 16, 8)
TINY = {
    "patch_size": [16, 16, 8],
    "network_options": {"channels": [4, 8, 8], "strides": [1, 2, 2]},
    "iterations_per_epoch": 2,
    "samples_per_volume": 1,
    "batch_size": 1,
    "torch_threads": 1,
    "augment": {"enabled": False},
}


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A sqlite MLflow store of this test only; the current folder is tmp_path (default work folder)."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    monkeypatch.delenv("MEDSEG_WORK", raising=False)
    monkeypatch.chdir(tmp_path)
    return db


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _runs(db: Path) -> list:
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _registered(db: Path) -> list:
    return MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").search_registered_models() if db.exists() else []


# --- fixture writers: each returns the dataset folder ---------------------------------------------


def _good(tmp: Path, n: int = 4, with_patients: bool = True) -> Path:
    root = tmp / "msd"
    write_msd_dataset(root, n_train=n, n_test=0, shape=SHAPE, seed=3, with_patients=with_patients)
    return root


def _nan_voxel(tmp: Path) -> Path:
    root = _good(tmp)
    path = root / "imagesTr" / "case_001.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return root


def _dataset_json_list(tmp: Path) -> Path:
    root = _good(tmp)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta["training"]))
    return root


def _truncate(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])


def _truncated_image(tmp: Path) -> Path:
    root = _good(tmp)
    _truncate(root / "imagesTr" / "case_002.nii.gz")
    return root


def _truncated_label(tmp: Path) -> Path:
    root = _good(tmp)
    _truncate(root / "labelsTr" / "case_002.nii.gz")
    return root


def _label_256(tmp: Path) -> Path:
    root = _good(tmp)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"]["vessel"] = 256
    (root / "dataset.json").write_text(json.dumps(meta))
    path = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).astype(np.uint16)
    label[:2, :2, :2] = 256
    nib.save(nib.Nifti1Image(label, img.affine), str(path))
    return root


@dataclass(frozen=True)
class BadInput:
    write: Callable[[Path], Path]
    flags: tuple[str, ...]
    expected: tuple[str, ...]  # every one must appear in stdout + stderr
    absent: tuple[str, ...] = ()  # none may appear


CASES = {
    "nan_voxel_in_one_training_image": BadInput(_nan_voxel, (), ("case_001", "NaN")),
    "dataset_json_holding_a_list": BadInput(_dataset_json_list, (), ("dataset.json", "list")),
    "gzip_truncated_image": BadInput(_truncated_image, (), ("imagesTr/case_002.nii.gz", "truncated")),
    "gzip_truncated_label": BadInput(_truncated_label, (), ("labelsTr/case_002.nii.gz", "truncated")),
    "label_value_above_255": BadInput(_label_256, (), ("256", "0..255")),
    "epochs_0": BadInput(_good, ("--epochs", "0"), ("--epochs", "at least 1")),
    "epochs_negative": BadInput(_good, ("--epochs", "-3"), ("--epochs", "-3")),
    "folds_1": BadInput(_good, ("--folds", "1"), ("--folds", "at least 2", "--folds 2 or more")),
    "folds_0": BadInput(_good, ("--folds", "0"), ("--folds",)),
    "one_case_five_folds": BadInput(
        lambda t: _good(t, n=1), ("--folds", "5"), ("1 training", "at least 2", "add"), ("--folds 1 or",)
    ),
    "three_cases_five_folds": BadInput(
        lambda t: _good(t, n=3, with_patients=False), ("--folds", "5"), ("3 training patient(s)", "use --folds 3 or fewer")
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_training_input_exits_2_with_reason(name, tmp_path, store, capsys):
    case = CASES[name]
    data = case.write(tmp_path)
    argv = ["train", "--data", str(data), "--network", "unet", "--device", "cpu", "--register", "bad"]
    argv += ["--folds", "2", "--epochs", "1", *case.flags]  # later flags win

    code, text = _run(argv, capsys)

    assert code == 2, text
    for expected in case.expected:
        assert expected in text, (expected, text)
    for absent in case.absent:
        assert absent not in text, (absent, text)
    assert "Traceback" not in text
    assert not (tmp_path / "medseg_work").exists()  # refused before any work
    assert _runs(store) == [] and _registered(store) == []


def _nan_weights_after_first_epoch(monkeypatch) -> None:
    real = trainer.train_one_epoch

    def poisoned(loop, *args, **kwargs):
        metrics = real(loop, *args, **kwargs)
        with torch.no_grad():
            next(loop.model.parameters()).fill_(float("nan"))
        return metrics

    monkeypatch.setattr(trainer, "train_one_epoch", poisoned)


@pytest.mark.parametrize("fault", ["learning_rate_1e30", "nan_weights"])
def test_diverged_fold_fails_without_checkpoint_or_bundle(fault, tmp_path, store, monkeypatch, capsys):
    data = _good(tmp_path)
    settings = dict(TINY, learning_rate=1e30) if fault == "learning_rate_1e30" else dict(TINY)
    if fault == "nan_weights":
        _nan_weights_after_first_epoch(monkeypatch)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(settings))
    argv = ["train", "--data", str(data), "--network", "unet", "--folds", "2", "--epochs", "2"]
    argv += ["--config", str(config), "--device", "cpu", "--register", "diverged", "--experiment", "nan"]

    code, text = _run(argv, capsys)

    assert code == 2, text
    assert "fold 0, epoch 1" in text and "NaN" in text.replace("nan", "NaN"), text
    assert "no model was registered" in text and "Traceback" not in text
    assert _registered(store) == []
    runs = _runs(store)
    assert runs and {r.info.status for r in runs} == {"FAILED"}, [(r.info.run_name, r.info.status) for r in runs]
    fold = tmp_path / "medseg_work" / "msd" / "fold_0"
    assert not (fold / "checkpoint_best.pt").exists()  # the diverged epoch was never kept as best


def test_bundle_with_non_finite_weights_is_never_built_or_registered(tmp_path, store):
    data = _good(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(TINY))
    work = tmp_path / "work"
    argv = ["train", "--data", str(data), "--network", "unet", "--folds", "2", "--fold", "0"]
    argv += ["--epochs", "1", "--config", str(config), "--device", "cpu", "--out", str(work)]
    assert main(argv) == 0
    best = work / "fold_0" / "checkpoint_best.pt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], float("inf"))
    torch.save(checkpoint, best)
    plan = read_plan(work / "plan.json")

    with pytest.raises(ModelBundleError, match=rf"checkpoint_best\.pt.*NaN/Inf.*{name}"):
        bundle_from_checkpoints(plan, [best])
    from pipeline.bundle import ModelBundle

    bundle = ModelBundle(plan, (checkpoint["model"],))
    parent = Tracker("direct").start_run("direct")
    with pytest.raises(ModelBundleError, match="NaN/Inf"):
        register_bundle(bundle, parent, "direct-model", 0.5)
    assert _registered(store) == []
