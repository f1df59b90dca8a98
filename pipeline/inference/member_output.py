"""What the engine hands out per ensemble member when members are streamed: :class:`MemberOutput`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemberOutput:
    """Class probabilities of one ensemble member: one fold network and one TTA mirroring.

    Members are streamed fold-major, mirror-minor (``for fold: for mirror``), as
    :func:`pipeline.inference.sliding_window.predict_probabilities` runs them.

    Attributes:
        member: 0-based position in that order, ``0 .. folds * mirrors - 1``.
        fold: index of the member's network in the ensemble's network list (the fold).
        mirror_axes: spatial axes of the network grid flipped for this pass (0 = X, 1 = Y,
            2 = Z; ``()`` is the un-mirrored pass). The probabilities are flipped back already.
        probabilities: ``float32 (K, X', Y', Z')`` softmax of this member on the network grid,
            on the inference device (the CPU after host stitching). Not reused by the engine:
            a hook may keep it.
    """

    member: int
    fold: int
    mirror_axes: tuple[int, ...]
    probabilities: torch.Tensor


def pass_hook(
    on_member: Callable[[MemberOutput], None] | None, mirrors: list[tuple[int, ...]]
) -> Callable[[int, torch.Tensor], None] | None:
    """The engine's ``(pass index, (1, K, X', Y', Z') probabilities)`` hook feeding ``on_member``.

    Passes of one side-by-side sweep sit fold-major, mirror-minor (the network runner's output
    order); ``mirrors`` are the engine's axes of a ``(N, C, X, Y, Z)`` batch.
    """
    if on_member is None:
        return None

    def hook(p: int, probs: torch.Tensor) -> None:
        fold, mirror = divmod(p, len(mirrors))
        on_member(MemberOutput(p, fold, tuple(a - 2 for a in mirrors[mirror]), probs[0]))

    return hook
