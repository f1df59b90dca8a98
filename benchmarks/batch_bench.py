"""A batch of CT DICOM series through the real batch engine (``medseg predict``), GPU-busy fraction.

Issue 6 asks that 20 cases of a 512 x 512 x 400 CT series keep the GPU busy >= 80 % of the wall
time (model loaded once per worker; reading and writing overlapped). This script writes N synthetic
series, builds a seeded random-weight bundle (``case_bench.make_bundle``), runs
``workflows.predict.run_predict`` on them exactly as the CLI does, and samples GPU utilisation
with ``nvidia-smi`` every 100 ms while the batch runs. On CPU it reports throughput only.

GPU (the issue's workload)::

    python benchmarks/batch_bench.py --device cuda --cases 20 --size 512 --slices 400 --roi 128 \\
        --channels 32,64,128,256,320 --classes 14 --json batch_h100.json

CPU smoke size::

    python benchmarks/batch_bench.py --cases 6 --size 128 --slices 60 --roi 64 --channels 8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from case_bench import make_bundle, write_case  # noqa: E402  (sibling benchmark script)
from infer_bench import machine_info  # noqa: E402

from workflows.predict import PredictConfig, run_predict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="rows = columns of each series")
    p.add_argument("--slices", type=int, default=60)
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5))
    p.add_argument("--target-spacing", type=float, default=1.5)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--channels", default="8,16,32,64")
    p.add_argument("--network", default="attention_unet")
    p.add_argument("--workers", type=int, default=2, help="CPU workers (CUDA: one per GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation (percent) every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split()
            if out:
                self.samples.append(sum(float(v) for v in out) / len(out))
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def busy_fraction(self) -> float | None:
        """Mean utilisation over the batch (0..1); None without nvidia-smi."""
        return sum(self.samples) / len(self.samples) / 100.0 if self.samples else None


def run(args: argparse.Namespace, root: Path) -> dict:
    shape = (args.size, args.size, args.slices)
    scans = root / "scans"
    for i in range(args.cases):
        write_case(scans / f"series_{i:03d}", shape, tuple(args.spacing), args.seed + i)
    bundle_dir = root / "bundle"
    make_bundle(args, bundle_dir)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    config = PredictConfig(
        source=scans,
        model_uri=str(bundle_dir),
        out_dir=root / "out",
        device=args.device,
        workers=args.workers,
    )
    with GpuSampler() as sampler:
        start = time.perf_counter()
        code = run_predict(config)
        wall = time.perf_counter() - start
    cases = pd.read_csv(root / "out" / "cases.csv")
    ok = cases[cases["status"] == "ok"]
    return {
        "exit_code": code,
        "cases": int(len(ok)),
        "wall_s": round(wall, 2),
        "cases_per_min": round(60.0 * len(ok) / wall, 2),
        "mean_case_s": round(float(ok["seconds"].mean()), 2),
        # Work time per stage (read, segment, write): with overlap their sum exceeds the wall.
        **{
            f"mean_{stage}_s": round(float(ok[f"seconds_{stage}"].mean()), 2)
            for stage in ("read", "segment", "write")
            if f"seconds_{stage}" in ok
        },
        # The segment stage's share of the wall per worker: on a GPU box, an upper bound of the
        # GPU-busy fraction (what it would be if the GPU ran flat out during every segment task).
        "segment_stage_fraction_of_wall": round(
            float(ok["seconds_segment"].sum()) / (wall * max(1, n_segment_workers(args))), 3
        )
        if "seconds_segment" in ok
        else None,
        "gpu_busy_fraction": sampler.busy_fraction(),
        "gpu_samples": len(sampler.samples),
        "shape": list(shape),
        "roi": args.roi,
        "classes": args.classes,
        "network": args.network,
        "channels": args.channels,
        "device": args.device,
        "machine": machine_info(args.device),
    }


def n_segment_workers(args: argparse.Namespace) -> int:
    """Workers that run segment tasks: one per GPU on CUDA, ``--workers`` on the CPU."""
    if args.device == "cuda":
        return max(1, torch.cuda.device_count())
    return int(args.workers or 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medseg-batch-bench-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["exit_code"] in (0, 4) else 1


if __name__ == "__main__":
    sys.exit(main())
