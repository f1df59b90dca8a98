"""Dataset fingerprint -> ``plan.json`` (nnU-Net's fingerprint/plans idea, simplified).

The planner turns a :class:`~preprocessing.fingerprint.Fingerprint` (per-case spacings and shapes
in RAS axis order, foreground intensity statistics per channel) into a :class:`Plan`: target
spacing, patch size, batch size, normalisation per channel, labels and the network. Training and
inference both read the plan; it travels inside the model bundle.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from preprocessing.atomic import write_text_atomic
from preprocessing.fingerprint import Fingerprint

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
#: ``(patch_size, spacing_mm) -> (network options for that patch, per-axis divisor they need)``; the
#: workflow builds it from ``networks.geometry_options`` + ``networks.required_divisor`` (this layer
#: does not import networks).
NetworkGeometry = Callable[
    [tuple[int, int, int], tuple[float, float, float]], tuple[dict[str, Any], tuple[int, int, int]]
]
# Rounds of "topology from patch, patch to the topology's divisor" before the planner gives up.
_MAX_GEOMETRY_ROUNDS = 8
# Networks whose input must be a multiple of 32 (patch embedding + 5 downsamplings).
_DIVISOR_32 = {"swin_unetr", "unetr"}


@dataclass(frozen=True)
class PlanConfig:
    """Planner knobs; every ``None`` is derived from the fingerprint.

    Attributes:
        target_spacing_mm: force the target spacing (RAS axis order, mm).
        patch_size: force the patch size (voxels, RAS axis order).
        batch_size: patches per optimiser step.
        patch_voxel_budget: maximum voxels per patch (GPU memory budget; nnU-Net's 3d_fullres
            default ends up near 128^3 on a 10 GB card).
        anisotropy_threshold: spacing ratio above which the low-resolution axis gets the 10th
            percentile spacing instead of the median (nnU-Net).
        divisor: extra per-axis divisor every patch size must be a multiple of. With a network
            geometry (``make_plan(..., geometry=...)``, what ``medseg train`` does) the network's own
            divisor follows from its plan-derived topology and this is only added on top; without
            one, ``None`` derives it from ``network_options["strides"]`` or falls back to 16 (32 for
            the transformers).
        network_options: the user's explicit keyword arguments for ``networks.build_network``; they
            win over the options derived from the plan (the plan stores the merged result).
        foreground_samples_per_case: foreground voxels sampled per case for CT statistics
            (by ``preprocessing.fingerprint.fingerprint_dataset``).
        seed: seed of that sample.
    """

    target_spacing_mm: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 2
    patch_voxel_budget: int = 128**3
    anisotropy_threshold: float = 3.0
    divisor: tuple[int, int, int] | int | None = None
    network_options: dict[str, Any] = field(default_factory=dict)
    foreground_samples_per_case: int = 10000
    seed: int = 0


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel is normalised.

    ``scheme`` is ``"ct"`` (clip to ``[clip_low, clip_high]`` HU -- the foreground 0.5/99.5
    percentiles -- then ``(x - mean) / std`` with dataset foreground statistics), ``"zscore"``
    (per-image z-score over the non-zero voxels) or ``"none"``.
    """

    scheme: str
    clip_low: float = 0.0
    clip_high: float = 0.0
    mean: float = 0.0
    std: float = 1.0


@dataclass(frozen=True)
class Plan:
    """Everything preprocessing and the network need, serialised as ``plan.json``.

    Attributes:
        spacing_mm: target voxel spacing along RAS axes (mm).
        patch_size: training patch / sliding-window ROI in voxels (RAS axis order).
        batch_size: patches per optimiser step.
        normalization: one entry per input channel.
        modalities: channel index -> modality name.
        labels: label value -> name, background included.
        network: name for ``networks.build_network``; ``network_options`` its keyword arguments,
            resolved at planning time (the user's explicit options over the topology derived from
            the patch and spacing), so a bundle rebuilds exactly the network it was trained with.
        median_shape: median case shape after resampling (voxels).
        fingerprint_sha256: hash of the dataset fingerprint.
    """

    spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    batch_size: int
    normalization: tuple[ChannelNormalization, ...]
    modalities: dict[int, str]
    labels: dict[int, str]
    network: str
    network_options: dict[str, Any] = field(default_factory=dict)
    median_shape: tuple[int, int, int] = (0, 0, 0)
    fingerprint_sha256: str = ""
    dataset_name: str = ""
    version: int = PLAN_VERSION

    @property
    def in_channels(self) -> int:
        return len(self.normalization)

    @property
    def num_classes(self) -> int:
        """Network output channels: background + foreground labels (label values must be 0..K-1)."""
        return max(self.labels) + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"] = {str(k): v for k, v in self.modalities.items()}
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),  # type: ignore[arg-type]
            patch_size=tuple(int(v) for v in d["patch_size"]),  # type: ignore[arg-type]
            batch_size=int(d["batch_size"]),
            normalization=tuple(ChannelNormalization(**n) for n in d["normalization"]),
            modalities={int(k): v for k, v in d["modalities"].items()},
            labels={int(k): v for k, v in d["labels"].items()},
            network=d["network"],
            network_options=dict(d.get("network_options", {})),
            median_shape=tuple(int(v) for v in d.get("median_shape", (0, 0, 0))),  # type: ignore[arg-type]
            fingerprint_sha256=d.get("fingerprint_sha256", ""),
            dataset_name=d.get("dataset_name", ""),
            version=int(d.get("version", PLAN_VERSION)),
        )


