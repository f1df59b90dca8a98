"""Model bundle: folder round trip, models:/ loading, and (pipeline.tracking_registry) champion + pyfunc."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch

from pipeline.bundle import ModelBundle, ModelBundleError, load_bundle, resolve_bundle_dir, save_bundle
from pipeline.inference.config import InferenceConfig
from pipeline.inference.segment import Segmenter
from pipeline.tracking import Tracker, tracking_uri
from pipeline.tracking_registry import register_bundle
from preprocessing.image import Volume
from preprocessing.plan import ChannelNormalization, Plan

OPTIONS = {"channels": [4, 8, 8], "strides": [1, 2, 2]}


def _bundle(seed: int, folds: int = 2) -> ModelBundle:
    plan = Plan(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        batch_size=2,
        normalization=(ChannelNormalization("ct", -100.0, 200.0, 40.0, 50.0),),
        modalities={0: "CT"},
        labels={0: "background", 1: "liver", 2: "kidney"},
        network="unet",
        network_options=OPTIONS,
    )
    empty = ModelBundle(plan, ())
    torch.manual_seed(seed)
    states = tuple(net.state_dict() for net in [_build(empty) for _ in range(folds)])
    return ModelBundle(plan, states, {"largest_component": False}, code_version="abc123", cv_mean_dice=0.5)


def _build(bundle: ModelBundle) -> torch.nn.Module:
    from networks import build_network

    return build_network("unet", 1, 3, **OPTIONS)


def test_folder_round_trip(tmp_path):
    bundle = _bundle(0)
    folder = save_bundle(bundle, tmp_path / "b")
    loaded = load_bundle(folder)
    assert loaded.plan == bundle.plan and loaded.label_names == {1: "liver", 2: "kidney"}
    assert loaded.postprocessing == {"largest_component": False} and loaded.code_version == "abc123"
    assert loaded.in_channels == 1 and loaded.modality == "CT" and loaded.patch_size == (16, 16, 16)
    nets = loaded.build_networks("cpu")
    assert len(nets) == 2 and not nets[0].training
    for key, value in bundle.fold_states[1].items():
        assert torch.equal(nets[1].state_dict()[key], value)
    with pytest.raises(ModelBundleError, match="no model bundle"):
        load_bundle(tmp_path)


def test_champion_moves_only_on_improvement_and_models_uri_loads(tmp_path):
    parent = Tracker("exp-bundle").start_run("cv")
    first = register_bundle(_bundle(1), parent, "liver-seg", 0.50)
    second = register_bundle(_bundle(2), parent, "liver-seg", 0.40)
    assert first.is_champion and first.version == "1"
    assert not second.is_champion and second.version == "2" and second.champion_version == "1"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    assert str(client.get_model_version_by_alias("liver-seg", "champion").version) == "1"
    assert float(client.get_model_version("liver-seg", "2").tags["cv_mean_dice"]) == pytest.approx(0.40)
    third = register_bundle(_bundle(3), parent, "liver-seg", 0.70)
    assert (
        third.is_champion and str(client.get_model_version_by_alias("liver-seg", "champion").version) == "3"
    )

    champion = load_bundle("models:/liver-seg@champion")
    assert champion.name == "liver-seg" and champion.version == "3" and champion.version_tag == "liver-seg/v3"
    assert math.isclose(champion.cv_mean_dice, 0.70)
    expected = _bundle(3).fold_states[0]
    assert all(torch.equal(champion.fold_states[0][k], v) for k, v in expected.items())
    folder = resolve_bundle_dir("models:/liver-seg/2", cache_dir=tmp_path / "cache")
    assert load_bundle(folder).version == "2"
    with pytest.raises(ModelBundleError, match="could not download"):
        load_bundle("models:/no-such-model@champion")


def test_pyfunc_predicts_label_map(tmp_path):
    parent = Tracker("exp-pyfunc").start_run("cv")
    bundle = _bundle(4)
    register_bundle(bundle, parent, "pyfunc-seg", 0.6)
    model = mlflow.pyfunc.load_model("models:/pyfunc-seg@champion")
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 60.0, (20, 18, 12)).astype(np.float32)
    labels = model.predict({"image": image, "spacing_mm": [1.5, 1.5, 3.0]})
    assert labels.shape == (20, 18, 12) and labels.dtype == np.uint8
    volume = Volume(image[None], np.diag([1.5, 1.5, 3.0, 1.0]))
    segmenter = Segmenter(
        bundle.plan,
        bundle.build_networks("cpu"),
        bundle.postprocessing,
        InferenceConfig(roi_size=(16, 16, 16), device="cpu"),
    )
    direct = segmenter(volume).labels
    assert np.array_equal(labels, direct)
    import pandas as pd

    frame = pd.DataFrame({"image": [image], "spacing_mm": [[1.5, 1.5, 3.0]]})
    assert np.array_equal(model.predict(frame), direct)
    with pytest.raises(ValueError, match="spacing_mm"):
        model.predict({"image": image})


def test_calibration_and_qc_reference_round_trip(tmp_path):
    from dataclasses import replace

    calibration = {"temperature": 1.7, "ece_before": 0.12, "ece_after": 0.03, "bins": 15, "voxels": 4000}
    qc = {"cases": 3, "labels": {"liver": {"volume_ml": [1.0, 2.0]}}, "uncertainty_p95": 0.2}
    bundle = replace(_bundle(0, folds=1), calibration=calibration, qc_reference=qc)
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    assert loaded.calibration == calibration and loaded.temperature == 1.7
    assert loaded.qc_reference == qc


def test_bundle_without_calibration_loads_uncalibrated(tmp_path):
    import json

    folder = save_bundle(_bundle(0, folds=1), tmp_path / "old")
    meta = json.loads((folder / "bundle.json").read_text())
    del meta["calibration"], meta["qc_reference"]  # as written before issue 12
    (folder / "bundle.json").write_text(json.dumps(meta))
    loaded = load_bundle(folder)
    assert loaded.calibration == {} and loaded.temperature == 1.0 and loaded.qc_reference == {}
    for bad in ({"temperature": 0.0}, {"temperature": "hot"}, [1.5]):
        (folder / "bundle.json").write_text(json.dumps({**meta, "calibration": bad}))
        with pytest.raises(ModelBundleError, match="calibration"):
            load_bundle(folder)


def test_bundle_from_checkpoints_keeps_calibration_and_qc_reference(tmp_path):
    from pipeline.bundle import bundle_from_checkpoints

    bundle = _bundle(0, folds=1)
    torch.save({"model": bundle.fold_states[0]}, tmp_path / "best.pt")
    made = bundle_from_checkpoints(
        bundle.plan, [tmp_path / "best.pt"], calibration={"temperature": 2.0}, qc_reference={"cases": 1}
    )
    assert made.temperature == 2.0 and made.qc_reference == {"cases": 1}
    assert bundle_from_checkpoints(bundle.plan, [tmp_path / "best.pt"]).temperature == 1.0
