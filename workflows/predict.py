"""``medseg predict``: batch segmentation of a scan folder on a Dask cluster.

Flow: discover cases (headers only) -> skip finished cases (resume) -> one Dask task per case
(``pipeline.case_runner``: read, segment, the writers of ``pipeline.writers.WRITERS``, metrics)
-> typed :class:`~pipeline.case_row.CaseRow` s -> ``cases.csv`` and ``summary.json`` -> one MLflow
run with the summary, the table and the QC pictures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from distributed import Client, as_completed
from tqdm import tqdm

from pipeline.bundle import ModelBundleError, bundle_fingerprint, load_bundle, resolve_bundle_dir
from pipeline.case_folder import case_is_done, clean_staging, read_case_record, remove_empty_staging
from pipeline.case_row import CaseRow, error_kind
from pipeline.case_runner import CaseConfig, read_case, segment_case, write_case
from pipeline.inference.config import inference_config_for
from pipeline.metrics import json_ready, summarize_metrics
from pipeline.report import write_batch_report_or_warn
from pipeline.review import flag_counts, write_review_queue
from pipeline.tracking_batch_run import BatchRun
from pipeline.writers import optional_writers
from pipeline.writers.base import flag_dest
from preprocessing.atomic import write_text_atomic
from preprocessing.discovery import discover_sources
from preprocessing.source_item import SourceItem, row_case_id
from preprocessing.source_tree import printable_text
from workflows.cluster import dask_client, gpu_count
from workflows.exit_codes import EXIT_OK, EXIT_PARTIAL, EXIT_TRACKING_UNREACHABLE
from workflows.predict_tracking import finish_predict_run, open_predict_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """Everything ``medseg predict`` was asked to do (built from CLI flags).

    ``outputs`` names the optional outputs to write besides mask, SEG and QC picture (the
    ``name`` of a writer of :func:`pipeline.writers.optional_writers`, e.g. ``"probabilities"``
    for ``--save-probabilities``).
    """

    source: Path
    model_uri: str
    out_dir: Path
    labels_dir: Path | None = None
    tta: bool = False
    device: str = "cpu"
    overlap: float = 0.5
    outputs: frozenset[str] = frozenset()
    experiment: str = "medseg-predict"
    qc_sample: int | None = None
    workers: int | None = 2
    scheduler: str | None = None
    run_name: str = ""


def predict_command(args: argparse.Namespace) -> int:
    """CLI entry point (``workflows.cli`` has checked the flags, SOURCE and ``--model`` already)."""
    config = _config_from_args(args)
    return run_predict(config)


def _config_from_args(args: argparse.Namespace) -> PredictConfig:
    import torch

    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    labels = Path(args.labels) if args.labels else None
    if labels is not None and not labels.is_dir():
        raise FileNotFoundError(f"--labels folder {labels} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available on this machine")
    return PredictConfig(
        source=source,
        model_uri=args.model,
        out_dir=Path(args.out),
        labels_dir=labels,
        tta=args.tta,
        device=device,
        overlap=args.overlap,
        outputs=frozenset(w.name for w in optional_writers() if getattr(args, flag_dest(w), False)),
        experiment=args.experiment,
        qc_sample=args.qc_sample,
        workers=args.workers,
        scheduler=args.scheduler,
        run_name=getattr(args, "run_name", None) or "",
    )


#: ``medseg predict`` refuses to start when the disk of ``--out`` has less free space than this
#: (100 MiB: a few cases' masks, SEGs and pictures); a full disk would otherwise fail every case.
MIN_FREE_BYTES = 100 * 1024**2


def run_predict(config: PredictConfig) -> int:
    """Run the batch; returns the exit code (0 ok, 3 some cases failed, 4 MLflow unreachable).

    Raises:
        ValueError: (exit 2) before any case runs: ``--out`` unusable (a file, under a file, not
            writable, disk full), the model unusable, or no images found in SOURCE.
    """
    out = config.out_dir
    check_out_dir(out)
    bundle_dir, bundle = _load_model(config)
    items = discover_sources(config.source, exclude=[out])
    if not items:
        raise ValueError(
            f"no images found in SOURCE {config.source}: it holds no DICOM, NIfTI, NRRD or MHA file "
            "(hidden files and the --out folder are not scanned); check the path"
        )
    print(f"{len(items)} case(s) found in {config.source}; model {bundle.name or config.model_uri}")
    out.mkdir(parents=True, exist_ok=True)
    removed = clean_staging(out)
    if removed:
        print(f"removed {removed} unfinished case folder(s) left by an interrupted run")
    # Started now: MLflow shows the batch's true duration (and the run stays RUNNING while it works).
    run = open_predict_run(bundle, bundle_dir, config.out_dir, config.experiment, config.model_uri,
                           config.run_name, _loggable_params(config))
    try:
        try:
            rows = _run_cases(items, bundle_dir, bundle, config, run)
        finally:
            remove_empty_staging(out)
        table, summary = _write_tables(rows, bundle, out)
        write_review_queue(out, rows)
        write_batch_report_or_warn(out, rows, {"name": bundle.name, "version": bundle.version_tag})
    except BaseException as exc:  # Ctrl-C -> KILLED, an error -> FAILED; the progress metrics stay
        if run is not None:
            run.abort(exc)
        raise
    failed = sum(r.status == "error" for r in rows)
    tracked = run is not None and finish_predict_run(run, rows, bundle, (table, summary), config.out_dir, config.qc_sample)
    _print_summary(rows, out)
    if run is not None:
        print("\n".join(run.review_lines()))
    if failed:
        print(f"{failed} case(s) failed; see the 'reason' column of {out / 'cases.csv'}")
        return EXIT_PARTIAL
    if not tracked:
        return EXIT_TRACKING_UNREACHABLE
    return EXIT_OK


def check_out_dir(out: Path, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Refuse an ``--out`` that cannot hold the batch, before any work (``ValueError``: exit 2)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give the path of a folder (it is created)")
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out} lies under {existing}, which is a file; choose a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out {out}: {existing} is not writable by this user; choose a folder you can write to"
        )
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise ValueError(
            f"--out {out}: its disk has {free / 2**20:.0f} MiB free, predict needs at least "
            f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose --out on another disk"
        )


def _load_model(config: PredictConfig):  # noqa: ANN202 (bundle folder, ModelBundle)
    """Resolve, read and check the model before the cluster starts: every fold's weights are loaded
    into its network here, so a corrupt or mismatched weight file is exit 2, not an error per case."""
    try:
        bundle_dir = resolve_bundle_dir(config.model_uri, cache_dir=config.out_dir / ".model")
        bundle = load_bundle(bundle_dir)
        bundle.build_networks("cpu")  # raises ModelBundleError naming a fold that does not fit
    except ModelBundleError as exc:
        raise ValueError(f"--model {config.model_uri}: {exc}") from exc
    return bundle_dir, bundle


def _run_cases(items: list[SourceItem], bundle_dir: Path, bundle, config: PredictConfig,
               run: BatchRun | None = None) -> list[CaseRow]:
    rows: list[CaseRow] = []
    todo: list[SourceItem] = []
    fingerprint = bundle_fingerprint(bundle_dir)
    for item in items:
        if item.status != "ok":
            rows.append(_discovery_row(item))
        elif case_is_done(config.out_dir, item.case_id, fingerprint):
            rows.append(read_case_record(config.out_dir, item.case_id))
        else:
            todo.append(item)
    done_before = len(items) - len(todo) - sum(item.status != "ok" for item in items)
    if done_before:
        print(f"resuming: {done_before} case(s) already finished, {len(todo)} to go")
    stale = sum(case_is_done(config.out_dir, item.case_id) for item in todo)
    if stale:
        print(f"{stale} finished case(s) were made by another model; they will be redone")
    if not todo:
        return rows
    on_gpu = config.device == "cuda"
    # One inference worker per GPU: local GPU workers advertise GPU=1, remote ones are started with
    # `dask worker ... --resources GPU=1` (README), and every segment task asks for one.
    resources = {"GPU": 1} if on_gpu else None
    workers = max(1, gpu_count()) if on_gpu and config.scheduler is None else config.workers
    # A GPU worker gets spare threads so the next case is read and the last one written while the
    # GPU segments (the GPU resource still admits one segment task at a time). CPU workers have
    # one thread each and share this machine's cores through torch's intra-op threads.
    threads_per_worker = GPU_WORKER_THREADS if on_gpu else 1
    torch_threads = (
        None if on_gpu or config.scheduler else max(1, (os.cpu_count() or 1) // max(1, workers or 1))
    )
    case_config = CaseConfig(
        bundle_dir=str(bundle_dir),
        out_dir=str(config.out_dir),
        inference=inference_config_for(
            bundle.plan,
            overlap=config.overlap,
            device=config.device,
            tta=config.tta,
            temperature=bundle.temperature,
        ),
        labels_dir=str(config.labels_dir) if config.labels_dir else None,
        outputs=config.outputs,
        torch_threads=torch_threads,
        model_fingerprint=fingerprint,
    )
    with dask_client(
        workers=workers,
        scheduler=config.scheduler,
        resources=resources,
        threads_per_worker=threads_per_worker,
    ) as client:
        in_flight = max(2, sum(client.nthreads().values()) + 1)
        failures = 0
        with tqdm(total=len(todo), desc="cases", unit="case") as bar:
            for row in run_case_tasks(client, todo, case_config, resources, in_flight):
                rows.append(row)
                failures += row.status == "error"
                bar.set_postfix(failed=failures)
                bar.update(1)
                if run is not None:
                    run.progress(bar.n, failures)
    return rows


#: Threads of a local GPU worker: one segments on the GPU, the others read and write.
GPU_WORKER_THREADS = 3


def run_case_tasks(
    client: Client,
    items: list[SourceItem],
    case_config: CaseConfig,
    resources: dict[str, float] | None,
    in_flight: int,
):
    """Yield each case's :class:`CaseRow` as it finishes; three Dask tasks per case: read -> segment -> write.

    Only the segment task asks for the ``resources`` (the GPU), so Dask runs reads and writes of
    other cases on the worker's other threads meanwhile; the arrays pass between a case's tasks in
    the worker's memory. At most ``in_flight`` cases are submitted at a time (more are added as
    cases finish) so read-ahead cannot fill the workers' memory with volumes waiting for the GPU.
    A case whose task dies with its worker (a crash, an out-of-memory kill) becomes an error row.
    """
    pending = iter(items)

    def submit(item: SourceItem):
        key = item.case_id
        read = client.submit(read_case, item, case_config, key=f"read-{key}", pure=False)
        segment = client.submit(
            segment_case, read, case_config, key=f"segment-{key}", pure=False, resources=resources
        )
        write = client.submit(write_case, segment, case_config, key=f"write-{key}", pure=False)
        owners[write.key] = item
        return write

    owners: dict[str, SourceItem] = {}
    running = as_completed([submit(item) for _, item in zip(range(in_flight), pending, strict=False)])
    for future in running:
        item = owners.pop(future.key)
        try:
            yield future.result()
        except Exception as exc:  # the task's worker died or the task could not be run at all
            logger.debug("case %s: task failed", item.case_id, exc_info=True)
            row = _discovery_row(item)
            row.status, row.reason = "error", f"worker failure: {type(exc).__name__}: {exc}"
            row.reason_code = f"worker_failure:{error_kind(exc)}"
            yield row
        finally:
            future.release()
        nxt = next(pending, None)
        if nxt is not None:
            running.add(submit(nxt))


def _discovery_row(item: SourceItem) -> CaseRow:
    """The row of a case no model touched (a discovery verdict; a worker that died)."""
    source = str(item.paths[0]) if item.paths else ""
    return CaseRow(
        case_id=row_case_id(item),
        source=source,
        kind=item.kind,
        status=item.status,
        reason=item.reason,
        # Discovery's reasons quote paths; the code says only which kind of verdict it was.
        reason_code=f"discovery_{item.status}" if item.status != "ok" else "",
    )


def _write_tables(rows: list[CaseRow], bundle, out: Path) -> tuple[pd.DataFrame, dict]:
    """``cases.csv`` and ``summary.json`` (strict JSON: ``null`` for undefined values).

    Text cells are made printable first: the surrogate-escaped bytes of a file name that is not
    UTF-8 are written as ``\\xNN``, so one odd name cannot cost the batch its tables.

    Returns:
        The table as written to ``cases.csv`` and the summary as written to ``summary.json``.
    """
    front = ["case_id", "source", "status", "reason", "seconds"]
    records = [row.to_record() for row in rows]  # the typed rows become columns here only
    table = pd.DataFrame(printable_rows(records), columns=None if rows else front)
    rest = [c for c in table.columns if c not in front and c != "kind"]
    table = table.reindex(columns=front + rest).sort_values("case_id")
    write_text_atomic(out / "cases.csv", table.to_csv(index=False))
    summary = json_ready(_summary(rows, bundle))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    return table, summary


def printable_rows(rows: list[dict]) -> list[dict]:
    """Rows whose text can be encoded: a surrogate-escaped byte (``\\udce9``) becomes ``\\xe9``."""
    return [{k: printable_text(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def _summary(rows: list[CaseRow], bundle) -> dict:
    """Case counts and per-label statistics of the metrics that were computed (none: no block)."""
    metric_rows = []
    for r in rows:
        if not r.ok:
            continue
        for name in bundle.label_names.values():
            # What the row holds was measured (NaN: undefined, e.g. HD95 of an empty mask).
            entry: dict = {"label": name, **(asdict(r.metrics[name]) if name in r.metrics else {})}
            if name in r.volumes_ml:
                entry["vol_pred_ml"] = r.volumes_ml[name]
            metric_rows.append(entry)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "cases": counts,
        "per_label": summarize_metrics(metric_rows) if metric_rows else {},
        "flags": flag_counts(rows),
    }


def _loggable_params(config: PredictConfig) -> dict:
    """Run parameters safe for MLflow: no paths (they may hold patient names), no UIDs.

    Each optional output is logged under its flag's name (``save_probabilities``: True/False).
    """
    return {
        "tta": config.tta,
        "device": config.device,
        "overlap": config.overlap,
        "with_reference_labels": config.labels_dir is not None,
        **{flag_dest(w): w.name in config.outputs for w in optional_writers()},
    }


def _print_summary(rows: list[CaseRow], out: Path) -> None:
    counts = pd.Series([printable_text(r.status) for r in rows], dtype=object).value_counts().to_dict()
    print(f"cases: {counts}; outputs in {out}")
    flagged = flag_counts(rows)
    if flagged["cases_flagged"]:
        named = {k[len("flag_") :]: n for k, n in flagged.items() if k.startswith("flag_") and n}
        print(f"QC: {flagged['cases_flagged']} case(s) flagged {named}; review queue {out / 'review.csv'}")
    labels = list(dict.fromkeys(label for r in rows for label in r.metrics))
    for label in labels:
        values = np.array([r.metrics[label].dice for r in rows if r.ok and label in r.metrics], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            print(f"  {'dice_' + printable_text(label):<24} mean {values.mean():.3f}  (n={values.size})")
