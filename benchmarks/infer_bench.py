"""Sliding-window inference: our engine vs MONAI's ``sliding_window_inference``, side by side.

Same network, weights, volume, overlap and Gaussian blending in one run; both produce class
probabilities (softmax included in both timings). Reports warm-up + median times, the speedup,
the argmax agreement (>= 0.999 required), FLOPs per window and in total, and a floor (the time
the FLOPs and the accumulator bytes would take at the device's measured matmul / copy speed).

Issue 6 target (H100)::

    python benchmarks/infer_bench.py --device cuda --json out.json
    # 320^3, roi 128^3, overlap 0.5, 4 windows/batch, MONAI AttentionUnet 14 classes, bf16

CPU smoke size::

    python benchmarks/infer_bench.py --device cpu --size 96 --roi 64 --classes 4 \\
        --channels 8,16,32,64,64 --json /tmp/infer.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.inferers import sliding_window_inference  # noqa: E402

from pipeline.inference.config import InferenceConfig  # noqa: E402
from pipeline.inference.sliding_window import (  # noqa: E402
    MIRROR_AXES,
    predict_probabilities,
    window_starts,
)

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--tta", action="store_true", help="8 mirrors (MONAI side: 8 wrapped sweeps)")
    p.add_argument("--size", type=int, default=320, help="cubic volume side (voxels)")
    p.add_argument("--roi", type=int, default=128, help="cubic window side (voxels)")
    p.add_argument("--classes", type=int, default=14)
    p.add_argument(
        "--network", default="monai_attention_unet", help="monai_attention_unet or a networks/ name"
    )
    p.add_argument("--channels", default="32,64,128,256,320", help="comma-separated feature channels")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (both engines)")
    p.add_argument("--compile", action="store_true", help="torch.compile in our engine")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs in our engine")
    p.add_argument("--fp16-accumulator", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d in our engine")
    p.add_argument("--max-network-batch", type=int, default=None, help="cap on windows x mirrors per call")
    p.add_argument("--no-fold-batchnorm", action="store_true", help="run our engine on the unfolded net")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-markdown", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return p.parse_args(argv)


def build_model(name: str, classes: int, channels: tuple[int, ...], roi: int) -> torch.nn.Module:
    """The benchmarked network (seeded weights), in eval mode."""
    torch.manual_seed(0)
    strides = (2,) * (len(channels) - 1)
    if name == "monai_attention_unet":
        from monai.networks.nets import AttentionUnet

        return AttentionUnet(3, 1, classes, channels=channels, strides=strides).eval()
    try:
        from networks import build_network
    except ImportError as exc:  # pragma: no cover - depends on H1's package
        raise SystemExit(f"--network {name}: the networks registry is not importable ({exc})") from exc
    options: dict[str, object] = {"channels": channels}
    if name == "unet":
        options["patch_size"] = (roi,) * 3
    try:
        return build_network(name, 1, classes, **options).eval()
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--network {name}: cannot build it with {options} ({exc})") from exc


def time_callable(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` calls (CUDA synchronised)."""
    return time_interleaved({"fn": fn}, device, warmup, repeats)[0]["fn"]


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, object], dict[str, list[float]]]:
    """Time several callables round-robin, so load changes on a shared machine hit all alike.

    Returns ``(wall seconds per name, last output per name, process CPU seconds per name)``.
    The CPU seconds are the robust number on a loaded CPU box (other jobs inflate wall time).
    """
    outputs: dict[str, object] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            outputs[name] = fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, outputs, cpu


def monai_probabilities(image: torch.Tensor, net: torch.nn.Module, args: argparse.Namespace) -> torch.Tensor:
    """MONAI's engine as a user would call it; with TTA one sweep per mirror (window-wise flips)."""
    mirrors = MIRROR_AXES if args.tta else ((),)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" and not args.no_amp else None
    probs = None
    with torch.inference_mode(), amp or _null():
        for axes in mirrors:

            def predictor(x: torch.Tensor, axes: tuple[int, ...] = axes) -> torch.Tensor:
                return net(x.flip(axes)).flip(axes) if axes else net(x)

            logits = sliding_window_inference(
                image, (args.roi,) * 3, args.sw_batch_size, predictor,
                overlap=args.overlap, mode="gaussian", sigma_scale=0.125,
            )  # fmt: skip
            p = torch.softmax(logits.float(), dim=1)
            probs = p if probs is None else probs.add_(p)
    assert probs is not None
    return probs[0] / len(mirrors)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(net: torch.nn.Module, roi: int, device: str) -> int:
    """FLOPs of one window forward (batch 1), counted by torch's FlopCounterMode (2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 1, roi, roi, roi), device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def measure_peaks(device: str) -> dict[str, float]:
    """Measured matmul FLOP/s (bf16 on CUDA, fp32 on CPU) and device copy bandwidth (bytes/s)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    t = min(time_callable(lambda: a @ a, device, 1, 3))
    big = torch.empty(2**28 if device == "cuda" else 2**25, dtype=torch.uint8, device=device)
    t_copy = min(time_callable(lambda: big.clone(), device, 1, 3))
    return {"matmul_flops_per_s": 2 * n**3 / t, "copy_bytes_per_s": 2 * big.numel() / t_copy}


def machine_info(device: str) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
        info["cpu"] = model or info["cpu"]
    except OSError:  # pragma: no cover
        pass
    return info


