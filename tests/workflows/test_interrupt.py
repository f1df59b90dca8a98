"""Ctrl-C during ``medseg predict``: one clean message and exit code 130, no Dask tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from preprocessing.synthetic import write_hospital_folder

REPO = Path(__file__).resolve().parents[2]


def _a_case_has_started(out: Path) -> bool:
    return any(out.glob(".staging/*")) or any(out.glob("*/case.json"))


def test_ctrl_c_during_predict_exits_130_without_tracebacks(tmp_path, trained_model):
    scans = tmp_path / "scans"
    write_hospital_folder(scans, n_series=5, seed=11, shape=(48, 48, 24))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "predict",
        str(scans),
        "--model",
        str(trained_model.bundle_dir),
        "--out",
        str(out),
        "--workers",
        "1",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'i.db'}", "PYTHONUNBUFFERED": "1"}
    # Its own process group, like a shell job: the terminal's Ctrl-C reaches the CLI, the Dask
    # nanny and every worker process at once.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not _a_case_has_started(out):
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be interrupted"
        assert _a_case_has_started(out), "no case started within 180 s"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stdout[-2000:] + stderr[-4000:]
    assert "interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr[-4000:]
    assert "KeyboardInterrupt" not in stderr
