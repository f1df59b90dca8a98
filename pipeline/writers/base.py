"""The :class:`CaseWriter` protocol: one output file of a segmented case.

Every output of ``medseg predict`` (mask, probabilities, DICOM SEG, QC picture...) is one object
in :data:`pipeline.writers.WRITERS`; the case runner runs each that applies (side by side, in
threads) and the ``predict`` command line offers a flag for each optional one. So a new output is
one new module here plus one entry in that list: no edit in the configs, the parser or the runner.

Import cost: the command line builds its flags from the list, and a bad command line is refused
in well under a second, so writer modules import their heavy libraries (highdicom, matplotlib,
nibabel) inside the functions that write, not at the top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: importing Segmentation here would import torch into the CLI
    from pipeline.inference.segment import Segmentation
    from preprocessing.image import Volume
    from preprocessing.source_item import SourceItem


@dataclass(frozen=True)
class SegmentedCase:
    """What every writer reads: one case with its segmentation, and the model that made it.

    Attributes:
        item: the discovered source (``kind``, ``paths``, ``case_id``).
        volume: the image as read, ``(C, X, Y, Z)`` on its own grid (``volume.dicom`` for DICOM).
        segmentation: labels ``uint8 (X, Y, Z)`` on that grid (probabilities when asked for).
        label_names: label value -> name of the model's foreground labels.
        model_name: the model's name ("" when unnamed); ``model_version``: its version tag.
    """

    item: SourceItem
    volume: Volume
    segmentation: Segmentation
    label_names: Mapping[int, str]
    model_name: str = ""
    model_version: str = ""


class CaseWriter(Protocol):
    """One output file of a case (implementations: one module each in ``pipeline/writers/``).

    Attributes (read-only):
        name: the output's id: the key in ``CaseConfig.outputs`` / ``PredictConfig.outputs``
            and, for a failure that does not fail the case, the ``<name>_skipped:`` reason code.
        title: how messages name it ("QC picture").
        filename: the file it writes in the case folder.
        optional: written only when enabled (by its command-line ``flag``); else always.
        flag: the ``medseg predict`` flag that enables it (optional writers only), e.g.
            ``--save-probabilities``; its argparse dest is the MLflow param name.
        help: the flag's help text.
        needs_probabilities: the segmenter must keep the class probabilities for it.
        needs_uncertainty: the segmenter must compute the ensemble uncertainty maps for it.
        fails_case: a failure to write fails the case; ``False`` for review aids (a note instead).
    """

    @property
    def name(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def optional(self) -> bool: ...
    @property
    def flag(self) -> str: ...
    @property
    def help(self) -> str: ...
    @property
    def needs_probabilities(self) -> bool: ...
    @property
    def needs_uncertainty(self) -> bool: ...
    @property
    def fails_case(self) -> bool: ...

    def applies_to(self, case: SegmentedCase) -> bool:
        """Whether this output exists for ``case`` (e.g. a DICOM SEG only for DICOM sources)."""
        ...

    def write(self, case: SegmentedCase, path: Path) -> Path:
        """Write the output of ``case`` to ``path`` atomically; raise on failure."""
        ...


def flag_dest(writer: CaseWriter) -> str:
    """The argparse dest of an optional writer's flag (``--save-probabilities`` -> ``save_probabilities``);
    also its MLflow param name."""
    return writer.flag.lstrip("-").replace("-", "_")
