"""The batch engine's three tasks per case on a real Dask LocalCluster.

A GPU worker must read the next case and write the last one while the current one holds the GPU.
The GPU is an abstract Dask resource, so the scheduling is tested here on the CPU: one worker with
three threads advertising ``GPU=1``, as ``medseg predict --device cuda`` starts on a one-GPU box.
"""

from __future__ import annotations

import os

import dask
import pytest
from distributed import get_task_stream

from pipeline.bundle import bundle_fingerprint, load_bundle
from pipeline.case_runner import CaseConfig
from pipeline.inference.config import InferenceConfig
from preprocessing.discovery import discover_sources
from preprocessing.synthetic import write_hospital_folder
from workflows import predict
from workflows.cluster import dask_client

GPU = {"GPU": 1}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    # CT axial, CT sagittal, CT coronal, (MR: skipped by the CT model), Enhanced CT, JPEG-LS, J2K
    write_hospital_folder(root / "scans", n_series=7, seed=5, shape=(56, 56, 28))
    return root / "scans"


def _case_config(trained_model, out_dir) -> CaseConfig:
    bundle = load_bundle(trained_model.bundle_dir)
    return CaseConfig(
        bundle_dir=str(trained_model.bundle_dir),
        out_dir=str(out_dir),
        inference=InferenceConfig(roi_size=tuple(bundle.patch_size), overlap=0.5, device="cpu"),
        torch_threads=1,
        model_fingerprint=bundle_fingerprint(trained_model.bundle_dir),
    )


def _intervals(stream: list[dict], prefix: str) -> list[tuple[float, float]]:
    out = []
    for task in stream:
        if str(task["key"]).startswith(prefix):
            out += [(s["start"], s["stop"]) for s in task["startstops"] if s["action"] == "compute"]
    return out


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_reading_and_writing_overlap_the_gpu_stage(tmp_path, trained_model, scans):
    items = [i for i in discover_sources(scans) if i.status == "ok"]
    config = _case_config(trained_model, tmp_path / "out")
    with dask_client(workers=1, resources=GPU, threads_per_worker=3) as client:
        with get_task_stream(client) as stream:
            rows = list(predict.run_case_tasks(client, items, config, GPU, in_flight=4))
        data = stream.data
    assert sorted(r.case_id for r in rows) == sorted(i.case_id for i in items)
    assert {r.status for r in rows} == {"ok", "skipped"}, [r.reason for r in rows]
    for row in rows:
        assert (tmp_path / "out" / row.case_id / "case.json").is_file()
        if row.status == "ok":
            assert all(row.stage_seconds[stage] > 0 for stage in ("read", "segment", "write"))

    segments = _intervals(data, "segment-")
    io = _intervals(data, "read-") + _intervals(data, "write-")
    assert len(segments) == len(items)
    # The resource admits one segment task at a time (the recorded stop trails the release a little)
    ordered = sorted(segments)
    assert all(a[1] <= b[0] + 0.05 for a, b in zip(ordered, ordered[1:], strict=False)), ordered
    # ...and the worker's other threads read and write meanwhile.
    overlapping = [s for s in segments if any(_overlaps(s, other) for other in io)]
    assert len(overlapping) >= len(segments) // 2, (segments, io)


def test_a_case_that_kills_its_worker_is_an_error_row(tmp_path, trained_model, scans, monkeypatch):
    """A crash of the worker process (segfaulting decoder, OOM kill) fails that case only."""
    items = [i for i in discover_sources(scans) if i.status == "ok"][:3]
    doomed = items[1].case_id
    real_read = predict.read_case

    def read_or_die(item, case_config):  # a closure: shipped to the worker by value
        if item.case_id == doomed:
            os._exit(11)
        return real_read(item, case_config)

    monkeypatch.setattr(predict, "read_case", read_or_die)
    config = _case_config(trained_model, tmp_path / "out")
    # One allowed failure (Dask's default is 3) and two workers: each worker death makes the nanny
    # restart a process that imports torch, and on this 2-core machine such a restart was seen to
    # stall now and then (2 of 4 full-suite runs), leaving a one-worker cluster with none. The
    # second worker finishes the other cases whatever the restarts do; the case is still a row.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        dask_client(workers=2) as client,
    ):
        rows = {r.case_id: r for r in predict.run_case_tasks(client, items, config, None, in_flight=3)}
    assert set(rows) == {i.case_id for i in items}
    assert rows[doomed].status == "error" and "worker" in rows[doomed].reason.lower()
    assert not (tmp_path / "out" / doomed).exists()
    others = [r for cid, r in rows.items() if cid != doomed]
    assert all(r.status in ("ok", "skipped") for r in others), [r.reason for r in others]
