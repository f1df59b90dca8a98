"""Seeded, patient-level K-fold cross-validation splits, stored in ``splits.json``.

``splits.json`` (written next to the plan, reused on reruns so a resumed or repeated run trains
the same folds)::

    {"seed": 0, "num_folds": 2,
     "folds": [{"train": ["case_a", ...], "val": ["case_c", ...]}, ...],
     "groups": {"case_a": "grp-1f3a...", ...}}

``groups`` holds *hashed* patient groups, never patient ids, so the file may be logged to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from preprocessing.atomic import write_text_atomic
from preprocessing.errors import DatasetError

logger = logging.getLogger(__name__)


def hash_group(patient_id: str) -> str:
    """A non-identifying, stable stand-in for a patient id (for files that may be logged)."""
    return "grp-" + hashlib.sha256(f"medseg-group\0{patient_id}".encode()).hexdigest()[:12]


def make_folds(
    case_ids: Sequence[str], num_folds: int, seed: int = 0, groups: Mapping[str, str | None] | None = None
) -> list[dict[str, list[str]]]:
    """Split cases into ``num_folds`` folds with no group (patient) in two folds.

    Like scikit-learn's ``GroupKFold`` but seeded: groups are shuffled with ``seed`` and then
    assigned greedily, largest first, to the fold with the fewest cases, which balances fold sizes
    when patients have several scans. (Written with numpy because scikit-learn is not a dependency.)

    Args:
        case_ids: all training case ids.
        num_folds: K >= 2, at most the number of groups.
        seed: shuffling seed.
        groups: case id -> patient/group id; missing or ``None`` means the case is its own group.

    Returns:
        ``K`` dicts ``{"train": [...], "val": [...]}`` with sorted case ids.

    Raises:
        DatasetError: fewer groups than folds.
    """
    groups = groups or {}
    members: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        members.setdefault(groups.get(case) or f"case:{case}", []).append(case)
    if num_folds < 2:
        raise DatasetError(f"--folds must be at least 2 (got {num_folds})")
    if len(members) < num_folds:
        raise DatasetError(
            f"{len(members)} patients/cases cannot fill {num_folds} folds; use --folds {len(members)} or fewer"
        )
    keys = sorted(members)
    order = np.random.default_rng(seed).permutation(len(keys))
    # Stable sort by size keeps the seeded shuffle among groups of equal size.
    shuffled = [keys[i] for i in order]
    shuffled.sort(key=lambda g: -len(members[g]))
    val: list[list[str]] = [[] for _ in range(num_folds)]
    for group in shuffled:
        target = int(np.argmin([len(v) for v in val]))
        val[target].extend(members[group])
    all_cases = sorted(case_ids)
    return [{"train": sorted(set(all_cases) - set(v)), "val": sorted(v)} for v in val]


def load_or_make_splits(
    path: Path,
    case_ids: Sequence[str],
    num_folds: int,
    seed: int = 0,
    groups: Mapping[str, str | None] | None = None,
) -> list[dict[str, list[str]]]:
    """Reuse ``path`` when it matches these cases and K, else make new folds and write it atomically.

    A ``splits.json`` whose case set or fold count differs from the dataset is an error rather
    than silently replaced: results trained on the old folds would no longer be comparable.
    """
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        folds = stored["folds"]
        stored_cases = sorted({c for f in folds for c in f["val"]})
        if len(folds) == num_folds and stored_cases == sorted(case_ids):
            logger.info("reusing cross-validation splits from %s", path)
            return folds
        raise DatasetError(
            f"{path} holds {len(folds)} folds over {len(stored_cases)} cases, but this run asks for {num_folds} folds "
            f"over {len(case_ids)} cases; delete it (or use another --out) to make new splits"
        )
    folds = make_folds(case_ids, num_folds, seed, groups)
    hashed = {c: hash_group(g) for c, g in (groups or {}).items() if g and c in set(case_ids)}
    write_text_atomic(
        path, json.dumps({"seed": seed, "num_folds": num_folds, "folds": folds, "groups": hashed}, indent=2)
    )
    return folds
