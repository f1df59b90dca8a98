"""The model of a batch, loaded once per worker process (not once per case).

A Dask worker runs many cases; loading the bundle and building its fold networks costs seconds,
so both are cached here per process, keyed by (bundle folder, device, model fingerprint).
"""

from __future__ import annotations

import logging
import os
import threading

from torch import nn

from pipeline.bundle import ModelBundle, load_bundle

logger = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple[str, str, str], tuple[ModelBundle, list[nn.Module]]] = {}
_BUNDLE_CACHE: dict[tuple[str, str, str], ModelBundle] = {}
_MODEL_LOCK = threading.Lock()  # a multi-threaded (GPU) worker must not load the model twice


def cached_model(bundle_dir: str, device: str, fingerprint: str) -> tuple[ModelBundle, list[nn.Module]]:
    """The bundle and its fold networks on ``device``, loaded once per worker process."""
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


def load_bundle_cached(bundle_dir: str, device: str, fingerprint: str) -> ModelBundle:
    """The bundle's metadata (label names, version) without touching the device."""
    key = (bundle_dir, device, fingerprint)
    with _MODEL_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is not None:
            return cached[0]
        # The write task ran on a worker that never segmented (Dask moved it): load once here.
        if key not in _BUNDLE_CACHE:
            _BUNDLE_CACHE.clear()
            _BUNDLE_CACHE[key] = load_bundle(bundle_dir)
        return _BUNDLE_CACHE[key]
