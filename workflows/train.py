"""``medseg train``: plan, split, train K folds (in-process or on Dask), track in MLflow, register.

Work folder (``--out``; default ``./medseg_work/<DATA folder name>`` under the current folder, or
``$MEDSEG_WORK/<DATA folder name>`` when ``MEDSEG_WORK`` is set; printed on the first line)::

    plan.json  splits.json  cv_state.json (MLflow run ids, for --resume)  cv_results.json
    cache/ (PersistentDataset, when cache: disk)   fold_0/ fold_1/ ... (see pipeline.training.trainer)

The ``--config`` YAML is parsed in :mod:`workflows.train_config`; the folds run (in-process or on
Dask) and are summarised in :mod:`workflows.train_folds`. :func:`run_train` is the whole job after the
flags are read, for callers that build a :class:`CrossValidationJob` themselves (the demo).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.bundle import ModelBundleError
from pipeline.inference.postprocessing import LARGEST_COMPONENT, check_postprocessing_labels
from pipeline.tracking import (
    NullTracker,
    Tracker,
    check_tracking_reachable,
    code_version,
    end_run_status,
    end_runs_quietly,
    tracking_uri,
)
from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData
from pipeline.training.trainer import FoldResult, TrainingDivergedError
from preprocessing.atomic import write_text_atomic
from preprocessing.errors import DatasetError
from preprocessing.fingerprint import fingerprint_dataset
from preprocessing.msd import MsdDataset, read_msd_dataset
from preprocessing.plan import (
    NetworkGeometry,
    Plan,
    PlanConfig,
    make_plan,
    read_plan,
    write_plan,
)
from preprocessing.splits import load_or_make_splits
from preprocessing.transforms import case_to_item
from workflows.exit_codes import EXIT_BAD_ARGS, EXIT_OK, EXIT_TRACKING_UNREACHABLE
from workflows.train_config import load_config_file
from workflows.train_folds import (
    FoldTask,
    calibration_lines,
    calibration_summary,
    postprocessing_lines,
    run_fold_tasks,
    summarize_folds,
)

logger = logging.getLogger(__name__)

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
    # Forced post-processing from --config ({} = decide every label on the out-of-fold Dice).
    postprocessing: dict[str, Any] = field(default_factory=dict)


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
    if train_cfg.epochs < 1:
        raise ValueError(f"--epochs (or epochs: in --config) must be at least 1; got {train_cfg.epochs}")
    if args.folds < 2:
        raise ValueError(
            f"--folds must be at least 2 (got {args.folds}): each fold validates on cases the other folds "
            "train on. Use --folds 2 or more; --fold I then trains only fold I"
        )
    if args.fold is not None and not 0 <= args.fold < args.folds:
        raise ValueError(f"--fold {args.fold} is outside 0..{args.folds - 1}")
    folds = (args.fold,) if args.fold is not None else tuple(range(args.folds))
    work = Path(args.out) if args.out else default_work_dir(data)
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
        postprocessing=post,
    )


def default_work_dir(data: Path) -> Path:
    """``$MEDSEG_WORK/<dataset folder name>``, else ``./medseg_work/<dataset folder name>``.

    Never next to the dataset: a dataset on a read-only or shared folder would fail there or
    collide with another user's run.
    """
    base = Path(os.environ["MEDSEG_WORK"]) if os.environ.get("MEDSEG_WORK") else Path.cwd() / "medseg_work"
    return base / data.resolve().name


def train_command(args: argparse.Namespace) -> int:
    """Entry point of ``medseg train``: :func:`run_train` of the job the flags describe.

    Raises:
        ValueError, FileNotFoundError: bad arguments (exit code 2 at the CLI).
    """
    return run_train(build_job(args))


def run_train(job: CrossValidationJob) -> int:
    """Read and check the dataset, run the job's cross-validation, register. Returns the exit code.

    Exit codes: 0 ok; 2 bad dataset (checked before any training: unreadable or truncated files,
    NaN/Inf voxels, bad labels, too few cases for the folds, post-processing labels not in the
    dataset) or a fold whose loss or weights became NaN/Inf (nothing is registered; the MLflow runs
    end FAILED); 4 MLflow unreachable (results in the work folder, not logged).
    """
    print(f"medseg train: work folder {job.work_dir.resolve()}", flush=True)
    try:
        dataset = read_msd_dataset(job.data)
        check_enough_cases(dataset, job.num_folds)
    except DatasetError as exc:
        print(f"medseg train: dataset error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    try:
        check_postprocessing_labels(job.postprocessing, dataset.foreground_labels.values())
    except ValueError as exc:  # the message the CLI prints for any bad argument
        print(f"medseg train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    try:
        return run_cross_validation(job, dataset)
    except DatasetError as exc:
        print(f"medseg train: dataset error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except (TrainingDivergedError, ModelBundleError) as exc:
        print(f"medseg train: error: {exc}; no model was registered", file=sys.stderr)
        return EXIT_BAD_ARGS


def check_enough_cases(dataset: MsdDataset, num_folds: int) -> None:
    """Refuse, before any work, a dataset with too few patients (or cases) for ``num_folds`` folds.

    Raises:
        DatasetError: saying how many there are and what to do.
    """
    groups = {c.patient_id or f"case:{c.case_id}" for c in dataset.cases}
    n = len(groups)
    unit = "patient(s)" if any(c.patient_id for c in dataset.cases) else "case(s)"
    if n < 2:
        raise DatasetError(
            f"{dataset.root}: {n} training {unit}; cross-validation needs at least 2 (each fold validates "
            "on cases the others train on): add training cases to imagesTr/ and labelsTr/"
        )
    if n < num_folds:
        raise DatasetError(
            f"{dataset.root}: {n} training {unit} cannot fill --folds {num_folds}; "
            f"use --folds {n} or fewer (at least 2), or add training cases"
        )


def prepare_plan(job: CrossValidationJob, dataset: MsdDataset) -> Plan:
    """Fingerprint + plan (reusing ``plan.json`` on --resume so a resumed fold keeps its geometry).

    The network's geometry follows the plan (``networks.geometry_options``: e.g. unet's strides from
    the patch and spacing, unetr's ``img_size`` = the patch), under the user's ``network_options``;
    ``make_plan`` resolves patch and topology together and stores the options in ``plan.json``.
    """
    path = job.work_dir / "plan.json"
    if job.resume and path.is_file():
        logger.info("resume: reusing %s", path)
        return read_plan(path)
    config = job.plan_config
    geometry = network_geometry(job.network, config.network_options)
    fingerprint = fingerprint_dataset(
        dataset, foreground_samples_per_case=config.foreground_samples_per_case, seed=config.seed
    )
    plan = make_plan(fingerprint, job.network, config, geometry)
    write_plan(plan, path)
    return plan


def network_geometry(network: str, explicit: dict[str, Any]) -> NetworkGeometry:
    """``make_plan``'s geometry for ``network``: plan-derived options under ``explicit``, and their divisor."""
    from networks import geometry_options, required_divisor

    def geometry(
        patch: tuple[int, int, int], spacing: tuple[float, float, float]
    ) -> tuple[dict[str, Any], tuple[int, int, int]]:
        options = geometry_options(network, patch, spacing, explicit)
        return options, required_divisor(network, **options)

    return geometry


