"""``medseg train``: plan, split, train K folds (in-process or on Dask), track in MLflow, register.

Work folder (``--out``; default ``./medseg_work/<DATA folder name>`` under the current folder, or
``$MEDSEG_WORK/<DATA folder name>`` when ``MEDSEG_WORK`` is set; printed on the first line)::

    plan.json  splits.json  cv_state.json (MLflow run ids, for --resume)  cv_results.json
    cache/ (PersistentDataset, when cache: disk)   fold_0/ fold_1/ ... (see pipeline.training.trainer)

The YAML of ``--config`` is parsed here and nowhere else. It is a flat mapping of
:class:`~preprocessing.plan.PlanConfig` and :class:`~pipeline.training.trainer.TrainConfig` field names
(optionally grouped under ``plan:`` and ``train:``; ``augment:`` is a nested mapping of
:class:`~preprocessing.transforms.AugmentConfig`; ``postprocessing:`` forces the largest-component
decision, see :mod:`pipeline.inference.postprocessing`), e.g.::

    network_options: {channels: [8, 16, 32], strides: [1, 2, 2]}
    optimizer: adamw
    learning_rate: 0.003
    val_every: 5
    augment: {mirror: false}
    postprocessing: {largest_component: {liver: true}}

An unknown key at any level is an error naming the valid ones (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.bundle import ModelBundleError
from pipeline.inference.postprocessing import (
    LARGEST_COMPONENT,
    check_postprocessing_labels,
    decide_largest_component,
    parse_postprocessing_config,
)
from pipeline.tracking import (
    NullTracker,
    Tracker,
    check_tracking_reachable,
    code_version,
    end_run_status,
    end_runs_quietly,
    tracking_uri,
)
from pipeline.training.data import FoldData
from pipeline.training.trainer import FoldResult, TrainConfig, TrainingDivergedError, train_fold
from preprocessing.atomic import write_text_atomic
from preprocessing.errors import DatasetError
from preprocessing.msd import MsdDataset, read_msd_dataset
from preprocessing.plan import (
    NetworkGeometry,
    Plan,
    PlanConfig,
    fingerprint_dataset,
    make_plan,
    read_plan,
    with_overrides,
    write_plan,
)
from preprocessing.splits import load_or_make_splits
from preprocessing.transforms import AugmentConfig, case_to_item

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
    # Forced post-processing from --config ({} = decide every label on the out-of-fold Dice).
    postprocessing: dict[str, Any] = field(default_factory=dict)


SECTIONS = ("plan", "train", "postprocessing")


def load_config_file(
    path: str | Path | None, plan: PlanConfig, train: TrainConfig
) -> tuple[PlanConfig, TrainConfig, dict[str, Any]]:
    """Apply a YAML file's overrides. Returns the configs and the forced ``postprocessing``.

    Keys may sit at the top level or under ``plan:`` / ``train:``; ``augment:`` and
    ``postprocessing:`` are nested mappings. Per-label ``postprocessing`` names are checked
    against the dataset later (:func:`~pipeline.inference.postprocessing.check_postprocessing_labels`).

    Raises:
        ValueError: unknown keys at any level, a section that is not a mapping, or a file that is
            not a mapping (exit code 2 at the CLI); the message names the valid keys.
    """
    if path is None:
        return plan, train, {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    plan_fields, train_fields = set(PlanConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    unknown = sorted(str(k) for k in raw if k not in plan_fields | train_fields | set(SECTIONS))
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {unknown}; valid keys: the sections {list(SECTIONS)}, "
            f"plan settings {sorted(plan_fields)}, training settings {sorted(train_fields)}"
        )
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    # A top-level key of both configs (``seed``) sets both; a section's key sets only its own.
    plan_keys = {**{k: v for k, v in top.items() if k in plan_fields}, **_section(raw, "plan", plan_fields, path)}
    flat = {**{k: v for k, v in top.items() if k in train_fields}, **_section(raw, "train", train_fields, path)}
    post = parse_postprocessing_config(raw.get("postprocessing"), str(path))
    if "augment" in flat:
        augment_fields = set(AugmentConfig.__dataclass_fields__)
        augment = flat["augment"] or {}
        if not isinstance(augment, dict):
            raise ValueError(f"{path}: 'augment' must be a mapping of {sorted(augment_fields)}")
        bad = sorted(str(k) for k in set(augment) - augment_fields)
        if bad:
            raise ValueError(f"{path}: unknown augment settings {bad}; valid: {sorted(augment_fields)}")
        flat["augment"] = replace(train.augment, **augment)
    return with_overrides(plan, plan_keys), replace(train, **flat), post


def _section(raw: dict[str, Any], name: str, valid: set[str], path: str | Path) -> dict[str, Any]:
    """The ``plan:`` or ``train:`` mapping of a config, its keys checked against ``valid``."""
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: '{name}' must be a mapping of {name} settings {sorted(valid)}")
    bad = sorted(str(k) for k in set(section) - valid)
    if bad:
        raise ValueError(f"{path}: unknown {name} settings {bad}; valid: {sorted(valid)}")
    return dict(section)


def config_help() -> str:
    """Plain-text list of the ``--config`` keys (the epilog of ``medseg train --help``)."""
    lines = [
        "--config FILE is a YAML mapping; keys go at the top level or under 'plan:' / 'train:'.",
        "Unknown keys at any level are an error (exit code 2).",
    ]
    for title, cls in (
        ("plan settings", PlanConfig),
        ("training settings", TrainConfig),
        ("augment: {...} settings", AugmentConfig),
    ):
        lines += ["", f"{title}:"] + [f"  {line}" for line in _field_lines(cls)]
    lines += [
        "",
        "postprocessing: {...} settings:",
        f"  {LARGEST_COMPONENT}: true | false | {{LABEL: true|false, ...}}",
        "      force keeping only the largest connected component, for every label or per label",
        "      name; default: decided per label on the out-of-fold Dice of the cross-validation",
        "      (on only where it raises that label's Dice), recorded in the bundle's bundle.json",
    ]
    return "\n".join(lines)


def _field_lines(cls: type) -> list[str]:
    """``name (default: x): description`` per dataclass field; descriptions from the docstring."""
    described: dict[str, str] = {}
    current: list[str] = []
    for line in (cls.__doc__ or "").split("Attributes:", 1)[-1].splitlines():
        head, sep, text = line.strip().partition(": ")
        names = [n.strip() for n in head.replace(",", "/").split("/")]
        if sep and len(line) - len(line.lstrip()) <= 8 and all(n.isidentifier() for n in names):
            current = [n for n in names if n not in described]
            for n in current:
                described[n] = text.strip()
        elif line.strip() and current:  # continuation of the entry above
            for n in current:
                described[n] += " " + line.strip()
    out = []
    for f in fields(cls):
        if f.name == "augment":
            default = "see augment settings"
        elif f.default is not MISSING:
            default = repr(f.default)
        else:
            default = repr(f.default_factory()) if f.default_factory is not MISSING else "required"
        desc = described.get(f.name, "").replace("``", "")
        text = f"{f.name} (default: {default})" + (f": {desc}" if desc else "")
        out += textwrap.wrap(text, width=96, subsequent_indent="    ")
    return out


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
    """Entry point of ``medseg train``.

    Exit codes: 0 ok; 2 bad arguments or dataset (checked before any training: unreadable or
    truncated files, NaN/Inf voxels, bad labels, too few cases for the folds) or a fold whose loss
    or weights became NaN/Inf (nothing is registered; the MLflow runs end FAILED); 4 MLflow unreachable.
    """
    job = build_job(args)
    print(f"medseg train: work folder {job.work_dir.resolve()}", flush=True)
    try:
        dataset = read_msd_dataset(job.data)
        check_enough_cases(dataset, job.num_folds)
    except DatasetError as exc:
        print(f"medseg train: dataset error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    check_postprocessing_labels(job.postprocessing, dataset.foreground_labels.values())  # ValueError: exit 2
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
    plan = make_plan(fingerprint_dataset(dataset, config), job.network, config, geometry)
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
    summary = summarize_folds(results, plan, job.postprocessing)
    write_text_atomic(job.work_dir / "cv_results.json", json.dumps(summary, indent=2))
    parent.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)}, step=0)
    print(
        f"cross-validation ({len(results)} fold(s)): mean Dice {summary['cv_mean_dice']:.4f} "
        f"+/- {summary['cv_std_dice']:.4f}"
    )
    for line in postprocessing_lines(summary):
        print(line)
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
        "postprocessing": {
            LARGEST_COMPONENT: job.postprocessing.get(LARGEST_COMPONENT, "decided per label on out-of-fold Dice")
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
    except BaseException as exc:  # FAILED for an error, KILLED for Ctrl-C
        end_runs_quietly([task.tracker], end_run_status(exc))
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


def _register(
    job: CrossValidationJob, plan: Plan, results: list[FoldResult], summary: dict, parent: Tracker
) -> None:
    from pipeline.bundle import bundle_from_checkpoints, register_bundle

    bundle = bundle_from_checkpoints(
        plan,
        [r.best_checkpoint for r in sorted(results, key=lambda r: r.fold)],
        postprocessing=summary["postprocessing"],
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
