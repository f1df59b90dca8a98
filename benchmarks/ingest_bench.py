"""Ingestion benchmark: series read vs SimpleITK, header scan rate, Dask scaling.

Usage::

    python benchmarks/ingest_bench.py [--size 512] [--slices 300] [--scan-files 10000]
        [--scaling-series 8] [--repeats 3] [--record benchmarks/RESULTS.md]

1. ``read_dicom_series`` vs SimpleITK ``ImageSeriesReader`` (GDCM) on one generated
   size x size x slices CT series (int16, explicit VR little endian), both warm (page cache),
   alternating, best of ``--repeats``. SimpleITK is timed twice: reading a sorted file list
   (``Execute`` + ``GetArrayFromImage``) and with its own header scan/sort
   (``GetGDCMSeriesFileNames``), because our reader sorts the files it is given.
2. ``discover_sources`` header scan over a tree of ``--scan-files`` small (64 x 64) slices.
3. ``medseg ingest`` wall time on ``--scaling-series`` series with 1 and 2 local Dask workers
   (cluster start included: that is what a user waits for).

Not a test: numbers depend on the machine; the script prints them and, with ``--record``,
appends them to the "## Ingestion" section of the results file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from preprocessing.dicom.series import read_dicom_series
from preprocessing.discovery import discover_sources
from preprocessing.synthetic import DicomSeriesSpec, orientation_affine, write_dicom_series
from workflows.cluster import dask_client
from workflows.ingest import IngestConfig, ingest_item, run_ingest


def _write_series(folder: Path, shape: tuple[int, int, int], seed: int, series_number: int = 1) -> list[Path]:
    """A CT-like series: air around an elliptic soft-tissue body with a denser core, plus noise.

    Cheaper than the phantom at 512^2 x 300, and compresses like a real CT (pure noise would make
    the gzip step look several times slower than it is on scans).
    """
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    core = (x / 0.3) ** 2 + (y / 0.25) ** 2 < 1
    plane = np.where(body, 40.0, -1000.0) + np.where(core, 300.0, 0.0)
    image = plane[:, :, None] + rng.normal(0, 12, size=shape).astype(np.float32) * body[:, :, None]
    affine = orientation_affine("axial", (0.7, 0.7, 1.0), shape=shape)
    spec = DicomSeriesSpec(seed=seed, series_number=series_number, shuffle_names=True)
    return write_dicom_series(image.astype(np.float32), affine, folder, spec)


def _best(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def bench_read(root: Path, size: int, slices: int, repeats: int) -> dict:
    folder = root / "big"
    files = _write_series(folder, (size, size, slices), seed=0)
    sorted_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))

    def ours():
        return read_dicom_series(files).array

    def itk_sorted():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sorted_names)
        return sitk.GetArrayFromImage(reader.Execute())

    def itk_with_scan():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return sitk.GetArrayFromImage(reader.Execute())

    assert np.array_equal(ours()[0], itk_sorted().transpose(2, 1, 0))  # same voxels, or the race is void
    results: dict[str, list[float]] = {"ours": [], "itk_sorted": [], "itk_scan": []}
    cpu: dict[str, list[float]] = {k: [] for k in results}
    for _ in range(repeats):  # interleaved so background load hits all three alike
        for name, fn in (("ours", ours), ("itk_sorted", itk_sorted), ("itk_scan", itk_with_scan)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            results[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)  # all threads of this process
    best = {k: min(v) for k, v in results.items()}
    median = {k: statistics.median(v) for k, v in results.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    return {"best": best, "median": median, "cpu": best_cpu, "files": len(files)}


def bench_scan(root: Path, n_files: int) -> dict:
    folder = root / "scan"
    per_series = 100
    for s in range(max(1, n_files // per_series)):
        _write_series(folder / f"p{s % 10}" / f"s{s}", (64, 64, per_series), seed=s + 1, series_number=s + 1)
    total = sum(1 for p in folder.rglob("*") if p.is_file())
    rates = {}
    start_cpu = time.process_time()
    for label, processes in (("1 process", 1), (f"{min(8, os.cpu_count() or 1)} processes", None)):
        start = time.perf_counter()
        items = discover_sources(folder, processes=processes)
        rates[label] = total / (time.perf_counter() - start)
        if processes == 1:
            rates["per CPU-second, 1 process"] = total / (time.process_time() - start_cpu)
    return {"files": total, "rates": rates, "series": len(items)}


def bench_scaling(root: Path, n_series: int, size: int) -> dict:
    folder = root / "scaling"
    for s in range(n_series):
        _write_series(folder / f"s{s}", (size, size, 100), seed=100 + s, series_number=s + 1)
    items = [it for it in discover_sources(folder) if it.status == "ok"]
    out = {}
    for workers in (1, 2):
        target = root / f"out{workers}"
        start = time.perf_counter()
        code = run_ingest(IngestConfig(folder, target, workers=workers))
        wall = time.perf_counter() - start
        assert code == 0
        shutil.rmtree(target)
        # Task phase alone: cluster up, modules imported on every worker, then time the batch.
        with dask_client(workers) as client:
            client.run(importlib.import_module, "workflows.ingest")
            start = time.perf_counter()
            futures = [client.submit(ingest_item, it, str(target), pure=False) for it in items]
            assert all(f.result()["status"] == "ok" for f in futures)
            tasks = time.perf_counter() - start
        shutil.rmtree(target)
        out[workers] = (wall, tasks)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--scan-files", type=int, default=10_000)
    parser.add_argument("--scaling-series", type=int, default=8)
    parser.add_argument("--scaling-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--record", default=None, metavar="FILE", help="append results to this markdown file")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ingest_bench_"))
    try:
        read = bench_read(root, args.size, args.slices, args.repeats)
        ratio = read["best"]["itk_sorted"] / read["best"]["ours"]
        ratio_scan = read["best"]["itk_scan"] / read["best"]["ours"]
        cpu_ratio = read["cpu"]["itk_sorted"] / read["cpu"]["ours"]
        lines = [
            f"- series read {args.size}x{args.size}x{args.slices} int16 (best of {args.repeats}, warm cache): "
            f"ours {read['best']['ours']:.3f} s (median {read['median']['ours']:.3f}), "
            f"SimpleITK sorted list {read['best']['itk_sorted']:.3f} s (median {read['median']['itk_sorted']:.3f}), "
            f"SimpleITK incl. GDCM scan {read['best']['itk_scan']:.3f} s; "
            f"speed ratio SimpleITK/ours = {ratio:.2f} (sorted list), {ratio_scan:.2f} (incl. scan); "
            f"CPU time ours {read['cpu']['ours']:.3f} s vs SimpleITK {read['cpu']['itk_sorted']:.3f} s "
            f"(ratio {cpu_ratio:.2f}; CPU time is robust to other jobs on a shared machine)",
        ]
        print(lines[-1], flush=True)
        shutil.rmtree(root / "big")
        scan = bench_scan(root, args.scan_files)
        rates = ", ".join(f"{rate:.0f} files/s ({label})" for label, rate in scan["rates"].items())
        lines.append(
            f"- header scan (discover_sources) of {scan['files']} files ({scan['series']} series): {rates}"
        )
        print(lines[-1], flush=True)
        shutil.rmtree(root / "scan")
        scaling = bench_scaling(root, args.scaling_series, args.scaling_size)
        (w1, t1), (w2, t2) = scaling[1], scaling[2]
        lines.append(
            f"- medseg ingest of {args.scaling_series} series ({args.scaling_size}^2 x 100): end to end "
            f"(incl. cluster start) 1 worker {w1:.1f} s, 2 workers {w2:.1f} s ({w1 / w2:.2f}x); task phase on "
            f"warm workers 1 worker {t1:.1f} s, 2 workers {t2:.1f} s ({t1 / t2:.2f}x)"
        )
        print(lines[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.record:
        _record(Path(args.record), lines)
    return 0


def _record(path: Path, lines: list[str]) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {sys.version.split()[0]}, load average at the end {load} (shared machine)"
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join([f"### {stamp} -- {machine}", *lines]) + "\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if "## Ingestion" not in text:
        text = text.rstrip("\n") + "\n\n## Ingestion\n\n"
    # Append under our own section, before the next "## " heading, so other sections stay intact.
    head, _, tail = text.partition("## Ingestion\n")
    rest_start = tail.find("\n## ")
    ours, after = (tail, "") if rest_start < 0 else (tail[: rest_start + 1], tail[rest_start + 1 :])
    text = head + "## Ingestion\n" + ours.rstrip("\n") + "\n\n" + block + ("\n" + after if after else "")
    path.write_text(text)
    print(f"appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
