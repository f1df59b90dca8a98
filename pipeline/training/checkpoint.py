"""Training checkpoints: the fold's :class:`TrainingState`, atomic writes, the RNG states a faithful resume needs.

A checkpoint holds state dicts, RNG states and plain numbers only -- no class of ours is pickled
(``LambdaLR.state_dict`` stores a schedule factor's ``__dict__``, not the object), so renaming a
class never breaks resuming from a checkpoint written before.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.training.schedules import set_schedule_length
from preprocessing.atomic import atomic_path

logger = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"


@dataclass
class TrainingState:
    """What changes while a fold trains, and what ``checkpoint_last.pt`` stores to resume it.

    ``loss_fn`` maps the network's training output (a tensor or the deep-supervision list) and the
    ``(B, 1, X, Y, Z)`` labels to a scalar loss.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    epoch: int = 0  # epochs finished
    best_dice: float = -math.inf
    best_epoch: int = 0
    best_per_label: dict[str, float] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when CUDA is present)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` into a temp file in the same folder, then rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    ``weights_only=False`` because the checkpoint holds RNG states (numpy arrays, tuples); only
    load checkpoints this project wrote.
    """
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def training_checkpoint(state: TrainingState) -> dict[str, Any]:
    """The ``checkpoint_last.pt`` contents of ``state`` (plus the current RNG states)."""
    return {
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": capture_rng_state(),
        "best_dice": state.best_dice,
        "best_epoch": state.best_epoch,
        "best_per_label": state.best_per_label,
    }


def restore_training_state(state: TrainingState, path: str | Path, epochs: int) -> None:
    """Load a :func:`training_checkpoint` into ``state`` and the RNGs; stretch the schedule to ``epochs``."""
    # CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state to the device.
    saved = load_checkpoint(path, map_location="cpu")
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    restore_rng_state(saved["rng"])
    state.epoch = int(saved["epoch"])
    state.best_dice, state.best_epoch = float(saved["best_dice"]), int(saved["best_epoch"])
    state.best_per_label = dict(saved["best_per_label"])
    set_schedule_length(state.scheduler, state.optimizer, epochs)  # --epochs may have grown
    logger.info("resumed from %s after epoch %d", path, state.epoch)
