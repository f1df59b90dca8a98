"""Dask cluster context: a private LocalCluster by default, or an existing scheduler.

Shared by ``ingest``, ``train`` (parallel folds) and ``predict``: one place decides how workers
are started, so every job behaves the same on a laptop and on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    resources: dict[str, float] | None = None,
    threads_per_worker: int = 1,
) -> Iterator[Client]:
    """Yield a Dask client; close what we started on exit.

    Args:
        workers: processes of a private ``LocalCluster`` (one thread each: our tasks are
            numpy/torch-heavy and hold the GIL in places, so processes scale better than threads).
            ``None`` or < 1 means 1.
        scheduler: address of an existing scheduler (``tcp://host:8786``); overrides ``workers``.
            The cluster is not shut down on exit -- it is not ours.
        resources: abstract resources each local worker advertises (e.g. ``{"GPU": 1}``) so tasks
            submitted with ``resources=`` are placed one per GPU. Ignored with ``scheduler``
            (remote workers declare their own resources when started).
        threads_per_worker: threads of each local worker (``predict`` gives GPU workers spare
            threads for reading and writing around the GPU stage). Ignored with ``scheduler``.

    Yields:
        A connected ``distributed.Client``.
    """
    if scheduler:
        logger.info("connecting to Dask scheduler %s", scheduler)
        with Client(scheduler) as client:
            yield client
        return
    n = max(1, int(workers or 1))
    with _local_cluster(n, resources, threads_per_worker) as cluster, Client(cluster) as client:
        client.wait_for_workers(n)
        logger.info("started a local Dask cluster with %d worker process(es)", n)
        yield client


def _local_cluster(n: int, resources: dict[str, float] | None, threads_per_worker: int = 1) -> LocalCluster:
    """A LocalCluster of ``n`` worker processes (single-threaded unless asked otherwise).

    With a ``GPU`` resource each worker gets its own ``CUDA_VISIBLE_DEVICES`` (set through its
    nanny, so a restarted worker keeps it): otherwise every worker would run on GPU 0.
    """
    # ":0": the scheduler always runs an HTTP server (health/metrics); on a random free port a batch
    # job on a shared host never collides with a user's dashboard on 8787.
    options = dict(
        threads_per_worker=max(1, int(threads_per_worker)),
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.WARNING,
        resources=resources,
    )
    if not resources or "GPU" not in resources:
        return LocalCluster(n_workers=n, **options)
    cluster = LocalCluster(n_workers=0, **options)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    devices = [d.strip() for d in visible.split(",") if d.strip()] or [str(i) for i in range(n)]
    for index in range(n):
        spec = cluster.new_spec
        env = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": devices[index % len(devices)]}
        cluster.worker_spec[f"gpu-{index}"] = {"cls": spec["cls"], "options": {**spec["options"], "env": env}}
    cluster.scale(n)  # starts exactly the specs above
    return cluster


def gpu_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch  # imported here: ingest must not pay for torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
