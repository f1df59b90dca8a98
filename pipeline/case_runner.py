"""One case of a batch: read -> segment -> write its outputs and metrics -> a :class:`CaseRow`.

Called on Dask workers by ``workflows/predict.py`` (this module knows nothing of Dask). The model
is loaded once per worker process (:mod:`pipeline.inference.model_cache`), not once per case.

The case is three stages, ``read_case`` -> ``segment_case`` -> ``write_case`` (``run_case`` chains
them), so a batch engine can run them as separate tasks: on a GPU worker the next case is read
and the previous one written while the current one holds the GPU. A stage never raises for a
bad case: it marks the row as an error and the later stages pass it through.

The outputs are the writers of :data:`pipeline.writers.WRITERS` that apply to the case (optional
ones when enabled in :attr:`CaseConfig.outputs`), written side by side into the case's staging
folder, which is then published atomically (:mod:`pipeline.case_folder`).
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import writers
from pipeline.bundle import ModelBundle
from pipeline.case_folder import CaseModel, publish_case, staging_folder
from pipeline.case_row import CaseRow, error_kind
from pipeline.compatibility import model_incompatibility
from pipeline.inference.config import InferenceConfig
from pipeline.inference.model_cache import cached_model, load_bundle_cached
from pipeline.inference.segment import Segmentation, Segmenter
from pipeline.inference.uncertainty import case_uncertainty
from pipeline.metrics import ReferenceMetrics, reference_metrics
from pipeline.qc_flags import flag_case
from pipeline.qc_reference import QcReference, measure_case
from pipeline.writers.base import CaseWriter, SegmentedCase
from preprocessing.image import GRID_TOL_MM, Volume
from preprocessing.source_item import SourceItem
from preprocessing.volume_io import load_source_item, read_volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseConfig:
    """What every case of one batch shares.

    Attributes:
        bundle_dir: local folder of the model bundle (already downloaded from MLflow).
        out_dir: batch output folder; the case's folder is ``out_dir/<case_id>``.
        inference: sliding-window settings (device, overlap, TTA...).
        labels_dir: optional reference labels ``<case_id>.nii.gz`` for metrics.
        outputs: names of the optional writers to run (``{"probabilities"}``: also write
            ``probabilities.nii.gz``); the other writers always run where they apply.
        nsd_tolerance_mm: tolerance of the normalised surface distance.
        torch_threads: intra-op threads per worker (cores / workers on CPU).
        model_fingerprint: ``bundle_fingerprint`` of the model; recorded per case so a rerun
            with another model redoes the case.
        uncertainty_score: compute the ensemble uncertainty and the row's ``uncertainty``
            summary even when no enabled writer needs the maps (e.g. for QC flags).
    """

    bundle_dir: str
    out_dir: str
    inference: InferenceConfig
    labels_dir: str | None = None
    outputs: frozenset[str] = frozenset()
    nsd_tolerance_mm: float = 2.0
    torch_threads: int | None = None
    model_fingerprint: str = ""
    uncertainty_score: bool = False


@dataclass
class CaseInFlight:
    """One case between stages: its row so far and, while it is in flight, its arrays.

    Lives in the memory of the worker that made it (the batch engine passes it from task to task);
    it never goes to disk or to MLflow.
    """

    item: SourceItem
    row: CaseRow
    volume: Volume | None = None
    segmentation: Segmentation | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, unrounded


def enabled_writers(config: CaseConfig) -> list[CaseWriter]:
    """The writers of this batch: every non-optional one, and the optional ones it asked for."""
    return [w for w in writers.WRITERS if not w.optional or w.name in config.outputs]


def run_case(item: SourceItem, config: CaseConfig) -> CaseRow:
    """Segment one case and write its outputs; never raises for a bad case.

    Returns:
        The case's row: status ``ok``, ``error`` or ``skipped`` with reason and reason code, work
        seconds per stage, volume per label in mL and, with reference labels, Dice/HD95/NSD per label.
    """
    return write_case(segment_case(read_case(item, config), config), config)


def read_case(item: SourceItem, config: CaseConfig) -> CaseInFlight:
    """Stage 1: read the case's image (CPU and disk only)."""
    row = CaseRow(
        case_id=item.case_id,
        source=str(item.paths[0]) if item.paths else "",
        kind=item.kind,
        reason=item.reason,  # discovery's note on an ok item (a split series), as ingest reports it
        model_fingerprint=config.model_fingerprint,
    )
    work = CaseInFlight(item=item, row=row)
    with _stage(work, "read"):
        work.volume = load_source_item(item)
    return work


