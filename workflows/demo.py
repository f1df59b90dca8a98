"""``medseg demo``: the product's main job end to end, on generated data, with no options.

Every step runs the same job function the command line runs (``run_ingest``, ``run_train``,
``run_predict``, ``run_evaluate`` with the config its flags would build), so the demo exercises
what a user types: generate a small synthetic hospital folder and an MSD training set ->
``medseg ingest`` -> ``medseg train`` (2 folds, brief) with ``--register`` -> ``medseg predict``
of the hospital folder with ``models:/<name>@champion`` (DICOM in -> NIfTI + DICOM SEG + QC out) ->
``medseg evaluate`` -> a summary and the ``mlflow ui`` command to review it all.

Defaults are embedded: a local sqlite MLflow store inside the demo folder (unless
``MLFLOW_TRACKING_URI`` is set), a local Dask cluster, generated data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.training.config import TrainConfig
from preprocessing.plan import PlanConfig
from preprocessing.synthetic import LABEL_NAMES, write_hospital_folder, write_msd_dataset
from workflows.evaluate import EvaluateConfig, run_evaluate
from workflows.exit_codes import EXIT_BAD_ARGS, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL
from workflows.ingest import IngestConfig, run_ingest
from workflows.predict import PredictConfig, run_predict
from workflows.train import CrossValidationJob, run_train
from workflows.train_config import load_config_file

DEMO_MODEL = "medseg-demo"
DEMO_EPOCHS = 20
# A small attention U-Net that learns the phantom on 2 CPU cores in a few minutes. Augmentation
# is off: on 8 synthetic cases it only slows convergence; real data should keep the default.
DEMO_TRAIN_CONFIG = {
    "patch_size": [32, 32, 16],
    "network_options": {"channels": [8, 16, 32], "strides": [1, 2, 2], "deep_supervision": True},
    "optimizer": "adamw",
    "learning_rate": 0.01,
    "val_every": 5,
    "iterations_per_epoch": 10,
    "batch_size": 2,
    "augment": {"enabled": False},
}


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo into ``args.out``; returns 0 (a failing step raises ``SystemExit`` naming it)."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    epochs = args.epochs or DEMO_EPOCHS
    t0 = time.perf_counter()

    _step(1, "generating a synthetic hospital folder and an MSD training set")
    hospital, truth, msd = _write_demo_data(out)
    print(f"  hospital folder: {hospital}\n  training set:    {msd}")

    _step(2, "medseg ingest (DICOM/NIfTI -> NIfTI + manifest)")
    ingest = IngestConfig(hospital, out / "ingested", args.workers)
    _run_step("ingest", run_ingest, ingest, allowed=(EXIT_OK, EXIT_PARTIAL))

    _step(3, f"medseg train (2 folds x {epochs} epochs, register {DEMO_MODEL})")
    _run_step("train", run_train, _train_job(out, msd, epochs))

    _step(4, "medseg predict (batch on the local Dask cluster)")
    predictions = out / "predictions"
    predict = PredictConfig(
        source=hospital,
        model_uri=f"models:/{DEMO_MODEL}@champion",
        out_dir=predictions,
        labels_dir=truth,
        device="cpu",
        experiment="medseg-demo-predict",
        workers=args.workers,
    )
    _run_step("predict", run_predict, predict, allowed=(EXIT_OK, EXIT_PARTIAL))

    _step(5, "medseg evaluate")
    evaluate = EvaluateConfig(predictions, truth, out / "metrics.csv")
    if _run_step("evaluate", run_evaluate, evaluate, allowed=(EXIT_OK, EXIT_PARTIAL)) == EXIT_PARTIAL:
        print(
            "  (error rows are references without a prediction; here that is expected for the MR"
            " series, which the CT model skips on purpose -- see predictions/cases.csv)"
        )

    _print_summary(out, predictions, time.perf_counter() - t0)
    return EXIT_OK


def _write_demo_data(out: Path) -> tuple[Path, Path, Path]:
    """The hospital folder, its ground truth and the MSD training set (kept when already there)."""
    hospital, truth, msd = out / "hospital", out / "hospital_truth", out / "msd_dataset"
    if not (hospital.is_dir() and truth.is_dir()):
        write_hospital_folder(hospital, seed=7, truth_dir=truth)
        # Label names for `medseg evaluate`, which reads an MSD-style dataset.json beside GT.
        (truth / "dataset.json").write_text(
            json.dumps(
                {"labels": {"background": 0, **{name: value for value, name in LABEL_NAMES.items()}}},
                indent=2,
            )
        )
    if not (msd / "dataset.json").is_file():
        write_msd_dataset(msd, n_train=8, n_test=2, seed=11)
    return hospital, truth, msd


def _train_job(out: Path, msd: Path, epochs: int) -> CrossValidationJob:
    """What ``medseg train --network attention_unet --folds 2 --register medseg-demo --config
    demo_train.yaml --device cpu`` builds; the YAML is written so a user can rerun that command."""
    config_path = out / "demo_train.yaml"
    config_path.write_text(yaml.safe_dump(DEMO_TRAIN_CONFIG))
    plan, train, post = load_config_file(config_path, PlanConfig(), TrainConfig(epochs=epochs, device="cpu"))
    return CrossValidationJob(
        data=msd,
        network="attention_unet",
        num_folds=2,
        folds=(0, 1),
        work_dir=out / "training",
        experiment="medseg-demo-train",
        plan_config=plan,
        train_config=train,
        register=DEMO_MODEL,
        postprocessing=post,
    )


def _run_step(step: str, job: Callable[[Any], int], config: Any, allowed: tuple[int, ...] = (EXIT_OK,)) -> int:
    """``job(config)`` with the command line's handling of bad input and Ctrl-C; stops the demo
    (``SystemExit``) on an exit code outside ``allowed``, else returns it."""
    try:
        code = int(job(config))
    except (ValueError, FileNotFoundError) as exc:
        print(f"medseg {step}: error: {exc}", file=sys.stderr)
        code = EXIT_BAD_ARGS
    except KeyboardInterrupt:
        print(f"medseg {step}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = EXIT_INTERRUPTED
    _check(code, step, allowed)
    return code


def _step(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def _check(code: int, step: str, allowed: tuple[int, ...] = (EXIT_OK,)) -> None:
    if code not in allowed:
        raise SystemExit(f"demo stopped: `medseg {step}` exited with code {code}")


def _print_summary(out: Path, predictions: Path, seconds: float) -> None:
    cases = pd.read_csv(predictions / "cases.csv")
    print("\n=== demo summary ===")
    segmented = cases[cases["status"] != "skipped"]
    cols = ["case_id", "status"] + [c for c in cases.columns if c.startswith("dice_")] + ["seconds"]
    print(segmented[[c for c in cols if c in cases.columns]].round(3).to_string(index=False))
    skipped = cases[cases["status"] == "skipped"]
    if len(skipped):
        print(f"\nskipped on purpose ({len(skipped)}):")
        for _, row in skipped.iterrows():
            print(f"  {Path(str(row['source'])).name or row['case_id']}: {row['reason']}")
    metrics_csv = out / "metrics.csv"
    if metrics_csv.is_file():
        metrics = pd.read_csv(metrics_csv)
        if {"label", "dice"} <= set(metrics.columns):
            print("\nmean Dice per label (medseg evaluate):")
            print(metrics.groupby("label")["dice"].mean().round(3).to_string())
    print(f"\noutputs: {predictions}  (mask.nii.gz, seg.dcm, qc.png per case)")
    print(f"finished in {seconds / 60:.1f} min. Review everything in MLflow:")
    from pipeline.tracking_links import mlflow_ui_command, ui_base_url

    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"  {mlflow_ui_command(uri) or ''}\n  then open {ui_base_url(uri)}/ (the batch run's URL is printed above)")
