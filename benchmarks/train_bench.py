"""Training throughput: iterations/s and the fraction of time the model waits for data, per cache mode.

Runs the real training chain (load, RAS, resample, normalise, crop, pad, patch sampling and the
nnU-Net-like augmentation) and the real optimiser step (``pipeline.training.trainer.train_one_epoch``) on a
generated MSD dataset, with MONAI's ``CacheDataset`` (memory), ``PersistentDataset`` (disk) and no
cache. ``--write`` appends a "## Training" table to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/train_bench.py --epochs 3 --iterations 10 --write
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.training.config import TrainConfig
from pipeline.training.data import FoldData, make_fold_data
from pipeline.training.trainer import new_training_state, train_one_epoch
from preprocessing.fingerprint import fingerprint_dataset
from preprocessing.msd import read_msd_dataset
from preprocessing.plan import PlanConfig, make_plan
from preprocessing.synthetic import write_msd_dataset
from preprocessing.transforms import case_to_item

RESULTS = Path(__file__).with_name("RESULTS.md")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(cache: str, data: FoldData, plan, args: argparse.Namespace, root: Path) -> dict:
    config = TrainConfig(
        epochs=args.epochs,
        optimizer="adamw",
        learning_rate=3e-3,
        iterations_per_epoch=args.iterations,
        samples_per_volume=2,
        cache=cache,
        num_workers=args.workers,
        torch_threads=args.threads,
    )
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    loop = new_training_state(plan, config)
    t0 = time.perf_counter()
    _, loader, _ = make_fold_data(data, plan, config, root / f"cache-{cache}")
    setup = time.perf_counter() - t0
    epochs = [train_one_epoch(loop, loader, config) for _ in range(args.epochs)]
    steady = epochs[1:] or epochs
    return {
        "cache": cache,
        "setup_s": setup,
        "first_its": epochs[0]["iterations_per_second"],
        "first_wait": epochs[0]["data_wait_fraction"],
        "its": sum(e["iterations_per_second"] for e in steady) / len(steady),
        "wait": sum(e["data_wait_fraction"] for e in steady) / len(steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 40))
    parser.add_argument("--patch", type=int, nargs=3, default=(48, 48, 32))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_msd_dataset(root / "msd", n_train=args.cases, n_test=0, shape=tuple(args.shape), seed=0)
        ds = read_msd_dataset(root / "msd")
        options = {"channels": [8, 16, 32], "strides": [1, 2, 2], "deep_supervision": True}
        plan = make_plan(
            fingerprint_dataset(ds), "unet", PlanConfig(patch_size=tuple(args.patch), network_options=options)
        )
        items = tuple({**case_to_item(c.image_paths, c.label_path), "case_id": c.case_id} for c in ds.cases)
        data = FoldData(0, items, ())
        rows = [bench(cache, data, plan, args, root) for cache in ("none", "memory", "disk")]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    header = (
        f"\n## Training\n\n{_cpu_name()} ({torch.get_num_threads()} torch thread(s), DataLoader workers "
        f"{args.workers}); torch {torch.__version__}; {stamp} UTC\n\n"
        f"`python benchmarks/train_bench.py --epochs {args.epochs} --iterations {args.iterations} "
        f"--threads {args.threads} --workers {args.workers}`: {args.cases} cases {tuple(args.shape)} CT phantoms, "
        f"patch {tuple(args.patch)}, batch {plan.batch_size} (2 patches per case), unet (8,16,32) + deep "
        "supervision, AdamW, full nnU-Net-like augmentation.\n\n"
        "| cache | setup s (cache fill) | epoch 1 it/s | epoch 1 data-wait | later epochs it/s | later data-wait |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    table = "".join(
        f"| {r['cache']} | {r['setup_s']:.1f} | {r['first_its']:.2f} | {r['first_wait']:.0%} | "
        f"{r['its']:.2f} | {r['wait']:.0%} |\n"
        for r in rows
    )
    print(header + table)
    if args.write:
        with RESULTS.open("a") as fh:
            fh.write(header + table)


if __name__ == "__main__":
    main()
