"""Transform chains: patch sampling, and inference preprocessing identical to the validation chain."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from preprocessing.fingerprint import fingerprint_dataset
from preprocessing.image import GRID_TOL_MM, Volume
from preprocessing.msd import read_msd_dataset
from preprocessing.plan import ChannelNormalization, PlanConfig, make_plan
from preprocessing.synthetic import write_msd_dataset
from preprocessing.transforms import (
    AugmentConfig,
    ResampleToPlanGrid,
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


def test_oblique_volume_gives_ras_aligned_grids_with_correct_world_values(tmp_path):
    """Training and inference both resample an oblique scan onto RAS-aligned grids, value-exact in world space."""
    from preprocessing.plan import Plan

    c, s = np.cos(0.35), np.sin(0.35)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, 1.3, 2.5])
    affine[:3, 3] = [12.0, -20.0, 5.0]
    shape = (30, 26, 12)

    def world_function(points):  # linear in world mm, so trilinear resampling reproduces it exactly
        return 1000.0 + points[..., 0] + 2.0 * points[..., 1] - 3.0 * points[..., 2]

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    image = world_function(ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), str(tmp_path / "lab.nii.gz"))
    plan = Plan(
        spacing_mm=(1.5, 1.5, 2.0),
        patch_size=(8, 8, 8),
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "MR"},
        labels={0: "bg", 1: "x"},
        network="unet",
    )
    val = val_transforms(plan)({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    inf, inf_affine = preprocess_for_inference(Volume(image[None], affine), plan)
    for values, grid_affine in (
        (val["image"][0].numpy(), np.asarray(val["image"].affine)),
        (inf[0].numpy(), inf_affine),
    ):
        assert np.allclose(
            grid_affine[:3, :3], np.diag(plan.spacing_mm), atol=1e-4
        )  # RAS-aligned, plan spacing
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1).astype(float)
        world = grid @ grid_affine[:3, :3].T + grid_affine[:3, 3]
        src = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
        inside = np.all((src >= 1) & (src <= np.array(shape) - 2), axis=-1)  # away from the FOV edge
        assert inside.sum() > 1000
        assert np.allclose(values[inside], world_function(world[inside]), atol=1e-2)


def _oblique_case(tmp_path):
    """A rotated, anisotropic (1 x 1.3 x 2.5 mm) case with a label, written as NIfTI."""
    c, s = np.cos(0.35), np.sin(0.35)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.0, 1.3, 2.5])
    affine[:3, 3] = [12.0, -20.0, 5.0]
    rng = np.random.default_rng(3)
    image = (100.0 + rng.normal(0.0, 20.0, (30, 26, 12))).astype(np.float32)
    label = np.zeros((30, 26, 12), np.uint8)
    label[8:20, 6:18, 3:9] = 1
    label[10:14, 8:12, 4:7] = 2
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "lab.nii.gz"))
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}


def test_training_and_inference_use_the_same_grid(tmp_path):
    """One resampler: the training transform lands an oblique case on preprocess_for_inference's grid."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from preprocessing.plan import Plan
    from preprocessing.resample import resample_to_grid

    item = _oblique_case(tmp_path)
    plan = Plan(
        spacing_mm=(1.5, 1.5, 2.0),
        patch_size=(8, 8, 8),
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "MR"},
        labels={0: "bg", 1: "a", 2: "b"},
        network="unet",
    )
    load = Compose(
        [LoadImaged(keys=("image", "label"), image_only=True), EnsureChannelFirstd(keys=("image", "label"))]
    )
    loaded = load(item)
    out = ResampleToPlanGrid(("image", "label"), plan.spacing_mm, modes=("linear", "nearest"))(loaded)
    img = nib.load(item["image"])
    volume = Volume(np.asarray(img.dataobj, np.float32)[None], img.affine)
    network, network_affine = preprocess_for_inference(volume, plan)
    assert tuple(out["image"].shape) == tuple(network.shape) == tuple(out["label"].shape)
    assert np.array_equal(np.asarray(out["image"].affine), network_affine)
    assert np.array_equal(np.asarray(out["label"].affine), network_affine)
    assert torch.equal(out["image"].as_tensor(), network)  # "none" normalisation: the resampled values
    # the label: nearest resample of the source labels onto that grid, integer-valued, every label kept
    labels = out["label"].as_tensor()
    source = torch.from_numpy(np.asarray(nib.load(item["label"]).dataobj, np.float32))[None]
    assert torch.equal(
        labels, resample_to_grid(source, img.affine, network_affine, network.shape[1:], "nearest")
    )
    assert set(torch.unique(labels).tolist()) == {0.0, 1.0, 2.0}
    assert out["image"].meta["filename_or_obj"] == item["image"]  # other metadata survives
    # the validation chain (crop of zero borders, none here; pad to patch, not needed) gives that grid too
    val = val_transforms(plan)(item)
    assert np.allclose(np.asarray(val["image"].affine), network_affine, atol=GRID_TOL_MM)
    assert torch.equal(val["image"].as_tensor(), network)


def test_resample_transform_refuses_plain_tensors():
    with pytest.raises(TypeError, match="MetaTensor"):
        ResampleToPlanGrid(("image",), (1.0, 1.0, 1.0), modes=("linear",))({"image": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="one mode per key"):
        ResampleToPlanGrid(("image", "label"), (1.0, 1.0, 1.0), modes=("linear",))


@pytest.mark.parametrize("layout", ["4d", "channel_files"])
def test_multichannel_layouts_match_inference_preprocessing(tmp_path, layout):
    root = tmp_path / "mc"
    write_msd_dataset(
        root, n_train=2, n_test=0, shape=(20, 18, 10), n_channels=2, with_patients=False, seed=6
    )
    if layout == "channel_files":  # rewrite as nnU-Net style case_000_0000.nii.gz / _0001
        for path in sorted((root / "imagesTr").glob("*.nii.gz")):
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, np.float32)
            for ch in range(2):
                nib.save(
                    nib.Nifti1Image(data[..., ch], img.affine),
                    str(path.with_name(path.name[:-7] + f"_{ch:04d}.nii.gz")),
                )
            path.unlink()
    ds = read_msd_dataset(root)
    plan = make_plan(fingerprint_dataset(ds), "unet", PlanConfig(patch_size=(8, 8, 8), divisor=8))
    assert [n.scheme for n in plan.normalization] == ["ct", "zscore"]  # CT channel + MR channel
    case = ds.cases[0]
    val = val_transforms(plan)(case_to_item(case.image_paths, case.label_path))
    from preprocessing.msd import load_case_arrays

    image, _, affine = load_case_arrays(case)
    tensor, _ = preprocess_for_inference(Volume(image, affine), plan)
    assert tuple(val["image"].shape) == (2, 20, 18, 10)
    assert torch.allclose(tensor, val["image"].as_tensor(), atol=1e-4)
