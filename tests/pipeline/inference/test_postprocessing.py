"""Largest-component post-processing is decided per label on out-of-fold Dice, and applied per label.

The "oracle" network reads the label map it should predict from its input channel (one-hot of the
rounded intensity), so the sliding-window engine of validation and prediction runs for real and
returns exactly the prediction a test wants.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from pipeline.bundle import ModelBundle, ModelBundleError, load_bundle, save_bundle
from pipeline.inference.config import InferenceConfig
from pipeline.inference.postprocessing import (
    check_postprocessing_labels,
    decide_largest_component,
    largest_component_values,
    normalize_postprocessing,
    parse_postprocessing_config,
)
from pipeline.inference.segment import Segmenter
from pipeline.training.validation import ValidationCase, validate
from preprocessing.image import Volume
from preprocessing.plan import ChannelNormalization, Plan

LABELS = {0: "background", 1: "organ", 2: "lesion"}
SHAPE = (24, 24, 16)


class LabelOracle(nn.Module):
    """Logits (B, 3, ...) that make the argmax equal the rounded input channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :1].round()
        return torch.cat([(value == k).float() for k in range(len(LABELS))], dim=1) * 20.0


def _plan() -> Plan:
    return Plan(
        spacing_mm=(1.0, 1.0, 1.0),
        patch_size=(16, 16, 16),
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "CT"},
        labels=LABELS,
        network="oracle",
    )


def _config() -> InferenceConfig:
    return InferenceConfig(roi_size=(16, 16, 16), overlap=0.25, device="cpu", amp=False)


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction): an organ predicted with false-positive specks, two lesions predicted right."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(SHAPE, np.uint8)
    truth[3:13, 3:13, 3:11] = 1  # organ: one blob
    truth[17:20, 17:20, 2:5] = 2  # two lesions, far apart
    truth[17:20, 4:7, 11:14] = 2
    pred = truth.copy()
    for _ in range(6):  # isolated organ specks in the background
        while True:
            x, y, z = (int(rng.integers(0, n)) for n in SHAPE)
            if truth[max(0, x - 1) : x + 2, max(0, y - 1) : y + 2, max(0, z - 1) : z + 2].max() == 0:
                pred[x, y, z] = 1
                break
    return truth, pred


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


def test_validation_oof_dice_decides_per_label_lesions_off_speckled_organ_on():
    cases = []
    for seed in range(3):
        truth, pred = _case(seed)
        image = torch.from_numpy(pred.astype(np.float32))[None]
        cases.append(ValidationCase(f"case{seed}", image, truth, np.eye(4)))
    fg = {k: v for k, v in LABELS.items() if k}
    result = validate(LabelOracle(), cases, fg, _config(), largest_component=True)
    assert set(result.oof_dice) == {"case0", "case1", "case2"}
    first = result.oof_dice["case0"]
    assert first["lesion"]["without"] == pytest.approx(1.0) and first["lesion"]["with"] < 0.7
    assert first["organ"]["without"] < first["organ"]["with"] == pytest.approx(1.0)
    # the "without" Dice is the epoch validation's Dice
    assert first["organ"]["without"] == pytest.approx(result.per_case["case0"]["organ"])

    decision = decide_largest_component(result.oof_dice, ["organ", "lesion"])
    assert decision["organ"]["apply"] is True and decision["organ"]["decided_by"] == "oof"
    assert decision["lesion"]["apply"] is False and decision["lesion"]["decided_by"] == "oof"
    assert decision["lesion"]["oof_dice_without"] == pytest.approx(1.0)
    assert decision["lesion"]["oof_dice_with"] < decision["lesion"]["oof_dice_without"]
    assert decision["organ"]["oof_cases"] == 3
    json.dumps(decision)  # plain JSON for bundle.json


