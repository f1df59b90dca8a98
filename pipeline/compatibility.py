"""Whether a model may segment an image: channel count and imaging modality.

A model trained on CT must not silently segment an MR series: the case is *skipped* with a reason
(``incompatible_modality`` / ``incompatible_channels``) instead of producing a confident, wrong mask.
"""

from __future__ import annotations

import logging

from pipeline.bundle import ModelBundle
from preprocessing.image import Volume

logger = logging.getLogger(__name__)

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
