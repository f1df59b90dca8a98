"""Cost of ``Segmenter(..., uncertainty=True)`` against the plain ensemble, side by side in one process.

Issue 12 budget: uncertainty costs at most 1.3x the plain ensemble's inference time and no more
than 2 extra K-channel accumulators of memory on the network grid. Both calls segment the same
volume with the same fold networks (folds x TTA members); they are timed round-robin (CPU
seconds: the robust number on a shared box) and the probabilities are checked to agree.

Memory is counted, not sampled: the uncertainty accumulators hold ``K + 1`` channels (sum of the
probabilities, sum of the member entropies) whatever the number of members, plus at most 2
one-channel temporaries while a member is added. The engine's own accumulators are the same on
both sides (members are handed out of the plain path's side-by-side sweep, ``P x K + 1``
channels, or of its per-pass fallback when that does not fit the memory budget).

CPU default (tiny: 48^3, roi 32, K=3, 2 folds x 8 TTA = 16 members; < 1 min on 2 cores)::

    python benchmarks/uncertainty_bench.py

GPU::

    python benchmarks/uncertainty_bench.py --device cuda --size 160 --roi 96 --classes 14 \\
        --channels 16,32,64,128 --folds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_bench import build_model, machine_info, time_interleaved  # noqa: E402

from pipeline.inference.config import InferenceConfig  # noqa: E402
from pipeline.inference.segment import Segmenter  # noqa: E402
from pipeline.inference.uncertainty import UncertaintyAccumulator  # noqa: E402
from preprocessing.image import Volume  # noqa: E402
from preprocessing.plan import ChannelNormalization, Plan  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Uncertainty (issue 12)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", type=int, default=48, help="cubic image side in voxels (network grid)")
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--channels", default="8,16,32")
    p.add_argument("--network", default="attention_unet")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=True, help="8 mirrors per fold (members = folds x 8)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help=f"append a row to {RESULTS_MD.name}")
    return p.parse_args(argv)


def bench(args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    channels = tuple(int(c) for c in args.channels.split(","))
    k = args.classes
    plan = Plan(
        spacing_mm=(1.0, 1.0, 1.0),
        patch_size=(args.roi,) * 3,
        batch_size=1,
        normalization=(ChannelNormalization("none"),),
        modalities={0: "CT"},
        labels={i: ("background" if i == 0 else f"l{i}") for i in range(k)},
        network=args.network,
    )
    nets = []
    for fold in range(args.folds):
        torch.manual_seed(fold)
        net = build_model(args.network, k, channels, args.roi)
        with torch.no_grad():  # distinct folds: perturb the seeded weights per fold
            for param in net.parameters():
                param.add_(0.05 * fold * torch.randn_like(param))
        nets.append(net)
    image = np.random.default_rng(0).standard_normal((1, *(args.size,) * 3)).astype(np.float32)
    volume = Volume(image, np.eye(4), case_id="bench")
    config = InferenceConfig(roi_size=(args.roi,) * 3, device=args.device, tta=args.tta, amp=args.device == "cuda")
    segmenter = Segmenter(plan, nets, {}, config)
    fns = {
        "plain": lambda: segmenter(volume, keep_probabilities=True),
        "uncertainty": lambda: segmenter(volume, keep_probabilities=True, uncertainty=True),
    }
    wall, outputs, cpu = time_interleaved(fns, args.device, args.warmup, args.repeats)
    plain, unc = outputs["plain"], outputs["uncertainty"]
    members = args.folds * (8 if args.tta else 1)
    voxels = args.size**3
    acc, member = UncertaintyAccumulator(k), torch.softmax(torch.randn(k, *(args.size,) * 3), dim=0)
    c0 = time.process_time()
    for _ in range(members):  # the hook's own work, isolated from the network's (less load noise)
        acc.add(member)
    acc.maps()
    hook_cpu = time.process_time() - c0
    k_channel_bytes = k * voxels * 4
    med = {name: statistics.median(v) for name, v in wall.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "args": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "machine": machine_info(args.device),
        "members": members,
        "plain_s": med["plain"],
        "uncertainty_s": med["uncertainty"],
        "plain_cpu_s": med_cpu["plain"],
        "uncertainty_cpu_s": med_cpu["uncertainty"],
        "ratio_wall": med["uncertainty"] / med["plain"],
        "ratio_cpu": med_cpu["uncertainty"] / med_cpu["plain"],
        "hook_cpu_s": hook_cpu,
        "hook_fraction_of_plain_cpu": hook_cpu / med_cpu["plain"],
        "max_abs_prob_diff": float((plain.probabilities - unc.probabilities).abs().max()),
        "label_agreement": float((plain.labels == unc.labels).mean()),
        "uncertainty_accumulator_bytes": acc.nbytes,
        "k_channel_accumulator_bytes": k_channel_bytes,
        "extra_in_k_channel_accumulators": acc.nbytes / k_channel_bytes,
        "engine_channels_both": members * k + 1,
    }


def append_markdown(r: dict, path: Path = RESULTS_MD) -> None:
    """Append one row to the uncertainty section of RESULTS.md (a new table after another section)."""
    a, m = r["args"], r["machine"]
    header = (
        f"\n{SECTION}\n\n"
        "| date (UTC) | machine | network | size/roi/K | members | plain s | unc. s | ratio (wall) "
        "| ratio (CPU time) | hook CPU s (share) | max prob diff | label agree | extra memory (K-channel accumulators) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = path.read_text() if path.exists() else ""
    machine = f"{m.get('gpu') or m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} threads)"
    members = f"{r['members']} ({a['folds']} folds{' x 8 TTA' if a['tta'] else ''})"
    row = (
        f"| {r['date_utc']} | {machine} | {a['network']} ({a['channels']}) | {a['size']}/{a['roi']}/{a['classes']} "
        f"| {members} | {r['plain_s']:.3f} | {r['uncertainty_s']:.3f} | {r['ratio_wall']:.2f} | {r['ratio_cpu']:.2f} "
        f"| {r['hook_cpu_s']:.3f} ({r['hook_fraction_of_plain_cpu']:.1%}) | {r['max_abs_prob_diff']:.1e} | {r['label_agreement']:.5f} | {r['extra_in_k_channel_accumulators']:.2f} |\n"
    )
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    with open(path, "a") as fh:  # append only: earlier rows are history
        if not headings or headings[-1].strip() != SECTION:
            fh.write(header)
        fh.write(row)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        append_markdown(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
