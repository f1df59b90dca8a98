"""``medseg train``: plan, split, train K folds (in-process or on Dask), track in MLflow, register.

Work folder (``--out``, default ``DATA/../medseg_work``)::

    plan.json  splits.json  cv_state.json (MLflow run ids, for --resume)  cv_results.json
    cache/ (PersistentDataset, when cache: disk)   fold_0/ fold_1/ ... (see pipeline.trainer)

The YAML of ``--config`` is parsed here and nowhere else. It is a flat mapping of
:class:`~preprocessing.plan.PlanConfig` and :class:`~pipeline.trainer.TrainConfig` field names
(``augment:`` is a nested mapping of :class:`~preprocessing.transforms.AugmentConfig`), e.g.::

    network_options: {channels: [8, 16, 32], strides: [1, 2, 2]}
    optimizer: adamw
    learning_rate: 0.003
    val_every: 5
    augment: {mirror: false}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.tracking import NullTracker, Tracker, check_tracking_reachable, code_version, tracking_uri
from pipeline.trainer import FoldResult, TrainConfig, train_fold
from pipeline.training_data import FoldData
from preprocessing.atomic import write_text_atomic
from preprocessing.errors import DatasetError
from preprocessing.msd import MsdDataset, read_msd_dataset
from preprocessing.plan import (
    Plan,
    PlanConfig,
    fingerprint_dataset,
    make_plan,
    read_plan,
    with_overrides,
    write_plan,
)
from preprocessing.splits import load_or_make_splits
from preprocessing.transforms import case_to_item

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_ARGS, EXIT_TRACKING_UNREACHABLE = 0, 2, 4
STATE = "cv_state.json"


@dataclass(frozen=True)
class CrossValidationJob:
    """Everything one ``medseg train`` invocation does (built from the CLI flags + YAML)."""

    data: Path
    network: str
    num_folds: int
    folds: tuple[int, ...]
    work_dir: Path
    experiment: str
    plan_config: PlanConfig
    train_config: TrainConfig
    register: str | None = None
    resume: bool = False
    scheduler: str | None = None
    parallel_folds: int | None = None
    postprocessing: tuple[tuple[str, Any], ...] = (("largest_component", True),)


def load_config_file(
    path: str | Path | None, plan: PlanConfig, train: TrainConfig
) -> tuple[PlanConfig, TrainConfig, dict]:
    """Apply a YAML file's overrides. Returns the configs and the ``postprocessing`` mapping.

    Raises:
        ValueError: unknown keys or a file that is not a mapping (exit code 2 at the CLI).
    """
    if path is None:
        return plan, train, {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    flat = {**raw.pop("plan", {}), **raw.pop("train", {}), **raw}
    post = flat.pop("postprocessing", {}) or {}
    plan_keys = {k: flat.pop(k) for k in list(flat) if k in PlanConfig.__dataclass_fields__}
    train_fields = TrainConfig.__dataclass_fields__
    unknown = sorted(set(flat) - set(train_fields))
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {unknown}; plan settings: {sorted(PlanConfig.__dataclass_fields__)}, "
            f"training settings: {sorted(train_fields)}"
        )
    if "augment" in flat:
        augment_fields = type(train.augment).__dataclass_fields__
        bad = sorted(set(flat["augment"] or {}) - set(augment_fields))
        if bad:
            raise ValueError(f"{path}: unknown augment settings {bad}; valid: {sorted(augment_fields)}")
        flat["augment"] = replace(train.augment, **(flat["augment"] or {}))
    return with_overrides(plan, plan_keys), replace(train, **flat), dict(post)


def build_job(args: argparse.Namespace) -> CrossValidationJob:
    """CLI flags (+ ``--config``) -> job. Raises ValueError/FileNotFoundError for bad arguments."""
    import torch

    from networks import available_networks

    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder")
    if args.network not in available_networks():
        raise ValueError(f"unknown --network {args.network!r}; choose from {sorted(available_networks())}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    plan_cfg, train_cfg, post = load_config_file(
        args.config, PlanConfig(), TrainConfig(epochs=args.epochs, device=device)
    )
    if args.epochs != 100 or args.config is None:  # an explicit --epochs beats the YAML
        train_cfg = replace(train_cfg, epochs=args.epochs)
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2 (got {args.folds})")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold {args.fold} is outside 0..{args.folds - 1}")
    folds = (args.fold,) if args.fold is not None else tuple(range(args.folds))
    work = Path(args.out) if args.out else data.resolve().parent / "medseg_work"
    return CrossValidationJob(
        data=data,
        network=args.network,
        num_folds=args.folds,
        folds=folds,
        work_dir=work,
        experiment=args.experiment,
        plan_config=plan_cfg,
        train_config=train_cfg,
        register=args.register,
        resume=bool(args.resume),
        scheduler=args.scheduler,
        parallel_folds=args.parallel_folds,
        postprocessing=tuple(sorted({"largest_component": True, **post}.items())),
    )


def train_command(args: argparse.Namespace) -> int:
    """Entry point of ``medseg train`` (exit codes: 0 ok, 2 bad dataset/arguments, 4 MLflow unreachable)."""
    job = build_job(args)
    try:
        dataset = read_msd_dataset(job.data)
    except DatasetError as exc:
        print(f"medseg train: dataset error: {exc}")
        return EXIT_BAD_ARGS
    try:
        return run_cross_validation(job, dataset)
    except DatasetError as exc:
        print(f"medseg train: dataset error: {exc}")
        return EXIT_BAD_ARGS


def prepare_plan(job: CrossValidationJob, dataset: MsdDataset) -> Plan:
    """Fingerprint + plan (reusing ``plan.json`` on --resume so a resumed fold keeps its geometry)."""
    from networks import required_divisor

    path = job.work_dir / "plan.json"
    if job.resume and path.is_file():
        logger.info("resume: reusing %s", path)
        return read_plan(path)
    config = job.plan_config
    if config.divisor is None:
        config = replace(config, divisor=required_divisor(job.network, **config.network_options))
    plan = make_plan(fingerprint_dataset(dataset, config), job.network, config)
    write_plan(plan, path)
    return plan


def run_cross_validation(job: CrossValidationJob, dataset: MsdDataset) -> int:
    """Plan, split, train the job's folds, log everything, optionally register. Returns the exit code."""
    job.work_dir.mkdir(parents=True, exist_ok=True)
    plan = prepare_plan(job, dataset)
    groups = {c.case_id: c.patient_id for c in dataset.cases}
    splits = load_or_make_splits(
        job.work_dir / "splits.json",
        [c.case_id for c in dataset.cases],
        job.num_folds,
        job.train_config.seed,
        groups,
    )
    problem = check_tracking_reachable(tracking_uri())
    parent, fold_trackers = _open_runs(job, plan, problem)
    print(
        f"plan: spacing {plan.spacing_mm} mm, patch {plan.patch_size}, batch {plan.batch_size}; "
        f"work folder {job.work_dir}"
    )
    if not problem:
        print(f"MLflow: {tracking_uri()} experiment '{job.experiment}', run {parent.run_id}")
    by_id = {c.case_id: c for c in dataset.cases}
    fold_data = [_fold_data(f, splits[f], by_id) for f in job.folds]
    try:
        results = _train_folds(job, plan, fold_data, fold_trackers)
    except BaseException:
        for t in [parent, *fold_trackers.values()]:
            t.end("KILLED")
        raise
    summary = summarize_folds(results, plan)
    write_text_atomic(job.work_dir / "cv_results.json", json.dumps(summary, indent=2))
    parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, step=0)
    print(
        f"cross-validation ({len(results)} fold(s)): mean Dice {summary['cv_mean_dice']:.4f} "
        f"+/- {summary['cv_std_dice']:.4f}"
    )
    if job.register:
        _register(job, plan, results, summary, parent)
    parent.end()
    if problem:
        print(
            f"medseg train: WARNING: MLflow at {tracking_uri()} was unreachable ({problem}); "
            f"results are in {job.work_dir} but were not logged"
        )
        return EXIT_TRACKING_UNREACHABLE
    return EXIT_OK


