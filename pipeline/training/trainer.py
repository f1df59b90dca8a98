"""Training of one cross-validation fold: the epoch loop, validation, checkpoints, resume.

The loop is deliberately plain (no trainer class hierarchy): :func:`train_fold` builds the
network, data, optimiser and loss from a :class:`~preprocessing.plan.Plan` and a
:class:`TrainConfig`, then runs epochs. Everything it logs goes through the tracker it is given.

Files in the fold's work folder::

    checkpoint_last.pt   model, optimiser, scheduler, grad scaler, epoch, RNG states, best so far
    checkpoint_best.pt   model weights of the best validation epoch (+ its metrics)
    epochs.jsonl         one JSON line per finished epoch (loss, lr, val Dice, timings)
    qc_best.png          QC picture of the first validation case at the best epoch
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import nn
from tqdm import tqdm

from networks import build_network
from pipeline.inference.config import InferenceConfig, inference_config_for
from pipeline.inference.postprocessing import OofDice
from pipeline.tracking import Tracker
from pipeline.training.checkpoint import (
    BEST,
    LAST,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.training.data import FoldData, make_fold_data
from pipeline.training.losses import DeepSupervisionLoss
from pipeline.training.schedules import make_optimizer, make_scheduler, set_schedule_length
from pipeline.training.validation import ValidationCase, ValidationResult, validate
from preprocessing.plan import Plan
from preprocessing.transforms import AugmentConfig

logger = logging.getLogger(__name__)

EPOCH_LOG = "epochs.jsonl"
QC_PICTURE = "qc_best.png"


class TrainingDivergedError(RuntimeError):
    """The training loss or the weights of a fold became NaN/Inf.

    The fold stops at once: the diverged epoch gets no checkpoint (``checkpoint_last.pt`` keeps the
    last finite epoch, so ``--resume`` with a lower learning rate can continue) and is never the best.
    """


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


@dataclass(frozen=True)
class FoldResult:
    """Outcome of one fold (``best_dice`` = mean foreground validation Dice at ``best_epoch``).

    ``oof_dice``: the best checkpoint's out-of-fold Dice per validation case and label, without
    and with keeping the largest connected component (``pipeline.inference.postprocessing.OofDice``);
    empty when the fold has no best checkpoint or no validation cases.
    """

    fold: int
    best_dice: float
    best_epoch: int
    per_label: dict[str, float]
    epochs_run: int
    best_checkpoint: str
    run_id: str | None = None
    oof_dice: OofDice = field(default_factory=dict)


def build_fold_network(plan: Plan, device: str | torch.device = "cpu") -> nn.Module:
    """The plan's network (``networks.build_network``) on ``device``."""
    net = build_network(plan.network, plan.in_channels, plan.num_classes, **plan.network_options)
    return net.to(device)


