"""Per-architecture option checks: nnU-Net topology, attention gates, dual attention, option validation."""

from __future__ import annotations

import pytest
import torch

from networks import build_network, network_options, required_divisor, unet_topology
from networks.attention_unet import AttentionCoefficients
from networks.dual_attention_unet import DualAttention, PositionAttention
from networks.residual_unet import ResidualUNet, ResidualUNetConfig

SMALL = {"channels": (8, 16, 32)}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- nnU-Net topology -------------------------------------------------------------------------------


def test_unet_topology_isotropic_matches_nnunet_default():
    kernels, strides = unet_topology((128, 128, 128), (1.0, 1.0, 1.0))
    # nnU-Net 3d_fullres on 128^3 isotropic: 6 stages, pooled 5 times down to a 4^3 bottleneck.
    assert strides == [(1, 1, 1)] + [(2, 2, 2)] * 5
    assert kernels == [(3, 3, 3)] * 6


def test_unet_topology_anisotropic_pools_in_plane_first_and_uses_flat_kernels():
    kernels, strides = unet_topology((192, 160, 64), (0.8, 0.8, 3.0))
    # 3.0 / 0.8 > 2: Z is neither pooled nor convolved with 3-wide kernels until in-plane spacing is 1.6 mm.
    assert strides[1] == (2, 2, 1)
    assert kernels[0] == (3, 3, 1)
    assert all(k == (3, 3, 3) for k in kernels[1:])
    assert all(s == (2, 2, 2) for s in strides[2:])
    prod = [1, 1, 1]
    for s in strides:
        prod = [p * v for p, v in zip(prod, s, strict=True)]
    assert prod == [32, 32, 16]
    # Bottleneck edges stay >= 4 voxels (nnU-Net's minimum feature-map size).
    assert all(p // d >= 4 for p, d in zip((192, 160, 64), prod, strict=True))


def test_unet_topology_single_poolable_axis_needs_three_times_min_size():
    # After one pooling only Z (10 voxels) is still >= 2 * 4 long; nnU-Net pools a lone axis only if it is
    # at least 3 * min_feature_map_size = 12 long, so it stops here.
    _, strides = unet_topology((8, 8, 20), (1.0, 1.0, 1.0))
    assert strides == [(1, 1, 1), (2, 2, 2)]


def test_unet_from_patch_and_spacing_gets_anisotropic_strides():
    patch = (32, 32, 16)
    net = build_network(
        "unet", 1, 3, patch_size=patch, spacing_mm=(1.0, 1.0, 2.5), deep_supervision=True, **SMALL
    )
    assert net.min_input_divisor == (4, 4, 2)
    assert required_divisor("unet", patch_size=patch, spacing_mm=(1.0, 1.0, 2.5), **SMALL) == (4, 4, 2)
    outs = net.train()(torch.randn(1, 1, *patch))
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 16), (16, 16, 16)]


def test_unet_patch_not_divisible_suggests_a_valid_one():
    with pytest.raises(ValueError, match=r"patch_size=\(36, 32, 32\)"):
        build_network("unet", 1, 2, patch_size=(34, 32, 32), **SMALL)


def test_unet_patch_too_small_for_requested_levels():
    with pytest.raises(ValueError, match="allows only 3 levels"):
        build_network("unet", 1, 2, patch_size=(16, 16, 16), channels=(8, 16, 32, 64))


def test_unet_rejects_patch_size_together_with_strides():
    with pytest.raises(ValueError, match="not both"):
        build_network("unet", 1, 2, patch_size=(32, 32, 32), strides=(1, 2, 2), **SMALL)


@pytest.mark.parametrize(
    "name", ["unet", "attention_unet", "dual_attention_unet", "channel_attention_aspp_unet"]
)
def test_deep_supervision_levels_full_resolution_first_then_coarser(name):
    strides = (1, (2, 2, 1), 2, 2)
    net = build_network(name, 1, 2, channels=(4, 8, 8, 8), strides=strides, deep_supervision=True).train()
    outs = net(torch.randn(1, 1, 32, 32, 16))
    # Four levels: full resolution plus the two decoder levels above the bottleneck, not upsampled.
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 16), (16, 16, 16), (8, 8, 8)]


# --- attention gates --------------------------------------------------------------------------------


def _capture_coefficients(net: torch.nn.Module) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    for module in net.modules():
        if isinstance(module, AttentionCoefficients):
            module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    return captured


