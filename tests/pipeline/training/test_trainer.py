"""Fold training: checkpoints, resume after a crash continues (not restarts), same result as uninterrupted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline.training.trainer as trainer
from pipeline.calibration import load_samples
from pipeline.tracking import Tracker
from pipeline.training.checkpoint import BEST, LAST, load_checkpoint
from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData
from pipeline.training.out_of_fold import CALIBRATION_SAMPLES
from pipeline.training.trainer import train_fold
from preprocessing.fingerprint import fingerprint_dataset
from preprocessing.msd import read_msd_dataset
from preprocessing.plan import PlanConfig, make_plan
from preprocessing.synthetic import write_msd_dataset
from preprocessing.transforms import AugmentConfig, case_to_item

CONFIG = TrainConfig(
    epochs=4,
    optimizer="adamw",
    learning_rate=3e-3,
    val_every=2,
    iterations_per_epoch=2,
    samples_per_volume=1,
    torch_threads=1,
    augment=AugmentConfig(affine_prob=0.5, mirror=True),
)


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer") / "msd"
    write_msd_dataset(root, n_train=3, n_test=0, shape=(24, 24, 12), seed=4, with_patients=False)
    ds = read_msd_dataset(root)
    options = {"channels": [4, 8, 8], "strides": [1, 2, 2], "deep_supervision": True}
    plan = make_plan(
        fingerprint_dataset(ds), "unet", PlanConfig(patch_size=(16, 16, 8), network_options=options)
    )
    items = tuple({**case_to_item(c.image_paths, c.label_path), "case_id": c.case_id} for c in ds.cases)
    return FoldData(0, items[:2], items[2:]), plan


def _epochs(work):
    return [json.loads(line)["epoch"] for line in (work / trainer.EPOCH_LOG).read_text().splitlines()]


def test_resume_after_crash_continues_and_matches_uninterrupted(fold, tmp_path, monkeypatch):
    data, plan = fold
    reference = train_fold(data, plan, CONFIG, tmp_path / "ref", Tracker("exp-trainer").start_run("ref"))
    assert reference.epochs_run == 4 and 1 <= reference.best_epoch <= 4
    assert (tmp_path / "ref" / BEST).is_file()

    real_epoch = trainer.train_one_epoch
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault (power cut)")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", crash_on_third)
    run = Tracker("exp-trainer").start_run("crashy")
    with pytest.raises(RuntimeError, match="injected"):
        train_fold(data, plan, CONFIG, tmp_path / "b", run)
    assert load_checkpoint(tmp_path / "b" / LAST)["epoch"] == 2
    assert _epochs(tmp_path / "b") == [1, 2]

    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", counting)
    resumed = train_fold(
        data, plan, CONFIG, tmp_path / "b", Tracker("exp-trainer").bind(run.run_id), resume=True
    )
    assert counted["n"] == 2  # epochs 3 and 4 only, not from scratch
    assert _epochs(tmp_path / "b") == [1, 2, 3, 4]
    assert [s for s, _ in run.metric_history("train_loss")] == [1, 2, 3, 4]
    assert [s for s, _ in run.metric_history("val_dice")] == [2, 4]
    # RNG states, augmentation seeds, optimiser and schedule restored: bit-for-bit the same training.
    ref_state = load_checkpoint(tmp_path / "ref" / LAST)["model"]
    new_state = load_checkpoint(tmp_path / "b" / LAST)["model"]
    assert all(torch.allclose(ref_state[k].float(), new_state[k].float(), atol=1e-6) for k in ref_state)
    assert resumed.best_dice == pytest.approx(reference.best_dice, abs=1e-6)
    # The out-of-fold calibration voxels and uncertainty scores come back with the resumed fold.
    ref_x, ref_y = load_samples(reference.calibration_samples)
    new_x, new_y = load_samples(resumed.calibration_samples)
    assert resumed.calibration_samples == str(tmp_path / "b" / CALIBRATION_SAMPLES)
    assert ref_x.shape[1] == plan.num_classes and 0 < ref_x.shape[0] <= CONFIG.calibration_voxels
    np.testing.assert_array_equal(ref_y, new_y)
    np.testing.assert_allclose(ref_x, new_x, atol=1e-4)
    assert set(resumed.oof_uncertainty) == {data.val[0]["case_id"]}
    score = resumed.oof_uncertainty[data.val[0]["case_id"]]
    assert 0.0 <= score <= 1.0 and score == pytest.approx(reference.oof_uncertainty[data.val[0]["case_id"]], abs=1e-4)


def test_resume_can_extend_epochs_with_poly_schedule(fold, tmp_path):
    data, plan = fold
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": 2, "optimizer": "sgd", "learning_rate": 1e-2})
    tracker = Tracker("exp-trainer").start_run("extend")
    train_fold(data, plan, config, tmp_path / "e", tracker)
    longer = TrainConfig(**{**config.__dict__, "epochs": 3})
    result = train_fold(
        data, plan, longer, tmp_path / "e", Tracker("exp-trainer").bind(tracker.run_id), resume=True
    )
    assert result.epochs_run == 3 and _epochs(tmp_path / "e") == [1, 2, 3]
    lrs = dict(tracker.metric_history("lr"))
    assert lrs[1] == pytest.approx(1e-2)
    assert lrs[3] == pytest.approx(1e-2 * (1 - 2 / 3) ** 0.9, rel=1e-4)  # poly over the new length


def test_checkpoint_pickles_no_class_of_ours(fold, tmp_path):
    """Resume never depends on our class names (renames such as _Loop -> TrainingState stay safe)."""
    import pickletools
    import zipfile

    data, plan = fold
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": 1, "lr_schedule": "constant"})
    train_fold(data, plan, config, tmp_path / "c", Tracker("exp-trainer").start_run("classes"))
    with zipfile.ZipFile(tmp_path / "c" / LAST) as archive:
        pickle = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    globals_ = [
        str(arg) for op, arg, _ in pickletools.genops(pickle) if op.name in ("GLOBAL", "STACK_GLOBAL")
    ]
    strings = [str(arg) for op, arg, _ in pickletools.genops(pickle) if isinstance(arg, str)]
    modules = {s for s in globals_ + strings if s.split(".")[0] in ("pipeline", "networks", "preprocessing")}
    assert not modules, modules
    assert "collections OrderedDict" in globals_ or "torch._utils _rebuild_tensor_v2" in globals_


@pytest.mark.gpu
def test_amp_training_on_cuda(fold, tmp_path):
    data, plan = fold
    config = TrainConfig(**{**CONFIG.__dict__, "device": "cuda", "amp": True, "epochs": 2})
    result = train_fold(data, plan, config, tmp_path / "gpu", Tracker("exp-gpu").start_run("gpu"))
    assert result.epochs_run == 2 and 0.0 <= result.best_dice <= 1.0
    assert load_checkpoint(tmp_path / "gpu" / LAST, map_location="cpu")["epoch"] == 2
    assert torch.isfinite(
        torch.tensor(
            [
                json.loads(x)["train_loss"]
                for x in (tmp_path / "gpu" / trainer.EPOCH_LOG).read_text().splitlines()
            ]
        )
    ).all()