def _fold_data(fold: int, split: dict[str, list[str]], by_id: dict) -> FoldData:
    def items(ids: list[str]) -> tuple[dict[str, Any], ...]:
        return tuple({**case_to_item(by_id[c].image_paths, by_id[c].label_path), "case_id": c} for c in ids)

    return FoldData(fold, items(split["train"]), items(split["val"]))


def _open_runs(job: CrossValidationJob, plan: Plan, problem: str) -> tuple[Tracker, dict[int, Tracker]]:
    """Parent + one child run per fold; reused from ``cv_state.json`` on --resume."""
    if problem:
        return NullTracker(), {f: NullTracker() for f in job.folds}
    root = Tracker(job.experiment)
    state_path = job.work_dir / STATE
    state = json.loads(state_path.read_text()) if (job.resume and state_path.is_file()) else {}
    if state.get("parent_run_id"):
        parent = root.bind(state["parent_run_id"])
    else:
        parent = root.start_run(f"cv-{plan.network}-{job.num_folds}folds", tags={"medseg.job": "train"})
        parent.log_params(_run_params(job, plan))
        parent.log_artifact(job.work_dir / "plan.json")
        parent.log_artifact(job.work_dir / "splits.json")
    children = dict(state.get("fold_run_ids", {}))
    trackers = {}
    for fold in job.folds:
        run_id = children.get(str(fold))
        if run_id:
            trackers[fold] = parent.bind(run_id)
        else:
            trackers[fold] = parent.start_run(f"fold-{fold}", nested=True, tags={"medseg.fold": str(fold)})
            trackers[fold].log_params({"fold": fold, **_run_params(job, plan)})
            children[str(fold)] = trackers[fold].run_id
    write_text_atomic(
        state_path, json.dumps({"parent_run_id": parent.run_id, "fold_run_ids": children}, indent=2)
    )
    return parent, trackers


