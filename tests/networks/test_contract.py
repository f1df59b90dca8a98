"""Contract suite: every registered network passes the same checks (scikit-learn check_estimator idea)."""

from __future__ import annotations

import pytest
import torch

from networks import available_networks, build_network, required_divisor
from tests.networks.cases import CASES, IN_CHANNELS, OUT_CHANNELS, Case

NAMES = sorted(CASES)
DS_NAMES = [n for n in NAMES if CASES[n].deep_supervision]


def _build(name: str, patch=None, **extra) -> torch.nn.Module:
    case = CASES[name]
    torch.manual_seed(0)
    return build_network(
        name, IN_CHANNELS, OUT_CHANNELS, **case.options_for(patch or case.patches[0], **extra)
    )


def _input(patch, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, IN_CHANNELS, *patch, generator=torch.Generator().manual_seed(1))


def test_every_registered_network_has_a_contract_case():
    assert sorted(available_networks()) == NAMES
    assert all(isinstance(d, str) and d for d in available_networks().values())


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_for_two_patch_sizes(name):
    case: Case = CASES[name]
    for batch, patch in zip((2, 1), case.patches, strict=True):
        net = _build(name, patch).eval()
        assert all(p % d == 0 for p, d in zip(patch, net.min_input_divisor, strict=True))
        with torch.no_grad():
            out = net(_input(patch, batch=batch))
        assert isinstance(out, torch.Tensor)
        assert out.shape == (batch, OUT_CHANNELS, *patch)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_required_divisor_matches_built_network(name):
    case = CASES[name]
    net = _build(name)
    assert required_divisor(name, **case.options_for(case.patches[0])) == tuple(net.min_input_divisor)


@pytest.mark.parametrize("name", DS_NAMES)
def test_deep_supervision_list_in_train_single_tensor_in_eval(name):
    patch = CASES[name].patches[1]
    net = _build(name, patch, deep_supervision=True).train()
    outs = net(_input(patch, batch=2))
    assert isinstance(outs, list)
    # channels (8, 16, 32): full resolution + one auxiliary level (the bottleneck has no head).
    assert len(outs) == 2
    assert outs[0].shape == (2, OUT_CHANNELS, *patch)
    # Auxiliary logits stay at their own resolution (not upsampled): level 1 is half size on strided axes.
    assert outs[1].shape == (2, OUT_CHANNELS, *(p // 2 for p in patch))
    net.eval()
    with torch.no_grad():
        out = net(_input(patch, batch=2))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, OUT_CHANNELS, *patch)


@pytest.mark.parametrize("name", [n for n in NAMES if not CASES[n].deep_supervision])
def test_deep_supervision_rejected_where_unsupported(name):
    with pytest.raises(ValueError, match="deep_supervision"):
        _build(name, deep_supervision=True)


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_gradients_for_every_trainable_parameter(name):
    extra = {"deep_supervision": True} if CASES[name].deep_supervision else {}
    patch = CASES[name].patches[0]
    net = _build(name, patch, **extra).train()
    out = net(_input(patch))
    outs = out if isinstance(out, list) else [out]
    target = torch.randint(0, OUT_CHANNELS, (1, *patch), generator=torch.Generator().manual_seed(2))
    loss = sum(
        torch.nn.functional.cross_entropy(
            o, torch.nn.functional.interpolate(target[:, None].float(), o.shape[2:])[:, 0].long()
        )
        for o in outs
    )
    loss.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    # DANet's attention scales start at zero, so the attention convolutions get exactly zero gradient at
    # step 0 (they start learning once gamma moves); everything else must get a non-zero gradient.
    zero = [n for n, p in trainable if not p.grad.abs().sum() > 0 and ".position." not in n]
    assert not zero, f"zero gradient for {zero}"


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_is_deterministic(name):
    patch = CASES[name].patches[0]
    net = _build(name, patch).eval()
    x = _input(patch)
    with torch.no_grad():
        first, second = net(x), net(x)
    assert torch.equal(first, second)
    # The same seed builds the same weights.
    with torch.no_grad():
        again = _build(name, patch).eval()(x)
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_snapshot(name):
    net = _build(name)
    assert sum(p.numel() for p in net.parameters()) == CASES[name].n_params


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_on_cpu(name):
    patch = CASES[name].patches[0]
    net = _build(name, patch).eval()
    x = _input(patch)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out.float()).all()
    # Loose agreement: bf16 has ~3 significant digits; a broken cast would be far off.
    assert torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1] > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_smoke(name):
    patch = CASES[name].patches[0]
    net = _build(name, patch).eval()
    x = _input(patch)
    compiled = torch.compile(net)
    with torch.no_grad():
        ref, out = net(x), compiled(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
