"""The folds of ``medseg train``: run them (in this process or as Dask tasks) and summarise them.

:func:`run_fold_tasks` trains :class:`FoldTask`\\ s one after the other, or on a Dask cluster when a
scheduler address or more than one parallel fold is asked for; :func:`summarize_folds` turns the
folds' results into the cross-validation summary and the per-label post-processing decision.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.inference.postprocessing import LARGEST_COMPONENT, decide_largest_component
from pipeline.tracking import Tracker, end_run_status, end_runs_quietly
from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData
from pipeline.training.out_of_fold import calibrate_folds
from pipeline.training.trainer import FoldResult, train_fold
from preprocessing.plan import Plan


@dataclass(frozen=True)
class FoldTask:
    """One fold as a picklable unit of work (a Dask task)."""

    data: FoldData
    plan: Plan
    config: TrainConfig
    work_dir: str
    tracker: Tracker
    resume: bool


def run_fold_task(task: FoldTask) -> FoldResult:
    """Train one fold (top-level so Dask workers can import it); ends the fold's run."""
    try:
        result = train_fold(task.data, task.plan, task.config, task.work_dir, task.tracker, task.resume)
    except BaseException as exc:  # FAILED for an error, KILLED for Ctrl-C
        end_runs_quietly([task.tracker], end_run_status(exc))
        raise
    task.tracker.end()
    return result


def run_fold_tasks(
    tasks: list[FoldTask], scheduler: str | None = None, parallel_folds: int | None = None
) -> list[FoldResult]:
    """Train ``tasks`` in this process, or on Dask when ``scheduler`` is given or ``parallel_folds > 1``.

    Args:
        tasks: the folds to train.
        scheduler: address of an existing Dask scheduler (``--scheduler``), else a local cluster.
        parallel_folds: local Dask workers (``--parallel-folds``); ``None`` = one per fold.
    """
    if scheduler or (parallel_folds and parallel_folds > 1 and len(tasks) > 1):
        return _run_on_dask(tasks, scheduler, parallel_folds)
    return [run_fold_task(t) for t in tasks]


def _run_on_dask(
    tasks: list[FoldTask], scheduler: str | None, parallel_folds: int | None
) -> list[FoldResult]:
    from workflows.cluster import dask_client

    gpu = any(t.config.device.startswith("cuda") for t in tasks)
    resources: dict[str, float] | None = {"GPU": 1} if gpu else None
    workers = parallel_folds or len(tasks)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    tasks = [
        replace(t, config=replace(t.config, torch_threads=t.config.torch_threads or threads)) for t in tasks
    ]
    with dask_client(workers, scheduler, resources=resources) as client:
        futures = [
            client.submit(
                run_fold_task,
                t,
                key=f"medseg-train-fold-{t.data.fold}-{os.getpid()}",
                pure=False,
                resources=resources,
            )
            for t in tasks
        ]
        return list(client.gather(futures))


def summarize_folds(
    results: list[FoldResult], plan: Plan, postprocessing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Cross-validation summary and the per-label post-processing decision.

    Keys: ``cv_mean_dice``, ``cv_std_dice``, ``cv_dice_<label>`` (means over folds); per label the
    mean out-of-fold Dice ``oof_dice_<label>`` and ``oof_dice_largest_component_<label>`` and the
    decision ``largest_component_<label>`` (1.0 on, 0.0 off); ``postprocessing`` (what goes into
    ``bundle.json``, see :mod:`pipeline.inference.postprocessing`); ``folds`` (per-fold rows).

    Args:
        results: the folds' outcomes (their ``oof_dice`` pooled over folds).
        plan: supplies the label names.
        postprocessing: forced settings of ``--config`` (``CrossValidationJob.postprocessing``).
    """
    dice = np.array([r.best_dice for r in results], dtype=np.float64)
    out: dict[str, Any] = {"cv_mean_dice": float(dice.mean()), "cv_std_dice": float(dice.std())}
    names = [v for k, v in sorted(plan.labels.items()) if k != 0]
    for name in names:
        values = [r.per_label.get(name, np.nan) for r in results]
        out[f"cv_dice_{name}"] = float(np.nanmean(values))
    oof = {f"fold{r.fold}/{case}": d for r in results for case, d in r.oof_dice.items()}
    decisions = decide_largest_component(oof, names, (postprocessing or {}).get(LARGEST_COMPONENT))
    for name, d in decisions.items():
        if d["oof_cases"]:
            out[f"oof_dice_{name}"] = float(d["oof_dice_without"])
            out[f"oof_dice_largest_component_{name}"] = float(d["oof_dice_with"])
        out[f"largest_component_{name}"] = 1.0 if d["apply"] else 0.0
    out["postprocessing"] = {LARGEST_COMPONENT: decisions}
    out["folds"] = [asdict(r) for r in results]
    return out


def calibration_summary(results: list[FoldResult]) -> dict[str, Any]:
    """The temperature fitted on the folds' pooled out-of-fold voxels, for the summary.

    Keys: ``calibration`` (the bundle's dict, ``{}`` without out-of-fold voxels) and, when
    calibrated, ``temperature``, ``ece_before``, ``ece_after`` (parent-run metrics).
    """
    calibration = calibrate_folds([r.calibration_samples for r in sorted(results, key=lambda r: r.fold)])
    metrics = {
        k: float(calibration[k]) for k in ("temperature", "ece_before", "ece_after") if k in calibration
    }
    return {"calibration": calibration, **metrics}


def calibration_lines(summary: dict[str, Any]) -> list[str]:
    """One printable line: the temperature and the ECE before and after (or why there is none)."""
    c = summary.get("calibration") or {}
    if not c:
        return ["calibration: none (no out-of-fold voxels); temperature 1.0"]
    return [
        f"calibration: temperature {c['temperature']:.4f}; ECE ({c['bins']} bins, {c['voxels']} out-of-fold "
        f"voxels) {c['ece_before']:.4f} before, {c['ece_after']:.4f} after"
    ]


def postprocessing_lines(summary: dict[str, Any]) -> list[str]:
    """One printable line per label: the largest-component decision and its out-of-fold Dice."""
    lines = []
    for name, d in summary["postprocessing"][LARGEST_COMPONENT].items():
        state = "on" if d["apply"] else "off"
        if d["oof_cases"]:
            dice = (
                f"out-of-fold Dice {d['oof_dice_without']:.4f} without, {d['oof_dice_with']:.4f} with "
                f"({d['oof_cases']} cases)"
            )
        else:
            dice = "no out-of-fold cases"
        why = {"oof": "", "forced": ", forced by --config", "default": ", default"}[d["decided_by"]]
        lines.append(f"largest component {name}: {state}{why}; {dice}")
    return lines
