"""Every registered network trains through `medseg train` from the plan alone (no network_options).

The registry derives each network's geometry from the plan (unet's kernels and strides from patch size
and spacing, the residual U-Nets' strides, the transformers' img_size); these tests would catch a network
whose defaults do not fit the plan's patch (unetr's 96^3 img_size) or that ignores the plan's spacing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from networks import available_networks, build_network, geometry_options, required_divisor
from preprocessing.fingerprint import Fingerprint
from preprocessing.plan import PlanConfig, make_plan
from preprocessing.synthetic import write_msd_dataset
from workflows.cli import main
from workflows.train import network_geometry

# Patch sizes only where the plan's own (24, 24, 12) cannot work: Swin UNETR needs multiples of 32 and,
# with instance norm, one side >= 64. Everything else in the YAML is training cost, never network_options.
PATCH = {"swin_unetr": [64, 32, 32]}
CHEAP = {
    "iterations_per_epoch": 1,
    "samples_per_volume": 1,
    "batch_size": 1,
    "torch_threads": 1,
    "augment": {"enabled": False},
}
DEFAULT_SUITE = {"unet", "attention_unet"}
NETWORKS = [
    pytest.param(name, marks=() if name in DEFAULT_SUITE else pytest.mark.slow)
    for name in sorted(available_networks())
]


@pytest.fixture(scope="module")
def tiny_msd(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("networks") / "tiny_msd"
    # 1.5 x 1.5 x 3.0 mm: anisotropic enough that nnU-Net's rule keeps z at full resolution at level 1.
    write_msd_dataset(root, n_train=4, n_test=0, shape=(24, 24, 12), seed=5)
    return root


@pytest.mark.parametrize("name", NETWORKS)
def test_every_network_trains_one_step_from_the_plan(name, tiny_msd, tmp_path, monkeypatch, capsys):
    settings = {**CHEAP, **({"patch_size": PATCH[name]} if name in PATCH else {})}
    config = tmp_path / "cheap.yaml"
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", str(tiny_msd), "--network", name, "--folds", "2", "--fold", "0"]
    argv += ["--epochs", "1", "--config", str(config), "--device", "cpu", "--experiment", f"nets-{name}"]
    if name == "attention_unet":
        monkeypatch.setenv("MEDSEG_WORK", str(tmp_path / "shared_work"))
        work = tmp_path / "shared_work" / "tiny_msd"
    else:
        monkeypatch.delenv("MEDSEG_WORK", raising=False)
        work = tmp_path / "medseg_work" / "tiny_msd"  # under the current folder, not next to the dataset

    assert main(argv) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert str(work) in first_line and "work folder" in first_line
    assert not (tiny_msd.parent / "medseg_work").exists()
    plan = json.loads((work / "plan.json").read_text())
    options = plan["network_options"]
    assert options, "the plan must carry the network geometry it derived"
    if name in ("unetr", "swin_unetr"):
        assert options["img_size"] == plan["patch_size"]
    else:
        # 3.0 mm slices vs 1.5 mm in-plane: no downsampling along z at the first level.
        assert options["strides"][1] == [2, 2, 1], options
    divisor = required_divisor(name, **options)
    assert all(p % d == 0 for p, d in zip(plan["patch_size"], divisor, strict=True))
    state = torch.load(work / "fold_0" / "checkpoint_best.pt", map_location="cpu", weights_only=False)["model"]
    build_network(name, 1, len(plan["labels"]), **options).load_state_dict(state)


def _fingerprint(spacing, shape) -> Fingerprint:
    stats = {"mean": 0.0, "std": 1.0, "p00_5": -1.0, "p99_5": 1.0, "min": -1.0, "max": 1.0}
    return Fingerprint((spacing,) * 3, (shape,) * 3, (stats,), {0: "CT"}, {0: "background", 1: "organ"})


def test_unet_topology_follows_an_anisotropic_plan():
    plan = make_plan(
        _fingerprint((0.8, 0.8, 3.0), (320, 320, 40)),
        "unet",
        PlanConfig(),
        network_geometry("unet", {}),
    )
    strides, kernels = plan.network_options["strides"], plan.network_options["kernel_size"]
    assert strides[0] == [1, 1, 1]
    assert strides[1] == [2, 2, 1]  # 0.8 vs 3.0 mm: pool in-plane only at first
    assert kernels[0] == [3, 3, 1]  # no 3-wide kernel across thick slices at full resolution
    assert kernels[-1] == [3, 3, 3]
    assert any(s[2] == 2 for s in strides)  # z is pooled once in-plane spacing has caught up
    net_divisor = required_divisor("unet", **plan.network_options)
    assert all(p % d == 0 for p, d in zip(plan.patch_size, net_divisor, strict=True))
    assert plan.patch_size[0] * plan.patch_size[1] * plan.patch_size[2] <= PlanConfig().patch_voxel_budget

    # Isotropic data: every level pools every axis that is long enough, kernels are 3 everywhere.
    iso = geometry_options("unet", (64, 64, 64), (1.0, 1.0, 1.0))
    assert iso["strides"][1:] == [[2, 2, 2]] * 4 and all(k == [3, 3, 3] for k in iso["kernel_size"])


def test_explicit_network_options_win_over_the_plan():
    explicit = {"channels": [8, 16, 32], "strides": [1, 2, 2]}
    assert geometry_options("unet", (64, 64, 16), (0.8, 0.8, 3.0), explicit) == explicit
    assert geometry_options("unetr", (32, 32, 16), (1.0, 1.0, 1.0), {"img_size": [32, 32, 32]}) == {
        "img_size": [32, 32, 32]
    }
    # Only the levels the user asked for are derived.
    three = geometry_options("unet", (64, 64, 16), (0.8, 0.8, 3.0), {"channels": [8, 16, 32]})
    assert len(three["strides"]) == 3 and three["strides"][1] == [2, 2, 1]


def test_forced_patch_the_topology_cannot_take_names_one_it_can():
    with pytest.raises(ValueError, match=r"patch_size \(18, 18, 18\).*use e\.g\. patch_size: \[20, 20, 20\]"):
        make_plan(
            _fingerprint((1.0, 1.0, 1.0), (40, 40, 40)),
            "unet",
            PlanConfig(patch_size=(18, 18, 18)),
            network_geometry("unet", {}),
        )
