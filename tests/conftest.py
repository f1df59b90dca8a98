"""Project-wide test settings: CPU only, seeded, MLflow never touches the user's store."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

os.environ.setdefault("MEDSEG_PSEUDONYM_SALT", "medseg-tests")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a setup error reported elsewhere
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own sqlite MLflow store unless it sets one itself."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "mlartifacts"))
    if "mlflow" in sys.modules:  # MLflow's process-global URIs must not carry an earlier test's store
        sys.modules["mlflow"].set_tracking_uri(uri)
        sys.modules["mlflow"].set_registry_uri(uri)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
