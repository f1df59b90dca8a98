"""Post-processing of label maps: keep the largest connected component, decided per label.

Keeping only the largest component of a label removes stray false-positive islands of a single
organ, but it deletes every further true lesion, metastasis or the second kidney. So, as in
nnU-Net, it is decided per label on the out-of-fold (validation) predictions of the
cross-validation: a label gets it only where it raises that label's mean out-of-fold Dice.

The decision lives in the model bundle (``bundle.json`` -> ``postprocessing``)::

    {"largest_component": {
        "liver":  {"apply": true,  "decided_by": "oof", "oof_dice_without": 0.91,
                   "oof_dice_with": 0.93, "oof_cases": 12},
        "lesion": {"apply": false, "decided_by": "oof", "oof_dice_without": 0.55,
                   "oof_dice_with": 0.41, "oof_cases": 12}}}

``decided_by`` is ``"oof"`` (out-of-fold Dice), ``"forced"`` (``--config`` said so; the
out-of-fold values are still recorded) or ``"default"`` (no out-of-fold data: off). A label
that is not listed is off. Bundles of older versions stored ``{"largest_component": true}``;
that explicit boolean is still honoured for every label (with a warning), ``false`` or a
missing entry means off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

LARGEST_COMPONENT = "largest_component"
#: The keys ``postprocessing:`` of a training config (and of ``bundle.json``) may hold.
POSTPROCESSING_KEYS = (LARGEST_COMPONENT,)
#: ``decided_by`` values of a per-label decision.
DECIDED_BY = ("oof", "forced", "default")

#: Per case id, per label name: ``{"without": dice, "with": dice}`` (largest component off/on).
OofDice = dict[str, dict[str, dict[str, float]]]


def keep_largest_component(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Per label value, keep only its largest 26-connected component; the rest becomes background.

    Each label is labelled inside its own bounding box (one ``find_objects`` pass finds them all):
    an organ fills a few percent of a 512x512x400 scan, so this is ~30x less work than labelling
    the whole volume once per class (10 s -> 0.3 s for 13 classes on two cores). Components, sizes
    and the tie-break (lowest component in raster order) are those of the whole-volume labelling:
    every voxel of a value lies inside its box, and raster order within a box is raster order.

    Args:
        labels: ``(X, Y, Z)`` integer label map.
        values: positive label values to clean (others are left alone).
    """
    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    wanted = sorted({int(v) for v in values if 0 < int(v)})
    if not wanted or labels.size == 0:
        return out
    top = int(labels.max())
    boxes = ndimage.find_objects(labels if labels.dtype.kind in "iu" else labels.astype(np.int32), top)
    for value in wanted:
        box = boxes[value - 1] if value <= len(boxes) else None
        if box is None:  # value absent
            continue
        components, n = ndimage.label(labels[box] == value, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        crop = out[box]  # a view: writing into it writes into ``out``
        crop[(components != int(np.argmax(sizes))) & (components > 0)] = 0
    return out


def parse_postprocessing_config(raw: Any, source: str) -> dict[str, Any]:
    """Validate the ``postprocessing:`` mapping of a training config.

    Accepted: ``{largest_component: true|false}`` (force it for every label) or
    ``{largest_component: {LABEL: true|false, ...}}`` (force it per label; the other labels are
    decided on the out-of-fold Dice). ``null`` or an empty mapping forces nothing. Label names
    are checked against the dataset later (:func:`check_postprocessing_labels`).

    Args:
        raw: the parsed YAML value.
        source: the config file, for messages.

    Returns:
        ``{}`` or ``{"largest_component": bool | {label: bool}}``.

    Raises:
        ValueError: unknown keys or values that are not booleans, naming the valid ones.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{source}: 'postprocessing' must be a mapping with the keys {list(POSTPROCESSING_KEYS)}, "
            f"got {type(raw).__name__}"
        )
    unknown = sorted(str(k) for k in raw if k not in POSTPROCESSING_KEYS)
    if unknown:
        raise ValueError(
            f"{source}: unknown postprocessing settings {unknown}; valid: {list(POSTPROCESSING_KEYS)}"
        )
    value = raw.get(LARGEST_COMPONENT)
    if value is None:
        return {}
    if isinstance(value, bool):
        return {LARGEST_COMPONENT: value}
    if isinstance(value, Mapping):
        bad = sorted(str(k) for k, v in value.items() if not isinstance(v, bool))
        if bad:
            raise ValueError(
                f"{source}: postprocessing.largest_component values must be true or false; "
                f"not so for {bad}"
            )
        return {LARGEST_COMPONENT: {str(k): bool(v) for k, v in value.items()}}
    raise ValueError(
        f"{source}: postprocessing.largest_component must be true, false or a mapping "
        f"{{label name: true|false}}; got {value!r}"
    )


def check_postprocessing_labels(config: Mapping[str, Any], label_names: Collection[str]) -> None:
    """Refuse per-label settings for names that are not foreground labels of the dataset.

    Raises:
        ValueError: naming the unknown labels and the valid ones.
    """
    value = config.get(LARGEST_COMPONENT)
    if not isinstance(value, Mapping):
        return
    unknown = sorted(set(value) - set(label_names))
    if unknown:
        raise ValueError(
            f"postprocessing.largest_component names {unknown}, which are not labels of the dataset; "
            f"valid labels: {sorted(label_names)}"
        )


def largest_component_dice(
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]], label: str
) -> tuple[float, float, int]:
    """Mean out-of-fold Dice of ``label`` without and with the largest component, and the case count."""
    pairs = [
        (float(d[label]["without"]), float(d[label]["with"]))
        for d in per_case.values()
        if label in d and math.isfinite(float(d[label]["without"])) and math.isfinite(float(d[label]["with"]))
    ]
    if not pairs:
        return math.nan, math.nan, 0
    without, with_ = (float(np.mean(v)) for v in zip(*pairs, strict=True))
    return without, with_, len(pairs)


def decide_largest_component(
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
    label_names: Iterable[str],
    forced: bool | Mapping[str, bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per label: keep the largest component or not, from the out-of-fold Dice.

    A label gets it only when its mean out-of-fold Dice with it is strictly higher than
    without (nnU-Net v2's per-class rule). A tie -- typically the operation changed no
    out-of-fold case -- leaves it off: nothing showed that it helps, and off keeps a second
    lesion that the validation cases happened not to contain. A forced value wins and is
    recorded as ``"forced"``; a label without out-of-fold cases is off (``"default"``).

    Args:
        per_case: out-of-fold Dice of every validation case of every fold (:data:`OofDice`).
        label_names: foreground label names of the plan.
        forced: ``--config`` value: one boolean for every label, or per label name.

    Returns:
        ``{label: {"apply", "decided_by", "oof_dice_without", "oof_dice_with", "oof_cases"}}``
        (Dice ``None`` without out-of-fold cases, so the mapping is plain JSON).
    """
    out: dict[str, dict[str, Any]] = {}
    for name in label_names:
        without, with_, n = largest_component_dice(per_case, name)
        if isinstance(forced, bool):
            force: bool | None = forced
        else:
            force = None if forced is None else forced.get(name)
        if force is not None:
            apply, by = bool(force), "forced"
        elif n:
            apply, by = with_ > without, "oof"
        else:
            apply, by = False, "default"
        out[name] = {
            "apply": apply,
            "decided_by": by,
            "oof_dice_without": without if n else None,
            "oof_dice_with": with_ if n else None,
            "oof_cases": n,
        }
    return out


def normalize_postprocessing(raw: Any, source: str = "bundle.json") -> dict[str, Any]:
    """The ``postprocessing`` entry of ``bundle.json``, validated (missing -> ``{}``: all off).

    Raises:
        ValueError: an entry of the wrong shape (naming what was expected).
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: 'postprocessing' must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in POSTPROCESSING_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown postprocessing entries {unknown}; valid: {list(POSTPROCESSING_KEYS)}")
    value = raw.get(LARGEST_COMPONENT)
    if value is None:
        return {}
    if isinstance(value, bool):  # format of older bundles: one switch for every label
        return {LARGEST_COMPONENT: value}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{source}: postprocessing.largest_component must be a boolean or a mapping per label, got {value!r}"
        )
    decisions: dict[str, Any] = {}
    for name, entry in value.items():
        if isinstance(entry, bool):
            decisions[str(name)] = {"apply": entry}
        elif isinstance(entry, Mapping) and isinstance(entry.get("apply"), bool):
            decisions[str(name)] = dict(entry)
        else:
            raise ValueError(
                f"{source}: postprocessing.largest_component.{name} must be a boolean or a mapping "
                f"with a boolean 'apply', got {entry!r}"
            )
    return {LARGEST_COMPONENT: decisions}


def largest_component_values(postprocessing: Mapping[str, Any], labels: Mapping[int, str]) -> list[int]:
    """Label values whose largest component is kept, from a bundle's ``postprocessing``.

    Args:
        postprocessing: normalised entry (:func:`normalize_postprocessing`).
        labels: foreground label value -> name.
    """
    value = postprocessing.get(LARGEST_COMPONENT)
    if value is True:
        return sorted(labels)
    if not isinstance(value, Mapping):
        return []
    on = {name for name, entry in value.items() if isinstance(entry, Mapping) and entry.get("apply") is True}
    return sorted(k for k, name in labels.items() if name in on)


def warn_legacy_postprocessing(postprocessing: Mapping[str, Any], source: str) -> None:
    """Log that an older bundle keeps the largest component of every label (its recorded behaviour)."""
    if postprocessing.get(LARGEST_COMPONENT) is True:
        logger.warning(
            "%s keeps only the largest connected component of every label (a bundle of an older medseg); "
            "a second lesion or the second of a paired organ is removed. Retrain to decide it per label, "
            "or set postprocessing.largest_component to false in its bundle.json",
            source,
        )
