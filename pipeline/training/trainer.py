"""Training of one cross-validation fold: the epoch loop, validation, checkpoints, resume.

The loop is deliberately plain (no trainer class hierarchy): :func:`train_fold` builds the
network, data, optimiser and loss from a :class:`~preprocessing.plan.Plan` and a
:class:`~pipeline.training.config.TrainConfig`, then runs epochs. Everything it logs goes through
the tracker it is given.

Files in the fold's work folder::

    checkpoint_last.pt   model, optimiser, scheduler, grad scaler, epoch, RNG states, best so far
    checkpoint_best.pt   model weights of the best validation epoch (+ its metrics)
    epochs.jsonl         one JSON line per finished epoch (loss, lr, val Dice, timings)
    qc_best.png          QC picture of the first validation case at the best epoch
    calibration_samples.npz  sampled out-of-fold logits + labels of the best weights (calibration)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
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
    TrainingState,
    restore_training_state,
    save_checkpoint,
    training_checkpoint,
)
from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData, make_fold_data
from pipeline.training.losses import supervised_loss
from pipeline.training.out_of_fold import CALIBRATION_SAMPLES, OutOfFoldCollector
from pipeline.training.schedules import make_optimizer, make_scheduler
from pipeline.training.validation import ValidationCase, ValidationResult, out_of_fold_dice, validate
from preprocessing.plan import Plan

logger = logging.getLogger(__name__)

EPOCH_LOG = "epochs.jsonl"
QC_PICTURE = "qc_best.png"


class TrainingDivergedError(RuntimeError):
    """The training loss or the weights of a fold became NaN/Inf.

    The fold stops at once: the diverged epoch gets no checkpoint (``checkpoint_last.pt`` keeps the
    last finite epoch, so ``--resume`` with a lower learning rate can continue) and is never the best.
    """


@dataclass(frozen=True)
class FoldResult:
    """Outcome of one fold (``best_dice`` = mean foreground validation Dice at ``best_epoch``).

    ``oof_dice``: the best checkpoint's out-of-fold Dice per validation case and label, without
    and with keeping the largest connected component (``pipeline.inference.postprocessing.OofDice``);
    empty when the fold has no best checkpoint or no validation cases. ``calibration_samples``:
    the file of that pass's sampled logits and labels (``""``: none); ``oof_uncertainty``: case id
    -> uncertainty score of that pass (``pipeline.training.out_of_fold``).
    """

    fold: int
    best_dice: float
    best_epoch: int
    per_label: dict[str, float]
    epochs_run: int
    best_checkpoint: str
    run_id: str | None = None
    oof_dice: OofDice = field(default_factory=dict)
    calibration_samples: str = ""
    oof_uncertainty: dict[str, float] = field(default_factory=dict)


def build_fold_network(plan: Plan, device: str | torch.device = "cpu") -> nn.Module:
    """The plan's network (``networks.build_network``) on ``device``."""
    net = build_network(plan.network, plan.in_channels, plan.num_classes, **plan.network_options)
    return net.to(device)


