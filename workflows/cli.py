"""The ``medseg`` command line: ``ingest``, ``train``, ``predict``, ``evaluate``, ``demo``.

This module only parses flags and hands a config to the job modules; it is the one place that
prints. Exit codes are the contract of :mod:`workflows.exit_codes` (documented in the README).
Cheap checks of the arguments (numbers in range, SOURCE and ``--model`` present, the Dask
scheduler reachable) run here, before a job's heavy imports and before any work, so a bad
command line is refused in well under a second with exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from workflows.exit_codes import EXIT_BAD_ARGS, EXIT_INTERRUPTED

DESCRIPTION = "The medseg command line: ingest, train, predict, evaluate, demo."
# Sliding-window overlap above this multiplies the window count (and the run time) without
# improving masks: 0.5 (nnU-Net's value) is the default, 0.9 already means 1000x the windows of 0.
MAX_OVERLAP = 0.9
SCHEDULER_CONNECT_TIMEOUT_S = 5.0
DEFAULT_DASK_PORT = 8786
_TCP_SCHEMES = ("tcp", "tls", "ws", "wss")


class MedsegArgumentParser(argparse.ArgumentParser):
    """argparse, but an unknown ``--option`` is named (with the closest valid one) first.

    Plain argparse reports ``medseg predict SRC --modle m --out o`` as "the following arguments
    are required: --model", which hides the typo. Subparsers inherit this class.
    """

    def parse_known_args(self, args=None, namespace=None):
        if not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self._refuse_unknown_options(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_options(self, args: list[str]) -> None:
        known = [s for s in self._option_string_actions if s.startswith("--")]
        for arg in args:
            if arg == "--":
                return
            if not arg.startswith("--"):
                continue
            name = arg.split("=", 1)[0]
            if name in known or (self.allow_abbrev and any(k.startswith(name) for k in known)):
                continue
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (see {self.prog} --help)"
            self.error(f"unrecognized option {name}{hint}")


def _positive_int(text: str) -> int:
    value = _parse(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _parse(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0; got {text}")
    return value


def _positive_mm(text: str) -> float:
    value = _parse(float, text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of millimetres; got {text}")
    return value


def _overlap(text: str) -> float:
    value = _parse(float, text)
    if not 0.0 <= value <= MAX_OVERLAP:  # also refuses NaN
        raise argparse.ArgumentTypeError(
            f"must be between 0 and {MAX_OVERLAP} (0.5 is the default; more than {MAX_OVERLAP} "
            f"multiplies the run time without better masks); got {text}"
        )
    return value


def _parse(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        noun = "whole number" if kind is int else "number"
        raise argparse.ArgumentTypeError(f"must be a {noun}; got {text!r}") from None


_CONFIG_FIELDS = "(the --config keys)"


class _TrainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``medseg train --help``: the epilog lists the ``--config`` keys, plain text in its own layout.

    The list is built from the config dataclasses only when the help is shown: importing them
    imports torch, which a bare ``medseg`` or an argument error must not wait for.
    """

    def add_text(self, text: str | None) -> None:
        if text == _CONFIG_FIELDS:
            from workflows.train_config import config_help

            text = config_help()
        super().add_text(text)


