"""The phantom: deterministic, labelled as declared, asymmetric, and the same anatomy in every grid."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.synthetic import LABEL_NAMES, make_phantom, orientation_affine

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")


def _world_centroid(label: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_same_seed_identical_other_seed_differs(modality: str) -> None:
    a_img, a_lab = make_phantom((32, 32, 16), modality=modality, seed=3)
    b_img, b_lab = make_phantom((32, 32, 16), modality=modality, seed=3)
    c_img, c_lab = make_phantom((32, 32, 16), modality=modality, seed=4)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)  # position/size vary with the seed, not just noise


def test_dtypes_shapes_and_declared_labels() -> None:
    image, label = make_phantom((40, 36, 20), seed=1)
    assert image.shape == label.shape == (40, 36, 20)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values == {0, *LABEL_NAMES}
    counts = np.bincount(label.ravel(), minlength=4)
    assert counts[1] > counts[2] > counts[3] > 20  # liver > kidney > lesion, all learnable sizes


def test_ct_contrast_is_learnable() -> None:
    image, label = make_phantom(seed=0)
    mean = {v: float(image[label == v].mean()) for v in range(4)}
    assert image.min() < -900  # air outside the body
    assert mean[2] > mean[1] + 40 > mean[3] + 80  # kidney brighter than liver, lesion darker
    body_soft = image[(label == 0) & (image > -200) & (image < 200)]
    assert abs(float(np.median(body_soft)) - 30) < 25


def test_mr_is_non_negative_and_lesion_bright() -> None:
    image, label = make_phantom(modality="MR", seed=0)
    assert image.min() >= 0
    assert image[label == 3].mean() > image[label == 1].mean() + 300


def test_left_right_and_axis_flips_are_detectable() -> None:
    affine = orientation_affine("axial", (1.5, 1.5, 3.0), shape=(48, 48, 32))
    _, label = make_phantom(seed=0, affine_ras=affine)
    for axis in range(3):
        assert np.mean(label != np.flip(label, axis)) > 0.02
    assert np.mean(label != np.swapaxes(label, 0, 1)) > 0.02
    # RAS: +x is the patient's right. Liver on the right, the single kidney on the left and posterior.
    liver, kidney = _world_centroid(label, 1, affine), _world_centroid(label, 2, affine)
    assert liver[0] > kidney[0] + 15
    assert kidney[1] < liver[1]


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_orientation_affine_is_scanner_like(orientation: str) -> None:
    spacing = (0.8, 1.1, 2.5)
    affine = orientation_affine(orientation, spacing, shape=(40, 30, 10))
    cols = affine[:3, :3]
    assert np.allclose(np.linalg.norm(cols, axis=0), spacing)
    unit = cols / np.linalg.norm(cols, axis=0)
    assert np.allclose(unit.T @ unit, np.eye(3), atol=1e-12)
    # In LPS the slice axis is row x column (so DICOM readers rebuild exactly this grid).
    lps = np.diag([-1.0, -1.0, 1.0]) @ unit
    assert np.allclose(np.cross(lps[:, 0], lps[:, 1]), lps[:, 2])
    centre = affine @ np.array([19.5, 14.5, 4.5, 1.0])
    assert np.allclose(centre[:3], [2.5, -4.0, 7.5])
    explicit = orientation_affine(orientation, spacing, origin_ras=(1.0, 2.0, 3.0))
    assert np.allclose(explicit[:3, 3], [1.0, 2.0, 3.0])


def test_orientation_affine_directions() -> None:
    assert np.allclose(orientation_affine("axial", (1, 1, 1))[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    sag = orientation_affine("sagittal", (1, 1, 1))[:3, :3]
    assert (
        np.allclose(sag[:, 0], [0, -1, 0])
        and np.allclose(sag[:, 1], [0, 0, -1])
        and np.allclose(sag[:, 2], [1, 0, 0])
    )
    obl = orientation_affine("oblique", (1, 1, 1), oblique_deg=20.0)[:3, :3]
    assert np.isclose(np.degrees(np.arccos(obl[2, 2])), 20.0)
    with pytest.raises(ValueError, match="orientation"):
        orientation_affine("diagonal", (1, 1, 1))


def test_same_anatomy_in_world_space_across_orientations() -> None:
    half = (36.0, 36.0, 36.0)
    centroids = {}
    for orientation in ORIENTATIONS:
        affine = orientation_affine(orientation, (1.5, 1.5, 3.0), shape=(48, 48, 24))
        _, label = make_phantom((48, 48, 24), seed=2, affine_ras=affine, body_half_extent_mm=half)
        centroids[orientation] = [_world_centroid(label, v, affine) for v in LABEL_NAMES]
    for orientation in ORIENTATIONS[1:]:
        for a, b in zip(centroids["axial"], centroids[orientation], strict=True):
            assert np.linalg.norm(a - b) < 3.0, orientation


def test_noise_seed_keeps_anatomy() -> None:
    img_a, lab_a = make_phantom((32, 32, 16), seed=5, noise_seed=1)
    img_b, lab_b = make_phantom((32, 32, 16), seed=5, noise_seed=2)
    assert np.array_equal(lab_a, lab_b)
    assert not np.array_equal(img_a, img_b)


def test_bad_modality_rejected() -> None:
    with pytest.raises(ValueError, match="modality"):
        make_phantom(modality="PET")


@pytest.mark.slow
def test_tiny_unet_learns_every_structure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Learnability: 200 full-volume steps (~100 s on one CPU thread) reach Dice > 0.85 (lesion > 0.7) on test cases."""
    import json

    import nibabel as nib
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from preprocessing.synthetic import write_msd_dataset

    torch.manual_seed(0)
    path = write_msd_dataset(tmp_path / "msd", n_train=6, n_test=2)
    meta = json.loads(path.read_text())

    def load(entries: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        x = [np.clip(nib.load(path.parent / e["image"]).get_fdata(), -200, 300) / 150 for e in entries]
        y = [nib.load(path.parent / e["label"]).get_fdata() for e in entries]
        return torch.tensor(np.stack(x)[:, None], dtype=torch.float32), torch.tensor(
            np.stack(y)[:, None]
        ).long()

    (x_train, y_train), (x_test, y_test) = load(meta["training"]), load(meta["test"])
    net = UNet(3, 1, 4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for step in range(200):
        flip = [4] if step % 2 else []
        optimizer.zero_grad()
        loss_fn(net(torch.flip(x_train, flip)), torch.flip(y_train, flip)).backward()
        optimizer.step()
    with torch.no_grad():
        pred = net.eval()(x_test).argmax(1)
    truth = y_test[:, 0]
    for value in LABEL_NAMES:
        dice = (
            2 * ((pred == value) & (truth == value)).sum() / ((pred == value).sum() + (truth == value).sum())
        )
        assert float(dice) > (0.7 if LABEL_NAMES[value] == "lesion" else 0.85), (
            LABEL_NAMES[value],
            float(dice),
        )
