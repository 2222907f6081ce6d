"""The multirun recipes of docs/sweeps.md on the installed launchers and sweeper (the `sweep` extra).

Each runs train.py as docs/sweeps.md does, on the synthetic data with a few batches per job, and
checks the job folders and the sweep summary the run leaves.
"""

import csv
import json
import os
import subprocess

import pytest
import yaml

from sae.training.evaluate import evaluate
from tests.conftest import ROOT, compose_config, train_command

pytestmark = pytest.mark.slow  # every test here starts train.py

ONE_EPOCH = ["debug=limit", "epochs=1"]
# What a launcher does with a job is the same for every output: the per-run probe and figures
# (tested with the basic launcher) are left out.
NO_RUN_VISUALS = ["~callbacks.linear_probe", "~callbacks.run_figures", "~callbacks.epoch_visuals"]


def multirun(tmp_path, mnist_root, *overrides: str, multirun_flag: bool = True):
    sweep = tmp_path / "sweep"
    command = train_command(
        mnist_root, *ONE_EPOCH, *NO_RUN_VISUALS, "data.batches_per_call=3", f"hydra.sweep.dir={sweep}"
    )
    command += [*overrides] + (["-m"] if multirun_flag else [])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = sweep / "summary.csv"
    assert summary.is_file(), proc.stderr[-3000:]
    with open(summary) as f:
        return proc, sweep, list(csv.DictReader(f))


def test_joblib_runs_jobs_in_parallel_with_a_share_of_the_threads(mnist_root, tmp_path):
    proc, sweep, rows = multirun(
        tmp_path, mnist_root, "launcher=joblib", "hydra.launcher.n_jobs=2", "beta=1e-3,5e-3", "rho=0.05,1.5"
    )
    assert proc.returncode != 0  # one job's config is invalid: the command says so
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert sorted((r["beta"], r["rho"], r["status"]) for r in rows) == [  # knobs as typed
        ("1e-3", "0.05", "ok"),
        ("1e-3", "1.5", "failed"),
        ("5e-3", "0.05", "ok"),
        ("5e-3", "1.5", "failed"),
    ]
    share = max(1, (os.cpu_count() or 1) // 2)
    for row in rows:
        if row["status"] == "ok":
            assert int(row["fit/threads"]) == share  # loky's OMP_NUM_THREADS = cores // n_jobs
            assert float(row["test/mse"]) > 0
    assert (sweep / "summary.md").is_file() and (sweep / "pareto.png").is_file()


def test_submitit_local_runs_each_job_in_its_own_process(mnist_root, tmp_path):
    proc, sweep, rows = multirun(tmp_path, mnist_root, "launcher=submitit_local", "beta=1e-3,5e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["beta"], r["status"]) for r in sorted(rows, key=lambda r: r["job"])] == [
        ("1e-3", "ok"),
        ("5e-3", "ok"),
    ]
    assert all(int(r["fit/threads"]) == 1 for r in rows)  # the preset's threads=1
    assert list((sweep / ".submitit").iterdir())  # submitit's job logs
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["ckpt_path"].startswith(str(sweep / "0"))


def test_optuna_study_minimises_the_optimized_metric(mnist_root, tmp_path):
    proc, sweep, rows = multirun(
        tmp_path,
        mnist_root,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        multirun_flag=False,  # the preset sets hydra.mode=MULTIRUN
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 3e-2 for lr in lrs)  # sampled, in the space
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(float(r["val/loss"]) for r in rows)
    assert result["best_value"] == pytest.approx(best, rel=1e-6)  # what train.py returned


def test_ddp_preset_trains_one_run_in_two_processes(mnist_root, tmp_path):
    """accelerator=ddp on two CPU processes: one run folder, and whole-split test metrics (synced
    across the processes) that a single-process evaluate.py of its checkpoint reproduces."""
    run = tmp_path / "run"
    command = train_command(mnist_root, *ONE_EPOCH, f"hydra.run.dir={run}", "accelerator=ddp")
    command += ["trainer.accelerator=cpu", "trainer.devices=2"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "train_ddp_process_1.log").is_file()  # Lightning re-ran the command for rank 1 ...
    assert not [p for p in tmp_path.iterdir() if p != run]  # ... into this run's folder
    metrics = json.loads((run / "metrics.json").read_text())
    where = [f"data.root={mnist_root}", f"output_dir={tmp_path / 'e'}"]
    cfg = compose_config("evaluate", [f"ckpt_path={metrics['ckpt_path']}", *where])
    cfg.data.eval_batch_size, cfg.trainer.accelerator = 64, "cpu"
    single = evaluate(cfg)
    for key in ("test/mse", "test/fvu", "test/rho_hat_mean", "test/l0"):
        assert metrics[key] == pytest.approx(single[key], rel=1e-5), key
