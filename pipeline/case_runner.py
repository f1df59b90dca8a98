"""One case of a batch: read -> segment -> write mask, DICOM SEG, QC picture, metrics.

Called on Dask workers by ``workflows/predict.py`` (this module knows nothing of Dask). The model
is loaded once per worker process and cached here, not once per case.

The case is three stages, ``read_case`` -> ``segment_case`` -> ``write_case`` (``run_case`` chains
them), so a batch engine can run them as separate tasks: on a GPU worker the next case is read
and the previous one written while the current one holds the GPU. A stage never raises for a
bad case: it marks the row as an error and the later stages pass it through.

Atomicity: every output of a case is written into a private staging folder
``OUT/.staging/<case_id>.<pid>/`` and the folder is renamed to ``OUT/<case_id>/`` as the very
last step. A rename of a directory is atomic on POSIX file systems, so a case folder either exists
complete (with ``case.json``, its row of ``cases.csv``) or not at all; a SIGKILL at any moment
leaves at most a staging folder, which the next run deletes.

Reasons: every row has a free-text ``reason`` (with paths and the exception's message: it stays in
the hospital's ``OUT/cases.csv``) and a ``reason_code`` made only from the kind of the failure
(``read:IngestError``, ``incompatible_modality``, ``segment:out_of_memory``, ...), set where the
row is made. Only the code leaves the output folder (``pipeline.tracking_batch``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from pipeline.bundle import ModelBundle, load_bundle
from pipeline.inference.config import InferenceConfig
from pipeline.inference.segment import Segmentation, Segmenter
from pipeline.metrics import segmentation_metrics
from pipeline.writers.dicom_seg import write_dicom_seg
from pipeline.writers.qc_picture import write_qc_picture
from preprocessing.atomic import atomic_path
from preprocessing.discovery import SourceItem
from preprocessing.image import Volume
from preprocessing.volume_io import load_source_item, read_volume, write_nifti_atomic

logger = logging.getLogger(__name__)

CASE_RECORD = "case.json"
STAGING = ".staging"

#: Channel names of MSD ``dataset.json`` files (upper case, without spaces, ``-`` and ``_``) and DICOM
#: Modality values -> the DICOM Modality (0008,0060) of the imaging technique. The modality check
#: compares these, so a model whose dataset says "MRI", "T2" or "FLAIR" segments a series with
#: Modality "MR". Names not listed are unknown: never a refusal, a warning.
IMAGING_MODALITY: dict[str, str] = {
    **dict.fromkeys(("CT", "CECT", "NCCT", "CTA"), "CT"),
    **dict.fromkeys(
        (
            "MR", "MRI", "T1", "T1W", "T1GD", "T1CE", "T1C", "T2", "T2W", "FLAIR", "T2FLAIR", "ADC",
            "DWI", "PD", "PDW", "SWI",
        ),
        "MR",
    ),
    **dict.fromkeys(("PT", "PET"), "PT"),
}
_warned_modalities: set[str] = set()



@dataclass(frozen=True)
class CaseConfig:
    """What every case of one batch shares.

    Attributes:
        bundle_dir: local folder of the model bundle (already downloaded from MLflow).
        out_dir: batch output folder; the case's folder is ``out_dir/<case_id>``.
        inference: sliding-window settings (device, overlap, TTA...).
        labels_dir: optional reference labels ``<case_id>.nii.gz`` for metrics.
        save_probabilities: also write ``probabilities.nii.gz`` ((X, Y, Z, K) float32).
        nsd_tolerance_mm: tolerance of the normalised surface distance.
        torch_threads: intra-op threads per worker (cores / workers on CPU).
        model_fingerprint: ``bundle_fingerprint`` of the model; recorded per case so a rerun
            with another model redoes the case.
    """

    bundle_dir: str
    out_dir: str
    inference: InferenceConfig
    labels_dir: str | None = None
    save_probabilities: bool = False
    nsd_tolerance_mm: float = 2.0
    torch_threads: int | None = None
    model_fingerprint: str = ""


@dataclass
class CaseWork:
    """One case between stages: its row so far and, while it is in flight, its arrays.

    Lives in the memory of the worker that made it (the batch engine passes it from task to task);
    it never goes to disk or to MLflow.
    """

    item: SourceItem
    row: dict
    volume: Volume | None = None
    segmentation: Segmentation | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed_or_skipped(self) -> bool:
        return self.row["status"] != "ok"


_MODEL_CACHE: dict[tuple[str, str, str], tuple[ModelBundle, list]] = {}
_BUNDLE_CACHE: dict[tuple[str, str, str], ModelBundle] = {}
_MODEL_LOCK = threading.Lock()  # a multi-threaded (GPU) worker must not load the model twice


def _cached_model(bundle_dir: str, device: str, fingerprint: str) -> tuple[ModelBundle, list]:
    """The bundle and its fold networks, loaded once per worker process."""
    # The fingerprint is part of the key: on a long-lived remote worker the same download folder
    # can hold a newer model version in a later batch.
    key = (bundle_dir, device, fingerprint)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model per worker process at a time
            bundle = load_bundle(bundle_dir)
            _MODEL_CACHE[key] = (bundle, bundle.build_networks(device))
            logger.info("loaded model bundle %s on %s (pid %d)", bundle_dir, device, os.getpid())
        return _MODEL_CACHE[key]


def case_is_done(out_dir: Path, case_id: str, model_fingerprint: str = "") -> bool:
    """True when a previous run finished this case (ok or deliberately skipped) with this model.

    Failed cases publish no folder, so a rerun retries them; a case finished by a different
    model (another ``model_fingerprint``) counts as not done, so its outputs are replaced.
    """
    record = Path(out_dir) / case_id / CASE_RECORD
    if not record.is_file():
        return False
    return (
        not model_fingerprint or json.loads(record.read_text()).get("model_fingerprint") == model_fingerprint
    )


def read_case_record(out_dir: Path, case_id: str) -> dict:
    return json.loads((Path(out_dir) / case_id / CASE_RECORD).read_text())


def clean_staging(out_dir: Path) -> int:
    """Delete staging folders left by a killed run. Returns how many were removed."""
    staging = Path(out_dir) / STAGING
    if not staging.is_dir():
        return 0
    leftovers = list(staging.iterdir())
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


def remove_empty_staging(out_dir: Path) -> None:
    """Remove ``OUT/.staging`` once the batch is over and it is empty (a rerun makes it again)."""
    try:
        (Path(out_dir) / STAGING).rmdir()
    except OSError:  # absent, or holds a folder another run is still writing
        pass


def run_case(item: SourceItem, config: CaseConfig) -> dict:
    """Segment one case and write its outputs; never raises for a bad case.

    Returns:
        The case's row: ``case_id, source, status (ok|error|skipped), reason, seconds`` (work time:
        ``seconds_read + seconds_segment + seconds_write``), volume per label in mL
        (``vol_<label>_ml``), and with reference labels ``dice_/hd95_/nsd_<label>``.
    """
    return write_case(segment_case(read_case(item, config), config), config)


def read_case(item: SourceItem, config: CaseConfig) -> CaseWork:
    """Stage 1: read the case's image (CPU and disk only)."""
    row: dict = {
        "case_id": item.case_id,
        "source": str(item.paths[0]) if item.paths else "",
        "kind": item.kind,
        "status": "ok",
        "reason": item.reason,  # discovery's note on an ok item (a split series), as ingest reports it
        "reason_code": "",
        "model_fingerprint": config.model_fingerprint,
    }
    work = CaseWork(item=item, row=row)
    with _stage(work, "read"):
        work.volume = load_source_item(item)
    return work


