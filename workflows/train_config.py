"""The YAML of ``medseg train --config``, parsed here and nowhere else, and its ``--help`` field list.

The file is a flat mapping of :class:`~preprocessing.plan.PlanConfig` and
:class:`~pipeline.training.config.TrainConfig` field names (optionally grouped under ``plan:`` and
``train:``; ``augment:`` is a nested mapping of :class:`~preprocessing.transforms.AugmentConfig`;
``postprocessing:`` forces the largest-component decision, see :mod:`pipeline.inference.postprocessing`),
e.g.::

    network_options: {channels: [8, 16, 32], strides: [1, 2, 2]}
    optimizer: adamw
    learning_rate: 0.003
    val_every: 5
    augment: {mirror: false}
    postprocessing: {largest_component: {liver: true}}

An unknown key at any level is an error naming the valid ones (exit code 2).
"""

from __future__ import annotations

import textwrap
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.inference.postprocessing import LARGEST_COMPONENT, parse_postprocessing_config
from pipeline.training.config import TrainConfig
from preprocessing.plan import PlanConfig, with_overrides
from preprocessing.transforms import AugmentConfig

SECTIONS = ("plan", "train", "postprocessing")


def load_config_file(
    path: str | Path | None, plan: PlanConfig, train: TrainConfig
) -> tuple[PlanConfig, TrainConfig, dict[str, Any]]:
    """Apply a YAML file's overrides. Returns the configs and the forced ``postprocessing``.

    Keys may sit at the top level or under ``plan:`` / ``train:``; ``augment:`` and
    ``postprocessing:`` are nested mappings. Per-label ``postprocessing`` names are checked
    against the dataset later (:func:`~pipeline.inference.postprocessing.check_postprocessing_labels`).

    Raises:
        ValueError: unknown keys at any level, a section that is not a mapping, or a file that is
            not a mapping (exit code 2 at the CLI); the message names the valid keys.
    """
    if path is None:
        return plan, train, {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    plan_fields, train_fields = set(PlanConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    unknown = sorted(str(k) for k in raw if k not in plan_fields | train_fields | set(SECTIONS))
    if unknown:
        raise ValueError(
            f"{path}: unknown settings {unknown}; valid keys: the sections {list(SECTIONS)}, "
            f"plan settings {sorted(plan_fields)}, training settings {sorted(train_fields)}"
        )
    top = {k: v for k, v in raw.items() if k not in SECTIONS}
    # A top-level key of both configs (``seed``) sets both; a section's key sets only its own.
    plan_keys = {
        **{k: v for k, v in top.items() if k in plan_fields},
        **_section(raw, "plan", plan_fields, path),
    }
    flat = {
        **{k: v for k, v in top.items() if k in train_fields},
        **_section(raw, "train", train_fields, path),
    }
    post = parse_postprocessing_config(raw.get("postprocessing"), str(path))
    if "augment" in flat:
        flat["augment"] = _augment(flat["augment"], train.augment, path)
    return with_overrides(plan, plan_keys), replace(train, **flat), post


def _section(raw: dict[str, Any], name: str, valid: set[str], path: str | Path) -> dict[str, Any]:
    """The ``plan:`` or ``train:`` mapping of a config, its keys checked against ``valid``."""
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: '{name}' must be a mapping of {name} settings {sorted(valid)}")
    bad = sorted(str(k) for k in set(section) - valid)
    if bad:
        raise ValueError(f"{path}: unknown {name} settings {bad}; valid: {sorted(valid)}")
    return dict(section)


def _augment(value: Any, base: AugmentConfig, path: str | Path) -> AugmentConfig:
    """``base`` with the ``augment:`` mapping's overrides, its keys checked."""
    augment_fields = set(AugmentConfig.__dataclass_fields__)
    augment = value or {}
    if not isinstance(augment, dict):
        raise ValueError(f"{path}: 'augment' must be a mapping of {sorted(augment_fields)}")
    bad = sorted(str(k) for k in set(augment) - augment_fields)
    if bad:
        raise ValueError(f"{path}: unknown augment settings {bad}; valid: {sorted(augment_fields)}")
    return replace(base, **augment)


def config_help() -> str:
    """Plain-text list of the ``--config`` keys (the epilog of ``medseg train --help``)."""
    lines = [
        "--config FILE is a YAML mapping; keys go at the top level or under 'plan:' / 'train:'.",
        "Unknown keys at any level are an error (exit code 2).",
    ]
    for title, cls in (
        ("plan settings", PlanConfig),
        ("training settings", TrainConfig),
        ("augment: {...} settings", AugmentConfig),
    ):
        lines += ["", f"{title}:"] + [f"  {line}" for line in _field_lines(cls)]
    lines += [
        "",
        "postprocessing: {...} settings:",
        f"  {LARGEST_COMPONENT}: true | false | {{LABEL: true|false, ...}}",
        "      force keeping only the largest connected component, for every label or per label",
        "      name; default: decided per label on the out-of-fold Dice of the cross-validation",
        "      (on only where it raises that label's Dice), recorded in the bundle's bundle.json",
    ]
    return "\n".join(lines)


def _field_lines(cls: type) -> list[str]:
    """``name (default: x): description`` per dataclass field; descriptions from the docstring."""
    described = _attribute_descriptions(cls.__doc__ or "")
    out = []
    for f in fields(cls):
        if f.name == "augment":
            default = "see augment settings"
        elif f.default is not MISSING:
            default = repr(f.default)
        else:
            default = repr(f.default_factory()) if f.default_factory is not MISSING else "required"
        desc = described.get(f.name, "").replace("``", "")
        text = f"{f.name} (default: {default})" + (f": {desc}" if desc else "")
        out += textwrap.wrap(text, width=96, subsequent_indent="    ")
    return out


def _attribute_descriptions(doc: str) -> dict[str, str]:
    """Field name -> text of a Google docstring's ``Attributes:`` (``a / b: text`` names several)."""
    described: dict[str, str] = {}
    current: list[str] = []
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        head, sep, text = line.strip().partition(": ")
        names = [n.strip() for n in head.replace(",", "/").split("/")]
        if sep and len(line) - len(line.lstrip()) <= 8 and all(n.isidentifier() for n in names):
            current = [n for n in names if n not in described]
            for n in current:
                described[n] = text.strip()
        elif line.strip() and current:  # continuation of the entry above
            for n in current:
                described[n] += " " + line.strip()
    return described
