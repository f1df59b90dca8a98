"""One end-to-end case, stage by stage: our pipeline vs MONAI's standard bundle wiring, in one process.

A synthetic CT DICOM series is written to a temporary folder, a plan and a one-fold bundle with
seeded random weights are built in-process, and the same case runs through both chains with the
same network weights, window size, overlap and Gaussian blending:

- ours: ``read_dicom_series`` -> ``preprocess_for_inference`` (on the inference device) ->
  ``predict_probabilities`` -> ``resample_argmax`` back to the source grid (linear, on
  probabilities, slab by slab) -> ``keep_largest_component`` -> ``case_runner.write_outputs``
  (mask NIfTI, DICOM SEG and QC picture in parallel threads): the stages of
  ``pipeline.inference.segment.Segmenter`` and ``pipeline.case_runner``, called one by one so each
  can be timed. Each writer alone is timed too, outside the totals;
- MONAI (as in MONAI bundles' ``inference.json``): ``LoadImaged(PydicomReader|ITKReader)`` on the
  series folder -> ``EnsureChannelFirstd`` -> ``Orientationd("RAS")`` -> ``Spacingd`` ->
  ``ScaleIntensityRanged`` -> ``sliding_window_inference`` + ``Activationsd(softmax)`` ->
  ``Invertd`` (bilinear) -> ``AsDiscreted(argmax)`` -> ``SaveImaged`` (NIfTI). MONAI writes no DICOM SEG.

Both chains normalise identically: the plan's CT clip + z-score is an affine map, which
``ScaleIntensityRanged`` reproduces exactly with ``b_min/b_max`` set to the z-scores of the clip bounds.
Largest-component postprocessing and the QC picture are timed as extras, outside the totals.
Masks differ slightly (resampling conventions: MONAI's ``Spacingd`` grid starts at the first voxel,
ours is centred on the field of view); their agreement is reported, not asserted.

Issue workload (GPU, 512 x 512 x 400 CT)::

    python benchmarks/case_bench.py --device cuda --size 512 --slices 400 --roi 128 \\
        --channels 32,64,128,256,320 --classes 14 --json case_h100.json --markdown

CPU size used on the 2-core development box::

    python benchmarks/case_bench.py --threads 2 --json /tmp/case.json --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.infer_bench import count_flops, machine_info, measure_peaks  # noqa: E402
from pipeline.bundle import ModelBundle, load_bundle, save_bundle  # noqa: E402
from pipeline.case_row import CaseRow  # noqa: E402
from pipeline.case_runner import CaseConfig, CaseInFlight, write_outputs  # noqa: E402
from pipeline.inference.config import InferenceConfig  # noqa: E402
from pipeline.inference.postprocessing import keep_largest_component  # noqa: E402
from pipeline.inference.segment import (
    Segmentation,  # noqa: E402
    resample_argmax,  # noqa: E402
)
from pipeline.inference.sliding_window import predict_probabilities, window_starts  # noqa: E402
from pipeline.writers.dicom_seg import write_dicom_seg  # noqa: E402
from pipeline.writers.qc_picture import write_qc_picture  # noqa: E402
from preprocessing.dicom.series import read_dicom_series  # noqa: E402
from preprocessing.plan import ChannelNormalization, Plan  # noqa: E402
from preprocessing.resample import resample_to_grid  # noqa: E402
from preprocessing.source_item import SourceItem  # noqa: E402
from preprocessing.synthetic import (  # noqa: E402
    LABEL_NAMES,
    DicomSeriesSpec,
    make_phantom,
    orientation_affine,
    write_dicom_series,
)
from preprocessing.transforms import preprocess_for_inference  # noqa: E402
from preprocessing.volume_io import write_nifti_atomic  # noqa: E402

GPU_COMMAND = (
    "python benchmarks/case_bench.py --device cuda --size 512 --slices 400 --roi 128 "
    "--channels 32,64,128,256,320 --classes 14 --json case_h100.json --markdown"
)
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
STAGES = (
    "read series",
    "preprocess",
    "inference",
    "resample back + argmax",
    "largest component",
    "write outputs",
)
# Outside the totals: our write stage writer by writer (sequential), to show what the threads
# overlap; and the post-processing on the phantom's true label map, because a random-weight
# network's speckled mask is the worst case for connected components, contours and SEG frames.
EXTRAS = (
    "mask NIfTI alone (extra)",
    "DICOM SEG alone (extra)",
    "QC picture alone (extra)",
    "largest component, true anatomy (extra)",
    "DICOM SEG, true anatomy (extra)",
    "QC picture, true anatomy (extra)",
)
# CT normalisation of the benchmark plan (the synthetic phantom's soft tissue is 30-180 HU).
CT_NORM = ChannelNormalization("ct", clip_low=-160.0, clip_high=240.0, mean=60.0, std=60.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="rows = columns of the CT series")
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--spacing", default="0.8,0.8,1.5", help="source spacing i,j,k (mm)")
    p.add_argument("--target-spacing", type=float, default=1.5, help="plan spacing (mm, isotropic)")
    p.add_argument("--network", default="attention_unet", help="a networks/ registry name")
    p.add_argument("--channels", default="8,16,32,64", help="comma-separated feature channels")
    p.add_argument("--classes", type=int, default=4, help="output classes, background included")
    p.add_argument("--roi", type=int, default=64, help="cubic sliding window side (voxels)")
    p.add_argument("--sw-batch-size", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reader", choices=["PydicomReader", "ITKReader"], default="PydicomReader")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed small warm-up case")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--markdown", action="store_true", help="append the section to benchmarks/RESULTS.md")
    return p.parse_args(argv)


class StageTimer:
    """Wall and process-CPU seconds per named stage (CUDA synchronised at both ends)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

    def total(self, names: tuple[str, ...] = STAGES) -> tuple[float, float]:
        return sum(self.wall.get(n, 0.0) for n in names), sum(self.cpu.get(n, 0.0) for n in names)


