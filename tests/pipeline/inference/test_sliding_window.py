"""The sliding-window engine: MONAI agreement, mirror/ensemble semantics, and every lever."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from torch import nn

import pipeline.inference.network_runner as levers
from pipeline.inference.config import InferenceConfig
from pipeline.inference.sliding_window import (
    MIRROR_AXES,
    predict_probabilities,
    sliding_window_logits,
    window_starts,
)

ROI = (16, 12, 10)


def _net(in_channels: int = 1, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # Padding zeros at the window border plus a strided stage: outputs depend on the window
    # position, so blending mistakes show up.
    return nn.Sequential(
        nn.Conv3d(in_channels, 6, 3, padding=1),
        nn.InstanceNorm3d(6, affine=True),
        nn.LeakyReLU(),
        nn.Conv3d(6, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear"),
        nn.Conv3d(6, classes, 3, padding=1),
    ).eval()


def _image(shape=(1, 1, 29, 22, 17), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


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
    net, image = _net(), _image((2, 1, 37, 29, 23))
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
    net, image = _net(), _image((1, 1, 9, 20, 7))
    ours = sliding_window_logits(image, net, InferenceConfig(roi_size=ROI))
    assert ours.shape == (1, 3, 9, 20, 7)
    torch.testing.assert_close(ours, _monai(image, net), atol=1e-5, rtol=1e-5)


def _plain(image, net, **kw):
    return sliding_window_logits(image, net, InferenceConfig(roi_size=ROI, **kw))


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
    net, image = _net(), _image((2, 1, 27, 20, 15))
    reference = _plain(image, net)
    torch.testing.assert_close(_plain(image, net, **lever), reference, atol=1e-5, rtol=1e-5)


def test_low_precision_levers_stay_close():
    net, image = _net(), _image()
    reference = _plain(image, net)
    half_acc = _plain(image, net, accumulate_dtype="float16")
    torch.testing.assert_close(half_acc, reference, atol=5e-3, rtol=5e-3)
    bf16 = _plain(image, net, amp_on_cpu=True)
    assert (bf16.argmax(1) == reference.argmax(1)).float().mean() > 0.97
    assert (bf16 - reference).abs().max() < 0.1
    # amp=True alone is a CUDA lever: on CPU it changes nothing.
    assert torch.equal(_plain(image, net, amp=True), _plain(image, net, amp=False))


def test_compile_failure_falls_back_to_eager_and_is_remembered(monkeypatch):
    calls = {"n": 0}

    def broken_compile(module, **kwargs):
        def compiled(x):
            calls["n"] += 1
            raise RuntimeError("injected compiler failure")

        return compiled

    monkeypatch.setattr(levers.torch, "compile", broken_compile)
    net, image = _net(), _image()
    out = _plain(image, net, compile=True)
    torch.testing.assert_close(out, _plain(image, net), atol=1e-5, rtol=1e-5)
    assert calls["n"] == 1  # tried once for the (fixed) window shape, then eager
    _plain(image, net, compile=True)
    assert calls["n"] == 1  # the failure is cached with the network


def test_compiled_forwards_are_cached_per_network():
    net, image = _net(), _image()
    _plain(image, net, compile=True, compile_backend="eager")
    cached = levers._COMPILED.get(levers.prepare_network(net, fold_batchnorm=True, channels_last=False))[
        ("eager", None)
    ]
    _plain(image, net, compile=True, compile_backend="eager")
    assert (
        levers._COMPILED.get(levers.prepare_network(net, fold_batchnorm=True, channels_last=False))[
            ("eager", None)
        ]
        is cached
    )
    assert list(cached.status.values()) == [True]  # one window shape, compiled once


def _mirror_net(net, axes):
    class Mirrored(nn.Module):
        def forward(self, x):
            return net(x.flip(axes)).flip(axes) if axes else net(x)

    return Mirrored()


def test_tta_and_ensemble_equal_mean_of_softmax_of_each_pass():
    image = _image((1, 2, 22, 17, 13))[0]
    nets = [_net(in_channels=2, seed=0), _net(in_channels=2, seed=5)]
    cfg = InferenceConfig(roi_size=ROI, tta=True, sw_batch_size=3)
    probs = predict_probabilities(image, nets, cfg)
    expected = torch.zeros_like(probs)
    for net in nets:
        for axes in MIRROR_AXES:
            logits = sliding_window_logits(image[None], _mirror_net(net, axes), InferenceConfig(roi_size=ROI))
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


def test_deep_supervision_output_and_training_mode_restored():
    base = _net()

    class DeepSupervised(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            y = self.base(x)
            return [y, y[:, :, ::2, ::2, ::2] * 0 + 100.0]  # a wrong second head must be ignored

    net = DeepSupervised().train()
    image = _image()
    out = _plain(image, net)
    assert net.training  # the caller's mode is restored
    torch.testing.assert_close(out, _plain(image, base), atol=1e-6, rtol=0)


def test_inputs_are_not_modified_and_bad_inputs_rejected():
    net, image = _net(), _image()
    before = image.clone()
    _plain(image, net, stage_input="stream")
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
    net, image = _net(), _image((2, 1, 37, 29, 23))
    cpu = _plain(image, net)
    gpu = sliding_window_logits(image, _net().cuda(), _cuda_cfg(**lever))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_graphs_with_tta_in_chunks_match_cpu():
    """CUDA-graph replays reuse one output buffer; mirrored chunks must not alias it."""
    nets = [_net(seed=0), _net(seed=1)]
    image = _image((1, 1, 37, 29, 23))[0]
    cpu = predict_probabilities(image, nets, InferenceConfig(roi_size=ROI, tta=True))
    cfg = _cuda_cfg(amp=False, cuda_graphs=True, tta=True, max_network_batch=3)
    gpu = predict_probabilities(image, [n.cuda() for n in nets], cfg)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_graphs_and_compile_agree_with_fp32():
    image = _image((1, 1, 40, 33, 27))
    ref = sliding_window_logits(image, _net().cuda(), _cuda_cfg(amp=False))
    for kw in ({}, {"cuda_graphs": True}, {"compile": True}, {"accumulate_dtype": "float16"}):
        out = sliding_window_logits(image, _net().cuda(), _cuda_cfg(**kw))
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
    image = _image()
    out = sliding_window_logits(image, _net().cuda(), _cuda_cfg(amp=False, output_device="device"))
    assert out.device.type == "cpu"
    monkeypatch.setattr(sw.torch, "zeros", real_zeros)
    torch.testing.assert_close(out, _plain(image, _net()), atol=1e-4, rtol=1e-4)


def _bn_net() -> nn.Module:
    from monai.networks.nets import AttentionUnet

    torch.manual_seed(3)
    net = AttentionUnet(3, 1, 3, channels=(4, 8, 8), strides=(2, 2))
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_batchnorm_folding_matches_and_leaves_the_callers_network_alone():
    net = _bn_net()
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    folded = levers.fold_batchnorm_into_convs(net)
    assert n_bn > 0 and folded is not net
    assert sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules()) < n_bn // 2
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == n_bn
    x = _image((2, 1, 16, 16, 16))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-4)
    image = _image((1, 1, 20, 18, 17))
    cfg = dict(roi_size=(16, 16, 16))
    plain = sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=False))
    fast = sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=True, channels_last=True))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    assert next(net.parameters()).is_contiguous()  # the caller's weights keep their layout


def test_prepared_copy_is_refreshed_when_weights_change():
    net = _bn_net()
    first = levers.prepare_network(net, fold_batchnorm=True, channels_last=False)
    assert levers.prepare_network(net, fold_batchnorm=True, channels_last=False) is first
    image = _image((1, 1, 16, 16, 16))
    before = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16)))
    with torch.no_grad():  # an optimizer step between two validations
        for p in net.parameters():
            p.mul_(1.1)
    assert levers.prepare_network(net, fold_batchnorm=True, channels_last=False) is not first
    after = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16)))
    unfolded = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16), fold_batchnorm=False))
    torch.testing.assert_close(after, unfolded, atol=1e-5, rtol=1e-4)
    assert (after - before).abs().max() > 1e-3


def test_results_are_ordinary_tensors_the_caller_can_update_in_place():
    net, image = _net(), _image((1, 1, 20, 14, 12))
    probs = predict_probabilities(image[0], [net], InferenceConfig(roi_size=ROI))
    probs.mul_(2.0)  # would raise on an inference-mode tensor
    logits = sliding_window_logits(image, net, InferenceConfig(roi_size=ROI))
    logits.add_(1.0)
    assert not probs.requires_grad and not logits.requires_grad


def test_module_cache_is_bounded_and_ignores_dead_ids():
    cache = levers.ModuleCache(max_modules=2)
    nets = [_net(seed=i) for i in range(3)]
    for i, n in enumerate(nets):
        cache.set(n, i)
    assert cache.get(nets[0]) is None  # evicted: at most 2 modules are pinned
    assert cache.get(nets[1]) == 1 and cache.get(nets[2]) == 2
    other = _net(seed=9)
    assert cache.get(other) is None


def test_chunked_calls_survive_a_forward_that_reuses_its_output_buffer():
    """A CUDA-graph forward returns the same static buffer on every replay; chunks of a TTA
    batch must be copied out before the next chunk overwrites it."""
    net = _net()

    def graph_like(x: torch.Tensor, _static: dict = {}) -> torch.Tensor:  # noqa: B006 - the point
        y = net(x)
        buf = _static.get(tuple(y.shape))
        if buf is None:
            buf = _static[tuple(y.shape)] = torch.empty_like(y)
        return buf.copy_(y)

    x = torch.randn(7, 1, *ROI, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x)
        got = levers.NetworkRunner._chunked(graph_like, x, step=2)  # chunks 2, 2, 2, 1
    torch.testing.assert_close(got, expected)
