"""Interrupted training continues exactly; a diverged run stops in one line and keeps a good checkpoint."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from sae.checkpoints import CheckpointError
from sae.module import TrainingDiverged
from sae.training import train
from tests.conftest import ROOT, compose_train, train_command


def last_weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_resume_ends_where_an_uninterrupted_run_ends(mnist_root, tmp_path):
    def run(name: str, *overrides: str) -> dict:
        return train(compose_train(["debug=limit", *overrides], tmp_path / name, mnist_root))

    full = run("full", "epochs=4")
    run("part", "epochs=2")  # as if stopped after its second epoch
    resumed = run("elsewhere", "epochs=4", f"resume={tmp_path / 'part'}")

    # The run goes on in its own folder, which records where it resumed from.
    part = tmp_path / "part"
    assert resumed == json.loads((part / "metrics.json").read_text())
    assert not (tmp_path / "elsewhere" / "metrics.json").exists()
    assert resumed["resumed_from"] == str((part / "checkpoints" / "last.ckpt").resolve())
    assert full["resumed_from"] is None and resumed["fit/epochs"] == full["fit/epochs"] == 4
    assert Path(resumed["ckpt_path"]).name == Path(full["ckpt_path"]).name  # the same best epoch
    a, b = last_weights(tmp_path / "full"), last_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for key in [k for k in full if k.startswith("test/")]:
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


def test_resume_refuses_a_missing_run_or_another_architecture(mnist_root, tmp_path):
    with pytest.raises(CheckpointError, match="resume=.*nowhere: no .*last.ckpt"):
        train(compose_train([f"resume={tmp_path / 'nowhere'}"], tmp_path / "a", mnist_root))
    train(compose_train(["debug=limit", "epochs=1"], tmp_path / "part", mnist_root))
    cfg = compose_train([f"resume={tmp_path / 'part'}", "latent_dim=64"], tmp_path / "b", mnist_root)
    with pytest.raises(CheckpointError, match="latent_dim=32, the config asks for latent_dim=64"):
        train(cfg)


class PoisonWeights(L.Callback):
    """Makes the model's weights NaN before a given step, as a too-large learning rate would.

    Poisoned just before the previous step's update (step at_step - 1, counted from 0), which can
    fall inside a training call of several batches: the loss of step at_step is the first NaN.
    """

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.at_step - 1:
            with torch.no_grad():
                pl_module.net.encoder[0][0].weight.fill_(float("nan"))


def test_diverged_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path):
    # debug=limit: 10 steps an epoch, all in one call. Poisoned at step 13 (epoch 1, inside the
    # call); the loggers write every 50 calls, so it is the check before epoch 1's
    # validation and checkpoint that stops it.
    cfg = compose_train(
        [
            "debug=limit",
            "trainer.log_every_n_steps=50",
            "+callbacks.poison._target_=tests.test_resume.PoisonWeights",
            "+callbacks.poison.at_step=13",
        ],
        tmp_path,
        mnist_root,
    )
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    message = str(err.value)
    assert "became NaN or inf at step 13 (epoch 1)" in message and "\n" not in message
    assert "last logged: none yet" in message
    weights = last_weights(tmp_path)  # written after epoch 0, never overwritten by the NaN weights
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "metrics.json").exists()


def test_diverged_run_reports_the_last_finite_window(mnist_root, tmp_path):
    poison = ["+callbacks.poison._target_=tests.test_resume.PoisonWeights", "+callbacks.poison.at_step=4"]
    cfg = compose_train(["debug=limit", *poison], tmp_path, mnist_root)
    # Written every 3 steps (in calls of 3 batches): the last finite window is steps 0-2.
    cfg.data.batches_per_call = 3
    cfg.trainer.log_every_n_steps = 3
    with pytest.raises(
        TrainingDiverged, match=r"at step 4 \(epoch 0\); last logged: loss=\d.* \(mean of 3 steps\)"
    ):
        train(cfg)


class SlowSteps(L.Callback):
    """Slows training down so that a signal can be sent mid-epoch."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.05)


# Epochs of 4 training calls (3+3+3+1 batches): a stop lands between calls, mid-epoch.
INTERRUPTIBLE = ["debug=limit", "epochs=6", "data.batches_per_call=3"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(mnist_root, tmp_path, sig):
    run = tmp_path / "run"
    slow = "+callbacks.slow._target_=tests.test_resume.SlowSteps"
    command = train_command(mnist_root, *INTERRUPTIBLE, f"hydra.run.dir={run}", slow)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.08)  # into the second epoch (4 calls of >= 50 ms)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)

    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # stopped cleanly, between batches, with a checkpoint of where it stopped
        assert proc.returncode == (1 if sig == signal.SIGINT else 128 + signal.SIGTERM), stderr[-2000:]
        said = [line for line in stderr.splitlines() if line.startswith("interrupted at step")]
        assert said and f"resume={run}" in said[0], stderr[-2000:]
        step = torch.load(last, weights_only=True)["global_step"]
        assert said[0].startswith(f"interrupted at step {step} ")
    assert not (run / "metrics.json").exists()

    resumed = train(compose_train([*INTERRUPTIBLE, f"resume={run}"], tmp_path / "again", mnist_root))
    full = train(compose_train(INTERRUPTIBLE, tmp_path / "full", mnist_root))
    a, b = last_weights(tmp_path / "full"), last_weights(run)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert resumed["test/mse"] == pytest.approx(full["test/mse"], abs=1e-6)


def run_sweep(tmp_path, mnist_root, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    sweep = tmp_path / "sweep"
    command = train_command(
        mnist_root, *INTERRUPTIBLE, f"hydra.sweep.dir={sweep}", "epochs=2", *overrides, "-m"
    )
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    with open(sweep / "summary.csv") as f:
        return proc, list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_survives_an_invalid_value(mnist_root, tmp_path):
    proc, rows = run_sweep(tmp_path, mnist_root, "rho=1.5,0.05")
    assert proc.returncode != 0  # the command says that a job failed
    assert [(r["rho"], r["status"]) for r in rows] == [("1.5", "failed"), ("0.05", "ok")]
    assert rows[0]["error"] == "rho=1.5 must be a number in (0, 1)"
    assert float(rows[1]["test/mse"]) > 0


@pytest.mark.slow
def test_sweep_survives_a_job_that_diverges(mnist_root, tmp_path):
    poison = "+callbacks.poison._target_=tests.test_resume.PoisonWeights"
    proc, rows = run_sweep(tmp_path, mnist_root, poison, "+callbacks.poison.at_step=4,1000")
    assert proc.returncode != 0
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"].startswith("the training loss became NaN or inf at step 4")
