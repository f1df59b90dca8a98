"""The ``medseg`` command line's own contract: argument errors, help text, refusing bad input fast.

Everything here must be refused before any work: exit code 2, a message naming the argument,
nothing created in OUT, and (for predict) before torch, MONAI, MLflow or Dask are imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workflows import cluster
from workflows.cli import MAX_OVERLAP, build_parser, main

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = "tcp://127.0.0.1:1"  # port 1 (tcpmux) is closed on any test machine


def _fake_bundle(tmp_path: Path) -> Path:
    """A folder that passes the CLI's cheap model check (bundle.json present); nothing loads it."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({}))
    return bundle


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["predict", "SRC", "--model", "M", "--out", "O", "--overlap", "0.99"], "--overlap"),
        (["predict", "SRC", "--model", "M", "--out", "O", "--overlap", "nan"], "--overlap"),
        (["predict", "SRC", "--model", "M", "--out", "O", "--overlap", "-0.1"], "--overlap"),
        (["predict", "SRC", "--model", "M", "--out", "O", "--workers", "0"], "--workers"),
        (["predict", "SRC", "--model", "M", "--out", "O", "--workers", "-1"], "--workers"),
        (["predict", "SRC", "--model", "M", "--out", "O", "--qc-sample", "-1"], "--qc-sample"),
        (["ingest", "SRC", "--out", "O", "--workers", "0"], "--workers"),
        (["ingest", "SRC", "--out", "O", "--workers", "two"], "--workers"),
        (["train", "--data", "D", "--network", "unet", "--parallel-folds", "0"], "--parallel-folds"),
        (["evaluate", "P", "G", "--out", "m.csv", "--nsd-tolerance", "0"], "--nsd-tolerance"),
        (["evaluate", "P", "G", "--out", "m.csv", "--nsd-tolerance", "inf"], "--nsd-tolerance"),
        (["demo", "--workers", "0"], "--workers"),
        (["demo", "--epochs", "0"], "--epochs"),
    ],
)
def test_numbers_out_of_range_exit_2_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "usage:" in err


def test_overlap_limit_is_documented_and_accepted(capsys):
    args = build_parser().parse_args(
        ["predict", "S", "--model", "M", "--out", "O", "--overlap", str(MAX_OVERLAP)]
    )
    assert args.overlap == MAX_OVERLAP
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    assert f"0 to {MAX_OVERLAP}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "typo", "suggestion"),
    [
        (["predict", "SRC", "--modle", "m", "--out", "o"], "--modle", "--model"),
        (["predict", "SRC", "--model", "m", "--out", "o", "--overlpa=0.3"], "--overlpa", "--overlap"),
        (["train", "--data", "d", "--netwrok", "unet"], "--netwrok", "--network"),
        (["train", "--data", "d", "--network", "unet", "--epochz", "3"], "--epochz", "--epochs"),
    ],
)
def test_misspelt_option_is_named_with_the_close_one(argv, typo, suggestion, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"unrecognized option {typo}; did you mean {suggestion}?" in err
    assert "are required" not in err


def test_abbreviated_option_still_works():
    args = build_parser().parse_args(["predict", "S", "--mod", "M", "--out", "O"])
    assert args.model == "M"


@pytest.mark.parametrize("command", [None, "ingest", "train", "predict", "evaluate", "demo"])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: medseg" in text
    assert "`" not in text and ":data:" not in text and ":func:" not in text


def _run_cli(
    args: list[str], code: str = "", timeout: float = 60
) -> tuple[subprocess.CompletedProcess, float]:
    """``main(args)`` in a fresh interpreter; ``code`` runs after it (e.g. import checks)."""
    script = f"import sys\nfrom workflows.cli import main\nrc = main({args!r})\n{code}\nsys.exit(rc)\n"
    env = {k: v for k, v in os.environ.items() if k != "MEDSEG_PSEUDONYM_SALT"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - started


HEAVY = (
    "heavy = [m for m in ('torch', 'monai', 'mlflow', 'distributed', 'dask') if m in sys.modules]\n"
    "assert not heavy, heavy"
)


def test_predict_refuses_a_missing_source_fast_without_heavy_imports(tmp_path):
    out = tmp_path / "out"
    proc, seconds = _run_cli(
        ["predict", str(tmp_path / "nope"), "--model", "models:/m@champion", "--out", str(out)], HEAVY
    )
    assert proc.returncode == 2, proc.stderr
    assert seconds < 5
    assert f"SOURCE {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("model", ["no_such_folder", "empty_folder", "model:/typo@champion"])
def test_predict_refuses_a_model_that_is_not_there_before_creating_out(model, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "empty_folder").mkdir()
    out = tmp_path / "out"
    proc, _ = _run_cli(
        ["predict", str(tmp_path / "src"), "--model", str(tmp_path / model), "--out", str(out)], HEAVY
    )
    assert proc.returncode == 2, proc.stderr
    assert "--model" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def _scheduler_argv(command: str, tmp_path: Path) -> list[str]:
    src = tmp_path / "src"
    src.mkdir()
    if command == "ingest":
        return ["ingest", str(src), "--out", str(tmp_path / "out"), "--scheduler", UNREACHABLE]
    if command == "predict":
        bundle = _fake_bundle(tmp_path)
        return [
            "predict",
            str(src),
            "--model",
            str(bundle),
            "--out",
            str(tmp_path / "out"),
            "--scheduler",
            UNREACHABLE,
        ]
    return [
        "train",
        "--data",
        str(src),
        "--network",
        "unet",
        "--out",
        str(tmp_path / "out"),
        "--scheduler",
        UNREACHABLE,
    ]


@pytest.mark.parametrize("command", ["ingest", "predict", "train"])
def test_unreachable_scheduler_exits_2_quickly_before_any_work(command, tmp_path, capsys):
    started = time.monotonic()
    assert main(_scheduler_argv(command, tmp_path)) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert f"--scheduler {UNREACHABLE}: cannot reach a Dask scheduler there" in err
    assert not (tmp_path / "out").exists()  # refused before discovery, planning or any output


def test_a_port_that_is_not_a_dask_scheduler_is_refused_not_waited_on(monkeypatch):
    """The CLI's TCP check passes a port that accepts; Dask's handshake would then wait for ever."""
    monkeypatch.setattr(cluster, "SCHEDULER_CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(cluster.SchedulerUnreachableError, match="no Dask scheduler answered"):
            with cluster.dask_client(scheduler=address):
                pass
    assert time.monotonic() - started < 10


def test_public_pseudonym_salt_warns_once(tmp_path):
    (tmp_path / "src").mkdir()
    args = [
        "predict",
        str(tmp_path / "src"),
        "--model",
        str(_fake_bundle(tmp_path)),
        "--out",
        str(tmp_path / "o"),
    ]
    proc, _ = _run_cli(args, timeout=120)  # the fake bundle is refused once loaded: exit 2
    assert proc.returncode == 2
    warnings = [line for line in proc.stderr.splitlines() if "MEDSEG_PSEUDONYM_SALT" in line]
    assert len(warnings) == 1 and "public default salt" in warnings[0]


def test_own_pseudonym_salt_does_not_warn(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSEG_PSEUDONYM_SALT", "a-site-secret")
    (tmp_path / "src").mkdir()
    args = [
        "predict",
        str(tmp_path / "src"),
        "--model",
        str(_fake_bundle(tmp_path)),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "MEDSEG_PSEUDONYM_SALT" not in capsys.readouterr().err
