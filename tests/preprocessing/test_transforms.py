"""Transform chains: patch sampling, and inference preprocessing identical to the validation chain."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from preprocessing.image import Volume
from preprocessing.msd import read_msd_dataset
from preprocessing.plan import ChannelNormalization, PlanConfig, fingerprint_dataset, make_plan
from preprocessing.synthetic import write_msd_dataset
from preprocessing.transforms import (
    AugmentConfig,
    case_to_item,
    normalize_intensity,
    preprocess_for_inference,
    train_transforms,
    val_transforms,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tr") / "msd"
    write_msd_dataset(root, n_train=2, n_test=0, shape=(24, 22, 12), seed=2, with_patients=False)
    ds = read_msd_dataset(root)
    plan = make_plan(fingerprint_dataset(ds), "unet", PlanConfig(patch_size=(16, 16, 8), divisor=8))
    return ds, plan


def test_training_chain_yields_foreground_patches(dataset):
    ds, plan = dataset
    chain = train_transforms(plan, AugmentConfig(foreground_fraction=1.0), samples_per_volume=3)
    chain.set_random_state(seed=0)
    samples = chain(case_to_item(ds.cases[0].image_paths, ds.cases[0].label_path))
    assert len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (1, 16, 16, 8) and tuple(s["label"].shape) == (1, 16, 16, 8)
        assert s["image"].dtype == torch.float32
        assert (s["label"] > 0).any()  # centred on foreground
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_inference_preprocessing_matches_validation_chain(dataset):
    ds, plan = dataset
    case = ds.cases[1]
    val = val_transforms(plan)(case_to_item(case.image_paths, case.label_path))
    img = nib.load(str(case.image_paths[0]))
    volume = Volume(np.asarray(img.dataobj, np.float32)[None], img.affine)
    tensor, affine = preprocess_for_inference(volume, plan)
    assert tensor.dtype == torch.float32 and tensor.shape == val["image"].shape
    assert np.allclose(affine, np.asarray(val["image"].affine), atol=1e-4)
    assert torch.allclose(tensor, val["image"].as_tensor(), atol=1e-4)
    # CT: clipped to the foreground percentiles, z-scored with the foreground statistics
    norm = plan.normalization[0]
    assert tensor.min() >= (norm.clip_low - norm.mean) / norm.std - 1e-5


def test_inference_preprocessing_is_orientation_invariant(dataset):
    """An LPS-stored (x and y flipped) copy of a volume lands on the same RAS grid with the same values."""
    ds, plan = dataset
    img = nib.load(str(ds.cases[0].image_paths[0]))
    data = np.asarray(img.dataobj, np.float32)
    ras = Volume(data[None], img.affine)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    lps_stored = Volume(data[::-1, ::-1].copy()[None], img.affine @ flip)
    a, aff_a = preprocess_for_inference(ras, plan)
    b, aff_b = preprocess_for_inference(lps_stored, plan)
    assert np.allclose(aff_a, aff_b) and torch.allclose(a, b, atol=1e-5)


def test_zscore_ignores_zero_border():
    rng = np.random.default_rng(0)
    body = torch.from_numpy(rng.normal(100.0, 15.0, (1, 8, 8, 8)).astype(np.float32))
    padded = torch.zeros(1, 12, 12, 12)
    padded[:, 2:10, 2:10, 2:10] = body
    norm = (ChannelNormalization("zscore"),)
    inner = normalize_intensity(padded, norm)[:, 2:10, 2:10, 2:10]
    assert torch.allclose(inner, normalize_intensity(body, norm), atol=1e-5)
    assert abs(float(inner.mean())) < 1e-4
    with pytest.raises(ValueError, match="channels"):
        normalize_intensity(torch.zeros(2, 4, 4, 4), norm)
