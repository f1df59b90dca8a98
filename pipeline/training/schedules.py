"""Optimisers and learning-rate schedules of the training configs (nnU-Net defaults)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from pipeline.training.config import TrainConfig


class PolyDecay:
    """nnU-Net's poly schedule factor ``(1 - epoch / epochs) ** exponent`` for ``LambdaLR``.

    A callable object rather than a lambda because ``LambdaLR.state_dict`` saves objects' state
    (and not functions), and because a resumed run may change ``epochs``.
    """

    def __init__(self, epochs: int, exponent: float = 0.9) -> None:
        self.epochs = max(int(epochs), 1)
        self.exponent = exponent

    def __call__(self, epoch: int) -> float:
        return (1.0 - min(epoch, self.epochs - 1) / self.epochs) ** self.exponent


class ConstantFactor:
    """Schedule factor 1 at every epoch: the learning rate stays constant.

    A class for the same state-dict reason as :class:`PolyDecay`. Checkpoints hold only the
    factor's ``__dict__`` (``LambdaLR.state_dict``), never its class name, so renaming these
    classes does not break resuming from an older checkpoint.
    """

    epochs = 0

    def __call__(self, epoch: int) -> float:
        return 1.0


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net) or AdamW, from ``config.optimizer``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {config.optimizer!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch ``LambdaLR`` with :class:`PolyDecay` or :class:`ConstantFactor`."""
    if config.lr_schedule == "poly":
        factor: Any = PolyDecay(config.epochs)
    elif config.lr_schedule == "constant":
        factor = ConstantFactor()
    else:
        raise ValueError(f"lr_schedule must be 'poly' or 'constant'; got {config.lr_schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_length(
    scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer, epochs: int
) -> None:
    """Stretch a restored poly schedule to ``epochs`` and set the current lr accordingly."""
    for factor in scheduler.lr_lambdas:
        if isinstance(factor, PolyDecay):
            factor.epochs = max(int(epochs), 1)
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * factor(scheduler.last_epoch)
