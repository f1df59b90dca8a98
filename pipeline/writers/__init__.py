"""The outputs of a segmented case: one module per file behind the :class:`~pipeline.writers.base.CaseWriter`
protocol, and :data:`WRITERS`, the one list the case runner and the ``predict`` command line read.

To add an output: a module here with a class that has the protocol's attributes and
``applies_to`` / ``write``, and one entry in :data:`WRITERS`. An optional one (``optional = True``)
gets its ``medseg predict`` flag, its place in ``PredictConfig.outputs`` and its MLflow param
from this list; nothing else is edited.
"""

from __future__ import annotations

from pipeline.writers.base import CaseWriter
from pipeline.writers.dicom_seg import DicomSegWriter
from pipeline.writers.nifti_mask import NiftiMaskWriter
from pipeline.writers.probabilities import ProbabilitiesWriter
from pipeline.writers.qc_picture import QcPictureWriter
from pipeline.writers.uncertainty import UncertaintyWriter

#: Every output, in the order they are started (they run side by side in threads).
WRITERS: tuple[CaseWriter, ...] = (
    NiftiMaskWriter(),
    ProbabilitiesWriter(),
    DicomSegWriter(),
    QcPictureWriter(),
    UncertaintyWriter(),
)


def optional_writers() -> tuple[CaseWriter, ...]:
    """The writers a flag turns on (``--save-probabilities``...), in :data:`WRITERS` order."""
    return tuple(writer for writer in WRITERS if writer.optional)