def write_case(
    folder: Path, shape: tuple[int, int, int], spacing: tuple[float, ...], seed: int
) -> list[Path]:
    """A synthetic axial CT phantom written as a single-frame DICOM series (int16 HU)."""
    affine = orientation_affine("axial", spacing, shape=shape)
    image, _ = make_phantom(shape, spacing, "CT", seed, affine_ras=affine)
    return write_dicom_series(image, affine, folder, DicomSeriesSpec(seed=seed))


def true_labels(volume, seed: int) -> np.ndarray:
    """The phantom's label map on the series grid (what ``write_case`` rendered the image from)."""
    _, labels = make_phantom(
        volume.spatial_shape, volume.spacing_mm, "CT", seed, affine_ras=volume.affine_ras
    )
    return labels.astype(np.uint8)


def make_bundle(args: argparse.Namespace, folder: Path) -> ModelBundle:
    """Plan + one fold of seeded random weights, saved and loaded like a trained bundle."""
    from networks import build_network

    channels = [int(c) for c in args.channels.split(",")]
    options: dict[str, object] = {"channels": channels}
    if args.network == "unet":  # nnU-Net topology follows the window
        options["patch_size"] = [args.roi] * 3
    names = {k: LABEL_NAMES.get(k, f"class_{k}") for k in range(1, args.classes)}
    plan = Plan(
        spacing_mm=(args.target_spacing,) * 3,
        patch_size=(args.roi,) * 3,
        batch_size=2,
        normalization=(CT_NORM,),
        modalities={0: "CT"},
        labels={0: "background", **names},
        network=args.network,
        network_options=options,
    )
    torch.manual_seed(args.seed)
    net = build_network(args.network, 1, args.classes, **options)
    bundle = ModelBundle(plan, (net.state_dict(),), postprocessing={"largest_component": False})
    return load_bundle(save_bundle(bundle, folder))


