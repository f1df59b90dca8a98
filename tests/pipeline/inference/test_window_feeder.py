"""The window feeder: each yielded window is the image slice at its position, whatever the staging."""

from __future__ import annotations

import pytest
import torch

from pipeline.inference.window_feeder import WindowFeeder
from tests.pipeline.inference.engine_cases import random_image

ROI = (5, 4, 3)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fixed_batch", [False, True])
def test_windows_are_the_image_slices_at_their_positions(stream, fixed_batch):
    image = random_image((2, 2, 9, 8, 7))
    positions = [(b, (x, y, z)) for b in range(2) for x in (0, 4) for y in (0, 4) for z in (0, 4)]
    batches = [positions[i : i + 3] for i in range(0, len(positions), 3)]  # the last one is short
    feeder = WindowFeeder(image, batches, ROI, torch.device("cpu"), stream=stream, fixed_batch=fixed_batch)
    assert len(feeder) == len(batches)
    seen = []
    for batch, windows in feeder:
        assert windows.shape == (3 if fixed_batch else len(batch), 2, *ROI)
        for i, (b, (x, y, z)) in enumerate(batch):
            assert torch.equal(windows[i], image[b, :, x : x + 5, y : y + 4, z : z + 3])
        seen.extend(batch)
    assert seen == positions


def test_channels_last_buffers_hold_the_same_windows():
    image = random_image((1, 3, 9, 8, 7))
    batches = [[(0, (0, 0, 0)), (0, (4, 4, 4))]]
    ((_, plain),) = WindowFeeder(image, batches, ROI, torch.device("cpu"))
    ((_, fast),) = WindowFeeder(image, batches, ROI, torch.device("cpu"), channels_last=True)
    assert fast.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(plain, fast)