def _autocast(config: TrainConfig) -> tuple[bool, torch.dtype]:
    if not (config.amp and config.device.startswith("cuda")):
        return False, torch.float32
    return True, (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def new_training_state(plan: Plan, config: TrainConfig) -> TrainingState:
    """Fresh network, optimiser, schedule, grad scaler and loss of a fold (epoch 0)."""
    model = build_fold_network(plan, config.device)
    optimizer = make_optimizer(model.parameters(), config)
    use_amp, amp_dtype = _autocast(config)
    scaler = torch.amp.GradScaler(config.device.split(":")[0], enabled=use_amp and amp_dtype == torch.float16)
    return TrainingState(model, optimizer, make_scheduler(optimizer, config), scaler, supervised_loss)


def _next_batch(batches: Iterator[dict[str, Any]], loader: DataLoader) -> tuple[Iterator, dict[str, Any]]:
    try:
        return batches, next(batches)
    except StopIteration:  # iterations_per_epoch longer than one pass: start another pass
        batches = iter(loader)
        return batches, next(batches)


def _batch_tensors(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain tensors on ``device``: image ``(B, C, X, Y, Z)`` float, label ``(B, 1, X, Y, Z)`` rounded."""
    image = batch["image"]
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    return image.to(device), torch.as_tensor(batch["label"]).to(device).round()


def train_one_epoch(state: TrainingState, loader: DataLoader, config: TrainConfig) -> dict[str, float]:
    """One epoch of optimiser steps. Returns ``train_loss``, ``lr``, ``data_wait_fraction``, ``iterations_per_second``."""
    use_amp, amp_dtype = _autocast(config)
    device = torch.device(config.device)
    steps = config.iterations_per_epoch or len(loader)
    losses, wait, start = [], 0.0, time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    batches: Iterator = iter(loader)
    state.model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        batches, batch = _next_batch(batches, loader)
        image, label = _batch_tensors(batch, device)
        wait += time.perf_counter() - t0
        state.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            outputs = state.model(image)
        loss = state.loss_fn(outputs, label)
        if not torch.isfinite(loss.detach()):  # one sync per step, as the loss log below
            raise TrainingDivergedError(
                f"the training loss became {float(loss.detach())} at iteration {step + 1}"
            )
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        losses.append(float(loss.detach()))
    state.scheduler.step()
    seconds = time.perf_counter() - start
    return {
        "train_loss": float(np.mean(losses)),
        "lr": float(lr),
        "data_wait_fraction": wait / max(seconds, 1e-9),
        "iterations_per_second": steps / max(seconds, 1e-9),
    }


@dataclass(frozen=True)
class _FoldRun:
    """What every epoch of one fold reads (built once by :func:`train_fold`)."""

    fold: int
    seed: int
    plan: Plan
    config: TrainConfig
    work: Path
    tracker: Tracker
    train_ds: Dataset
    loader: DataLoader
    val_cases: list[ValidationCase]
    inference: InferenceConfig
    labels: dict[int, str]


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
    work = _prepare_work_dir(Path(work_dir), resume)
    state, run = _set_up_fold(data, plan, config, work, tracker, resume)
    bar = tqdm(
        range(state.epoch + 1, config.epochs + 1),
        desc=f"fold {data.fold}",
        unit="epoch",
        disable=None,
        initial=state.epoch,
        total=config.epochs,
    )
    for epoch in bar:
        metrics = _run_epoch(state, run, epoch)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", dice=f"{state.best_dice:.3f}")
    collector = OutOfFoldCollector(run.labels, config.calibration_voxels, run.seed)
    oof = out_of_fold_dice(state.model, work / BEST, run.val_cases, run.labels, run.inference, collector)
    samples = collector.save(work / CALIBRATION_SAMPLES)
    return _finish(state, data, work, tracker, (oof, samples, collector.uncertainty))


def _set_up_fold(
    data: FoldData, plan: Plan, config: TrainConfig, work: Path, tracker: Tracker, resume: bool
) -> tuple[TrainingState, _FoldRun]:
    """Seeds, network and optimiser (restored from ``checkpoint_last.pt`` on resume), data, validation settings."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    seed = config.seed + data.fold
    torch.manual_seed(seed)
    np.random.seed(seed)
    state = new_training_state(plan, config)
    train_ds, loader, val_cases = make_fold_data(data, plan, config, work.parent / "cache")
    # Restore last: MONAI's DataLoader re-seeds torch's global generator when it is created.
    if resume and (work / LAST).is_file():
        restore_training_state(state, work / LAST, config.epochs)
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
    run = _FoldRun(
        data.fold, seed, plan, config, work, tracker, train_ds, loader, val_cases, inference, labels
    )
    return state, run


def _prepare_work_dir(work: Path, resume: bool) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run must not append to, or keep the best of, an older run in this folder
        for name in (LAST, BEST, EPOCH_LOG, QC_PICTURE, CALIBRATION_SAMPLES):
            (work / name).unlink(missing_ok=True)
    return work


def _run_epoch(state: TrainingState, run: _FoldRun, epoch: int) -> dict[str, float]:
    """Train epoch ``epoch``, validate when due, keep the best, checkpoint, log. Returns its metrics."""
    _seed_augmentation(run.train_ds, run.seed * 100003 + epoch)
    try:
        metrics = train_one_epoch(state, run.loader, run.config)
        _check_finite_weights(state.model)
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(
            f"fold {run.fold}, epoch {epoch}: {exc}; the fold was stopped and this epoch was not "
            f"checkpointed. Lower learning_rate (now {run.config.learning_rate:g}) or check the training "
            "images for extreme values"
        ) from None
    result = None
    if epoch % run.config.val_every == 0 or epoch == run.config.epochs:
        result = validate(state.model, run.val_cases, run.labels, run.inference)
        metrics.update(val_dice=result.mean_dice, **{f"val_dice_{k}": v for k, v in result.per_label.items()})
    state.epoch = epoch
    if result is not None and result.mean_dice > state.best_dice:
        _keep_best(state, result, run.work, run.val_cases[0] if run.val_cases else None, run.plan)
    save_checkpoint(run.work / LAST, training_checkpoint(state))
    run.tracker.log_metrics(metrics, step=epoch)
    _append_epoch_log(run.work, epoch, metrics)
    return metrics


def _check_finite_weights(model: nn.Module) -> None:
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        raise TrainingDivergedError(f"{len(bad)} weight tensor(s) became NaN/Inf (first: {bad[0]})")


def _seed_augmentation(dataset: Dataset, seed: int) -> None:
    """Reseed every random transform per epoch, so a resumed run draws the same augmentations."""
    transform: Any = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed % (2**32))


def _keep_best(
    state: TrainingState, result: ValidationResult, work: Path, qc_case: ValidationCase | None, plan: Plan
) -> None:
    state.best_dice, state.best_epoch, state.best_per_label = (
        result.mean_dice,
        state.epoch,
        dict(result.per_label),
    )
    weights = state.model.state_dict()
    best = {
        "model": weights,
        "epoch": state.epoch,
        "val_dice": result.mean_dice,
        "per_label": result.per_label,
    }
    save_checkpoint(work / BEST, best)
    if qc_case is not None and result.first_prediction is not None:
        _write_qc(qc_case, result.first_prediction, work / QC_PICTURE, plan, state.epoch)


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


def _finish(
    state: TrainingState,
    data: FoldData,
    work: Path,
    tracker: Tracker,
    oof: tuple[OofDice, str, dict[str, float]],
) -> FoldResult:
    if (work / BEST).is_file():
        tracker.log_artifact(work / BEST, "checkpoints")
    if (work / QC_PICTURE).is_file():
        tracker.log_artifact(work / QC_PICTURE, "qc")
    tracker.log_metrics({"best_val_dice": state.best_dice, "best_epoch": state.best_epoch}, step=state.epoch)
    logger.info("fold %d: best mean Dice %.4f at epoch %d", data.fold, state.best_dice, state.best_epoch)
    best = str(work / BEST)
    return FoldResult(
        data.fold,
        state.best_dice,
        state.best_epoch,
        state.best_per_label,
        state.epoch,
        best,
        tracker.run_id,
        *oof,
    )
