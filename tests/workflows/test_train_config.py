"""`medseg train --config`: unknown keys at any level exit 2 naming the valid ones; --help lists the
fields; a registered bundle records the per-label largest-component decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main


@pytest.fixture(scope="module")
def tiny_msd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("config_msd") / "msd"
    write_msd_dataset(root, n_train=4, n_test=0, shape=(16, 16, 8), seed=3)
    return root


def _train(tmp_path: Path, data: Path, settings: object) -> int:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(settings))
    argv = ["train", "--data", str(data), "--network", "unet", "--folds", "2", "--epochs", "1"]
    return main([*argv, "--config", str(config), "--out", str(tmp_path / "work"), "--device", "cpu"])


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # a misspelt postprocessing key was silently ignored (largest component stayed on)
        ({"postprocessing": {"largest_componnent": False}}, ["largest_componnent", "['largest_component']"]),
        # the top-level list of valid keys names postprocessing (and the sections)
        ({"learning_rat": 0.1}, ["learning_rat", "'postprocessing'", "learning_rate", "patch_size"]),
        ({"plan": {"patch_sise": [16, 16, 8]}}, ["patch_sise", "patch_size"]),
        ({"train": {"epoch": 3}}, ["epoch", "'epochs'"]),
        ({"train": {"augment": {"mirorr": False}}}, ["mirorr", "'mirror'"]),
        ({"augment": {"elastic": True}}, ["elastic", "elastic_prob"]),
        ({"postprocessing": {"largest_component": {"livr": True}}}, ["livr", "'liver'", "'lesion'"]),
        ({"postprocessing": {"largest_component": "sometimes"}}, ["largest_component", "true, false"]),
        ({"postprocessing": [1, 2]}, ["postprocessing", "mapping"]),
    ],
)
def test_unknown_config_keys_at_any_level_exit_2_naming_the_valid_ones(
    tmp_path, tiny_msd, capsys, settings, expected
):
    assert _train(tmp_path, tiny_msd, settings) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "work" / "fold_0").exists()  # refused before any training


def test_train_help_lists_the_config_fields(capsys):
    try:
        code = main(["train", "--help"])
    except SystemExit as exc:  # argparse's own exit, when main does not turn it into a code
        code = exc.code
    assert code == 0
    out = capsys.readouterr().out
    for field_name in ("patch_size", "target_spacing_mm", "learning_rate", "val_every", "elastic_prob", "mirror"):
        assert field_name in out
    assert "postprocessing" in out and "largest_component" in out and "out-of-fold" in out
    assert "``" not in out and ":class:" not in out  # plain text, no RST markup


def test_registered_bundle_records_the_per_label_decision(trained_model):
    """The fixture's real `medseg train --register` decides every label on out-of-fold Dice."""
    meta = json.loads((trained_model.bundle_dir / "bundle.json").read_text())
    decisions = meta["postprocessing"]["largest_component"]
    assert set(decisions) == set(meta["label_names"].values())
    for name, d in decisions.items():
        assert d["decided_by"] == "oof", name
        assert d["oof_cases"] == 6  # 2 folds x 3 validation cases: every training case once
        assert 0.0 <= d["oof_dice_without"] <= 1.0 and 0.0 <= d["oof_dice_with"] <= 1.0
        assert d["apply"] is (d["oof_dice_with"] > d["oof_dice_without"])
    # ... and the training run reports it: metrics on the parent run, cv_results.json in the work folder
    root = Path(trained_model.tracking_uri.removeprefix("sqlite:///")).parent
    client = MlflowClient(tracking_uri=trained_model.tracking_uri, registry_uri=trained_model.tracking_uri)
    exp = client.get_experiment_by_name("fixture-train")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    for name, d in decisions.items():
        assert parent.data.metrics[f"largest_component_{name}"] == (1.0 if d["apply"] else 0.0)
        assert parent.data.metrics[f"oof_dice_{name}"] == pytest.approx(d["oof_dice_without"])
        assert parent.data.metrics[f"oof_dice_largest_component_{name}"] == pytest.approx(d["oof_dice_with"])
    summary = json.loads((root / "work" / "cv_results.json").read_text())
    assert summary["postprocessing"]["largest_component"] == decisions