def run_ours(
    paths: list[Path], bundle: ModelBundle, net: torch.nn.Module, args, out: Path, timer: StageTimer
):
    """Our chain stage by stage. Returns ``(labels uint8 (X, Y, Z) on the series grid, volume)``."""
    cfg = InferenceConfig(
        roi_size=(args.roi,) * 3, overlap=args.overlap, sw_batch_size=args.sw_batch_size, device=args.device
    )
    with timer.stage("read series"):
        volume = read_dicom_series(paths)
    with timer.stage("preprocess"):
        image, net_affine = preprocess_for_inference(volume, bundle.plan, device=args.device)
    with timer.stage("inference"):
        probs = predict_probabilities(image, [net], cfg)
    with timer.stage("resample back + argmax"):
        labels = resample_argmax(probs, net_affine, volume.affine_ras, volume.spatial_shape)
    raw = labels  # what MONAI's chain is compared with (it has no component filter)
    with timer.stage("largest component"):
        labels = keep_largest_component(labels, sorted(bundle.label_names))
    with timer.stage("write outputs"):  # mask NIfTI + DICOM SEG + QC picture, as medseg predict writes them
        item = SourceItem(kind="dicom", case_id="bench", paths=tuple(paths))
        case = CaseConfig(bundle_dir=str(out), out_dir=str(out), inference=cfg)
        segmentation = Segmentation(labels, volume.affine_ras)
        write_outputs(CaseInFlight(item, CaseRow("bench"), volume=volume, segmentation=segmentation), bundle, case, out)
    with timer.stage(EXTRAS[0]):
        write_nifti_atomic(raw, volume.affine_ras, out / "raw_mask.nii.gz", dtype=np.uint8)
    with timer.stage(EXTRAS[1]):
        write_dicom_seg(labels, volume.dicom, bundle.label_names, out / "extra_seg.dcm", "case-bench", "0")
    with timer.stage(EXTRAS[2]):
        write_qc_picture(volume.array[0], labels, volume.affine_ras, bundle.label_names, out / "extra_qc.png")
    truth = true_labels(volume, args.seed)
    with timer.stage(EXTRAS[3]):
        keep_largest_component(truth, sorted(bundle.label_names))
    with timer.stage(EXTRAS[4]):
        write_dicom_seg(truth, volume.dicom, bundle.label_names, out / "truth_seg.dcm", "case-bench", "0")
    with timer.stage(EXTRAS[5]):
        write_qc_picture(volume.array[0], truth, volume.affine_ras, bundle.label_names, out / "truth_qc.png")
    timer.net_shape = tuple(image.shape[1:])  # type: ignore[attr-defined]
    return labels, volume