def bench_inference(args: argparse.Namespace) -> dict[str, object]:
    """Run both engines on the same work; return the result record (also the lead's hook)."""
    channels = tuple(int(c) for c in args.channels.split(","))
    net = build_model(args.network, args.classes, channels, args.roi).to(args.device)
    g = torch.Generator().manual_seed(0)
    image = torch.randn((1, 1, args.size, args.size, args.size), generator=g).to(args.device)
    cfg = InferenceConfig(
        roi_size=(args.roi,) * 3, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        device=args.device, amp=not args.no_amp, tta=args.tta, compile=args.compile,
        cuda_graphs=args.cuda_graphs, accumulate_dtype="float16" if args.fp16_accumulator else "float32",
        channels_last=args.channels_last, fold_batchnorm=not args.no_fold_batchnorm,
        max_network_batch=args.max_network_batch,
    )  # fmt: skip
    ours_fn = lambda: predict_probabilities(image[0], [net], cfg)  # noqa: E731
    monai_fn = lambda: monai_probabilities(image, net, args)  # noqa: E731
    fns = {"monai": monai_fn, "ours": ours_fn}
    times, outs, cpu_times = time_interleaved(fns, args.device, args.warmup, args.repeats)
    t_monai, t_ours = times["monai"], times["ours"]
    p_ours, p_monai = outs["ours"].float().cpu(), outs["monai"].float().cpu()  # type: ignore[union-attr]
    agreement = float((p_ours.argmax(0) == p_monai.argmax(0)).float().mean())

    n_windows = len(window_starts((args.size,) * 3, (args.roi,) * 3, args.overlap))
    n_passes = len(MIRROR_AXES) if args.tta else 1
    flops_window = count_flops(net, args.roi, args.device)
    total_flops = flops_window * n_windows * n_passes
    # Accumulator traffic per window and pass: read + write of K fp32 values per voxel plus the
    # logits read; then the final divide + softmax over the whole volume (read + write).
    acc_bytes = n_windows * n_passes * args.classes * args.roi**3 * (4 + 4 + 4)
    acc_bytes += 2 * n_passes * args.classes * args.size**3 * 4 * 2
    peaks = measure_peaks(args.device)
    floor_compute = total_flops / peaks["matmul_flops_per_s"]
    floor_memory = acc_bytes / peaks["copy_bytes_per_s"]
    med_ours, med_monai = statistics.median(t_ours), statistics.median(t_monai)
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(args.device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_windows": n_windows,
        "n_passes": n_passes,
        "ours_s": t_ours,
        "monai_s": t_monai,
        "ours_median_s": med_ours,
        "monai_median_s": med_monai,
        "speedup_vs_monai": med_monai / med_ours,
        "speedup_vs_monai_best": min(t_monai) / min(t_ours),
        "ours_cpu_s": cpu_times["ours"],
        "monai_cpu_s": cpu_times["monai"],
        "speedup_vs_monai_cpu_time": statistics.median(cpu_times["monai"])
        / statistics.median(cpu_times["ours"]),
        "argmax_agreement": agreement,
        "max_abs_prob_diff": float((p_ours - p_monai).abs().max()),
        "flops_per_window": flops_window,
        "total_flops": total_flops,
        "accumulator_bytes": acc_bytes,
        "measured_peaks": peaks,
        "floor_s": max(floor_compute, floor_memory),
        "floor_compute_s": floor_compute,
        "floor_memory_s": floor_memory,
        "nnunet": "skipped: nnunetv2 not importable" if not _has_nnunet() else "not wired",
    }


def _has_nnunet() -> bool:
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        return False
    return True


def append_markdown(result: dict, path: Path = RESULTS_MD) -> None:
    """Append one row (with a header the first time) to the Sliding-window section of RESULTS.md."""
    a, m = result["args"], result["machine"]
    header = (
        "\n## Sliding-window inference\n\n"
        "| date (UTC) | machine | network | size/roi/K | TTA | engine options | ours s | MONAI s | speedup "
        "| speedup (CPU time) | argmax agree | GFLOP/window | floor s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = path.read_text() if path.exists() else ""
    machine = f"{m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} threads)"
    row = (
        f"| {result['date_utc']} | {machine} | {a['network']} ({a['channels']}) | "
        f"{a['size']}/{a['roi']}/{a['classes']} | {'yes' if a['tta'] else 'no'} | {_options(a)} | "
        f"{result['ours_median_s']:.3f} | {result['monai_median_s']:.3f} | {result['speedup_vs_monai']:.2f} | "
        f"{result['speedup_vs_monai_cpu_time']:.2f} | "
        f"{result['argmax_agreement']:.5f} | {result['flops_per_window'] / 1e9:.1f} | {result['floor_s']:.3f} |\n"
    )
    with open(path, "a") as fh:  # append only: earlier rows are history
        headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
        if not headings or headings[-1].strip() != "## Sliding-window inference":
            fh.write(header)  # a new table when another section was appended after ours
        fh.write(row)


def _options(a: dict) -> str:
    names = ("compile", "cuda_graphs", "channels_last", "fp16_accumulator", "no_fold_batchnorm", "no_amp")
    opts = [n.replace("_", "-") for n in names if a.get(n)]
    if a.get("max_network_batch"):
        opts.append(f"max-network-batch={a['max_network_batch']}")
    if a.get("threads"):
        opts.append(f"threads={a['threads']}")
    return ", ".join(opts) or "defaults"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_inference(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.json)
    if not args.no_markdown:
        append_markdown(result)
    keys = ("ours_median_s", "monai_median_s", "speedup_vs_monai", "speedup_vs_monai_best",
            "speedup_vs_monai_cpu_time", "argmax_agreement", "total_flops", "floor_s")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if not math.isfinite(result["argmax_agreement"]) or result["argmax_agreement"] < 0.999:
        print("argmax agreement below 0.999", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
