"""Fingerprint -> plan: spacing rules, patch size, normalisation, plan.json round trip; CV splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocessing.errors import DatasetError
from preprocessing.fingerprint import Fingerprint, fingerprint_dataset
from preprocessing.msd import read_msd_dataset
from preprocessing.plan import (
    Plan,
    PlanConfig,
    make_plan,
    patch_size_for,
    read_plan,
    target_spacing,
    with_overrides,
    write_plan,
)
from preprocessing.splits import hash_group, load_or_make_splits, make_folds
from preprocessing.synthetic import write_msd_dataset

_STATS = {"mean": 50.0, "std": 20.0, "p00_5": -30.0, "p99_5": 180.0, "min": -50.0, "max": 200.0}


def _fp(spacings, shapes, modality="CT"):
    return Fingerprint(
        tuple(map(tuple, spacings)), tuple(map(tuple, shapes)), (_STATS,), {0: modality}, {0: "bg", 1: "a"}
    )


def test_target_spacing_is_median():
    fp = _fp([(1.0, 1.0, 2.0), (0.8, 0.8, 2.5), (1.2, 1.2, 3.0)], [(100, 100, 50)] * 3)
    assert target_spacing(fp) == pytest.approx((1.0, 1.0, 2.5))


def test_anisotropic_axis_uses_10th_percentile():
    spacings = [(0.7, 0.7, s) for s in (4.0, 5.0, 5.0, 5.0, 6.0, 8.0, 8.0, 8.0, 8.0, 8.0)]
    fp = _fp(spacings, [(512, 512, 40)] * 10)
    spacing = target_spacing(fp)
    assert spacing[:2] == pytest.approx((0.7, 0.7))
    assert spacing[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    assert spacing[2] < np.median([s[2] for s in spacings])
    # not anisotropic in voxel counts -> plain median (nnU-Net's second condition)
    assert target_spacing(_fp(spacings, [(64, 64, 40)] * 10))[2] == pytest.approx(7.0)


def test_patch_size_divisible_and_within_budget():
    patch = patch_size_for((300, 280, 90), (0.8, 0.8, 2.5), (16, 16, 8), budget=128**3)
    assert all(p % d == 0 for p, d in zip(patch, (16, 16, 8), strict=True))
    assert np.prod(patch) <= 128**3
    assert patch_size_for((45, 45, 30), (1.5, 1.5, 3.0), (4, 4, 4), budget=10**6) == (48, 48, 32)


def test_plan_from_synthetic_dataset_and_round_trip(tmp_path):
    write_msd_dataset(tmp_path / "d", n_train=3, n_test=0, shape=(24, 20, 12), seed=1)
    ds = read_msd_dataset(tmp_path / "d")
    fp = fingerprint_dataset(ds)
    assert fp.spacings_mm[0] == pytest.approx((1.5, 1.5, 3.0)) and fp.shapes[0] == (24, 20, 12)
    assert fp.sha256() == fingerprint_dataset(ds).sha256()  # deterministic
    resampled = fingerprint_dataset(ds, foreground_samples_per_case=50, seed=3)
    assert resampled.spacings_mm == fp.spacings_mm and resampled.foreground != fp.foreground
    config = PlanConfig(divisor=(4, 4, 4), network_options={"channels": [8, 16, 32]})
    plan = make_plan(fp, "unet", config)
    assert plan.spacing_mm == pytest.approx((1.5, 1.5, 3.0))
    assert plan.patch_size == (24, 20, 12)
    norm = plan.normalization[0]
    assert norm.scheme == "ct" and norm.clip_low < norm.mean < norm.clip_high
    assert plan.num_classes == 4 and plan.labels[3] == "lesion"
    write_plan(plan, tmp_path / "plan.json")
    again = read_plan(tmp_path / "plan.json")
    assert again == plan and isinstance(again, Plan)
    assert json.loads((tmp_path / "plan.json").read_text())["labels"]["1"] == "liver"


def test_mr_gets_per_image_zscore_and_overrides():
    plan = make_plan(_fp([(1, 1, 1)], [(32, 32, 32)], modality="MRI"), "unet", PlanConfig(divisor=16))
    assert plan.normalization[0].scheme == "zscore"
    cfg = with_overrides(PlanConfig(), {"patch_size": [16, 16, 16], "batch_size": 4})
    assert cfg.patch_size == (16, 16, 16) and cfg.batch_size == 4
    with pytest.raises(ValueError, match="unknown plan settings"):
        with_overrides(PlanConfig(), {"patchsize": 3})


def test_folds_keep_patients_together_and_are_seeded():
    cases = [f"c{i}" for i in range(10)]
    groups = {"c0": "p0", "c1": "p0", "c2": "p1", "c3": "p1", "c4": "p1", "c5": "p2", "c6": "p3"}
    folds = make_folds(cases, 3, seed=5, groups=groups)
    assert sorted(c for f in folds for c in f["val"]) == sorted(cases)
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        for patient in ("p0", "p1"):
            members = [c for c, p in groups.items() if p == patient]
            assert set(members) <= set(f["val"]) or not set(members) & set(f["val"])
    assert make_folds(cases, 3, seed=5, groups=groups) == folds
    assert make_folds(cases, 3, seed=6, groups=groups) != folds
    with pytest.raises(DatasetError, match="cannot fill"):
        make_folds(["a", "b"], 3)


def test_splits_file_is_reused_and_hashes_patients(tmp_path):
    path = tmp_path / "splits.json"
    cases = ["a", "b", "c", "d"]
    groups = {"a": "PAT-1", "b": "PAT-1"}
    first = load_or_make_splits(path, cases, 2, seed=0, groups=groups)
    text = path.read_text()
    assert "PAT-1" not in text and hash_group("PAT-1") in text
    assert load_or_make_splits(path, cases, 2, seed=99, groups=groups) == first  # reused, not redrawn
    with pytest.raises(DatasetError, match="delete it"):
        load_or_make_splits(path, cases + ["e"], 2)