def test_attention_coefficients_in_unit_interval_with_skip_shape():
    torch.manual_seed(0)
    net = build_network("attention_unet", 1, 2, **SMALL).eval()
    captured = _capture_coefficients(net)
    with torch.no_grad():
        net(torch.randn(2, 1, 32, 16, 24))
    # Decoder runs deepest first: gate of skip level 1 (16, 8, 12), then level 0 (full resolution).
    assert [tuple(a.shape) for a in captured] == [(2, 1, 16, 8, 12), (2, 1, 32, 16, 24)]
    for alpha in captured:
        assert alpha.min() >= 0 and alpha.max() <= 1
        assert alpha.std() > 0  # spatially varying, not a constant gate


def test_attention_gates_actually_gate_the_skips():
    torch.manual_seed(0)
    net = build_network("attention_unet", 1, 2, **SMALL).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    outputs = []
    for bias in (-50.0, 50.0):  # alpha ~ 0 (skips closed) versus alpha ~ 1 (skips open)
        for module in net.modules():
            if isinstance(module, AttentionCoefficients):
                torch.nn.init.constant_(module.psi.bias, bias)
        with torch.no_grad():
            outputs.append(net(x))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)


# --- parameter count per option -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["attention_unet", "dual_attention_unet", "channel_attention_aspp_unet"])
def test_multi_scale_input_adds_input_channels_to_each_encoder_block(name):
    in_ch = 2
    off = n_params(build_network(name, in_ch, 3, **SMALL))
    on = n_params(build_network(name, in_ch, 3, multi_scale_input=True, **SMALL))
    # Levels 1, 2 (widths 16, 32) take in_ch extra channels: 3x3x3 conv + 1x1x1 residual projection.
    assert on - off == sum(in_ch * c * (27 + 1) for c in (16, 32))


@pytest.mark.parametrize(
    "name", ["unet", "attention_unet", "dual_attention_unet", "channel_attention_aspp_unet"]
)
def test_deep_supervision_adds_one_head_per_intermediate_decoder_level(name):
    off = n_params(build_network(name, 1, 3, **SMALL))
    on = n_params(build_network(name, 1, 3, deep_supervision=True, **SMALL))
    assert on - off == 16 * 3 + 3  # one 1x1x1 head with bias at the width-16 level


def test_attention_gates_parameter_count():
    config = ResidualUNetConfig(1, 3, channels=(8, 16, 32))
    plain = n_params(ResidualUNet(config))
    gated = n_params(build_network("attention_unet", 1, 3, **SMALL))

    def gate(c_skip: int, c_gate: int) -> int:
        inter = c_skip // 2
        return c_skip * inter * 8 + (c_gate * inter + inter) + (inter + 1)  # theta_x 2^3, phi_g, psi

    assert gated - plain == gate(8, 16) + gate(16, 32)


def test_dual_attention_levels_parameter_count():
    def dual(c: int) -> int:
        r = c // 8
        return 2 * (c * r + r) + (c * c + c) + 2  # query, key, value 1x1x1 convs, two gammas

    plain = n_params(ResidualUNet(ResidualUNetConfig(1, 3, channels=(8, 16, 32))))
    one = n_params(build_network("dual_attention_unet", 1, 3, attention_levels=1, **SMALL))
    two = n_params(build_network("dual_attention_unet", 1, 3, attention_levels=2, **SMALL))
    assert one - plain == dual(32)
    assert two - one == dual(16)


def test_channel_attention_and_aspp_parameter_count():
    plain = n_params(ResidualUNet(ResidualUNetConfig(1, 3, channels=(8, 16, 32))))
    net = build_network("channel_attention_aspp_unet", 1, 3, **SMALL)

    def se(c: int) -> int:
        r = c // 2
        return (c * r + r) + (r * c + c)  # squeeze and excite fully connected layers, with biases

    b = 32 // 4  # four ASPP branches share the bottleneck width
    aspp = (32 * b + b) + 3 * (32 * b * 27 + b) + (4 * b * 32) + 2 * 32  # 1x1, 3 dilated 3x3, fusion + norm
    assert n_params(net) - plain == se(8) + se(16) + se(32) + aspp


def test_aspp_dilations_must_split_the_bottleneck_width():
    with pytest.raises(ValueError, match="divisible by the number of ASPP branches"):
        build_network("channel_attention_aspp_unet", 1, 2, channels=(8, 16, 30))


# --- dual attention modules ---------------------------------------------------------------------------