def _add_cluster_flags(p: argparse.ArgumentParser, default_workers: int | None = 2) -> None:
    p.add_argument("--workers", type=_positive_int, default=default_workers, metavar="N",
                   help="worker processes of the local Dask cluster, >= 1 (default: %(default)s)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="address of an existing Dask scheduler, e.g. tcp://host:8786 (overrides --workers)")


def build_parser() -> argparse.ArgumentParser:
    parser = MedsegArgumentParser(prog="medseg", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="DICOM/NIfTI/NRRD/MHA/MSD folder -> OUT/images/*.nii.gz + manifest.csv")
    p.add_argument("source", help="folder tree of DICOM files, NIfTI/NRRD/MHA files, or an MSD dataset")
    p.add_argument("--out", required=True, help="output folder")
    _add_cluster_flags(p)

    p = sub.add_parser("train", help="cross-validation training tracked in MLflow",
                       epilog=_CONFIG_FIELDS, formatter_class=_TrainHelpFormatter)
    p.add_argument("--data", required=True, help="MSD-layout dataset folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--network", required=True, help="network name (see networks.available_networks())")
    p.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="epochs per fold (default: %(default)s)")
    p.add_argument("--fold", type=int, default=None, help="train only this fold (0-based)")
    p.add_argument("--experiment", default="medseg-train", help="MLflow experiment name")
    p.add_argument("--register", default=None, metavar="MODEL", help="register the fold ensemble as MODEL")
    p.add_argument("--resume", action="store_true", help="continue killed folds from their last checkpoint")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML overriding plan, training and postprocessing fields (listed below)")
    p.add_argument("--out", default=None, help="work folder for plan, splits, checkpoints (default: ./medseg_work/<DATA folder name>, "
                        "or $MEDSEG_WORK/<DATA folder name> when MEDSEG_WORK is set)")
    p.add_argument("--parallel-folds", type=_positive_int, default=None, metavar="N",
                   help="train folds as Dask tasks on a local cluster of N >= 1 workers")
    p.add_argument("--scheduler", default=None, metavar="ADDR", help="train folds on an existing Dask cluster")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")

    p = sub.add_parser("predict", help="batch segmentation of a scan folder")
    p.add_argument("source", help="anything medseg ingest accepts")
    p.add_argument("--model", required=True, metavar="URI",
                   help="models:/NAME@alias, models:/NAME/VERSION, runs:/..., or a bundle folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", default=None, metavar="DIR", help="reference labels named like the images")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--overlap", type=_overlap, default=0.5, metavar="F",
                   help=f"sliding-window overlap, 0 to {MAX_OVERLAP} (default: %(default)s)")
    from pipeline.writers import optional_writers  # light: writers import their libraries when writing

    for writer in optional_writers():  # an optional output's flag comes with its writer
        p.add_argument(writer.flag, action="store_true", help=writer.help)
    p.add_argument("--experiment", default="medseg-predict", help="MLflow experiment name")
    p.add_argument("--run-name", default=None, metavar="NAME",
                   help="MLflow run name (default: 'predict MODEL@vVERSION'; never put patient data here)")
    p.add_argument("--qc-sample", type=_non_negative_int, default=None, metavar="N",
                   help="log at most N QC pictures to MLflow (default: all)")
    _add_cluster_flags(p)

    p = sub.add_parser("evaluate", help="per-case, per-label metrics of predictions vs ground truth")
    p.add_argument("pred", help="folder of <case_id>.nii.gz or <case_id>/mask.nii.gz")
    p.add_argument("gt", help="folder of <case_id>.nii.gz")
    p.add_argument("--out", required=True, help="metrics CSV path")
    p.add_argument("--nsd-tolerance", type=_positive_mm, default=2.0, metavar="MM",
                   help="normalised surface distance tolerance in mm, > 0 (default: %(default)s)")

    p = sub.add_parser("demo", help="the whole loop on generated data: ingest, train, register, predict, evaluate")
    p.add_argument("--out", default="demo_output", help="demo folder (default: %(default)s)")
    p.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                   help="epochs per fold, >= 1 (default: a quick demo setting)")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                   help="local Dask workers, >= 1 (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (2) or the help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_ARGS
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args)
    except ValueError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    if args.command in ("ingest", "predict", "demo"):  # the jobs that name DICOM cases (once each)
        _warn_if_public_salt(args.command)
    try:
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
        code = int(command(args))
        if args.command == "train":
            _print_training_review(args)
        return code
    except (ValueError, FileNotFoundError) as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _print_training_review(args: argparse.Namespace) -> None:
    """The ``mlflow ui`` command and the URLs of the training experiment and the registered model."""
    from pipeline.tracking import tracking_uri
    from pipeline.tracking_links import experiment_id_of, review_lines

    uri = tracking_uri()
    experiment_id = experiment_id_of(uri, args.experiment)
    if experiment_id is not None:
        print("\n".join(review_lines(uri, training_experiment_id=experiment_id, model_name=args.register)))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what can be refused without heavy imports or work: inputs that are not there, a
    ``--model`` that cannot be a model, an unreachable ``--scheduler``.

    Raises:
        ValueError: naming the argument, what is wrong and what to do (the CLI exits with 2).
    """
    if args.command in ("ingest", "predict"):
        source = Path(args.source)
        if not source.exists():
            raise ValueError(f"SOURCE {source} does not exist; give a folder or file of scans")
    if args.command == "predict":
        _check_model_argument(args.model)
        if args.labels and not Path(args.labels).is_dir():
            raise ValueError(f"--labels {args.labels} is not a folder")
    scheduler = getattr(args, "scheduler", None)
    if scheduler:
        check_scheduler_reachable(scheduler)


def _check_model_argument(uri: str) -> None:
    """A ``models:/`` or ``runs:/`` URI, another MLflow artifact URI, or a local bundle folder."""
    if uri.startswith(("models:/", "runs:/")) or "://" in uri:
        return  # resolved (and refused with the reason) through MLflow by the job
    folder = Path(uri)
    if not folder.is_dir():
        raise ValueError(
            f"--model {uri}: no such folder, and not a models:/NAME@alias, models:/NAME/VERSION or "
            "runs:/RUN_ID/model URI"
        )
    if not any((f / "bundle.json").is_file() for f in (folder, folder / "artifacts" / "bundle")):
        raise ValueError(f"--model {uri}: no model bundle there (no bundle.json); give the folder that "
                         "medseg train wrote, or a models:/ URI")


def check_scheduler_reachable(address: str, timeout_s: float = SCHEDULER_CONNECT_TIMEOUT_S) -> None:
    """Refuse a ``--scheduler`` address nothing listens on, within ``timeout_s`` seconds.

    Only a TCP connection is tried (no Dask import, nothing discovered or computed yet); the
    Dask handshake itself is bounded by :func:`workflows.cluster.dask_client`. Addresses of other
    transports (``inproc://``, ``ucx://``) are left to Dask.

    Raises:
        ValueError: the address is malformed or refuses / does not answer the connection.
    """
    text = address if "://" in address else f"tcp://{address}"
    parts = urlsplit(text)
    if parts.scheme not in _TCP_SCHEMES:
        return
    try:
        host, port = parts.hostname, parts.port or DEFAULT_DASK_PORT
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        raise ValueError(f"--scheduler {address}: not an address like tcp://HOST:8786")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        else:
            reason = (exc.strerror or str(exc)).lower()
        raise ValueError(
            f"--scheduler {address}: cannot reach a Dask scheduler there ({reason}); start one "
            "(dask scheduler) and check the address, or drop --scheduler to use a local cluster"
        ) from exc


def _warn_if_public_salt(command: str) -> None:
    from preprocessing.image import pseudonym_salt_is_public

    if pseudonym_salt_is_public():
        print(
            f"medseg {command}: warning: MEDSEG_PSEUDONYM_SALT is not set, so DICOM case ids use the "
            "public default salt and anyone holding a SeriesInstanceUID can recompute them; set a "
            "secret salt of your own (see the README, Patient data)",
            file=sys.stderr,
        )


def _quiet_libraries(verbose: bool) -> None:
    """Keep library chatter out of the way of progress bars (after imports: Dask sets its own levels)."""
    # Dask's scheduler and nanny chatter would bury the progress bars; keep its warnings.
    for noisy in ("distributed", "tornado", "bokeh", "alembic", "mlflow.store", "mlflow.tracking", "openjpeg"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # MONAI announces on every import that NVIDIA's optional GPU JPEG decoder is absent; pydicom's
    # own decoders are used instead, which is what we want, so the notice is only noise.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    # The bundle's pyfunc predict takes a dict of arrays on purpose (see pipeline/tracking_registry.py), so
    # MLflow's advice to add type hints, and its per-file download bars, are noise here.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":
    sys.exit(main())
