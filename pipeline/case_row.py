"""The typed row of one batch case, and its one flattening to ``cases.csv`` / ``case.json`` columns.

A :class:`CaseRow` is what the case runner makes of a case and what ``workflows/predict.py``
summarises; it is turned into columns (``vol_<label>_ml``, ``dice_<label>``, ``seconds_read``...)
only by :meth:`CaseRow.to_record`, at the edge where the case record and the table are written,
and read back from a finished case's ``case.json`` by :meth:`CaseRow.from_record` (resume).

Reasons: every row has a free-text ``reason`` (with paths and the exception's message: it stays in
the hospital's ``OUT/cases.csv``) and a ``reason_code`` made only from the kind of the failure
(``read:IngestError``, ``incompatible_modality``, ``segment:out_of_memory``, ...), set where the
row is made. Only the code leaves the output folder (``pipeline.tracking_batch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.inference.uncertainty import CaseUncertainty
from pipeline.metrics import ReferenceMetrics
from pipeline.qc_flags import QcFlag

_SECONDS = "seconds_"
_VOLUME_PREFIX, _VOLUME_SUFFIX = "vol_", "_ml"
_HEAD = ("case_id", "source", "kind", "status", "reason", "reason_code")
_FLAGS, _FLAG_REASONS = "flags", "flag_reasons"
_UNCERTAINTY, _UNC_MASK, _UNC_BOUNDARY = "uncertainty", "unc_mask_", "unc_boundary_"


@dataclass
class CaseRow:
    """One case of a batch.

    Attributes:
        case_id: pseudonymous case id (the name of its output folder).
        source: first source path (stays in the hospital's output folder, never logged).
        kind: ``dicom``, ``nifti``, ``itk``... (discovery's kind).
        status: ``ok``, ``error``, ``skipped`` or a discovery verdict.
        reason: free text (paths, messages); ``reason_code``: the kind of failure only.
        model_fingerprint: the model that made it; ``None`` for rows no model touched (discovery
            verdicts, dead workers), which record no such column.
        stage_seconds: work time per stage (``read``, ``segment``, ``write``), rounded to ms.
        seconds: total work time (the sum of the unrounded stages, rounded to ms).
        volumes_ml: label name -> predicted volume in mL (ok cases).
        metrics: label name -> metrics against the reference label (with ``--labels``).
        uncertainty: the case's uncertainty summary (with ``--uncertainty``), else None (no
            such columns).
        flags: QC flags (:mod:`pipeline.qc_flags`); columns ``flags`` (names joined by ``;``) and
            ``flag_reasons`` (``name: reason`` joined by `` | ``), written once ``qc_checked``.
        qc_checked: the case was measured and flagged (a clean case then has an empty ``flags``).
        extra: columns of a read-back record this version does not know (kept as they were).
    """

    case_id: str
    source: str = ""
    kind: str = ""
    status: str = "ok"
    reason: str = ""
    reason_code: str = ""
    model_fingerprint: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, ReferenceMetrics] = field(default_factory=dict)
    uncertainty: CaseUncertainty | None = None
    flags: tuple[QcFlag, ...] = ()
    qc_checked: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def add_note(self, reason: str, reason_code: str) -> None:
        """Add a note to an ok case (a skipped review aid) after any earlier note (a split series)."""
        self.reason = f"{self.reason}; {reason}" if self.reason else reason
        self.reason_code = f"{self.reason_code};{reason_code}" if self.reason_code else reason_code

    def to_record(self) -> dict[str, Any]:
        """The row as ``case.json`` / ``cases.csv`` columns, in their order: the one flattening.

        ``case_id, source, kind, status, reason, reason_code[, model_fingerprint]``, then
        ``vol_<label>_ml``, ``<metric>_<label>`` (label by label: dice, hd95, nsd), with an
        uncertainty summary ``uncertainty, unc_mask_<label>..., unc_boundary_<label>...``,
        ``seconds_<stage>`` and ``seconds``.
        """
        record: dict[str, Any] = {name: getattr(self, name) for name in _HEAD}
        if self.model_fingerprint is not None:
            record["model_fingerprint"] = self.model_fingerprint
        if self.qc_checked or self.flags:
            record[_FLAGS] = ";".join(flag.name for flag in self.flags)
            record[_FLAG_REASONS] = " | ".join(f"{flag.name}: {flag.reason}" for flag in self.flags)
        record.update(
            {f"{_VOLUME_PREFIX}{label}{_VOLUME_SUFFIX}": ml for label, ml in self.volumes_ml.items()}
        )
        for label, measured in self.metrics.items():
            record.update({f"{name}_{label}": getattr(measured, name) for name in ReferenceMetrics.names()})
        if self.uncertainty is not None:
            record[_UNCERTAINTY] = self.uncertainty.score
            record.update({f"{_UNC_MASK}{label}": v for label, v in self.uncertainty.mask_mean.items()})
            record.update({f"{_UNC_BOUNDARY}{label}": v for label, v in self.uncertainty.boundary_mean.items()})
        record.update(self.extra)
        record.update({f"{_SECONDS}{stage}": value for stage, value in self.stage_seconds.items()})
        record["seconds"] = self.seconds
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CaseRow:
        """The row of a record written by :meth:`to_record` (a finished case's ``case.json``)."""
        text = {name: str(record.get(name, "") or "") for name in _HEAD}
        row = cls(
            text["case_id"], text["source"], text["kind"], text["status"], text["reason"], text["reason_code"]
        )
        row.model_fingerprint = record.get("model_fingerprint")
        row.seconds = float(record.get("seconds", 0.0) or 0.0)
        row.flags, row.qc_checked = _flags_from(record), _FLAGS in record
        row.uncertainty = _uncertainty_from(record)
        measured: dict[str, dict[str, float]] = {}
        prefixes = {f"{name}_": name for name in ReferenceMetrics.names()}
        for key, value in record.items():
            if key in _HEAD or key in ("model_fingerprint", "seconds", _FLAGS, _FLAG_REASONS):
                continue
            if row.uncertainty is not None and (key == _UNCERTAINTY or key.startswith((_UNC_MASK, _UNC_BOUNDARY))):
                continue
            metric = next((m for p, m in prefixes.items() if key.startswith(p)), None)
            if key.startswith(_SECONDS):
                row.stage_seconds[key[len(_SECONDS) :]] = float(value)
            elif key.startswith(_VOLUME_PREFIX) and key.endswith(_VOLUME_SUFFIX):
                row.volumes_ml[key[len(_VOLUME_PREFIX) : -len(_VOLUME_SUFFIX)]] = float(value)
            elif metric is not None:
                measured.setdefault(key[len(metric) + 1 :], {})[metric] = _number(value)
            else:
                row.extra[key] = value
        for label, values in measured.items():
            if set(values) == set(ReferenceMetrics.names()):
                row.metrics[label] = ReferenceMetrics(**values)
            else:  # written by a version that recorded other metrics: keep the columns as they were
                row.extra.update({f"{name}_{label}": value for name, value in values.items()})
        return row


def _uncertainty_from(record: dict[str, Any]) -> CaseUncertainty | None:
    """The ``uncertainty`` / ``unc_mask_<label>`` / ``unc_boundary_<label>`` columns, if written."""
    if record.get(_UNCERTAINTY) in (None, ""):
        return None
    columns = {
        prefix: {k[len(prefix) :]: _number(v) for k, v in record.items() if k.startswith(prefix)}
        for prefix in (_UNC_MASK, _UNC_BOUNDARY)
    }
    return CaseUncertainty(_number(record[_UNCERTAINTY]), columns[_UNC_MASK], columns[_UNC_BOUNDARY])


def _flags_from(record: dict[str, Any]) -> tuple[QcFlag, ...]:
    """The ``flags`` / ``flag_reasons`` columns of :meth:`CaseRow.to_record` (a CSV's NaN: none)."""
    names = [n for n in str(record.get(_FLAGS) or "").split(";") if n and n != "nan"]
    reasons = dict(part.partition(": ")[::2] for part in str(record.get(_FLAG_REASONS) or "").split(" | "))
    return tuple(QcFlag(name, reasons.get(name, "")) for name in names)


def _number(value: Any) -> float:
    """A metric cell of ``case.json``: a number, or ``NaN`` as Python's json writes it (or null)."""
    return math.nan if value is None else float(value)


def error_kind(exc: BaseException) -> str:
    """A code for the kind of ``exc`` that carries no data of the case (no message, no path).

    ``out_of_memory`` for host or device memory exhaustion, else the exception's class name
    (``IngestError``, ``GeometryError``, ``NonFiniteProbabilitiesError``, ``OSError``...).
    """
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return "out_of_memory"
    name = type(exc).__name__
    return name if name.isidentifier() and name.isascii() else "error"
