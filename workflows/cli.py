"""The ``medseg`` command line: ``ingest``, ``train``, ``predict``, ``evaluate``, ``demo``.

This module only parses flags and hands a config to the job modules; it is the one place that
prints. Exit codes (the contract, documented in the README):

* 0 -- everything succeeded (or was deliberately skipped);
* 2 -- bad arguments or unusable inputs (argparse's own code);
* 3 -- some cases/series failed, the good ones were still written;
* 4 -- outputs were written but MLflow could not be reached (nothing lost; see the warning).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

EXIT_OK = 0
EXIT_BAD_ARGS = 2
EXIT_PARTIAL = 3
EXIT_TRACKING_UNREACHABLE = 4


def _add_cluster_flags(p: argparse.ArgumentParser, default_workers: int | None = 2) -> None:
    p.add_argument("--workers", type=int, default=default_workers,
                   help="workers of the local Dask cluster (default: %(default)s)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="address of an existing Dask scheduler, e.g. tcp://host:8786 (overrides --workers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="DICOM/NIfTI/NRRD/MHA/MSD folder -> OUT/images/*.nii.gz + manifest.csv")
    p.add_argument("source", help="folder tree of DICOM files, NIfTI/NRRD/MHA files, or an MSD dataset")
    p.add_argument("--out", required=True, help="output folder")
    _add_cluster_flags(p)

    p = sub.add_parser("train", help="cross-validation training tracked in MLflow")
    p.add_argument("--data", required=True, help="MSD-layout dataset folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--network", required=True, help="network name (see networks.available_networks())")
    p.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per fold (default: %(default)s)")
    p.add_argument("--fold", type=int, default=None, help="train only this fold (0-based)")
    p.add_argument("--experiment", default="medseg-train", help="MLflow experiment name")
    p.add_argument("--register", default=None, metavar="MODEL", help="register the fold ensemble as MODEL")
    p.add_argument("--resume", action="store_true", help="continue killed folds from their last checkpoint")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML overriding plan/training fields")
    p.add_argument("--out", default=None, help="work folder for plan, splits, checkpoints (default: DATA/../medseg_work)")
    p.add_argument("--parallel-folds", type=int, default=None, metavar="N",
                   help="train folds as Dask tasks on a local cluster of N workers")
    p.add_argument("--scheduler", default=None, metavar="ADDR", help="train folds on an existing Dask cluster")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")

    p = sub.add_parser("predict", help="batch segmentation of a scan folder")
    p.add_argument("source", help="anything `medseg ingest` accepts")
    p.add_argument("--model", required=True, metavar="URI",
                   help="models:/NAME@alias, models:/NAME/VERSION, runs:/..., or a bundle folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default=None, metavar="DIR", help="reference labels named like the images")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default: %(default)s)")
    p.add_argument("--save-probabilities", action="store_true", help="also write probabilities.nii.gz")
    p.add_argument("--experiment", default="medseg-predict", help="MLflow experiment name")
    p.add_argument("--qc-sample", type=int, default=None, metavar="N",
                   help="log at most N QC pictures to MLflow (default: all)")
    _add_cluster_flags(p)

    p = sub.add_parser("evaluate", help="per-case, per-label metrics of predictions vs ground truth")
    p.add_argument("pred", help="folder of <case_id>.nii.gz or <case_id>/mask.nii.gz")
    p.add_argument("gt", help="folder of <case_id>.nii.gz")
    p.add_argument("--out", required=True, help="metrics CSV path")
    p.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM",
                   help="normalised surface distance tolerance in mm (default: %(default)s)")

    p = sub.add_parser("demo", help="the whole loop on generated data: ingest, train, register, predict, evaluate")
    p.add_argument("--out", default="demo_output", help="demo folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold (default: a quick demo setting)")
    p.add_argument("--workers", type=int, default=2, help="local Dask workers (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # Imported lazily so `medseg --help` is instant and a job's heavy imports load only when used.
    if args.command == "ingest":
        from workflows.ingest import ingest_command as command
    elif args.command == "train":
        from workflows.train import train_command as command
    elif args.command == "predict":
        from workflows.predict import predict_command as command
    elif args.command == "evaluate":
        from workflows.evaluate import evaluate_command as command
    else:
        from workflows.demo import demo_command as command
    _quiet_libraries(args.verbose)
    try:
        return int(command(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    """Keep library chatter out of the way of progress bars (after imports: Dask sets its own levels)."""
    # Dask's scheduler and nanny chatter would bury the progress bars; keep its warnings.
    for noisy in ("distributed", "tornado", "bokeh", "alembic", "mlflow.store", "mlflow.tracking", "openjpeg"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # MONAI announces on every import that NVIDIA's optional GPU JPEG decoder is absent; pydicom's
    # own decoders are used instead, which is what we want, so the notice is only noise.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    # The bundle's pyfunc predict takes a dict of arrays on purpose (see pipeline/bundle.py), so
    # MLflow's advice to add type hints, and its per-file download bars, are noise here.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":
    sys.exit(main())