def test_decision_ties_stay_off_forced_wins_and_no_data_is_off():
    oof = {"a": {"organ": {"without": 0.8, "with": 0.8}, "lesion": {"without": 0.5, "with": 0.9}}}
    decision = decide_largest_component(oof, ["organ", "lesion", "cyst"], forced={"lesion": False})
    assert decision["organ"]["apply"] is False  # no evidence that it helps: keep every component
    assert decision["lesion"] == {
        "apply": False,
        "decided_by": "forced",
        "oof_dice_without": 0.5,
        "oof_dice_with": 0.9,
        "oof_cases": 1,
    }
    assert decision["cyst"]["apply"] is False and decision["cyst"]["decided_by"] == "default"
    assert decision["cyst"]["oof_dice_with"] is None
    forced_all = decide_largest_component(oof, ["organ", "lesion"], forced=True)
    assert all(d["apply"] and d["decided_by"] == "forced" for d in forced_all.values())


def _two_blob_volume() -> Volume:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:8, 2:8, 2:8] = 1
    labels[15:22, 15:22, 9:15] = 1  # a second organ blob (the other kidney)
    labels[2:5, 18:21, 11:14] = 2
    labels[18:21, 2:5, 2:5] = 2  # a second lesion
    return Volume(labels[None].astype(np.float32), np.eye(4), case_id="blobs")


def test_predictor_applies_largest_component_only_to_labels_whose_decision_is_on():
    volume = _two_blob_volume()
    post = {"largest_component": {"organ": {"apply": True}, "lesion": {"apply": False}}}
    bundle = ModelBundle(_plan(), fold_states=(), postprocessing=post)
    labels = Segmenter(bundle.plan, [LabelOracle()], bundle.postprocessing, _config())(volume).labels
    assert _components(labels == 1) == 1 and (labels[15:22, 15:22, 9:15] == 1).all()  # larger kept
    assert _components(labels == 2) == 2  # both lesions survive


def test_two_blob_label_survives_by_default():
    """No decision recorded (the default bundle) means no component is removed."""
    volume = _two_blob_volume()
    bundle = ModelBundle(_plan(), fold_states=())
    labels = Segmenter(bundle.plan, [LabelOracle()], bundle.postprocessing, _config())(volume).labels
    np.testing.assert_array_equal(labels, volume.array[0].astype(np.uint8))
    assert _components(labels == 1) == 2 and _components(labels == 2) == 2


def test_bundle_round_trip_of_the_decision_and_old_boolean_bundles(tmp_path):
    plan = _plan()
    decision = decide_largest_component({"a": {"organ": {"without": 0.7, "with": 0.9}}}, ["organ", "lesion"])
    states = ({"w": torch.zeros(1)},)  # weights are not used here, but a bundle has at least one fold
    save_bundle(ModelBundle(plan, states, {"largest_component": decision}), tmp_path / "new")
    loaded = load_bundle(tmp_path / "new")
    assert loaded.postprocessing == {"largest_component": decision}
    assert largest_component_values(loaded.postprocessing, {1: "organ", 2: "lesion"}) == [1]

    # a bundle.json written by an older medseg: the explicit boolean is honoured for every label
    save_bundle(ModelBundle(plan, states, {"largest_component": True}), tmp_path / "old")
    assert largest_component_values(load_bundle(tmp_path / "old").postprocessing, {1: "organ", 2: "lesion"}) == [1, 2]
    # no postprocessing entry at all: off
    meta = json.loads((tmp_path / "old" / "bundle.json").read_text())
    del meta["postprocessing"]
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(tmp_path / "old").postprocessing == {}

    meta["postprocessing"] = {"largest_component": {"organ": "yes"}}
    (tmp_path / "old" / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(ModelBundleError, match="organ"):
        load_bundle(tmp_path / "old")


def test_config_parsing_names_the_valid_keys():
    assert parse_postprocessing_config({"largest_component": {"organ": True}}, "c.yaml") == {
        "largest_component": {"organ": True}
    }
    assert parse_postprocessing_config(None, "c.yaml") == {}
    with pytest.raises(ValueError, match=r"largest_componnent.*valid: \['largest_component'\]"):
        parse_postprocessing_config({"largest_componnent": False}, "c.yaml")
    with pytest.raises(ValueError, match="true or false"):
        parse_postprocessing_config({"largest_component": {"organ": "on"}}, "c.yaml")
    with pytest.raises(ValueError, match=r"\['organ'\]"):
        check_postprocessing_labels({"largest_component": {"organn": True}}, ["organ"])
    assert normalize_postprocessing({"largest_component": False}) == {"largest_component": False}