def segment_case(work: CaseWork, config: CaseConfig) -> CaseWork:
    """Stage 2: check the model fits the image, then segment it (the GPU stage)."""
    if work.failed_or_skipped:
        return work
    with _stage(work, "segment"):
        if config.torch_threads:
            import torch

            torch.set_num_threads(config.torch_threads)
        bundle, networks = _cached_model(config.bundle_dir, config.inference.device, config.model_fingerprint)
        assert work.volume is not None
        skip_code, skip_reason = model_incompatibility(work.volume, bundle)
        if skip_code:
            work.row.update(status="skipped", reason=skip_reason, reason_code=skip_code)
            work.volume = None
        else:
            segmenter = Segmenter(bundle.plan, networks, bundle.postprocessing, config.inference)
            work.segmentation = segmenter(work.volume, keep_probabilities=config.save_probabilities)
    return work


def write_case(work: CaseWork, config: CaseConfig) -> dict:
    """Stage 3: write mask, SEG, QC picture and metrics into staging, then publish the folder."""
    item, row = work.item, work.row
    staging = Path(config.out_dir) / STAGING / f"{item.case_id}.{os.getpid()}.{threading.get_ident()}"
    if row["status"] == "ok":
        with _stage(work, "write"):
            bundle = load_bundle_cached(config)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            outputs = write_outputs(work, bundle, config, staging)
            if outputs.get("reason") and row.get("reason"):  # keep discovery's note (a split series)
                outputs["reason"] = f"{row['reason']}; {outputs['reason']}"
            row.update(outputs)
    row.update({f"seconds_{name}": round(value, 3) for name, value in work.seconds.items()})
    row["seconds"] = round(sum(work.seconds.values()), 3)
    work.volume = work.segmentation = None  # free the arrays before publishing
    if row["status"] == "error":
        # A failed case leaves nothing behind, so the next run tries it again.
        shutil.rmtree(staging, ignore_errors=True)
    else:
        _publish(row, staging, Path(config.out_dir))
    return row