def _run_params(job: CrossValidationJob, plan: Plan) -> dict[str, Any]:
    return {
        "network": plan.network,
        "network_options": plan.network_options,
        "num_folds": job.num_folds,
        "plan": {k: v for k, v in plan.to_dict().items() if k not in ("network", "network_options")},
        "train": asdict(job.train_config),
        "fingerprint_sha256": plan.fingerprint_sha256,
        "code_version": code_version(),
        "postprocessing": dict(job.postprocessing),
    }


def _train_folds(
    job: CrossValidationJob, plan: Plan, folds: list[FoldData], trackers: dict[int, Tracker]
) -> list[FoldResult]:
    tasks = [
        FoldTask(
            d, plan, job.train_config, str(job.work_dir / f"fold_{d.fold}"), trackers[d.fold], job.resume
        )
        for d in folds
    ]
    if job.scheduler or (job.parallel_folds and job.parallel_folds > 1 and len(tasks) > 1):
        return _train_folds_dask(job, tasks)
    return [run_fold_task(t) for t in tasks]


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
    except BaseException:
        task.tracker.end("KILLED")
        raise
    task.tracker.end()
    return result


def _train_folds_dask(job: CrossValidationJob, tasks: list[FoldTask]) -> list[FoldResult]:
    from workflows.cluster import dask_client

    gpu = job.train_config.device.startswith("cuda")
    resources = {"GPU": 1} if gpu else None
    workers = job.parallel_folds or len(tasks)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    tasks = [
        replace(t, config=replace(t.config, torch_threads=t.config.torch_threads or threads)) for t in tasks
    ]
    with dask_client(workers, job.scheduler, resources=resources) as client:
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


def summarize_folds(results: list[FoldResult], plan: Plan) -> dict[str, Any]:
    """``cv_mean_dice``, ``cv_std_dice``, ``cv_dice_<label>`` (means over folds) and per-fold rows."""
    dice = np.array([r.best_dice for r in results], dtype=np.float64)
    out: dict[str, Any] = {"cv_mean_dice": float(dice.mean()), "cv_std_dice": float(dice.std())}
    for name in (v for k, v in plan.labels.items() if k != 0):
        values = [r.per_label.get(name, np.nan) for r in results]
        out[f"cv_dice_{name}"] = float(np.nanmean(values))
    out["folds"] = [asdict(r) for r in results]
    return out


def _register(
    job: CrossValidationJob, plan: Plan, results: list[FoldResult], summary: dict, parent: Tracker
) -> None:
    from pipeline.bundle import bundle_from_checkpoints, register_bundle

    bundle = bundle_from_checkpoints(
        plan,
        [r.best_checkpoint for r in sorted(results, key=lambda r: r.fold)],
        postprocessing=dict(job.postprocessing),
        cv_mean_dice=summary["cv_mean_dice"],
    )
    if isinstance(parent, NullTracker):
        path = job.work_dir / "bundle"
        from pipeline.bundle import save_bundle

        save_bundle(bundle, path)
        print(f"MLflow unreachable: model bundle saved to {path}, not registered")
        return
    info = register_bundle(bundle, parent, job.register, summary["cv_mean_dice"])
    status = "now champion" if info.is_champion else f"champion stays version {info.champion_version}"
    print(
        f"registered {job.register} version {info.version} (cv_mean_dice {summary['cv_mean_dice']:.4f}); {status}"
    )
