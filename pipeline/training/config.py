"""Training hyperparameters of one cross-validation fold (:class:`TrainConfig`).

A module of its own so that the trainer, the fold data and the schedules all read the config
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preprocessing.transforms import AugmentConfig


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (fields, never subclasses; YAML overrides any of them).

    Attributes:
        epochs: epochs per fold (a resumed fold may be given more).
        optimizer: ``"sgd"`` (Nesterov, nnU-Net) or ``"adamw"``.
        learning_rate / momentum / weight_decay: optimiser settings (nnU-Net: 1e-2, 0.99, 3e-5).
        lr_schedule: ``"poly"`` (``lr * (1 - epoch/epochs) ** 0.9``) or ``"constant"``.
        grad_clip: gradient-norm clip (nnU-Net: 12).
        amp: mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler).
        val_every: validate every N epochs (and always after the last epoch).
        iterations_per_epoch: optimiser steps per epoch; ``None`` = one pass over the training cases.
        samples_per_volume: patches cropped from each loaded case.
        cache: ``"memory"`` (CacheDataset), ``"disk"`` (PersistentDataset) or ``"none"``.
        num_workers: DataLoader worker processes.
        device: ``"cpu"`` or ``"cuda"``.
        val_overlap / val_sw_batch_size: sliding-window validation settings.
        seed: base seed; fold ``f`` uses ``seed + f``.
        torch_threads: intra-op threads (``None`` = torch default).
        augment: augmentation settings.
        calibration_voxels: voxels sampled (seeded) from each out-of-fold validation case for the
            temperature fit of the bundle's calibration (0 = no calibration).
    """

    epochs: int = 100
    optimizer: str = "sgd"
    learning_rate: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    lr_schedule: str = "poly"
    grad_clip: float = 12.0
    amp: bool = True
    val_every: int = 1
    iterations_per_epoch: int | None = None
    samples_per_volume: int = 2
    cache: str = "memory"
    num_workers: int = 0
    device: str = "cpu"
    val_overlap: float = 0.5
    val_sw_batch_size: int = 2
    seed: int = 0
    torch_threads: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    calibration_voxels: int = 20000