def segment_case(work: CaseInFlight, config: CaseConfig) -> CaseInFlight:
    """Stage 2: check the model fits the image, then segment it (the GPU stage)."""
    if not work.row.ok:
        return work
    with _stage(work, "segment"):
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        bundle, networks = cached_model(config.bundle_dir, config.inference.device, config.model_fingerprint)
        assert work.volume is not None
        skip_code, skip_reason = model_incompatibility(work.volume, bundle)
        if skip_code:
            work.row.status, work.row.reason, work.row.reason_code = "skipped", skip_reason, skip_code
            work.volume = None
        else:
            segmenter = Segmenter(bundle.plan, networks, bundle.postprocessing, config.inference)
            keep = any(w.needs_probabilities for w in enabled_writers(config))
            # getattr: a writer written before issue 12 has no needs_uncertainty (it needs none)
            # ... and a bundle with an out-of-fold p95 needs the case's score for high_uncertainty
            uncertain = (
                config.uncertainty_score
                or bundle.qc_reference.get("uncertainty_p95") is not None
                or any(getattr(w, "needs_uncertainty", False) for w in enabled_writers(config))
            )
            work.segmentation = segmenter(work.volume, keep_probabilities=keep, uncertainty=uncertain)
    return work


def write_case(work: CaseInFlight, config: CaseConfig) -> CaseRow:
    """Stage 3: write the outputs and metrics into staging, then publish the case folder."""
    row = work.row
    staging = staging_folder(Path(config.out_dir), work.item.case_id)
    if row.ok:
        with _stage(work, "write"):
            bundle = load_bundle_cached(config.bundle_dir, config.inference.device, config.model_fingerprint)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_outputs(work, bundle, config, staging)
    row.stage_seconds = {name: round(value, 3) for name, value in work.seconds.items()}
    row.seconds = round(sum(work.seconds.values()), 3)
    work.volume = work.segmentation = None  # free the arrays before publishing
    if row.status == "error":
        # A failed case leaves nothing behind, so the next run tries it again.
        shutil.rmtree(staging, ignore_errors=True)
    else:
        # The bundle is cached: segment_case loaded it for every row that gets this far.
        bundle = load_bundle_cached(config.bundle_dir, config.inference.device, config.model_fingerprint)
        model = CaseModel(bundle.name, bundle.version_tag, bundle.label_names)
        publish_case(row, staging, Path(config.out_dir), model)
    return row


class _stage:
    """Time a stage into ``work.seconds``; turn an exception into the case's error row."""

    def __init__(self, work: CaseInFlight, name: str) -> None:
        self.work, self.name = work, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind, exc, tb) -> bool:
        self.work.seconds[self.name] = time.perf_counter() - self.start
        if exc is None:
            return False
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt / SystemExit propagate
        # One bad case must not stop the batch: it becomes an error row.
        logger.debug("case %s failed in %s:\n%s", self.work.item.case_id, self.name, traceback.format_exc())
        row = self.work.row
        row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"
        row.reason_code = f"{self.name}:{error_kind(exc)}"
        self.work.volume = self.work.segmentation = None
        return True


