"""Dask cluster context: a private LocalCluster by default, or an existing scheduler.

Shared by ``ingest``, ``train`` (parallel folds) and ``predict``: one place decides how workers
are started, so every job behaves the same on a laptop and on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

logger = logging.getLogger(__name__)

# Seconds to wait for the Dask handshake with an existing scheduler (Dask's default is 30 s of
# retries, then a traceback); the CLI has already checked that something listens there.
SCHEDULER_CONNECT_TIMEOUT_S = 10.0
_CLOSE_QUIETLY = ("distributed", "tornado", "asyncio")


class SchedulerUnreachableError(ValueError):
    """No Dask scheduler answered at the ``--scheduler`` address (the CLI exits with code 2)."""


@contextlib.contextmanager
def dask_client(
    workers: int | None = None,
    scheduler: str | None = None,
    resources: dict[str, float] | None = None,
    threads_per_worker: int = 1,
) -> Iterator[Client]:
    """Yield a Dask client; close what we started on exit.

    Ctrl-C (``KeyboardInterrupt``) propagates to the caller, but without Dask's tracebacks: the
    local workers ignore SIGINT (the terminal sends it to the whole process group; closing the
    cluster stops them) and Dask's loggers are lowered to CRITICAL before the cluster is closed.

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

    Raises:
        SchedulerUnreachableError: ``scheduler`` did not answer within
            :data:`SCHEDULER_CONNECT_TIMEOUT_S` seconds.
    """
    if scheduler:
        logger.info("connecting to Dask scheduler %s", scheduler)
        with _connect(scheduler) as client, _quiet_on_interrupt():
            yield client
        return
    n = max(1, int(workers or 1))
    with (
        _local_cluster(n, resources, threads_per_worker) as cluster,
        Client(cluster) as client,
        _quiet_on_interrupt(),
    ):
        client.register_plugin(IgnoreSigint(), name="medseg-ignore-sigint")
        client.wait_for_workers(n)
        logger.info("started a local Dask cluster with %d worker process(es)", n)
        yield client


def _connect(scheduler: str, timeout_s: float | None = None) -> Client:
    """A client of ``scheduler``, or :class:`SchedulerUnreachableError` within about ``timeout_s``.

    Dask bounds the TCP connect by its timeout but waits for the scheduler's handshake for ever,
    so a port that accepts and stays silent (not a Dask scheduler) would hang the command: the
    connection is made on a helper thread that is abandoned when the deadline passes.
    """
    timeout_s = SCHEDULER_CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    clients: list[Client] = []
    errors: list[Exception] = []

    def connect() -> None:
        try:
            clients.append(Client(scheduler, timeout=timeout_s))
        except Exception as exc:  # handed to the caller's thread below
            errors.append(exc)

    thread = threading.Thread(target=connect, name="medseg-dask-connect", daemon=True)
    thread.start()
    thread.join(timeout_s + 2.0)  # Dask's own timeout fires first when nothing listens
    if clients:
        return clients[0]
    if not errors:
        detail = "something accepts connections there but did not answer as a Dask scheduler does"
    elif isinstance(errors[0], OSError):  # includes TimeoutError: nothing listening
        detail = str(errors[0])
    else:  # e.g. another service answered with bytes Dask cannot parse
        detail = f"not a Dask scheduler: {type(errors[0]).__name__}: {errors[0]}"
    raise SchedulerUnreachableError(
        f"--scheduler {scheduler}: no Dask scheduler answered within {timeout_s:g} s ({detail}); "
        "check the address and that the scheduler runs, or drop --scheduler to use a local cluster"
    ) from (errors[0] if errors else None)


@contextlib.contextmanager
def _quiet_on_interrupt() -> Iterator[None]:
    """On Ctrl-C, silence Dask before the cluster is closed (its cancellations are expected)."""
    try:
        yield
    except KeyboardInterrupt:
        _silence_dask_logs()
        raise


def _silence_dask_logs(*_signal_args: object) -> None:
    """Lower Dask's loggers (and the event loop's) to CRITICAL in this process."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _CLOSE_QUIETLY]
    for name in {*_CLOSE_QUIETLY, *names}:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class IgnoreSigint(WorkerPlugin):
    """Local workers survive Ctrl-C; the client process handles it and closes the cluster.

    The terminal sends SIGINT to the whole process group. Without this every worker process
    dies of its own ``KeyboardInterrupt`` and prints a traceback, and the tasks cancelled by the
    close log ``CancelledError``, over the CLI's "interrupted" message. With it a worker only goes
    quiet, and the close that follows stops it.
    """

    def setup(self, worker) -> None:
        # Worker processes run their event loop, and so this hook, on their main thread; a
        # worker in this process (threads, tests) has no signals of its own to change.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _silence_dask_logs)


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