def run_monai(series_dir: Path, net: torch.nn.Module, args, out: Path, timer: StageTimer) -> Path:
    """MONAI's standard bundle wiring, one stage at a time. Returns the saved NIfTI mask."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    z = lambda hu: (hu - CT_NORM.mean) / CT_NORM.std  # noqa: E731 - the plan's z-score of a HU value
    load = [LoadImaged("image", reader=args.reader, image_only=True), EnsureChannelFirstd("image")]
    spatial = [
        Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=(args.target_spacing,) * 3, mode="bilinear"),
        ScaleIntensityRanged(
            "image", CT_NORM.clip_low, CT_NORM.clip_high, z(CT_NORM.clip_low), z(CT_NORM.clip_high), clip=True
        ),
    ]
    pre = Compose(load + spatial)  # Invertd walks back the very transform objects that ran
    post = Compose(
        [
            Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted("pred", argmax=True),
        ]
    )
    save = SaveImaged(
        "pred",
        output_dir=out,
        output_postfix="seg",
        output_dtype=np.uint8,
        separate_folder=False,
        print_log=False,
    )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else contextlib.nullcontext()
    d: dict = {"image": str(series_dir)}
    with timer.stage("read series"):
        d = Compose(load)(d)
    with timer.stage("preprocess"):
        d = Compose(spatial)(d)
    with timer.stage("inference"), torch.no_grad(), amp:
        logits = sliding_window_inference(
            d["image"].unsqueeze(0).to(args.device), (args.roi,) * 3, args.sw_batch_size, net,
            overlap=args.overlap, mode="gaussian", sigma_scale=0.125,
        )  # fmt: skip
        d["pred"] = logits[0].float()
        d = Activationsd("pred", softmax=True)(d)
    with timer.stage("resample back + argmax"):
        d = post(d)
    with timer.stage("write outputs"):  # MONAI writes the mask only
        save(d)
    return next(out.glob("*_seg.nii.gz"))


def mask_agreement(ours_path: Path, monai_path: Path) -> dict[str, object]:
    """Fraction of source voxels where both saved masks agree, matched in world (RAS) coordinates.

    The MONAI mask is brought onto our mask's grid by nearest-neighbour resampling (an exact axis
    permutation when, as expected, both sit on the source grid); a shape or affine mismatch shows.
    """
    ours_img, monai_img = nib.load(str(ours_path)), nib.load(str(monai_path))
    ours = np.asarray(ours_img.dataobj)
    monai = torch.from_numpy(np.asarray(monai_img.dataobj).astype(np.float32)).reshape(
        (1, *monai_img.shape[:3])
    )
    on_ours = resample_to_grid(monai, monai_img.affine, ours_img.affine, ours.shape, mode="nearest")[
        0
    ].numpy()
    corners = np.array([[0, 0, 0, 1], [*(np.asarray(ours.shape) - 1), 1]], dtype=np.float64).T
    return {
        "voxels_equal": float(np.mean(on_ours == ours)),
        "ours_class_voxels": np.bincount(ours.ravel(), minlength=2).tolist(),
        "monai_class_voxels": np.bincount(np.rint(on_ours).astype(np.int64).ravel(), minlength=2).tolist(),
        "monai_shape": list(monai_img.shape),
        "ours_shape": list(ours.shape),
        "corner_world_distance_mm": float(
            np.abs(
                np.sort((ours_img.affine @ corners)[:3], 1) - np.sort((monai_img.affine @ corners)[:3], 1)
            ).max()
        ),
    }


def floor_estimate(args, net: torch.nn.Module, net_shape: tuple[int, ...], n_src: int, io: dict) -> dict:
    """Rough floor: network FLOPs at measured matmul speed + unavoidable bytes at measured copy speed."""
    padded = [max(s, args.roi) for s in net_shape]
    n_windows = len(window_starts(padded, (args.roi,) * 3, args.overlap))
    flops = count_flops(net, args.roi, args.device) * n_windows
    n_net = int(np.prod(padded))
    # source HU + float32 copy, network input, K-channel accumulator write+read, K-channel
    # resampled probabilities, uint8 mask, plus the files read and written.
    traffic = n_src * (2 + 4) + n_net * 4 + 2 * args.classes * n_net * 4 + args.classes * n_src * 4 + n_src
    traffic += io["dicom_bytes_read"] + io["ours_bytes_written"]
    peaks = measure_peaks(args.device)
    return {
        "n_windows": n_windows,
        "inference_flops": flops,
        "memory_traffic_bytes": traffic,
        **peaks,
        "floor_compute_s": flops / peaks["matmul_flops_per_s"],
        "floor_memory_s": traffic / peaks["copy_bytes_per_s"],
    }


def stage_rows(ours: StageTimer, monai: StageTimer) -> list[dict[str, object]]:
    t_ours, t_monai = ours.total()[0], monai.total()[0]
    rows = []
    for name in STAGES + EXTRAS:
        a, b = ours.wall.get(name), monai.wall.get(name)
        rows.append(
            {
                "stage": name,
                "ours_s": a,
                "ours_pct": None if a is None or name in EXTRAS else 100 * a / t_ours,
                "ours_cpu_s": ours.cpu.get(name),
                "monai_s": b,
                "monai_pct": None if b is None or name in EXTRAS else 100 * b / t_monai,
                "monai_cpu_s": monai.cpu.get(name),
                "monai_over_ours": None if a is None or b is None else b / a,
            }
        )
    return rows


def format_table(rows: list[dict[str, object]], totals: dict[str, float]) -> str:
    def f(v: object, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [
        "| stage | ours s | ours % | ours CPU s | MONAI s | MONAI % | MONAI CPU s | MONAI/ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {f(r['ours_s'])} | {f(r['ours_pct'], '{:.0f}%')} | {f(r['ours_cpu_s'])} | "
            f"{f(r['monai_s'])} | {f(r['monai_pct'], '{:.0f}%')} | {f(r['monai_cpu_s'])} | "
            f"{f(r['monai_over_ours'])} |"
        )
    lines.append(
        f"| **total** | **{totals['ours_s']:.2f}** | 100% | {totals['ours_cpu_s']:.2f} | "
        f"**{totals['monai_s']:.2f}** | 100% | {totals['monai_cpu_s']:.2f} | "
        f"**{totals['monai_s'] / totals['ours_s']:.2f}** |"
    )
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    t, a, fl = result["totals"], result["agreement"], result["floor"]
    return [
        f"- speedup_vs_monai_wiring (all stages; ours also keeps the largest components and writes SEG + QC, MONAI does not): "
        f"{result['speedup_vs_monai_wiring']:.2f} wall, {t['monai_cpu_s'] / t['ours_cpu_s']:.2f} CPU time; "
        f"over the stages both do (read to argmax; no largest component, no SEG/QC): {result['speedup_common_stages']:.2f}",
        f"- dominant stage: ours {result['dominant_ours']}, MONAI {result['dominant_monai']}",
        f"- mask agreement (fraction of source voxels equal): {a['voxels_equal']:.5f}; class voxel counts "
        f"ours {a['ours_class_voxels']}, MONAI {a['monai_class_voxels']}; grid corners differ by "
        f"{a['corner_world_distance_mm']:.2g} mm",
        f"- floor: {fl['n_windows']} windows, {fl['inference_flops'] / 1e9:.0f} GFLOP "
        f"({fl['floor_compute_s']:.2f} s at {fl['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s measured matmul); "
        f"~{fl['memory_traffic_bytes'] / 1e9:.2f} GB moved ({fl['floor_memory_s']:.2f} s at "
        f"{fl['copy_bytes_per_s'] / 1e9:.1f} GB/s copy); DICOM read {result['io']['dicom_bytes_read'] / 1e6:.1f} MB, "
        f"written ours {result['io']['ours_bytes_written'] / 1e6:.2f} MB, MONAI "
        f"{result['io']['monai_bytes_written'] / 1e6:.2f} MB",
    ]


def run_both(args: argparse.Namespace, root: Path, shape: tuple[int, int, int]) -> dict:
    """Write one case of ``shape``, run both chains on it, return the measurements."""
    spacing = tuple(float(s) for s in args.spacing.split(","))
    series_dir, out_ours, out_monai = root / "series", root / "ours", root / "monai"
    for d in (out_ours, out_monai):
        d.mkdir(parents=True)
    t0 = time.perf_counter()
    paths = write_case(series_dir, shape, spacing, args.seed)
    generate_s = time.perf_counter() - t0
    bundle = make_bundle(args, root / "bundle")
    net = bundle.build_networks(args.device)[0]
    ours, monai = StageTimer(args.device), StageTimer(args.device)
    labels, volume = run_ours(paths, bundle, net, args, out_ours, ours)
    monai_mask = run_monai(series_dir, net, args, out_monai, monai)
    io = {
        "dicom_bytes_read": sum(p.stat().st_size for p in paths),
        "ours_bytes_written": sum(p.stat().st_size for p in (out_ours / "mask.nii.gz", out_ours / "seg.dcm")),
        "monai_bytes_written": monai_mask.stat().st_size,
    }
    return {
        "generate_s": generate_s,
        "ours": ours,
        "monai": monai,
        "net": net,
        "io": io,
        "n_src": int(np.prod(volume.spatial_shape)),
        "agreement": mask_agreement(out_ours / "raw_mask.nii.gz", monai_mask),
        "fg_voxels": int(np.count_nonzero(labels)),
    }


def build_result(args: argparse.Namespace, run: dict, cpu_start: float) -> dict:
    ours, monai = run["ours"], run["monai"]
    (t_ours, c_ours), (t_monai, c_monai) = ours.total(), monai.total()
    common = STAGES[:4]
    dominant = lambda timer: max(STAGES, key=lambda n: timer.wall.get(n, 0.0))  # noqa: E731
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/case_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(args.device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "source_shape": [args.size, args.size, args.slices],
        "network_grid_shape": list(ours.net_shape),
        "generate_s": run["generate_s"],
        "stages": stage_rows(ours, monai),
        "totals": {"ours_s": t_ours, "ours_cpu_s": c_ours, "monai_s": t_monai, "monai_cpu_s": c_monai},
        "speedup_vs_monai_wiring": t_monai / t_ours,
        "speedup_common_stages": monai.total(common)[0] / ours.total(common)[0],
        "dominant_ours": dominant(ours),
        "dominant_monai": dominant(monai),
        "agreement": run["agreement"],
        "io": run["io"],
        "floor": floor_estimate(args, run["net"], ours.net_shape, run["n_src"], run["io"]),
        "process_cpu_s": time.process_time() - cpu_start,
        "load_average_1_5_15": list(os.getloadavg()),
    }


def append_markdown(result: dict, table: str) -> None:
    m = result["machine"]
    gpu = f", {m['gpu']}" if "gpu" in m else ""
    text = [
        "",
        "## End-to-end case (per stage)",
        "",
        f"{result['date_utc']} UTC; {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads{gpu}); "
        f"torch {m['torch']}, MONAI {m.get('monai', '?')}",
        "",
        f"`{result['command']}`: CT {'x'.join(map(str, result['source_shape']))} at {result['args']['spacing']} mm "
        f"-> network grid {'x'.join(map(str, result['network_grid_shape']))} at {result['args']['target_spacing']} mm; "
        f"{result['args']['network']} ({result['args']['channels']}), {result['args']['classes']} classes, "
        f"roi {result['args']['roi']}, overlap {result['args']['overlap']}, sw_batch {result['args']['sw_batch_size']}, "
        f"MONAI reader {result['args']['reader']}, {result['args']['device']}",
        "",
        table,
        "",
        *summary_lines(result),
        f"- process CPU time of the whole script (incl. data generation and warm-up): "
        f"{result['process_cpu_s']:.1f} s; load average at the end "
        f"{', '.join(f'{v:.1f}' for v in result['load_average_1_5_15'])}",
    ]
    if result["args"]["device"] == "cpu":
        text.append(f"- still to do: the issue's 512x512x400 GPU run (no GPU in this task): `{GPU_COMMAND}`")
    text.append("")
    with RESULTS_MD.open("a") as fh:
        fh.write("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu_start = time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="case_bench_") as tmp:
        if not args.no_warmup:  # imports, allocator and lazy initialisation, paid once per process
            run_both(args, Path(tmp) / "warmup", (48, 48, 24))
        run = run_both(args, Path(tmp) / "case", (args.size, args.size, args.slices))
    result = build_result(args, run, cpu_start)
    table = format_table(result["stages"], result["totals"])
    print(table)
    print("\n".join(summary_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    if args.markdown:
        append_markdown(result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