def write_outputs(work: CaseInFlight, bundle: ModelBundle, config: CaseConfig, staging: Path) -> None:
    """Run the case's writers side by side into ``staging``; put volumes and metrics in its row.

    The writers run in threads: NIfTI gzip and PNG encoding release the GIL, so the mask, the SEG
    and the picture of a 512x512x400 scan overlap instead of adding up. A writer's failure fails
    the case (re-raised here), except for a writer that is a review aid (``fails_case`` False):
    the case stays ok with a note and the reason code ``<writer>_skipped:<kind>``.
    """
    item, volume, segmentation, row = work.item, work.volume, work.segmentation, work.row
    assert volume is not None and segmentation is not None
    case = SegmentedCase(item, volume, segmentation, bundle.label_names, bundle.name, bundle.version_tag)
    chosen = [w for w in enabled_writers(config) if w.applies_to(case)]
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"write-{item.case_id}") as pool:
        jobs = [(w, pool.submit(w.write, case, staging / w.filename)) for w in chosen]
        row.volumes_ml = label_volumes_ml(segmentation.labels, volume.spacing_mm, bundle.label_names)
        if segmentation.uncertainty is not None:
            maps = segmentation.uncertainty_on_source_grid()  # freed on return: 3 source-grid channels
            row.uncertainty = case_uncertainty(segmentation.labels, maps, bundle.label_names)
            del maps
        if config.labels_dir:
            row.metrics = _reference_metrics(item.case_id, segmentation.labels, volume, bundle, config)
        _flag_row(row, volume, segmentation, bundle)
        for writer, job in jobs:
            if writer.fails_case:
                job.result()  # re-raises a writer's error: the case fails as a whole
        for writer, job in jobs:
            if not writer.fails_case:
                _note_failure(row, writer, job)


def label_volumes_ml(
    labels: np.ndarray, spacing_mm: tuple[float, float, float], label_names: dict[int, str]
) -> dict[str, float]:
    """label name -> volume in mL (rounded to µL) of a label map ``(X, Y, Z)`` with this voxel spacing."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(label_names) + 1)
    return {name: round(float(counts[value]) * voxel_ml, 3) for value, name in label_names.items()}


def _flag_row(row: CaseRow, volume: Volume, segmentation: Segmentation, bundle: ModelBundle) -> None:
    """Measure the case on the source grid and flag it (:mod:`pipeline.qc_flags`) into its row.

    Against the bundle's training fingerprint when it has one (``bundle.json["qc_reference"]``;
    older bundles: only the flags that need none). QC is a review aid: if it fails, the case stays
    ok with a note and the reason code ``qc_flags_skipped:<kind>``.
    """
    try:
        stored = getattr(bundle, "qc_reference", None)  # getattr: a bundle class without the field
        reference = QcReference.from_json(stored) if stored else None
        measured = measure_case(volume.array[0], segmentation.labels, volume.spacing_mm, bundle.label_names)
        uncertainty = getattr(row, "uncertainty", None)
        score = None if uncertainty is None else uncertainty.score
        row.flags, row.qc_checked = flag_case(measured, reference, score), True
    except Exception as exc:
        logger.warning("case %s: QC flags skipped (%s: %s)", row.case_id, type(exc).__name__, exc)
        row.add_note(f"QC flags skipped: {type(exc).__name__}: {exc}", f"qc_flags_skipped:{error_kind(exc)}")


def _note_failure(row: CaseRow, writer: CaseWriter, job: Future) -> None:
    """A review aid that could not be written leaves the segmented case ok, with a note."""
    try:
        job.result()
    except Exception as exc:
        logger.warning("case %s: %s skipped (%s: %s)", row.case_id, writer.title, type(exc).__name__, exc)
        row.add_note(
            f"{writer.title} skipped: {type(exc).__name__}: {exc}", f"{writer.name}_skipped:{error_kind(exc)}"
        )


def _reference_metrics(
    case_id: str, labels: np.ndarray, volume: Volume, bundle: ModelBundle, config: CaseConfig
) -> dict[str, ReferenceMetrics]:
    """Metrics per label against ``<labels_dir>/<case_id>.nii.gz`` (none when it is missing)."""
    assert config.labels_dir is not None  # the caller checks it
    ref_path = Path(config.labels_dir) / f"{case_id}.nii.gz"
    if not ref_path.is_file():
        logger.warning("no reference label for %s in %s", case_id, config.labels_dir)
        return {}
    ref = read_volume(ref_path)
    if ref.spatial_shape != labels.shape or not np.allclose(
        ref.affine_ras, volume.affine_ras, atol=GRID_TOL_MM
    ):
        raise ValueError(f"reference label {ref_path.name} is not on the image's grid")
    return reference_metrics(
        labels,
        np.rint(ref.array[0]).astype(np.int16),
        bundle.label_names,
        volume.spacing_mm,
        nsd_tolerance_mm=config.nsd_tolerance_mm,
    )