def write_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan.json`` atomically."""
    return write_text_atomic(path, json.dumps(plan.to_dict(), indent=2))


def read_plan(path: str | Path) -> Plan:
    """Read ``plan.json``."""
    return Plan.from_dict(json.loads(Path(path).read_text()))


def target_spacing(fingerprint: Fingerprint, anisotropy_threshold: float = 3.0) -> tuple[float, float, float]:
    """Median spacing; nnU-Net's rule for strongly anisotropic data on the low-resolution axis.

    When the coarsest axis' median spacing exceeds ``anisotropy_threshold`` times the finest and
    that axis also has ``anisotropy_threshold`` times fewer voxels, the median would upsample most
    cases along it; nnU-Net takes the 10th percentile of that axis' spacings instead (kept above
    the other axes' spacing so the axis stays the coarse one).
    """
    spacings = np.asarray(fingerprint.spacings_mm, dtype=np.float64)
    shapes = np.asarray(fingerprint.shapes, dtype=np.float64)
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * target[others].max()
    aniso_voxels = median_shape[worst] * anisotropy_threshold < median_shape[others].min()
    if aniso_spacing and aniso_voxels:
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), target[others].max() + 1e-5)
    return tuple(float(v) for v in target)  # type: ignore[return-value]


def _divisor(network: str, config: PlanConfig) -> tuple[int, int, int]:
    if config.divisor:
        d = config.divisor
        return (int(d),) * 3 if isinstance(d, int) else tuple(int(v) for v in d)  # type: ignore[return-value]
    strides = config.network_options.get("strides")
    if strides:
        per_axis = np.ones(3, dtype=int)
        for s in strides:
            per_axis *= np.broadcast_to(np.asarray(s, dtype=int), (3,))
        return tuple(int(v) for v in per_axis)  # type: ignore[return-value]
    return (32,) * 3 if network in _DIVISOR_32 else (16,) * 3


def patch_size_for(
    median_shape: tuple[int, ...], spacing_mm: tuple[float, ...], divisor: tuple[int, ...], budget: int
) -> tuple[int, int, int]:
    """Patch size: the median shape rounded up to ``divisor`` (per axis), shrunk within ``budget`` voxels.

    While over budget, the axis with the largest physical extent (voxels * spacing) loses one
    divisor step -- nnU-Net's idea of keeping the patch's field of view roughly isotropic.
    """
    patch = [max(d, int(math.ceil(s / d)) * d) for s, d in zip(median_shape, divisor, strict=True)]
    while int(np.prod(patch)) > budget:
        extent = [p * sp if p > d else -1.0 for p, sp, d in zip(patch, spacing_mm, divisor, strict=True)]
        axis = int(np.argmax(extent))
        if extent[axis] < 0:
            break
        patch[axis] -= divisor[axis]
    return tuple(patch)  # type: ignore[return-value]


def normalization_for(modality: str, stats: dict[str, float]) -> ChannelNormalization:
    """CT -> clip to foreground 0.5-99.5 percentiles + z-score with foreground stats; else per-image z-score."""
    if modality.strip().upper() == "CT":
        return ChannelNormalization(
            "ct", stats["p00_5"], stats["p99_5"], stats["mean"], max(stats["std"], 1e-8)
        )
    return ChannelNormalization("zscore")


def _divisible(patch: tuple[int, ...], divisor: tuple[int, ...]) -> bool:
    return all(p % d == 0 for p, d in zip(patch, divisor, strict=True))


def _lcm(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(math.lcm(int(x), int(y)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def resolve_patch_and_network(
    median_shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    network: str,
    config: PlanConfig,
    geometry: NetworkGeometry | None = None,
) -> tuple[tuple[int, int, int], dict[str, Any]]:
    """Patch size and network options, resolved together as nnU-Net does.

    The network's topology follows the patch (e.g. ``unet``'s strides), and the patch must be a
    multiple of the topology's divisor. Without ``geometry`` the divisor is fixed (``config.divisor``,
    or derived from ``network_options["strides"]``) and the options are ``config.network_options``.
    With ``geometry``: the patch is planned first (``patch_size_for`` on the median shape; divisor
    ``config.divisor`` or 1), then ``geometry(patch, spacing)`` gives the topology and its divisor,
    the patch is rounded up to that divisor (and shrunk in divisor steps back within the budget), and
    this repeats until the patch is a multiple of its own topology's divisor. A forced
    ``config.patch_size`` is never changed: if its topology cannot take it, that is an error.

    Returns:
        ``(patch_size, network_options)``; the options are what ``networks.build_network`` gets.

    Raises:
        ValueError: a forced patch size the network cannot take, naming a size it can; or no
            consistent patch found (the message says to set ``patch_size``).
    """
    if geometry is None:
        divisor = _divisor(network, config)
        patch = config.patch_size or patch_size_for(median_shape, spacing_mm, divisor, config.patch_voxel_budget)
        return tuple(int(p) for p in patch), dict(config.network_options)  # type: ignore[return-value]
    forced = _divisor(network, config) if config.divisor else (1, 1, 1)
    if config.patch_size:
        patch = cast(tuple[int, int, int], tuple(int(p) for p in config.patch_size))
        options, needed = geometry(patch, spacing_mm)
        needed = _lcm(needed, forced)
        if not _divisible(patch, needed):
            suggestion = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, needed, strict=True))
            raise ValueError(
                f"patch_size {patch} does not fit network '{network}': with this patch and spacing "
                f"{spacing_mm} mm its input must be a multiple of {needed} per axis; use e.g. "
                f"patch_size: {list(suggestion)}"
            )
        return patch, options
    patch = patch_size_for(median_shape, spacing_mm, forced, config.patch_voxel_budget)
    for _ in range(_MAX_GEOMETRY_ROUNDS):
        options, needed = geometry(patch, spacing_mm)
        needed = _lcm(needed, forced)
        if _divisible(patch, needed):
            return patch, options
        patch = patch_size_for(patch, spacing_mm, needed, config.patch_voxel_budget)
    raise ValueError(
        f"could not plan a patch size for network '{network}' (median shape {median_shape}, spacing "
        f"{spacing_mm} mm, last try {patch}); set patch_size in --config"
    )


def make_plan(
    fingerprint: Fingerprint,
    network: str,
    config: PlanConfig = PlanConfig(),
    geometry: NetworkGeometry | None = None,
) -> Plan:
    """Plan preprocessing, patch size and network geometry for ``network`` from a dataset fingerprint.

    Args:
        fingerprint: the dataset's spacings, shapes, intensities, labels.
        network: name for ``networks.build_network``.
        config: planner knobs and the user's explicit ``network_options``.
        geometry: how the network's options and divisor follow from a patch and spacing (see
            :func:`resolve_patch_and_network`); ``medseg train`` always gives it. ``None``: the
            options are ``config.network_options`` as given and the divisor is fixed.
    """
    spacing = config.target_spacing_mm or target_spacing(fingerprint, config.anisotropy_threshold)
    spacings = np.asarray(fingerprint.spacings_mm, dtype=np.float64)
    shapes = np.asarray(fingerprint.shapes, dtype=np.float64)
    median_shape = tuple(int(round(v)) for v in np.median(shapes * spacings / np.asarray(spacing), axis=0))
    patch, network_options = resolve_patch_and_network(
        cast(tuple[int, int, int], median_shape),
        cast(tuple[float, float, float], tuple(float(s) for s in spacing)),
        network,
        config,
        geometry,
    )
    norms = tuple(
        normalization_for(fingerprint.modalities.get(c, ""), fingerprint.foreground[c])
        for c in range(len(fingerprint.foreground))
    )
    labels = dict(fingerprint.labels)
    if sorted(labels) != list(range(len(labels))):
        logger.warning(
            "label values %s are not 0..K-1; the network will have %d outputs",
            sorted(labels),
            max(labels) + 1,
        )
    plan = Plan(
        spacing_mm=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        patch_size=tuple(int(p) for p in patch),  # type: ignore[arg-type]
        batch_size=int(config.batch_size),
        normalization=norms,
        modalities=dict(fingerprint.modalities),
        labels=labels,
        network=network,
        network_options=network_options,
        median_shape=median_shape,  # type: ignore[arg-type]
        fingerprint_sha256=fingerprint.sha256(),
        dataset_name=fingerprint.dataset_name,
    )
    logger.info(
        "plan: spacing %s mm, patch %s, batch %d, normalisation %s, network options %s",
        plan.spacing_mm,
        plan.patch_size,
        plan.batch_size,
        [n.scheme for n in norms],
        plan.network_options,
    )
    return plan


def with_overrides(config: PlanConfig, overrides: dict[str, Any]) -> PlanConfig:
    """Copy of ``config`` with YAML overrides applied (unknown keys are an error)."""
    known = set(PlanConfig.__dataclass_fields__)
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown plan settings {sorted(unknown)}; known: {sorted(known)}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(config, **fixed)
