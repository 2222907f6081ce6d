"""The sweep summary on a fabricated sweep folder: two finished jobs, one failed, one interrupted."""

import csv
import json

import pytest
import yaml
from PIL import Image

from sae.sweep import write_summary
from tests.conftest import run_script


def fake_job(sweep, name, overrides, metrics=None, status=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/loss", "rho": 0.05}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (job / "status.json").write_text(json.dumps(status))


def metrics(mse, val_loss, rho_hat_mean, l0):
    return {
        "test/mse": mse,
        "val/loss": val_loss,
        "test/rho_hat_mean": rho_hat_mean,
        "test/l0": l0,
        "test/probe_accuracy": 0.9,
        "ckpt_path": "/x.ckpt",
    }


def fabricated_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(
        sweep,
        "0",
        ["beta=0.001", "lr=0.001", "~callbacks.run_figures"],
        metrics(0.016, 0.030, 0.13, 8.0),
        {"status": "ok"},
    )
    fake_job(sweep, "1", ["beta=0.005", "lr=0.001"], metrics(0.018, 0.020, 0.07, 4.0), {"status": "ok"})
    fake_job(
        sweep,
        "2",
        ["beta=abc", "lr=0.001"],
        None,
        {"status": "failed", "error": "ValueError: could not convert 'abc'"},
    )
    fake_job(sweep, "10", ["beta=0.1", "lr=0.001"])  # killed before it wrote anything
    return sweep


def test_summary_of_finished_failed_and_interrupted_jobs(tmp_path):
    sweep = fabricated_sweep(tmp_path)
    rows = write_summary(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # numeric order, not text order

    with open(sweep / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "incomplete"]
    assert table[2]["error"] == "ValueError: could not convert 'abc'"
    assert [r["beta"] for r in table] == ["0.001", "0.005", "abc", "0.1"]
    assert {"job", "beta", "lr", "status", "test/mse", "val/loss", "test/rho_hat_mean"} <= set(table[0])
    assert float(table[1]["test/mse"]) == 0.018
    assert not any(k.startswith("callbacks") for k in table[0])  # a deletion is not a swept value
    columns = list(table[0])
    # The figures a reader compares come first, right after the overrides and the status.
    assert columns[:7] == ["job", "beta", "lr", "status", "val/loss", "test/mse", "test/rho_hat_mean"]

    md = (sweep / "summary.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    # Only what differs between jobs: lr (0.001 in every job) and the probe's accuracy (0.9 in
    # every job that has one) move to a line above the table; summary.csv keeps them.
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "job",
        "beta",
        "status",
        "val/loss",
        "test/mse",
        "test/rho_hat_mean",
        "test/l0",
        "error",
    ]
    assert "not in the table: `lr` 0.001, `test/probe_accuracy` 0.9." in md
    assert {"lr", "test/probe_accuracy"} <= set(table[0])
    # Sorted by the optimized metric, val/loss, lowest first; jobs without it last.
    assert [line.split(" | ")[0].strip("| ") for line in lines[1:]] == ["1", "0", "2", "10"]
    assert "sorted by `val/loss`" in md and "`test/mse` 0.01387" in md

    png = Image.open(sweep / "pareto.png")
    assert png.size == (1400, 600)


@pytest.mark.slow
def test_evaluate_rebuilds_the_summary_from_job_folders(tmp_path):
    sweep = fabricated_sweep(tmp_path)
    proc = run_script("evaluate.py", f"sweep_dir={sweep}", f"hydra.run.dir={tmp_path}/out", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 jobs (2 ok)" in proc.stdout
    for name in ("summary.csv", "summary.md", "pareto.png"):
        assert (sweep / name).stat().st_size > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("evaluate.py", f"sweep_dir={empty}", f"hydra.run.dir={tmp_path}/out2", timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: sweep_dir=")
