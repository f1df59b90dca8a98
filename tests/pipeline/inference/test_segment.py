"""The Segmenter puts the mask on the right voxels of an oblique, anisotropic source grid.

The "oracle" network reads world coordinates: the test image's three channels hold each voxel's
R, A, S position in mm (linear functions, which trilinear resampling reproduces exactly), and the
network outputs a one-hot of an off-centre ball defined in world space. Any orientation, flip,
spacing or resampling error moves the mask away from the voxels whose centres lie in that ball.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.bundle import ModelBundle
from pipeline.inference.config import InferenceConfig
from pipeline.inference.postprocessing import keep_largest_component
from pipeline.inference.segment import Segmenter
from preprocessing.image import Volume
from preprocessing.plan import ChannelNormalization, Plan

CENTRE = np.array([14.0, -6.0, 9.0])  # off-centre (right, posterior, superior): a flip would miss it
RADIUS = 11.0


class WorldBallOracle(nn.Module):
    """Logits for {background, ball} from world-coordinate input channels (B, 3, X, Y, Z)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = torch.tensor(CENTRE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        inside = ((x - centre) ** 2).sum(dim=1, keepdim=True).sqrt() < RADIUS
        return torch.cat([(~inside).float(), inside.float()], dim=1) * 20.0


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _oblique_volume() -> Volume:
    shape = (40, 30, 16)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 30) @ _rotation(0, 20) @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) - 1) / 2 + np.array([5.0, -3.0, 4.0])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = (affine[:3, :3] @ ijk.T + affine[:3, 3:4]).T.reshape(*shape, 3)
    return Volume(np.moveaxis(world, -1, 0).astype(np.float32), affine, case_id="oblique")


def test_mask_lands_on_world_ball_for_oblique_anisotropic_volume():
    volume = _oblique_volume()
    plan = Plan(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=(16, 16, 16),
        batch_size=1,
        normalization=(ChannelNormalization("none"),) * 3,
        modalities={0: "X", 1: "Y", 2: "Z"},
        labels={0: "background", 1: "ball"},
        network="oracle",
    )
    bundle = ModelBundle(plan, fold_states=(), postprocessing={"largest_component": {"ball": {"apply": True}}})
    config = InferenceConfig(roi_size=(16, 16, 16), overlap=0.5, device="cpu", amp=False)
    segmentation = Segmenter(bundle.plan, [WorldBallOracle()], bundle.postprocessing, config)(
        volume, keep_probabilities=True
    )
    labels = segmentation.labels
    probs = np.moveaxis(segmentation.probabilities_on_source_grid(), -1, 0)
    assert labels.shape == volume.spatial_shape and labels.dtype == np.uint8
    assert probs is not None and probs.shape == (2, *volume.spatial_shape) and probs.dtype == np.float32
    distance = np.linalg.norm(np.moveaxis(volume.array, 0, -1) - CENTRE, axis=-1)
    truth = distance < RADIUS
    # Away from the boundary (beyond a target-grid voxel diagonal) the answer must be exact.
    margin = 2.0 * np.sqrt(3)
    assert labels[distance < RADIUS - margin].all()
    assert not labels[distance > RADIUS + margin].any()
    dice = 2 * np.sum(truth & (labels == 1)) / (truth.sum() + (labels == 1).sum())
    assert dice > 0.95
    # the mirrored ball (left-right flip) would be far off
    mirrored = np.linalg.norm(np.moveaxis(volume.array, 0, -1) - CENTRE * [-1, 1, 1], axis=-1) < RADIUS
    assert np.sum(mirrored & (labels == 1)) < 0.2 * mirrored.sum()


def test_keep_largest_component_per_label():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels
    labels[7, 7, 7] = 1  # stray voxel
    labels[6:9, 0:2, 0:2] = 2
    out = keep_largest_component(labels, [1, 2])
    assert out[7, 7, 7] == 0 and (out[1:4, 1:4, 1:4] == 1).all() and (out[6:9, 0:2, 0:2] == 2).all()