def load_bundle_cached(config: CaseConfig) -> ModelBundle:
    """The bundle's metadata (label names, version) without touching the device."""
    key = (config.bundle_dir, config.inference.device, config.model_fingerprint)
    with _MODEL_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is not None:
            return cached[0]
        # The write task ran on a worker that never segmented (Dask moved it): load once here.
        if key not in _BUNDLE_CACHE:
            _BUNDLE_CACHE.clear()
            _BUNDLE_CACHE[key] = load_bundle(config.bundle_dir)
        return _BUNDLE_CACHE[key]


class _stage:
    """Time a stage into ``work.seconds``; turn an exception into the case's error row."""

    def __init__(self, work: CaseWork, name: str) -> None:
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
        self.work.row.update(
            status="error", reason=f"{type(exc).__name__}: {exc}", reason_code=f"{self.name}:{error_kind(exc)}"
        )
        self.work.volume = self.work.segmentation = None
        return True


def error_kind(exc: BaseException) -> str:
    """A code for the kind of ``exc`` that carries no data of the case (no message, no path).

    ``out_of_memory`` for host or device memory exhaustion, else the exception's class name
    (``IngestError``, ``GeometryError``, ``NonFiniteProbabilitiesError``, ``OSError``...).
    """
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out_of_memory"
    name = type(exc).__name__
    return name if name.isidentifier() and name.isascii() else "error"


def imaging_modality(name: str) -> str:
    """DICOM Modality of a dataset.json channel name or Modality value ("MRI" -> "MR"); "" if unknown."""
    key = "".join(ch for ch in str(name).upper() if ch not in " -_")
    return IMAGING_MODALITY.get(key, "")


def model_incompatibility(volume: Volume, bundle: ModelBundle) -> tuple[str, str]:
    """``(reason_code, reason)`` why this model must not segment this volume; ``("", "")`` when it may.

    The modality check compares imaging modalities (:data:`IMAGING_MODALITY`): the bundle's
    channel-0 name from ``dataset.json`` ("CT", "MRI", "T2", "FLAIR"...) against the series'
    DICOM Modality ("CT", "MR", "PT"). A name that maps to nothing is not a refusal (a warning,
    once per name); NIfTI files, which carry no modality, are never refused for it.
    """
    want_channels = bundle.in_channels
    if volume.array.shape[0] != want_channels:
        return (
            "incompatible_channels",
            f"model expects {want_channels} channel(s), image has {volume.array.shape[0]}",
        )
    want_name, have_name = (bundle.modality or "").strip(), (volume.modality or "").strip()
    if not want_name or not have_name:
        return "", ""
    want, have = imaging_modality(want_name), imaging_modality(have_name)
    for name, mapped in ((want_name, want), (have_name, have)):
        if not mapped and name.upper() not in _warned_modalities:
            _warned_modalities.add(name.upper())
            logger.warning(
                "modality name %r is not a known imaging modality (known: %s); the modality check is "
                "skipped for it",
                name,
                ", ".join(sorted(IMAGING_MODALITY)),
            )
    if want and have and want != have:
        return (
            "incompatible_modality",
            f"model was trained on {want} images (dataset.json modality '{want_name}'), this series "
            f"is {have} (DICOM Modality '{have_name}'); segment it with a model trained on {have}",
        )
    return "", ""


