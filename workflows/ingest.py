"""``medseg ingest SOURCE --out OUT``: DICOM/NIfTI/NRRD/MHA/MSD folder -> ``OUT/images/*.nii.gz`` + manifest.

Flow: discover (headers only, on the client) -> skip cases whose output already exists (resume;
outputs appear only by atomic rename, so an existing file is complete) -> one Dask task per
series/file that reads AND writes the case on the worker (arrays never travel to the client) ->
``OUT/manifest.csv`` with one row per series or file met.

Output names come only from pseudonymous ids (DICOM) or sanitised file names (NIfTI/NRRD/MHA);
nothing read from a header decides where a file is written. Inputs are opened read-only.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from distributed import as_completed
from tqdm import tqdm

from preprocessing.atomic import write_text_atomic
from preprocessing.discovery import discover_sources
from preprocessing.errors import IngestError
from preprocessing.source_item import SourceItem, row_case_id
from preprocessing.source_tree import printable_path, printable_text
from preprocessing.volume_io import load_source_item, write_nifti_atomic
from workflows.cluster import dask_client
from workflows.exit_codes import EXIT_OK, EXIT_PARTIAL

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "case_id",
    "source",
    "series_uid",
    "status",
    "reason",
    "modality",
    "kind",
    "shape",
    "spacing",
    "dtype",
    "n_files",
    "output",
]


@dataclass(frozen=True)
class IngestConfig:
    """What ``medseg ingest`` was asked to do (built from CLI flags).

    Attributes:
        source: folder (or file) to ingest.
        out_dir: output folder; images go to ``out_dir/images``.
        workers: local Dask worker processes (ignored with ``scheduler``).
        scheduler: address of an existing Dask scheduler; its workers must see ``source`` and
            ``out_dir`` at the same paths.
    """

    source: Path
    out_dir: Path
    workers: int | None = 2
    scheduler: str | None = None


def ingest_command(args: argparse.Namespace) -> int:
    """CLI entry point; returns the exit code (0 all ingested/skipped, 3 some failed)."""
    config = IngestConfig(Path(args.source), Path(args.out), args.workers, args.scheduler)
    return run_ingest(config)


def run_ingest(config: IngestConfig) -> int:
    """Ingest ``config.source`` into ``config.out_dir``; see the module docstring.

    Raises:
        FileNotFoundError: the source does not exist (the CLI turns it into exit code 2).
    """
    source = config.source
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    images_dir = config.out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(images_dir)
    # OUT inside SOURCE: our own earlier outputs are not inputs (they would collide with the cases
    # they came from). The walker compares real paths, so a link to OUT is excluded too.
    items = discover_sources(source, exclude=[config.out_dir])
    print(f"{len(items)} series/file(s) found in {printable_path(source)}")
    rows: list[dict] = []
    todo: list[SourceItem] = []
    for item in items:
        if item.status != "ok":
            rows.append(_row(item))
        elif (done := _existing_row(item, images_dir)) is not None:
            rows.append(done)
        else:
            todo.append(item)
    resumed = sum(r["reason"].startswith("already ingested") for r in rows)
    if resumed:
        print(f"resuming: {resumed} output(s) already complete, {len(todo)} to go")
    if todo:
        rows.extend(_run_on_cluster(todo, images_dir, config))
    _write_manifest(rows, config.out_dir / "manifest.csv")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(
        f"ingested: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} failed; "
        f"manifest: {config.out_dir / 'manifest.csv'}"
    )
    if counts["error"]:
        print(f"{counts['error']} series/file(s) failed; see the 'reason' column of the manifest")
        return EXIT_PARTIAL
    return EXIT_OK


def _run_on_cluster(todo: list[SourceItem], images_dir: Path, config: IngestConfig) -> list[dict]:
    rows = []
    with dask_client(config.workers, config.scheduler) as client:
        futures = {
            client.submit(
                ingest_item, item, str(images_dir), pure=False
            ): item  # unique keys: safe on a shared scheduler
            for item in todo
        }
        failures = 0
        with tqdm(total=len(futures), desc="series", unit="series") as bar:
            for future in as_completed(futures, loop=client.loop):
                try:
                    row = future.result()
                except Exception as exc:  # the worker died (memory, signal): the case failed, not the run
                    row = _row(futures[future], "error", f"worker failed: {type(exc).__name__}: {exc}")
                rows.append(row)
                failures += row["status"] == "error"
                bar.set_postfix(failed=failures)
                bar.update(1)
    return rows


def ingest_item(item: SourceItem, images_dir: str) -> dict:
    """Read one series/file and write ``images_dir/<case_id>.nii.gz`` (runs on a Dask worker).

    Returns:
        The manifest row; status "error" with the reason when the input is invalid.
    """
    target = _target_path(Path(images_dir), item.case_id)
    try:
        volume = load_source_item(item)
        data = volume.array[0] if volume.array.shape[0] == 1 else np.moveaxis(volume.array, 0, -1)
        write_nifti_atomic(data, volume.affine_ras, target)
    except IngestError as exc:
        return _row(item, "error", str(exc))
    except Exception as exc:  # one odd file must not stop the batch; the traceback goes to the log
        logger.warning("unexpected failure on %s:\n%s", printable_path(item.paths[0]), traceback.format_exc())
        return _row(item, "error", f"unexpected {type(exc).__name__}: {exc}")
    row = _row(item, "ok", item.reason)
    row.update(
        _geometry_fields(volume.array.shape[1:], volume.spacing_mm, volume.array.dtype, volume.array.shape[0])
    )
    row["modality"] = volume.modality or item.modality
    row["output"] = f"images/{target.name}"
    return row


def _target_path(images_dir: Path, case_id: str) -> Path:
    """The output path of a case, guaranteed to be a direct child of ``images_dir``."""
    target = images_dir / f"{case_id}.nii.gz"
    if not case_id or target.resolve().parent != images_dir.resolve():
        raise IngestError(f"case id {case_id!r} would write outside {images_dir}; refusing")
    return target


def _row(item: SourceItem, status: str | None = None, reason: str | None = None) -> dict:
    return {
        "case_id": row_case_id(item),
        "source": _source_text(item),
        "series_uid": item.series_uid,
        "status": status or item.status,
        "reason": item.reason if reason is None else reason,
        "modality": item.modality,
        "kind": item.kind,
        "shape": "",
        "spacing": "",
        "dtype": "",
        "n_files": len(item.paths),
        "output": "",
    }


def _source_text(item: SourceItem) -> str:
    if len(item.paths) == 1:
        return printable_path(item.paths[0])
    parents = {printable_path(p.parent) for p in item.paths}
    return parents.pop() if len(parents) == 1 else ";".join(sorted(parents))


def _geometry_fields(shape, spacing, dtype, channels: int) -> dict:
    text = "x".join(str(int(s)) for s in shape)
    return {
        "shape": text if channels == 1 else f"{text}x{channels}",
        "spacing": "x".join(f"{float(s):.6g}" for s in spacing),
        "dtype": str(np.dtype(dtype)),
    }


def _existing_row(item: SourceItem, images_dir: Path) -> dict | None:
    """The manifest row of an output a previous run completed, or None if it must be (re)made."""
    target = images_dir / f"{item.case_id}.nii.gz"
    if not target.exists():
        return None
    try:
        # Header only: the data block is not read. We wrote the file, so it is NIfTI-1.
        header = cast(nib.Nifti1Header, nib.load(str(target)).header)
    except Exception:  # not written by us (we only rename complete files): redo it
        logger.warning("existing output %s is unreadable; ingesting it again", target)
        return None
    shape = header.get_data_shape()
    row = _row(item, "ok", f"already ingested ({target.name} exists)")
    row.update(
        _geometry_fields(
            shape[:3], header.get_zooms()[:3], header.get_data_dtype(), shape[3] if len(shape) > 3 else 1
        )
    )
    row["output"] = f"images/{target.name}"
    return row


def _remove_stale_temporaries(images_dir: Path) -> None:
    """Delete temporary files an interrupted run left behind (never complete outputs)."""
    for tmp in images_dir.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def _write_manifest(rows: list[dict], path: Path) -> None:
    """Write the manifest; every text cell is made UTF-8-safe, so no row can cost the table.

    File names that are not valid UTF-8 (surrogate escapes) appear with their odd bytes as
    ``\\xNN`` (:func:`preprocessing.source_tree.printable_text`), in paths and in reasons.
    """
    safe = [{k: printable_text(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    safe.sort(key=lambda r: (r["status"] != "ok", r["case_id"], r["source"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(safe)
    write_text_atomic(path, buffer.getvalue())
