"""Small configurations of every registered network, shared by the network test modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Shape = tuple[int, int, int]

IN_CHANNELS = 2
OUT_CHANNELS = 3


@dataclass(frozen=True)
class Case:
    """A tiny configuration of one registered network.

    Attributes:
        options: build_network options; ``options_for(patch)`` adds patch-dependent ones (unetr's img_size).
        patches: Two valid input sizes (X, Y, Z), the second anisotropic where the network allows it.
        deep_supervision: Whether the network supports ``deep_supervision=True``.
        n_params: Exact parameter count of ``options_for(patches[0])`` with IN/OUT_CHANNELS (snapshot).
    """

    options: dict
    patches: tuple[Shape, Shape]
    deep_supervision: bool
    n_params: int
    patch_options: Callable[[Shape], dict] | None = None

    def options_for(self, patch: Shape, **extra: object) -> dict:
        opts = dict(self.options)
        if self.patch_options is not None:
            opts.update(self.patch_options(patch))
        opts.update(extra)
        return opts


CASES: dict[str, Case] = {
    "unet": Case(
        options={"channels": (8, 16, 32)},
        patches=((32, 32, 32), (32, 32, 16)),
        deep_supervision=True,
        n_params=85_387,
    ),
    "attention_unet": Case(
        options={"channels": (8, 16, 32), "multi_scale_input": True},
        patches=((32, 32, 32), (32, 16, 24)),
        deep_supervision=True,
        n_params=91_157,
    ),
    "dual_attention_unet": Case(
        options={"channels": (8, 16, 32), "multi_scale_input": True, "attention_levels": 1},
        patches=((32, 32, 32), (32, 16, 24)),
        deep_supervision=True,
        n_params=90_853,
    ),
    "channel_attention_aspp_unet": Case(
        options={"channels": (8, 16, 32), "multi_scale_input": True},
        patches=((32, 32, 32), (32, 16, 24)),
        deep_supervision=True,
        n_params=113_071,
    ),
    "swin_unetr": Case(
        options={"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4},
        patches=((64, 32, 32), (32, 32, 64)),
        deep_supervision=False,
        n_params=3_732_931,
    ),
    "unetr": Case(
        options={"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 2},
        patches=((32, 32, 32), (32, 48, 16)),
        deep_supervision=False,
        n_params=1_258_731,
        patch_options=lambda patch: {"img_size": patch},
    ),
}
