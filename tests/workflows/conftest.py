"""A model trained once per test session through the real CLI, for the batch-prediction tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.bundle import resolve_bundle_dir
from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main

MODEL_NAME = "fixture-phantom"
# Learns liver and kidney of the phantom on 2 CPU cores in well under a minute (AdamW, no augmentation).
FIXTURE_TRAIN_CONFIG = {
    "patch_size": [32, 32, 16],
    "network_options": {"channels": [8, 16, 32], "strides": [1, 2, 2], "deep_supervision": True},
    "optimizer": "adamw",
    "learning_rate": 0.01,
    "val_every": 8,
    "iterations_per_epoch": 10,
    "batch_size": 2,
    "torch_threads": 2,
    "augment": {"enabled": False},
}


@dataclass(frozen=True)
class TrainedModel:
    tracking_uri: str
    model_uri: str
    bundle_dir: Path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    root = tmp_path_factory.mktemp("trained_model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ARTIFACTS_DESTINATION")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_ARTIFACTS_DESTINATION"] = str(root / "mlartifacts")
    try:
        data = root / "msd"
        write_msd_dataset(data, n_train=6, n_test=0, shape=(48, 48, 32), seed=0)
        config = root / "train.yaml"
        config.write_text(yaml.safe_dump(FIXTURE_TRAIN_CONFIG))
        code = main(
            [
                "train",
                "--data",
                str(data),
                "--network",
                "attention_unet",
                "--folds",
                "2",
                "--epochs",
                "8",
                "--register",
                MODEL_NAME,
                "--config",
                str(config),
                "--out",
                str(root / "work"),
                "--device",
                "cpu",
                "--experiment",
                "fixture-train",
            ]
        )
        assert code == 0, "training the fixture model failed"
        bundle_dir = resolve_bundle_dir(f"models:/{MODEL_NAME}@champion", cache_dir=root / "bundle")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return TrainedModel(uri, f"models:/{MODEL_NAME}@champion", Path(bundle_dir))