def run_cross_validation(job: CrossValidationJob, dataset: MsdDataset) -> int:
    """Plan, split, train the job's folds, log everything, optionally register. Returns the exit code.

    Any failure ends the MLflow runs still running (the parent and unfinished folds) as ``FAILED``,
    or ``KILLED`` for Ctrl-C, and re-raises.
    """
    runs: list[Tracker] = []
    try:
        return _run_cross_validation(job, dataset, runs)
    except BaseException as exc:
        end_runs_quietly(runs[1:] + runs[:1], end_run_status(exc))  # folds first, then the parent
        raise


def _run_cross_validation(job: CrossValidationJob, dataset: MsdDataset, runs: list[Tracker]) -> int:
    """:func:`run_cross_validation`'s work; appends the runs it opens to ``runs`` (parent first)."""
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
    runs += [parent, *fold_trackers.values()]
    print(f"plan: spacing {plan.spacing_mm} mm, patch {plan.patch_size}, batch {plan.batch_size}")
    if not problem:
        print(f"MLflow: {tracking_uri()} experiment '{job.experiment}', run {parent.run_id}")
    by_id = {c.case_id: c for c in dataset.cases}
    fold_data = [_fold_data(f, splits[f], by_id) for f in job.folds]
    results = _train_folds(job, plan, fold_data, fold_trackers)
    summary = {**summarize_folds(results, plan, job.postprocessing), **calibration_summary(results)}
    write_text_atomic(job.work_dir / "cv_results.json", json.dumps(summary, indent=2))
    parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, step=0)
    print(
        f"cross-validation ({len(results)} fold(s)): mean Dice {summary['cv_mean_dice']:.4f} "
        f"+/- {summary['cv_std_dice']:.4f}"
    )
    for line in [*postprocessing_lines(summary), *calibration_lines(summary)]:
        print(line)
    if job.register:
        _register(job.register, job.work_dir, plan, results, summary, parent, dataset)
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
        "postprocessing": {
            LARGEST_COMPONENT: job.postprocessing.get(
                LARGEST_COMPONENT, "decided per label on out-of-fold Dice"
            )
        },
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
    return run_fold_tasks(tasks, job.scheduler, job.parallel_folds)


def _register(
    name: str,
    work_dir: Path,
    plan: Plan,
    results: list[FoldResult],
    summary: dict,
    parent: Tracker,
    dataset: MsdDataset,
) -> None:
    """Bundle the folds' best checkpoints, calibration and QC reference (the training cases measured,
    with the out-of-fold uncertainty scores) and register them as ``name`` (saved in the work folder
    instead when MLflow is unreachable)."""
    from pipeline.bundle import bundle_from_checkpoints, save_bundle
    from pipeline.tracking_registry import register_bundle
    from pipeline.training.out_of_fold import qc_reference_for

    scores = [s for r in sorted(results, key=lambda r: r.fold) for s in r.oof_uncertainty.values()]

    bundle = bundle_from_checkpoints(
        plan,
        [r.best_checkpoint for r in sorted(results, key=lambda r: r.fold)],
        postprocessing=summary["postprocessing"],
        cv_mean_dice=summary["cv_mean_dice"],
        calibration=summary["calibration"],
        qc_reference=qc_reference_for(dataset.cases, dataset.foreground_labels, scores),
    )
    if isinstance(parent, NullTracker):
        path = work_dir / "bundle"
        save_bundle(bundle, path)
        print(f"MLflow unreachable: model bundle saved to {path}, not registered")
        return
    info = register_bundle(bundle, parent, name, summary["cv_mean_dice"])
    status = "now champion" if info.is_champion else f"champion stays version {info.champion_version}"
    print(f"registered {name} version {info.version} (cv_mean_dice {summary['cv_mean_dice']:.4f}); {status}")
