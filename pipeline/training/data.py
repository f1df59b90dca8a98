"""Training data of one fold: cached MONAI datasets, the patch loader and the validation volumes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate

from pipeline.training.config import TrainConfig
from pipeline.training.validation import ValidationCase
from preprocessing.plan import Plan
from preprocessing.transforms import train_transforms, val_transforms


@dataclass(frozen=True)
class FoldData:
    """Cases of one fold: MONAI items ``{"image": path(s), "label": path, "case_id": str}``."""

    fold: int
    train: tuple[dict[str, Any], ...]
    val: tuple[dict[str, Any], ...]


def make_dataset(
    items: list[dict[str, Any]], transform: Any, cache: str, cache_dir: Path | None = None
) -> Dataset:
    """MONAI dataset that caches the deterministic head of ``transform`` per ``cache``."""
    if cache == "memory":
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache folder")
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be 'memory', 'disk' or 'none'; got {cache!r}")


def validation_cases(dataset: Dataset, items: tuple[dict[str, Any], ...]) -> list[ValidationCase]:
    cases = []
    for i, item in enumerate(items):
        d = dataset[i]
        image = d["image"]
        affine = np.asarray(image.affine, dtype=np.float64) if hasattr(image, "affine") else np.eye(4)
        label = torch.as_tensor(d["label"])[0].round().to(torch.uint8).numpy()
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        cases.append(ValidationCase(str(item.get("case_id", i)), plain.float(), label, affine))
    return cases


def make_fold_data(
    data: FoldData, plan: Plan, config: TrainConfig, cache_dir: Path
) -> tuple[Dataset, DataLoader, list[ValidationCase]]:
    """Training dataset + loader (patches) and the preprocessed validation volumes."""
    chain = train_transforms(plan, config.augment, config.samples_per_volume)
    train_ds = make_dataset(list(data.train), chain, config.cache, cache_dir)
    val_ds = make_dataset(list(data.val), val_transforms(plan), config.cache, cache_dir)
    cases_per_batch = max(1, plan.batch_size // config.samples_per_volume)
    loader = DataLoader(
        train_ds,
        batch_size=cases_per_batch,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=list_data_collate,
        drop_last=len(data.train) > cases_per_batch,
    )
    return train_ds, loader, validation_cases(val_ds, data.val)
