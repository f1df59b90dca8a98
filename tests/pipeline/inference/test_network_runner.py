"""The network runner: BatchNorm folding (torch's fx pass), inference copies, compile / graph caches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import build_network
from pipeline.inference import network_runner
from pipeline.inference.config import InferenceConfig
from pipeline.inference.sliding_window import sliding_window_logits
from tests.pipeline.inference.engine_cases import ROI, batchnorm_net, conv_net, plain_logits, random_image


def test_compile_failure_falls_back_to_eager_and_is_remembered(monkeypatch):
    calls = {"n": 0}

    def broken_compile(module, **kwargs):
        def compiled(x):
            calls["n"] += 1
            raise RuntimeError("injected compiler failure")

        return compiled

    monkeypatch.setattr(network_runner.torch, "compile", broken_compile)
    net, image = conv_net(), random_image()
    out = plain_logits(image, net, compile=True)
    torch.testing.assert_close(out, plain_logits(image, net), atol=1e-5, rtol=1e-5)
    assert calls["n"] == 1  # tried once for the (fixed) window shape, then eager
    plain_logits(image, net, compile=True)
    assert calls["n"] == 1  # the failure is cached with the network


def test_compiled_forwards_are_cached_per_network():
    net, image = conv_net(), random_image()

    def cached_forward():
        prepared = network_runner.prepare_network(net, fold_batchnorm=True, channels_last=False)
        return network_runner._COMPILED_FORWARDS.get(prepared)[("eager", None)]

    plain_logits(image, net, compile=True, compile_backend="eager")
    cached = cached_forward()
    plain_logits(image, net, compile=True, compile_backend="eager")
    assert cached_forward() is cached
    assert list(cached.compile_worked.values()) == [True]  # one window shape, compiled once


def test_batchnorm_folding_matches_and_leaves_the_callers_network_alone():
    net = batchnorm_net()
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    folded = network_runner.fold_batchnorm_into_convs(net)
    assert n_bn > 0 and folded is not net
    assert sum(isinstance(m, nn.BatchNorm3d) for m in folded.modules()) < n_bn // 2
    assert sum(isinstance(m, nn.BatchNorm3d) for m in net.modules()) == n_bn
    x = random_image((2, 1, 16, 16, 16))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-4)
    image = random_image((1, 1, 20, 18, 17))
    cfg = dict(roi_size=(16, 16, 16))
    plain = sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=False))
    fast = sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=True, channels_last=True))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
    assert next(net.parameters()).is_contiguous()  # the caller's weights keep their layout


def test_prepared_copy_is_refreshed_when_weights_change():
    net = batchnorm_net()
    first = network_runner.prepare_network(net, fold_batchnorm=True, channels_last=False)
    assert network_runner.prepare_network(net, fold_batchnorm=True, channels_last=False) is first
    image = random_image((1, 1, 16, 16, 16))
    before = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16)))
    with torch.no_grad():  # an optimizer step between two validations
        for p in net.parameters():
            p.mul_(1.1)
    assert network_runner.prepare_network(net, fold_batchnorm=True, channels_last=False) is not first
    after = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16)))
    unfolded = sliding_window_logits(image, net, InferenceConfig(roi_size=(16, 16, 16), fold_batchnorm=False))
    torch.testing.assert_close(after, unfolded, atol=1e-5, rtol=1e-4)
    assert (after - before).abs().max() > 1e-3


def test_module_cache_is_bounded_and_ignores_dead_ids():
    cache = network_runner.RecentModulesCache(max_modules=2)
    nets = [conv_net(seed=i) for i in range(3)]
    for i, n in enumerate(nets):
        cache.set(n, i)
    assert cache.get(nets[0]) is None  # evicted: at most 2 modules are pinned
    assert cache.get(nets[1]) == 1 and cache.get(nets[2]) == 2
    other = conv_net(seed=9)
    assert cache.get(other) is None


def test_chunked_calls_survive_a_forward_that_reuses_its_output_buffer():
    """A CUDA-graph forward returns the same static buffer on every replay; chunks of a TTA
    batch must be copied out before the next chunk overwrites it."""
    net = conv_net()

    def graph_like(x: torch.Tensor, _static: dict = {}) -> torch.Tensor:  # noqa: B006 - the point
        y = net(x)
        buf = _static.get(tuple(y.shape))
        if buf is None:
            buf = _static[tuple(y.shape)] = torch.empty_like(y)
        return buf.copy_(y)

    x = torch.randn(7, 1, *ROI, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x)
        got = network_runner.NetworkRunner._chunked(graph_like, x, step=2)  # chunks 2, 2, 2, 1
    torch.testing.assert_close(got, expected)


def _registry_net(name: str, **options) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(name, 1, 3, channels=(8, 16, 32), norm="batch", **options)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_registry_unet_with_batchnorm_is_fully_folded():
    """The one registry network fx can trace: torch's pass folds every BatchNorm."""
    net = _registry_net("unet", patch_size=(32, 32, 32))
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    folded = network_runner.fold_batchnorm_into_convs(net)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    x = random_image((1, 1, 32, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["untraceable", "no_batchnorm"])
def test_networks_without_a_foldable_batchnorm_run_themselves(case):
    """The residual U-Nets cannot be fx-traced: they run unfolded, like InstanceNorm networks."""
    net = _registry_net("attention_unet") if case == "untraceable" else conv_net()
    assert network_runner.fold_batchnorm_into_convs(net) is net
    assert network_runner.prepare_network(net, fold_batchnorm=True, channels_last=False) is net
    image = random_image((1, 1, 20, 18, 17))
    cfg = dict(roi_size=(16, 16, 16))
    folded = sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=True))
    assert torch.equal(
        folded, sliding_window_logits(image, net, InferenceConfig(**cfg, fold_batchnorm=False))
    )