def write_outputs(work: CaseWork, bundle: ModelBundle, config: CaseConfig, staging: Path) -> dict:
    """Mask, probabilities, SEG and QC picture written side by side into ``staging``; volumes, metrics.

    The writers run in threads: NIfTI gzip and PNG encoding release the GIL, so the mask, the SEG
    and the picture of a 512x512x400 scan overlap instead of adding up.
    """
    item, volume, segmentation = work.item, work.volume, work.segmentation
    assert volume is not None and segmentation is not None
    labels = segmentation.labels
    affine = volume.affine_ras
    jobs = []
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"write-{item.case_id}") as pool:
        if item.kind == "nifti" and len(item.paths) == 1:
            jobs.append(pool.submit(write_mask_like_source, labels, item.paths[0], staging / "mask.nii.gz"))
        else:
            jobs.append(
                pool.submit(
                    write_nifti_atomic,
                    labels.astype(np.uint8, copy=False),
                    affine,
                    staging / "mask.nii.gz",
                    dtype=np.dtype(np.uint8),
                )
            )
        if segmentation.probabilities is not None:
            jobs.append(
                pool.submit(
                    write_nifti_atomic,
                    # (X, Y, Z, K) float32: NIfTI has no float16 type.
                    segmentation.probabilities_on_source_grid(),
                    affine,
                    staging / "probabilities.nii.gz",
                )
            )
        if item.kind == "dicom":
            jobs.append(
                pool.submit(
                    write_dicom_seg,
                    labels,
                    item.paths,
                    bundle.label_names,
                    staging / "seg.dcm",
                    algorithm_name=bundle.name or "medseg",
                    algorithm_version=bundle.version_tag,
                    source_headers=volume.meta.get("headers"),
                )
            )
        qc_job = pool.submit(
            write_qc_picture,
            volume.array[0],
            labels,
            affine,
            bundle.label_names,
            staging / "qc.png",
            title=f"{item.case_id} ({bundle.name or 'model'})",
        )
        voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
        counts = np.bincount(labels.ravel(), minlength=max(bundle.label_names) + 1)
        out: dict = {
            f"vol_{name}_ml": round(float(counts[value]) * voxel_ml, 3)
            for value, name in bundle.label_names.items()
        }
        if config.labels_dir:
            out.update(_reference_metrics(item.case_id, labels, volume, bundle, config))
        for job in jobs:
            job.result()  # re-raises a writer's error: the case fails as a whole
        out.update(_qc_outcome(qc_job, item.case_id))
    return out


def _qc_outcome(job, case_id: str) -> dict:
    """The QC picture is a review aid: its failure leaves the segmented case ok, with a note."""
    try:
        job.result()
    except Exception as exc:
        logger.warning("case %s: QC picture skipped (%s: %s)", case_id, type(exc).__name__, exc)
        return {
            "reason": f"QC picture skipped: {type(exc).__name__}: {exc}",
            "reason_code": f"qc_picture_skipped:{error_kind(exc)}",
        }
    return {}


def write_mask_like_source(labels: np.ndarray, source: Path, out_path: Path) -> Path:
    """Write a uint8 mask whose header geometry is the source NIfTI's, sform *and* qform.

    Viewers differ in which of the two they trust when they disagree; copying both (with their
    codes) makes the mask overlay the image in every viewer, bit for bit.
    """
    src = cast(nib.Nifti1Image, nib.load(str(source)))
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    img = nib.Nifti1Image(labels.astype(np.uint8), None, header=header)
    img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return Path(out_path)


def _reference_metrics(case_id, labels, volume, bundle, config: CaseConfig) -> dict:
    assert config.labels_dir is not None  # the caller checks it
    ref_path = Path(config.labels_dir) / f"{case_id}.nii.gz"
    if not ref_path.is_file():
        logger.warning("no reference label for %s in %s", case_id, config.labels_dir)
        return {}
    ref = read_volume(ref_path)
    if ref.spatial_shape != labels.shape or not np.allclose(ref.affine_ras, volume.affine_ras, atol=1e-3):
        raise ValueError(f"reference label {ref_path.name} is not on the image's grid")
    rows = segmentation_metrics(
        labels,
        np.rint(ref.array[0]).astype(np.int16),
        bundle.label_names,
        volume.spacing_mm,
        nsd_tolerance_mm=config.nsd_tolerance_mm,
    )
    out = {}
    for r in rows:
        for metric in ("dice", "hd95", "nsd"):
            out[f"{metric}_{r['label']}"] = r[metric]
    return out


def _publish(row: dict, staging: Path, out_dir: Path) -> None:
    """Write the case record into staging, then rename the whole folder into place."""
    staging.mkdir(parents=True, exist_ok=True)
    (staging / CASE_RECORD).write_text(json.dumps(row, indent=1, default=_json_default))
    final = out_dir / row["case_id"]
    if final.exists():  # made by another model: move it aside, put the new one in, then delete it
        stale = staging.with_name(staging.name + ".old")
        os.replace(final, stale)
        os.replace(staging, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, final)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
