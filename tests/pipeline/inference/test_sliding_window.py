"""The sliding-window engine: MONAI agreement, mirror/ensemble semantics, member streaming, the levers."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

from pipeline.inference.config import InferenceConfig
from pipeline.inference.member_output import MemberOutput
from pipeline.inference.sliding_window import (
    MIRROR_AXES,
    predict_probabilities,
    sliding_window_logits,
    window_starts,
)
from tests.pipeline.inference.engine_cases import ROI, conv_net, mirrored, plain_logits, random_image


def _monai(image, net, overlap=0.5, mode="gaussian", sw=4):
    with torch.inference_mode():
        return sliding_window_inference(image, ROI, sw, net, overlap=overlap, mode=mode, sigma_scale=0.125)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
@pytest.mark.parametrize("size", [(37, 29, 23), (16, 12, 10), (64, 13, 31)])
def test_window_positions_are_monais(size, overlap):
    interval = _get_scan_interval(size, ROI, 3, (overlap,) * 3)
    expected = [tuple(s.start for s in sl) for sl in dense_patch_slices(size, ROI, interval)]
    assert window_starts(size, ROI, overlap) == expected


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_logits_and_probabilities_agree_with_monai(mode):
    net, image = conv_net(), random_image((2, 1, 37, 29, 23))
    ref = _monai(image, net, mode=mode)
    ours = sliding_window_logits(image, net, InferenceConfig(roi_size=ROI, mode=mode, sw_batch_size=3))
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 37, 29, 23)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    probs = predict_probabilities(image[1], [net], InferenceConfig(roi_size=ROI, mode=mode))
    torch.testing.assert_close(probs, torch.softmax(ref[1], 0), atol=1e-5, rtol=1e-5)
    agreement = (probs.argmax(0) == ref[1].argmax(0)).float().mean().item()
    assert agreement >= 0.999
    # Not vacuous: blending matters (the first window alone gives different logits).
    with torch.inference_mode():
        assert (ours[:, :, :16, :12, :10] - net(image[:, :, :16, :12, :10])).abs().max() > 1e-2


def test_image_smaller_than_roi_is_padded_and_cropped_back():
    net, image = conv_net(), random_image((1, 1, 9, 20, 7))
    ours = sliding_window_logits(image, net, InferenceConfig(roi_size=ROI))
    assert ours.shape == (1, 3, 9, 20, 7)
    torch.testing.assert_close(ours, _monai(image, net), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "lever",
    [
        {"sw_batch_size": 1},
        {"sw_batch_size": 7},
        {"stage_input": "stream"},
        {"output_device": "cpu"},  # host stitching code path
        {"output_device": "device"},
        {"channels_last": True},
        {"compile": True, "compile_backend": "eager"},  # also pads the last batch to a fixed shape
    ],
)
def test_levers_match_plain_path(lever):
    net, image = conv_net(), random_image((2, 1, 27, 20, 15))
    reference = plain_logits(image, net)
    torch.testing.assert_close(plain_logits(image, net, **lever), reference, atol=1e-5, rtol=1e-5)


def test_low_precision_levers_stay_close():
    net, image = conv_net(), random_image()
    reference = plain_logits(image, net)
    half_acc = plain_logits(image, net, accumulate_dtype="float16")
    torch.testing.assert_close(half_acc, reference, atol=5e-3, rtol=5e-3)
    bf16 = plain_logits(image, net, amp_on_cpu=True)
    assert (bf16.argmax(1) == reference.argmax(1)).float().mean() > 0.97
    assert (bf16 - reference).abs().max() < 0.1
    # amp=True alone is a CUDA lever: on CPU it changes nothing.
    assert torch.equal(plain_logits(image, net, amp=True), plain_logits(image, net, amp=False))


def test_tta_and_ensemble_equal_mean_of_softmax_of_each_pass():
    image = random_image((1, 2, 22, 17, 13))[0]
    nets = [conv_net(in_channels=2, seed=0), conv_net(in_channels=2, seed=5)]
    cfg = InferenceConfig(roi_size=ROI, tta=True, sw_batch_size=3)
    probs = predict_probabilities(image, nets, cfg)
    expected = torch.zeros_like(probs)
    for net in nets:
        for axes in MIRROR_AXES:
            logits = sliding_window_logits(image[None], mirrored(net, axes), InferenceConfig(roi_size=ROI))
            expected += torch.softmax(logits[0], 0)
    expected /= len(nets) * len(MIRROR_AXES)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(0), torch.ones(probs.shape[1:]), atol=1e-5, rtol=0)
    # Not vacuous: mirroring changes the answer of these (non-symmetric) networks.
    no_tta = predict_probabilities(image, nets, InferenceConfig(roi_size=ROI))
    assert (no_tta - probs).abs().max() > 1e-3
    # Mirrors split over several network calls: same result.
    split = predict_probabilities(image, nets, InferenceConfig(roi_size=ROI, tta=True, max_network_batch=5))
    torch.testing.assert_close(split, probs, atol=1e-5, rtol=1e-5)
    # One sweep per pass (memory budget too small for side-by-side passes): same result.
    sequential = predict_probabilities(
        image, nets, InferenceConfig(roi_size=ROI, tta=True, max_accumulator_bytes=1)
    )
    torch.testing.assert_close(sequential, probs, atol=1e-5, rtol=1e-5)


def test_streamed_members_are_each_pass_and_average_to_the_batched_ensemble():
    image = random_image((1, 2, 22, 17, 13), seed=4)[0]
    nets = [conv_net(in_channels=2, seed=0), conv_net(in_channels=2, seed=5)]
    cfg = InferenceConfig(roi_size=ROI, tta=True, sw_batch_size=3)
    members: list[MemberOutput] = []
    streamed = predict_probabilities(image, nets, cfg, on_member=members.append)
    # folds x mirrors calls, fold-major, mirrors named by spatial axis (0 = X) of the network grid
    assert [(m.member, m.fold) for m in members] == [(i, i // 8) for i in range(16)]
    assert [m.mirror_axes for m in members[:8]] == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert [m.mirror_axes for m in members[8:]] == [m.mirror_axes for m in members[:8]]
    for m in members:
        assert m.probabilities.dtype == torch.float32 and m.probabilities.shape == (3, 22, 17, 13)
        engine_axes = tuple(a + 2 for a in m.mirror_axes)
        logits = plain_logits(image[None], mirrored(nets[m.fold], engine_axes))
        torch.testing.assert_close(m.probabilities, torch.softmax(logits[0], 0), atol=1e-5, rtol=1e-5)
    # The hook's tensors are not overwritten by the engine's running sum.
    kept_mean = torch.stack([m.probabilities for m in members]).mean(0)
    torch.testing.assert_close(streamed, kept_mean, atol=1e-6, rtol=1e-6)
    batched = predict_probabilities(image, nets, cfg)
    torch.testing.assert_close(streamed, batched, atol=1e-5, rtol=1e-5)
    assert (members[0].probabilities - members[9].probabilities).abs().max() > 1e-3  # members differ
    # Handed out of the one side-by-side sweep: the plain batched path, bit for bit.
    assert torch.equal(streamed, batched)
    # The per-pass (memory budget) sweep hands out the same members, in the same order.
    per_pass_members: list[MemberOutput] = []
    per_pass_cfg = InferenceConfig(roi_size=ROI, tta=True, sw_batch_size=3, batch_passes=False)
    per_pass = predict_probabilities(image, nets, per_pass_cfg, on_member=per_pass_members.append)
    assert [(m.member, m.fold, m.mirror_axes) for m in per_pass_members] == [
        (m.member, m.fold, m.mirror_axes) for m in members
    ]
    for a, b in zip(per_pass_members, members, strict=True):
        torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_pass, streamed, atol=1e-5, rtol=1e-5)


def test_deep_supervision_output_and_training_mode_restored():
    base = conv_net()

    class DeepSupervised(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            y = self.base(x)
            return [y, y[:, :, ::2, ::2, ::2] * 0 + 100.0]  # a wrong second head must be ignored

    net = DeepSupervised().train()
    image = random_image()
    out = plain_logits(image, net)
    assert net.training  # the caller's mode is restored
    torch.testing.assert_close(out, plain_logits(image, base), atol=1e-6, rtol=0)


def test_inputs_are_not_modified_and_bad_inputs_rejected():
    net, image = conv_net(), random_image()
    before = image.clone()
    plain_logits(image, net, stage_input="stream")
    assert torch.equal(image, before)
    with pytest.raises(ValueError):
        sliding_window_logits(image[0], net, InferenceConfig(roi_size=ROI))
    with pytest.raises(ValueError):
        predict_probabilities(image, [net], InferenceConfig(roi_size=ROI))
    with pytest.raises(ValueError):
        predict_probabilities(image[0], [], InferenceConfig(roi_size=ROI))
    with pytest.raises(ValueError):
        InferenceConfig(roi_size=ROI, overlap=1.0)
    with pytest.raises(ValueError):
        InferenceConfig(roi_size=ROI, output_device="gpu")


# ----------------------------------------------------------------------------------- CUDA only
def _cuda_cfg(**kw):
    return InferenceConfig(roi_size=ROI, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lever",
    [
        {"amp": False},
        {"amp": False, "stage_input": "stream"},  # pinned double-buffered prefetch
        {"amp": False, "output_device": "cpu"},  # host stitching from the GPU
        {"amp": False, "cuda_graphs": True},
        {"amp": False, "channels_last": True},
    ],
)
def test_cuda_levers_match_cpu(lever):
    net, image = conv_net(), random_image((2, 1, 37, 29, 23))
    cpu = plain_logits(image, net)
    gpu = sliding_window_logits(image, conv_net().cuda(), _cuda_cfg(**lever))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graphs_with_tta_in_chunks_match_cpu():
    """CUDA-graph replays reuse one output buffer; mirrored chunks must not alias it."""
    nets = [conv_net(seed=0), conv_net(seed=1)]
    image = random_image((1, 1, 37, 29, 23))[0]
    cpu = predict_probabilities(image, nets, InferenceConfig(roi_size=ROI, tta=True))
    cfg = _cuda_cfg(amp=False, cuda_graphs=True, tta=True, max_network_batch=3)
    gpu = predict_probabilities(image, [n.cuda() for n in nets], cfg)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_graphs_and_compile_agree_with_fp32():
    image = random_image((1, 1, 40, 33, 27))
    ref = sliding_window_logits(image, conv_net().cuda(), _cuda_cfg(amp=False))
    for kw in ({}, {"cuda_graphs": True}, {"compile": True}, {"accumulate_dtype": "float16"}):
        out = sliding_window_logits(image, conv_net().cuda(), _cuda_cfg(**kw))
        assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.97, kw


@pytest.mark.gpu
def test_cuda_out_of_memory_falls_back_to_host_stitching(monkeypatch):
    import pipeline.inference.sliding_window as sw

    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        shape = args[0] if args and isinstance(args[0], tuple | list) else ()
        if str(kwargs.get("device", "")).startswith("cuda") and len(shape) == 5 and shape[1] == 3:
            raise torch.cuda.OutOfMemoryError("injected")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(sw.torch, "zeros", zeros)
    image = random_image()
    out = sliding_window_logits(image, conv_net().cuda(), _cuda_cfg(amp=False, output_device="device"))
    assert out.device.type == "cpu"
    monkeypatch.setattr(sw.torch, "zeros", real_zeros)
    torch.testing.assert_close(out, plain_logits(image, conv_net()), atol=1e-4, rtol=1e-4)


def test_results_are_ordinary_tensors_the_caller_can_update_in_place():
    net, image = conv_net(), random_image((1, 1, 20, 14, 12))
    probs = predict_probabilities(image[0], [net], InferenceConfig(roi_size=ROI))
    probs.mul_(2.0)  # would raise on an inference-mode tensor
    logits = sliding_window_logits(image, net, InferenceConfig(roi_size=ROI))
    logits.add_(1.0)
    assert not probs.requires_grad and not logits.requires_grad
