"""workflows.cluster.dask_client: local clusters, external schedulers, one GPU per worker."""

from __future__ import annotations

import os

from distributed import LocalCluster

from workflows.cluster import dask_client


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_resource_pins_one_device_per_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with dask_client(2, resources={"GPU": 1}) as client:
        seen = client.run(_visible_devices)
        assert sorted(seen.values()) == ["5", "7"]  # not both on the first GPU
        resources = {w["name"]: w["resources"] for w in client.scheduler_info()["workers"].values()}
        assert all(r == {"GPU": 1} for r in resources.values()) and len(resources) == 2


def test_existing_scheduler_is_used_and_left_running():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with dask_client(workers=8, scheduler=cluster.scheduler_address) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
            assert len(client.scheduler_info()["workers"]) == 1  # --workers ignored with --scheduler
        assert cluster.status.name == "running"  # not ours to close
