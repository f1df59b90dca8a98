"""Network zoo benchmark: parameters, GFLOPs per window, forward throughput and peak memory per network.

Standard windows: 128^3 for the CNNs, 96^3 for the transformers (default options of each network, 1 input
channel, 3 classes, batch 1, eval mode, ``torch.no_grad``). CUDA runs in bf16 autocast, CPU in float32.
Each network runs in its own subprocess so that the CPU peak-RSS figure belongs to that network alone.

GFLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; convolutions,
matmuls and attention; norms and activations are not counted). The standard-window column is counted on
the ``meta`` device, so it is available even when the timed run uses a smaller ``--patch``.

Examples::

    python benchmarks/networks_bench.py --device cuda --write      # standard windows on a GPU
    python benchmarks/networks_bench.py --patch 64 --write          # 64^3 for every network (2-core CPU)
    python benchmarks/networks_bench.py --quick                     # 32^3 CNNs / 64^3 transformers, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from networks import available_networks, build_network  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
TRANSFORMERS = ("swin_unetr", "unetr")
STANDARD_PATCH = {"cnn": 128, "transformer": 96}
QUICK_PATCH = {"cnn": 32, "transformer": 64}
Patch = tuple[int, int, int]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--patch", help="window for every network: N or XxYxZ (multiples of 32 suit all)")
    p.add_argument("--quick", action="store_true", help="32^3 CNNs / 64^3 transformers, 1 timed repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per network")
    p.add_argument("--networks", default=",".join(available_networks()), help="comma-separated names")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS_MD}")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.repeats = 1
    return args


def parse_patch(text: str) -> Patch:
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise SystemExit(f"--patch takes N or XxYxZ; got {text}")
    return (parts[0], parts[1], parts[2])


def window_for(name: str, args: argparse.Namespace) -> Patch:
    if args.patch:
        return parse_patch(args.patch)
    kind = "transformer" if name in TRANSFORMERS else "cnn"
    side = (QUICK_PATCH if args.quick else STANDARD_PATCH)[kind]
    return (side, side, side)


def standard_window(name: str) -> Patch:
    side = STANDARD_PATCH["transformer" if name in TRANSFORMERS else "cnn"]
    return (side, side, side)


def options_for(name: str, patch: Patch) -> dict:
    """Default options, plus what depends on the window (unet topology, unetr position embedding)."""
    if name == "unet":
        return {"patch_size": patch, "spacing_mm": (1.0, 1.0, 1.0)}
    if name == "unetr":
        return {"img_size": patch}
    return {}


def count_gflops(name: str, patch: Patch) -> float:
    """FLOPs of one forward pass, counted on the meta device (no memory, no compute)."""
    net = build_network(name, 1, 3, **options_for(name, patch)).eval().to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.empty(1, 1, *patch, device="meta"))
    return counter.get_total_flops() / 1e9


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(name: str, patch: Patch, device: str, repeats: int) -> dict:
    """Build, warm up once, time ``repeats`` forward passes; runs inside a fresh subprocess."""
    torch.manual_seed(0)
    net = build_network(name, 1, 3, **options_for(name, patch)).eval().to(device)
    x = torch.randn(1, 1, *patch, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    rss_before = _rss_mib()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast:
        net(x)  # warm-up (allocator, cuDNN autotuning)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            net(x)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss is in KiB on Linux: the peak resident size of this process during the forward passes.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "windows_per_s": repeats / elapsed,
        "peak_mib": peak,
    }


def _child(name: str, patch: Patch, device: str, repeats: int, queue: mp.Queue) -> None:
    row = measure(name, patch, device, repeats)
    row["gflops"] = count_gflops(name, patch)
    std = standard_window(name)
    row["gflops_std"] = row["gflops"] if std == patch else count_gflops(name, std)
    queue.put(row)


def run_isolated(name: str, patch: Patch, device: str, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, patch, device, repeats, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def machine_line(device: str) -> str:
    cpu = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    load = f"; load average {os.getloadavg()[0]:.1f} at the end (shared machine)" if device == "cpu" else ""
    return f"{cpu}{gpu}; torch {torch.__version__}; {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC{load}"


def markdown_table(rows: list[dict], device: str) -> str:
    dtype = "bf16 autocast" if device == "cuda" else "float32"
    lines = [
        "| network | params (M) | window | GFLOPs/window | GFLOPs @ standard window | windows/s | peak mem (MiB) | device, dtype |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        window = "x".join(map(str, r["patch"]))
        std = "x".join(map(str, standard_window(r["name"])))
        mem = "GPU allocated" if device == "cuda" else "RSS increase"
        lines.append(
            f"| {r['name']} | {r['params_m']:.2f} | {window} | {r['gflops']:.1f} | {r['gflops_std']:.1f} ({std}) "
            f"| {r['windows_per_s']:.3f} | {r['peak_mib']:.0f} ({mem}) | {device}, {dtype} |"
        )
    lines.append("")
    lines.append(
        "unet's topology (so its parameter count) follows the window by nnU-Net's rule; unetr's position "
        "embedding follows img_size. GFLOPs: FlopCounterMode, 2 per multiply-add, batch 1."
    )
    return "\n".join(lines)


def append_results(table: str, args: argparse.Namespace, argv: list[str]) -> None:
    command = "python benchmarks/networks_bench.py " + " ".join(argv)
    text = f"\n## Networks\n\n{machine_line(args.device)}\n\n`{command.strip()}`\n\n{table}\n"
    if not RESULTS_MD.exists():
        text = "# Benchmark results\n" + text
    # One append-mode write: other benchmarks add their own sections to the same file.
    with RESULTS_MD.open("a", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rows = []
    for name in args.networks.split(","):
        patch = window_for(name, args)
        start = time.perf_counter()
        row = run_isolated(name, patch, args.device, args.repeats)
        row.update(name=name, patch=patch)
        rows.append(row)
        print(f"{name}: {patch} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    table = markdown_table(rows, args.device)
    print(table)
    if args.write:
        append_results(table, args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