def test_position_attention_matches_danet_formula():
    torch.manual_seed(0)
    pam = PositionAttention(16)
    x = torch.randn(2, 16, 4, 3, 5)
    q = pam.query(x).flatten(2)  # (B, C', N)
    k = pam.key(x).flatten(2)
    v = pam.value(x).flatten(2)  # (B, C, N)
    attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N), rows sum to 1
    expected = torch.bmm(v, attention.transpose(1, 2)).reshape(x.shape)
    torch.testing.assert_close(pam(x), expected, atol=1e-5, rtol=1e-5)


def test_dual_attention_is_identity_at_init_and_learns_once_gamma_moves():
    torch.manual_seed(0)
    block = DualAttention(16)
    x = torch.randn(1, 16, 4, 4, 4)
    torch.testing.assert_close(block(x), x)
    with torch.no_grad():
        block.gamma_position.fill_(0.5)
        block.gamma_channel.fill_(0.5)
    out = block(x)
    assert not torch.allclose(out, x)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_channel_attention_stays_finite_under_bf16_autocast():
    block = DualAttention(8)
    with torch.no_grad():
        block.gamma_channel.fill_(1.0)
    x = 30 * torch.randn(1, 8, 8, 8, 8)  # large energies: sum over 512 voxels of products ~ 1e3 each
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert torch.isfinite(out.float()).all()


# --- invalid options --------------------------------------------------------------------------------


def test_unknown_network_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*attention_unet.*unet"):
        build_network("vnet", 1, 2)


@pytest.mark.parametrize("name", ["unet", "attention_unet", "dual_attention_unet", "swin_unetr", "unetr"])
def test_unknown_option_lists_valid_options(name):
    with pytest.raises(ValueError, match="valid options") as info:
        build_network(name, 1, 2, n_filters=8)
    assert all(opt in str(info.value) for opt in network_options(name))
    assert "dropout" in network_options(name) and "norm" in network_options(name)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("swin_unetr", {"img_size": (96, 96, 48 + 8)}, "multiple of 32"),
        ("swin_unetr", {"img_size": (32, 32, 32)}, ">= 64"),
        ("swin_unetr", {"feature_size": 16}, "multiple of 12"),
        ("swin_unetr", {"num_heads": (5, 6, 12, 24)}, "num_heads"),
        ("unetr", {"img_size": (96, 96, 40)}, "multiples of 16"),
        ("unetr", {"hidden_size": 100, "num_heads": 12}, "divisible by num_heads"),
        ("attention_unet", {"channels": (8, 16, 32), "strides": (1,)}, "one entry per level"),
        ("unet", {"channels": (8, 16, 32), "strides": (1, 2, 2, 2)}, "one entry per level"),
        ("attention_unet", {"channels": (8, 16), "strides": (2, 2)}, "strides\\[0\\]"),
        ("attention_unet", {"channels": (8, 16), "kernel_size": 4}, "odd"),
        (
            "dual_attention_unet",
            {"channels": (8, 16, 32), "attention_levels": 4},
            "attention_levels must be in 1..3",
        ),
        ("unet", {"channels": (8, 16), "strides": (1, 2)}, "at least 3 levels"),
    ],
)
def test_invalid_option_values_raise_value_error(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_network(name, 1, 2, **options)


@pytest.mark.parametrize(
    "name", ["unet", "attention_unet", "dual_attention_unet", "channel_attention_aspp_unet"]
)
def test_strides_accept_monai_unet_and_dynunet_conventions(name):
    # MONAI UNet: one stride per downsampling; DynUNet: one per level with a leading 1. Options that went
    # through JSON (lists) must build the same network.
    monai_style = build_network(name, 1, 2, channels=[8, 16, 32], strides=[2, [2, 2, 1]])
    dynunet_style = build_network(name, 1, 2, channels=(8, 16, 32), strides=(1, 2, (2, 2, 1)))
    assert monai_style.min_input_divisor == dynunet_style.min_input_divisor == (4, 4, 2)
    assert n_params(monai_style) == n_params(dynunet_style)
    assert monai_style.state_dict().keys() == dynunet_style.state_dict().keys()


def test_input_not_divisible_raises_with_divisor():
    net = build_network("attention_unet", 1, 2, **SMALL)
    with pytest.raises(ValueError, match=r"divisible by \(4, 4, 4\)"):
        net(torch.randn(1, 1, 32, 32, 30))


def test_required_divisor_of_transformers_and_default_cnns():
    assert required_divisor("swin_unetr") == (32, 32, 32)
    assert required_divisor("unetr") == (16, 16, 16)
    assert required_divisor("attention_unet") == (16, 16, 16)  # default 5 levels
    assert required_divisor("unet", patch_size=(128, 128, 128)) == (32, 32, 32)