def _autocast(config: TrainConfig) -> tuple[bool, torch.dtype]:
    if not (config.amp and config.device.startswith("cuda")):
        return False, torch.float32
    return True, (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@dataclass
class _Loop:
    """Mutable state of the epoch loop (what the checkpoint stores)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    epoch: int = 0  # epochs finished
    best_dice: float = -math.inf
    best_epoch: int = 0
    best_per_label: dict[str, float] = field(default_factory=dict)


def train_one_epoch(loop: _Loop, loader: DataLoader, config: TrainConfig) -> dict[str, float]:
    """One epoch of optimiser steps. Returns ``train_loss``, ``lr``, ``data_wait_fraction``, ``iterations_per_second``."""
    use_amp, amp_dtype = _autocast(config)
    device = torch.device(config.device)
    steps = config.iterations_per_epoch or len(loader)
    losses, wait, start = [], 0.0, time.perf_counter()
    lr = loop.optimizer.param_groups[0]["lr"]
    batches = iter(loader)
    loop.model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:  # iterations_per_epoch longer than one pass: start another pass
            batches = iter(loader)
            batch = next(batches)
        image = (
            batch["image"].as_tensor().to(device)
            if hasattr(batch["image"], "as_tensor")
            else batch["image"].to(device)
        )
        label = torch.as_tensor(batch["label"]).to(device).round().long()
        wait += time.perf_counter() - t0
        loop.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            outputs = loop.model(image)
        loss = loop.loss_fn(outputs, label)
        if not torch.isfinite(loss.detach()):  # one sync per step, as the loss log below
            raise TrainingDivergedError(f"the training loss became {float(loss.detach())} at iteration {step + 1}")
        loop.scaler.scale(loss).backward()
        loop.scaler.unscale_(loop.optimizer)
        nn.utils.clip_grad_norm_(loop.model.parameters(), config.grad_clip)
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        losses.append(float(loss.detach()))
    loop.scheduler.step()
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(np.mean(losses)),
        "lr": float(lr),
        "data_wait_fraction": wait / max(seconds, 1e-9),
        "iterations_per_second": steps / max(seconds, 1e-9),
    }


def _checkpoint_state(loop: _Loop) -> dict[str, Any]:
    return {
        "epoch": loop.epoch,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "rng": capture_rng_state(),
        "best_dice": loop.best_dice,
        "best_epoch": loop.best_epoch,
        "best_per_label": loop.best_per_label,
    }


def _restore(loop: _Loop, path: Path, config: TrainConfig) -> None:
    # CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state to the device.
    state = load_checkpoint(path, map_location="cpu")
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    loop.epoch = int(state["epoch"])
    loop.best_dice, loop.best_epoch = float(state["best_dice"]), int(state["best_epoch"])
    loop.best_per_label = dict(state["best_per_label"])
    set_schedule_length(loop.scheduler, loop.optimizer, config.epochs)  # --epochs may have grown
    logger.info("resumed from %s after epoch %d", path, loop.epoch)


def _new_loop(plan: Plan, config: TrainConfig) -> _Loop:
    model = build_fold_network(plan, config.device)
    optimizer = make_optimizer(model.parameters(), config)
    use_amp, amp_dtype = _autocast(config)
    scaler = torch.amp.GradScaler(config.device.split(":")[0], enabled=use_amp and amp_dtype == torch.float16)
    return _Loop(model, optimizer, make_scheduler(optimizer, config), scaler, DeepSupervisionLoss())


def train_fold(
    data: FoldData,
    plan: Plan,
    config: TrainConfig,
    work_dir: str | Path,
    tracker: Tracker,
    resume: bool = False,
) -> FoldResult:
    """Train one fold, validating every ``config.val_every`` epochs and keeping the best weights.

    Args:
        data: the fold's training and validation cases.
        plan: preprocessing plan and network.
        config: hyperparameters.
        work_dir: the fold's folder (checkpoints, epoch log, QC picture).
        tracker: MLflow run of this fold (child run); receives params, per-epoch metrics, artifacts.
        resume: continue from ``checkpoint_last.pt`` when present.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run must not append to, or keep the best of, an older run in this folder
        for name in (LAST, BEST, EPOCH_LOG, QC_PICTURE):
            (work / name).unlink(missing_ok=True)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    seed = config.seed + data.fold
    torch.manual_seed(seed)
    np.random.seed(seed)
    loop = _new_loop(plan, config)
    train_ds, loader, val_cases = make_fold_data(data, plan, config, work.parent / "cache")
    # Restore last: MONAI's DataLoader re-seeds torch's global generator when it is created.
    if resume and (work / LAST).is_file():
        _restore(loop, work / LAST, config)
    elif resume:
        logger.info("fold %d: no checkpoint in %s, starting at epoch 1", data.fold, work)
    inference = inference_config_for(
        plan,
        overlap=config.val_overlap,
        sw_batch_size=config.val_sw_batch_size,
        device=config.device,
        amp=config.amp,
    )
    labels = {k: v for k, v in plan.labels.items() if k != 0}
    bar = tqdm(
        range(loop.epoch + 1, config.epochs + 1),
        desc=f"fold {data.fold}",
        unit="epoch",
        disable=None,
        initial=loop.epoch,
        total=config.epochs,
    )
    for epoch in bar:
        _seed_augmentation(train_ds, seed * 100003 + epoch)
        try:
            metrics = train_one_epoch(loop, loader, config)
            _check_finite_weights(loop.model)
        except TrainingDivergedError as exc:
            raise TrainingDivergedError(
                f"fold {data.fold}, epoch {epoch}: {exc}; the fold was stopped and this epoch was not "
                f"checkpointed. Lower learning_rate (now {config.learning_rate:g}) or check the training "
                "images for extreme values"
            ) from None
        result = None
        if epoch % config.val_every == 0 or epoch == config.epochs:
            result = validate(loop.model, val_cases, labels, inference)
            metrics.update(
                val_dice=result.mean_dice, **{f"val_dice_{k}": v for k, v in result.per_label.items()}
            )
        loop.epoch = epoch
        if result is not None and result.mean_dice > loop.best_dice:
            _keep_best(loop, result, work, val_cases[0] if val_cases else None, plan)
        save_checkpoint(work / LAST, _checkpoint_state(loop))
        tracker.log_metrics(metrics, step=epoch)
        _append_epoch_log(work, epoch, metrics)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", dice=f"{loop.best_dice:.3f}")
    oof = out_of_fold_dice(loop.model, work / BEST, val_cases, labels, inference)
    return _finish(loop, data, work, tracker, oof)


def _check_finite_weights(model: nn.Module) -> None:
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDivergedError(f"{len(bad)} weight tensor(s) became NaN/Inf (first: {bad[0]})")


def _seed_augmentation(dataset: Dataset, seed: int) -> None:
    """Reseed every random transform per epoch, so a resumed run draws the same augmentations."""
    transform: Any = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))


