"""The review workflow in a real browser: headless Debian ``chromium`` driven by ``playwright``.

A real ``mlflow server`` subprocess serves a copy of the fixture model's store; ``medseg predict
--experiment`` logs a real batch run to it. The browser opens the batch-run URL that predict
printed, checks that MLflow shows the ML runs table (not its GenAI traces view), opens the MLflow
variant of the batch report from the run's artifacts, checks one table row per case and that every
picture loads, does the same for the local ``OUT/report.html``, and saves ``docs/review.png`` (the
screenshot in the README; ``MEDSEG_REVIEW_SCREENSHOT`` writes it elsewhere).

Skipped with a note when ``chromium`` (``make`` installs Debian's package when root) or the
``playwright`` package is missing. The browser is the system one: ``playwright install``
downloads browsers from outside and is never needed. No request leaves 127.0.0.1.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest

from preprocessing.synthetic import make_phantom, orientation_affine, write_nifti
from workflows.cli import main

CHROMIUM = shutil.which("chromium")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no `chromium` on PATH: `make` installs Debian's chromium when run as root "
    "(apt-get install -y chromium); the browser review test needs it",
)

REPO = Path(__file__).resolve().parents[2]
SPACING = (1.5, 1.5, 3.0)
TIMEOUT_MS = 60_000  # the MLflow UI is a large single-page app; first paint on 2 busy cores is slow
#: Text that only MLflow's ML runs table shows (its GenAI view shows "Traces"/"Tool calls" instead).
RUNS_TABLE_TEXT = re.compile(r"\d+ matching runs?")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(uri: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("mlflow server exited")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not become healthy")


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn, job runner, consumers), SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            server.poll()
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                server.wait(timeout=5)
                return
            time.sleep(0.3)
        server.poll()


@pytest.fixture
def review_server(trained_model, tmp_path, monkeypatch):
    """``mlflow server`` on a free localhost port over a copy of the fixture model's store."""
    source_db = trained_model.tracking_uri[len("sqlite:///") :]
    db = tmp_path / "server.db"
    with sqlite3.connect(source_db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # consistent copy; the session fixture's store stays untouched
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(uri, server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
        yield uri
    finally:
        _stop_group(server)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: chromium refuses its sandbox as root (CI containers).
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def _batch(tmp_path: Path, model_uri: str) -> tuple[Path, str]:
    """A real ``medseg predict`` of three phantoms (one cut through the liver); its printed run URL."""
    scans = tmp_path / "scans"
    affine = orientation_affine("axial", SPACING, shape=(48, 48, 32))
    for seed in (31, 32):
        write_nifti(make_phantom(seed=seed, spacing_mm=SPACING)[0], affine, scans / f"clean{seed}.nii.gz")
    image, labels = make_phantom(seed=33, spacing_mm=SPACING)
    cut = int(np.median(np.nonzero(labels == 1)[0]))  # same grid and origin: starts inside the liver
    write_nifti(image[cut:], affine, scans / "cropped.nii.gz")
    out = tmp_path / "out"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(["predict", str(scans), "--model", model_uri, "--out", str(out),
                     "--workers", "1", "--experiment", "review-browser"])  # fmt: skip
    text = printed.getvalue()
    assert code == 0, text
    found = re.search(r"batch run:\s+(\S+)", text)
    assert found, f"predict printed no batch-run URL:\n{text}"
    return out, found.group(1)


def _local_only(context, server_uri: str) -> None:
    """Abort every request that is not to the test's server or a local file: no network."""
    allowed = (server_uri, "file:", "data:", "blob:")
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(allowed) else route.abort())


def _experiment_url(run_url: str) -> str:
    """The experiment page of a printed run URL (same query: ``?workflowType=...``)."""
    parts = urlsplit(run_url)
    fragment = re.sub(r"/runs/[^/?]+", "", parts.fragment)
    return f"{parts.scheme}://{parts.netloc}{parts.path}#{fragment}"


def _check_report(frame, n_cases: int, where: str) -> None:
    """One ``tr.case`` per case, and every picture decoded (``naturalWidth > 0``)."""
    frame.wait_for_selector("table#cases tbody tr.case", timeout=TIMEOUT_MS)
    assert frame.locator("table#cases tbody tr.case").count() == n_cases, where
    images = frame.locator("table#cases img")
    assert images.count() >= 1, f"{where}: no QC picture in the report"
    for i in range(images.count()):
        image = images.nth(i)
        image.scroll_into_view_if_needed(timeout=TIMEOUT_MS)  # thumbnails may be loading="lazy"
        image.evaluate(
            "img => img.complete && img.naturalWidth > 0 ? true : new Promise((ok, fail) => {"
            " img.addEventListener('load', () => ok(true)); img.addEventListener('error', () => fail('broken')); })"
        )
        assert image.evaluate("img => img.naturalWidth") > 0, f"{where}: picture {i} did not load"


def _report_frame(page, run_url: str, name: str):
    """The frame that shows the HTML artifact (MLflow may render it inline or in an iframe); opened as a
    reviewer does: the run, its Artifacts tab, the file."""
    page.goto(run_url)
    page.get_by_text("Artifacts", exact=True).first.click(timeout=TIMEOUT_MS)
    page.get_by_text(name, exact=True).first.click(timeout=TIMEOUT_MS)
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        for frame in page.frames:
            if frame.locator("table#cases").count():  # an iframe, or inline in the page
                return frame
        time.sleep(0.5)
    frames = [f.url[:80] for f in page.frames]
    raise AssertionError(f"MLflow did not show the report artifact; frames {frames}: {page.inner_text('body')[-600:]!r}")


def test_review_in_a_real_browser(trained_model, review_server, browser, tmp_path):
    out, run_url = _batch(tmp_path, trained_model.model_uri)
    n_cases = len(pd.read_csv(out / "cases.csv", keep_default_na=False))
    assert run_url.startswith(review_server)
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    _local_only(context, review_server)
    page = context.new_page()

    # The printed batch-run URL opens the run: its name and its metrics.
    page.goto(run_url)
    page.get_by_text("cases_ok").first.wait_for(timeout=TIMEOUT_MS)
    page.get_by_text("predict fixture-phantom@v").first.wait_for(timeout=TIMEOUT_MS)

    # Its experiment lands on the ML runs table, not the GenAI view (MLflow 3's default).
    page.goto(_experiment_url(run_url))
    try:
        page.get_by_text(RUNS_TABLE_TEXT).first.wait_for(timeout=TIMEOUT_MS)
    except sync_api.TimeoutError:
        pytest.fail(
            "the experiment of the printed URL does not show the runs table (GenAI view?): "
            f"{page.inner_text('body')[:400]!r}"
        )
    page.get_by_text("predict fixture-phantom@v").first.wait_for(timeout=TIMEOUT_MS)  # the batch run's row

    # The report, logged to the run (MLflow variant: pictures embedded), shown by MLflow.
    try:
        frame = _report_frame(page, run_url, "report.mlflow.html")
    finally:  # the screenshot of what the reviewer sees, even when the preview is missing
        shot = Path(os.environ.get("MEDSEG_REVIEW_SCREENSHOT") or REPO / "docs" / "review.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        partial = shot.with_name(f".{shot.name}.partial.png")
        page.screenshot(path=str(partial))
        os.replace(partial, shot)  # atomic: a reader never sees half a picture
    _check_report(frame, n_cases, "report in MLflow")

    # The local page in OUT (thumbnails are relative links to <case>/qc.png).
    local = context.new_page()
    local.goto((out / "report.html").as_uri())
    _check_report(local.main_frame, n_cases, "OUT/report.html")
    context.close()