def _largest_component_whole_volume(labels: np.ndarray, values) -> np.ndarray:
    """Reference: label the whole volume once per value (the obvious, slow way)."""
    from scipy import ndimage

    out = labels.copy()
    for value in values:
        components, n = ndimage.label(labels == value, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != int(np.argmax(sizes))) & (components > 0)] = 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_largest_component_matches_whole_volume_labelling(seed):
    """Bounding-box labelling gives the whole-volume result, ties and absent values included."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((30, 26, 22), np.uint8)
    for value in (1, 2, 3, 5):  # 4 absent; islands of equal size force the tie-break
        for _ in range(4):
            lo = rng.integers(0, [26, 22, 18])
            size = rng.integers(1, 5, size=3)
            labels[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = value
    labels[rng.random(labels.shape) < 0.02] = 3  # scattered single voxels
    labels[0:2, 0:2, 0:2] = 7
    labels[-2:, -2:, -2:] = 7  # two equal islands in opposite corners
    values = [1, 2, 3, 4, 5, 7]
    expected = _largest_component_whole_volume(labels, values)
    assert (expected != labels).any()  # the case does remove something
    np.testing.assert_array_equal(keep_largest_component(labels, values), expected)


def test_slabwise_resample_argmax_equals_full_resample():
    """The memory-saving slab path gives exactly the label map of resampling all channels at once."""
    import math

    from pipeline.inference.segment import resample_argmax
    from preprocessing.resample import resample_to_grid

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 20, 18, 14, generator=gen), dim=0)
    src = np.diag([1.5, 1.5, 3.0, 1.0])
    src[:3, 3] = [-10.0, 5.0, 2.0]
    c, s_ = math.cos(0.3), math.sin(0.3)
    dst = np.eye(4)
    dst[:3, :3] = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]) @ np.diag([0.9, 1.1, 2.0])
    dst[:3, 3] = [-8.0, 4.0, 3.0]
    shape = (25, 22, 17)
    full = torch.argmax(resample_to_grid(probs, src, dst, shape, mode="linear"), dim=0).numpy()
    slabbed = resample_argmax(probs, src, dst, shape, slab_voxels=25 * 22 * 3)  # 6 slabs, last partial
    np.testing.assert_array_equal(slabbed, full.astype(np.uint8))


def test_streamed_members_reach_the_hook_and_average_to_the_batched_segmentation():
    """on_member sees folds x mirrors members; the Segmentation is still their mean."""
    from pipeline.inference.member_output import MemberOutput
    from tests.pipeline.inference.engine_cases import conv_net

    plan = Plan(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=(16, 12, 10),
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "CT"},
        labels={0: "background", 1: "a", 2: "b"},
        network="test",
    )
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    gen = np.random.default_rng(0)
    volume = Volume(gen.standard_normal((1, 30, 22, 14)).astype(np.float32), affine, case_id="members")
    networks = [conv_net(seed=0), conv_net(seed=7)]
    config = InferenceConfig(roi_size=(16, 12, 10), tta=True, device="cpu", amp=False)
    segmenter = Segmenter(plan, networks, {}, config)
    batched = segmenter(volume, keep_probabilities=True)
    members: list[MemberOutput] = []
    streamed = segmenter(volume, keep_probabilities=True, on_member=members.append)
    assert [(m.member, m.fold) for m in members] == [(i, i // 8) for i in range(16)]
    assert len({m.mirror_axes for m in members}) == 8
    assert streamed.probabilities is not None and batched.probabilities is not None
    grid = tuple(streamed.probabilities.shape)
    assert all(m.probabilities.dtype == torch.float32 and tuple(m.probabilities.shape) == grid for m in members)
    mean = torch.stack([m.probabilities.cpu() for m in members]).mean(0)
    torch.testing.assert_close(streamed.probabilities, mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(streamed.probabilities, batched.probabilities, atol=1e-5, rtol=1e-5)
    assert (streamed.labels == batched.labels).mean() > 0.999
    assert len(np.unique(streamed.labels)) > 1  # not vacuous: more than one label predicted