def _keep_best(
    loop: _Loop, result: ValidationResult, work: Path, qc_case: ValidationCase | None, plan: Plan
) -> None:
    loop.best_dice, loop.best_epoch, loop.best_per_label = (
        result.mean_dice,
        loop.epoch,
        dict(result.per_label),
    )
    save_checkpoint(
        work / BEST,
        {
            "model": loop.model.state_dict(),
            "epoch": loop.epoch,
            "val_dice": result.mean_dice,
            "per_label": result.per_label,
        },
    )
    if qc_case is not None and result.first_prediction is not None:
        _write_qc(qc_case, result.first_prediction, work / QC_PICTURE, plan, loop.epoch)


def _write_qc(case: ValidationCase, pred: np.ndarray, path: Path, plan: Plan, epoch: int) -> None:
    try:
        from pipeline.writers.qc_picture import write_qc_picture
    except ImportError:  # QC writer not installed in this checkout: training must not fail for it
        logger.debug("pipeline.writers.qc_picture not available; no QC picture")
        return
    labels = {k: v for k, v in plan.labels.items() if k != 0}
    write_qc_picture(
        case.image[0].numpy(), pred, case.affine_ras, labels, path, title=f"{case.case_id} epoch {epoch}"
    )


def _append_epoch_log(work: Path, epoch: int, metrics: dict[str, float]) -> None:
    with (work / EPOCH_LOG).open("a") as fh:
        fh.write(json.dumps({"epoch": epoch, **metrics}) + "\n")


def out_of_fold_dice(
    model: nn.Module,
    best: Path,
    cases: list[ValidationCase],
    labels: dict[int, str],
    inference: InferenceConfig,
) -> OofDice:
    """The best checkpoint's Dice on the fold's validation cases, without and with largest component.

    One more pass of the validation engine with the best weights (the epoch loop's model holds
    the last epoch's): the out-of-fold predictions on which ``medseg train`` decides the
    post-processing per label. Loads the best weights into ``model``.
    """
    if not cases or not best.is_file():
        return {}
    model.load_state_dict(load_checkpoint(best, map_location=inference.device)["model"])
    return validate(model, cases, labels, inference, largest_component=True).oof_dice


def _finish(loop: _Loop, data: FoldData, work: Path, tracker: Tracker, oof: OofDice) -> FoldResult:
    if (work / BEST).is_file():
        tracker.log_artifact(work / BEST, "checkpoints")
    if (work / QC_PICTURE).is_file():
        tracker.log_artifact(work / QC_PICTURE, "qc")
    tracker.log_metrics({"best_val_dice": loop.best_dice, "best_epoch": loop.best_epoch}, step=loop.epoch)
    logger.info("fold %d: best mean Dice %.4f at epoch %d", data.fold, loop.best_dice, loop.best_epoch)
    return FoldResult(
        data.fold,
        loop.best_dice,
        loop.best_epoch,
        loop.best_per_label,
        loop.epoch,
        str(work / BEST),
        tracker.run_id,
        oof,
    )
