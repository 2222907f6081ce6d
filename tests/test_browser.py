"""TensorBoard as a newcomer sees it, in a real browser (headless Chromium driven by Playwright):
the page it opens on shows the training loss, the test metrics wait in closed groups, and the
HParams tab lists the swept knobs, integers as integers, then the metrics in ranking order.

CI installs Debian's `chromium` (.ci/run); elsewhere the test is skipped, saying what to install.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QUICK_RUN, run_script, tensorboard_run

pytestmark = pytest.mark.slow

SCREEN = {"width": 1280, "height": 800}  # a laptop's browser window


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(mnist_root, tmp_path_factory) -> Path:
    """One short run of `python train.py beta=1e-3 seed=0`: two knobs, as a sweep's job sets them."""
    folder = tmp_path_factory.mktemp("browser") / "run"
    args = [
        *QUICK_RUN,
        f"data.root={mnist_root}",
        "debug=limit",
        f"output_dir={folder}",
        "beta=1e-3",
        "seed=0",
    ]
    proc = run_script("train.py", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def tensorboard_url(run) -> Iterator[str]:
    """`tensorboard --logdir <run>/tensorboard`, as the run's closing lines say, on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tensorboard")]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as answer:
                    if b"beta=1e-3,seed=0" in answer.read():
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"tensorboard did not serve {url}: {server.stderr.read() if server.stderr else ''}"
                )
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


def test_tensorboard_opens_on_the_training_loss(browser, tensorboard_url):
    page = browser.new_page(viewport=SCREEN)
    page.goto(tensorboard_url)  # Time Series, the page TensorBoard opens on
    page.wait_for_selector("card-view", timeout=60_000)
    groups = page.locator("metrics-card-group-toolbar").all()
    titles = [g.locator(".group-title").inner_text() for g in groups]
    assert titles == ["train", "val", "visuals", "zz_target", "zz_test"]
    opened = [
        t
        for t, g in zip(titles, groups, strict=True)
        if g.locator("[data-mat-icon-name=expand_less_24px]").count()
    ]
    assert opened == ["train", "val"]  # the test metrics' single points wait, closed, at the end
    loss = page.locator("card-view", has_text="/loss").first
    loss.wait_for(timeout=30_000)
    box = loss.bounding_box()
    assert box is not None and box["y"] + box["height"] <= SCREEN["height"], box  # whole on the first screen
    assert "train\n/loss" in loss.inner_text()
    assert not any(t.startswith("zz_test") for t in page.locator("card-view .heading").all_inner_texts())


def test_hparams_lists_the_knobs_then_the_ranked_metrics(browser, tensorboard_url, run):
    page = browser.new_page(viewport=SCREEN)
    page.goto(f"{tensorboard_url}/#hparams")
    knobs = tensorboard_run(run).name  # e.g. batch_size=50,beta=1e-3,seed=0
    page.get_by_text("test/truncated_mse").first.wait_for(timeout=60_000)
    page.get_by_text(f"{knobs} (").first.wait_for(timeout=60_000)  # the rows load after the header
    cells = [c.strip() for c in page.locator("vaadin-grid-cell-content").all_inner_texts()]
    header = cells[: cells.index("test/dead_fraction") + 1]
    # The knobs the command set (QUICK_RUN's too), by name, before any setting it left alone.
    assert header[:6] == ["Trial ID", "Show Metrics", "batch_size", "beta", "seed", "val_size"]
    assert header[-5:] == ["test/truncated_mse", "test/mse", "test/l0", "test/fvu", "test/dead_fraction"]
    row = [c for c in cells[len(header) :] if c]
    assert "beta=1e-3" in knobs
    trial = next(c for c in row if c.startswith(f"{knobs} ("))  # the knobs lead the trial id
    batch_size, beta, seed, val_size = row[row.index(trial) + 1 : row.index(trial) + 5]
    assert (batch_size, float(beta), seed, val_size) == ("50", 1e-3, "0", "100")  # integers: not 0.0000


def test_custom_scalars_and_text_show_the_grouped_curves_and_the_test_table(browser, tensorboard_url):
    page = browser.new_page(viewport=SCREEN)
    page.goto(f"{tensorboard_url}/#custom_scalars")
    page.get_by_text("train: loss = reconstruction + penalty").wait_for(timeout=60_000)
    page.get_by_text("val: rho_hat min, mean, max and the target rho").wait_for(timeout=10_000)
    page.goto(f"{tensorboard_url}/#text")
    page.get_by_text("test/truncated_mse").first.wait_for(timeout=60_000)
