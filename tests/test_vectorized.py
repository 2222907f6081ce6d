"""hydra/launcher=vectorized: stacked jobs end as separate train.py runs of the same config would."""

import csv
import json
import os
import signal
import subprocess

import lightning as L
import pytest
import torch

from sae.training.evaluate import evaluate
from sae.training.fit import train
from tests.conftest import (
    LEAN,
    ROOT,
    compose_config,
    compose_train,
    hparams_end_status,
    tensorboard_run,
    train_command,
)

pytestmark = pytest.mark.slow  # every test here starts train.py

# Whole epochs: a stacked group refuses limited batches.
TWO_EPOCHS = "epochs=2"


def vectorized_sweep(tmp_path, mnist_root, *overrides):
    sweep = tmp_path / "sweep"
    command = train_command(mnist_root, TWO_EPOCHS, f"hydra.sweep.dir={sweep}", "hydra/launcher=vectorized")
    command += [*overrides, "-m"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = {}
    if (sweep / "summary.csv").is_file():  # not after SIGTERM, which ends the sweep at once
        with open(sweep / "summary.csv") as f:
            rows = {r["job"]: r for r in csv.DictReader(f)}
    return proc, sweep, rows


def weights(run):
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_vectorized_jobs_match_separate_runs(mnist_root, tmp_path):
    proc, sweep, rows = vectorized_sweep(tmp_path, mnist_root, "beta=1e-3,5e-2", "seed=0,1", "lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training jobs 0, 1, 2, 3 as one stacked model" in proc.stdout + proc.stderr
    assert [rows[j]["status"] for j in "0123"] == ["ok"] * 4
    assert all(rows[j]["fit/stacked_jobs"] == "4" for j in "0123")

    # The last job (other beta, other seed than the first): the stack gave it its own knobs.
    job, beta, seed = "3", "5e-2", 1
    alone = tmp_path / f"alone{job}"
    overrides = [TWO_EPOCHS, f"beta={beta}", f"seed={seed}", "lr=3e-3"]
    expected = train(compose_train(overrides, alone, mnist_root))
    got = json.loads((sweep / job / "metrics.json").read_text())
    for key in ("val/loss", "test/mse", "test/fvu", "test/rho_hat_mean", "test/l0", "test/kl"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7), (job, key)
    assert got["fit/epochs"] == expected["fit/epochs"] == 2
    a, b = weights(alone), weights(sweep / job)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)
    # The same folder as a separate run: checkpoints, figures, events, and evaluate.py reads it.
    for folder in ("checkpoints", "plots"):
        names = [{p.name for p in (run / folder).iterdir()} for run in (sweep / job, alone)]
        assert names[0] == names[1], folder
    named = dict(kv.split("=") for kv in tensorboard_run(sweep / job).name.split(","))  # knobs set
    assert (float(named["beta"]), int(named["seed"]), float(named["lr"])) == (float(beta), seed, 3e-3)
    assert "accelerator" not in named
    cfg = compose_config("evaluate", [f"ckpt_path={got['ckpt_path']}", f"output_dir={tmp_path / 'e'}"])
    cfg.data.root, cfg.data.eval_batch_size, cfg.trainer.accelerator = str(mnist_root), 64, "cpu"
    assert evaluate(cfg)["test/mse"] == pytest.approx(got["test/mse"], rel=1e-6)

    # Its last.ckpt resumes like a separate run's: one more epoch ends where 3 epochs in one go do.
    more = ["epochs=3", "beta=5e-2", "seed=1", "lr=3e-3"]
    train(compose_train([*more, f"resume={sweep / '3'}"], tmp_path / "more", mnist_root))
    train(compose_train(more, tmp_path / "three", mnist_root))
    a, b = weights(tmp_path / "three"), weights(sweep / "3")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_a_group_that_cannot_train_falls_back_to_one_job_at_a_time(tmp_path):
    no_data = tmp_path / "no-data"
    proc, sweep, rows = vectorized_sweep(tmp_path, no_data, "beta=1e-3,5e-3", "data.download=false")
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "failed (MNIST not found under data root" in said and "one job at a time" in said
    assert [r["status"] for r in rows.values()] == ["failed", "failed"]
    assert all(r["error"].startswith("MNIST not found under data root") for r in rows.values())


def test_failing_and_diverging_jobs_do_not_spoil_the_others(mnist_root, tmp_path):
    # An unbounded output and lr=1e30: the loss is inf at step 1, NaN after (in a separate run too).
    sweep_values = ["model.output_activation=identity", "lr=1e-3,1e30", "rho=0.05,1.5"]
    proc, sweep, rows = vectorized_sweep(tmp_path, mnist_root, *sweep_values)
    assert proc.returncode != 0  # the command says that jobs failed
    by_setting = {(r["lr"], r["rho"]): r for r in rows.values()}
    assert by_setting[("1e-3", "0.05")]["status"] == "ok"  # knobs as typed
    diverged = by_setting[("1e30", "0.05")]
    assert diverged["status"] == "failed"
    assert diverged["error"].startswith("the training loss became NaN or inf at step 1 (epoch 0)")
    assert not (sweep / diverged["job"] / "checkpoints" / "last.ckpt").exists()  # no NaN weights kept
    for lr in ("1e-3", "1e30"):
        assert by_setting[(lr, "1.5")]["error"] == "rho=1.5 must be a number in (0, 1)"
    assert float(by_setting[("1e-3", "0.05")]["test/mse"]) > 0


class TermAtStep(L.Callback):
    """Sends this process SIGTERM once training reaches a given optimizer step, as preemption would."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.sent = at_step, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at_step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_job_stopped_by_sigterm_in_its_replay_resumes_to_the_uninterrupted_run(mnist_root, tmp_path):
    # Three epochs of 10 steps; SIGTERM once job 0's replay has taken the second epoch's steps.
    term = ["+callbacks.term._target_=tests.test_vectorized.TermAtStep", "+callbacks.term.at_step=15"]
    proc, sweep, _ = vectorized_sweep(tmp_path, mnist_root, "epochs=3", "beta=1e-3,5e-2", *term)
    assert proc.returncode == 143, proc.stderr[-3000:]  # as the basic launcher ends after SIGTERM
    said = [line for line in proc.stderr.splitlines() if line.startswith("interrupted at step")]
    assert said and "cannot resume mid-epoch" in said[0], proc.stderr[-3000:]
    stopped = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] % 10 == 0  # an epoch's end, not the middle of one
    assert hparams_end_status(sweep / "0") == "STATUS_UNKNOWN"  # stopped to be resumed: not a success

    settings = [*LEAN, "epochs=3", "beta=1e-3"]
    train(compose_train([*settings, f"resume={sweep / '0'}"], tmp_path / "again", mnist_root))
    train(compose_train(settings, tmp_path / "alone", mnist_root))
    a, b = weights(tmp_path / "alone"), weights(sweep / "0")
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)
