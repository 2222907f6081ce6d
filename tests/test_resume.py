"""Interrupted training continues exactly; a diverged run stops in one line and keeps a good checkpoint."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from sae.config import ConfigError
from sae.training.checkpoints import CheckpointError, SafeCheckpointIO
from sae.training.fit import train
from sae.training.module import TrainingDiverged
from tests.conftest import (
    LEAN,
    QUICK_RUN,
    ROOT,
    compose_config,
    compose_train,
    hparams_end_status,
    train_command,
)


def last_weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# TopK with AuxK keeps state besides the weights: how long since each latent fired.
AUXK = ("sparsity=topk", "k=2", "model.sparsity.auxk=true", "model.sparsity.auxk_dead_after=64")


@pytest.mark.parametrize("method", [(), AUXK], ids=["kl", "topk_auxk"])
def test_resume_ends_where_an_uninterrupted_run_ends(mnist_root, tmp_path, method):
    def run(name: str, *overrides: str) -> dict:
        return train(compose_train([*LEAN, "debug=limit", *method, *overrides], tmp_path / name, mnist_root))

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
    train(compose_train([*LEAN, "debug=limit", "epochs=1"], tmp_path / "part", mnist_root))
    cfg = compose_train([f"resume={tmp_path / 'part'}", "latent_dim=64"], tmp_path / "b", mnist_root)
    with pytest.raises(ConfigError, match="latent_dim=64 differs from the run's latent_dim=32"):
        train(cfg)
    cfg = compose_train(
        ["ckpt_path=" + str(tmp_path / "part/checkpoints/last.ckpt"), "latent_dim=64"],
        tmp_path / "c",
        mnist_root,
    )
    with pytest.raises(CheckpointError, match="latent_dim=32, the config asks for latent_dim=64"):
        train(cfg)


def compose_command(overrides: list[str], output_dir: Path, data_root: Path):
    """The config of `python train.py <quick settings> <overrides>`, with Hydra's record of which
    keys the command set (what resume= reads to tell a meant change from a default)."""
    where = [f"data.root={data_root}", f"output_dir={output_dir}"]
    return compose_config("train", [*QUICK_RUN, *where, *overrides], return_hydra_config=True)


def test_resume_trains_on_with_the_runs_own_settings(mnist_root, tmp_path):
    run = tmp_path / "run"
    train(compose_train([*LEAN, "debug=limit", "epochs=1", "rho=0.1", "lr=0.01", "seed=3"], run, mnist_root))
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epochs"] == 1  # the epochs the run was set to train
    ckpt["epochs"] = 3  # as if it had been set to train 3 and was stopped after the first
    torch.save(ckpt, last)

    # resume=DIR alone (debug=limit's preset says epochs=2): the run's epochs, rho, lr and seed.
    resumed = train(compose_command([*LEAN, "debug=limit", f"resume={run}"], tmp_path / "r", mnist_root))
    assert resumed["fit/epochs"] == 3 and "resumed_with" not in resumed
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["hyper_parameters"]["sparsity"]["rho"], ckpt["hyper_parameters"]["lr"]) == (0.1, 0.01)
    assert ckpt["datamodule_hyper_parameters"]["seed"] == 3
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01  # what the optimizer used

    # More epochs: applied, and recorded.
    more = train(
        compose_command([*LEAN, "debug=limit", "epochs=4", f"resume={run}"], tmp_path / "m", mnist_root)
    )
    assert more["fit/epochs"] == 4 and more["resumed_with"] == "epochs=4"

    # An override that would change what is trained is refused, naming the key.
    refused = {
        "lr=1e-5": "lr=1e-05 differs from the run's lr=0.01",
        "model.hidden_dims=[64]": "hidden_dims=[64]",
    }
    for override, message in refused.items():
        cfg = compose_command([*LEAN, "debug=limit", f"resume={run}", override], tmp_path / "x", mnist_root)
        with pytest.raises(ConfigError, match=re.escape(message)):
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
    assert (
        "last logged: none yet" in message
        and "checkpoints/last.ckpt holds the last completed epoch" in message
    )
    weights = last_weights(tmp_path)  # written after epoch 0, never overwritten by the NaN weights
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not (tmp_path / "metrics.json").exists()
    assert hparams_end_status(tmp_path) == "STATUS_FAILURE"  # TensorBoard's HParams tab says so


def test_diverged_run_reports_the_last_finite_window(mnist_root, tmp_path):
    poison = ["+callbacks.poison._target_=tests.test_resume.PoisonWeights", "+callbacks.poison.at_step=4"]
    cfg = compose_train([*LEAN, "debug=limit", *poison], tmp_path, mnist_root)
    # Written every 3 steps (in calls of 3 batches): the last finite window is steps 0-2.
    cfg.data.batches_per_call = 3
    cfg.trainer.log_every_n_steps = 3
    with pytest.raises(
        TrainingDiverged, match=r"at step 4 \(epoch 0\); last logged: loss=\d.* \(mean of 3 steps\)"
    ) as err:
        train(cfg)
    # In the first epoch there is no checkpoint to point at, and the message says so.
    assert str(err.value).endswith("no checkpoint was written (no epoch completed)")
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


class SignalAt(L.Callback):
    """Sends `name` (SIGINT, SIGTERM, SIGKILL) to this process after training call `call` of epoch
    `epoch`: a stop that lands mid-epoch at a known step, however fast the machine is."""

    def __init__(self, name: str, epoch: int = 1, call: int = 1) -> None:
        self.signal, self.epoch, self.call = getattr(signal, name), epoch, call

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.call:
            os.kill(os.getpid(), self.signal)


# Epochs of 3 training calls of 3 batches (debug=limit), 9 steps: a stop lands between calls.
INTERRUPTIBLE = [*LEAN, "debug=limit", "epochs=6", "data.batches_per_call=3"]
STEPS_PER_EPOCH = 9


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_run_stopped_by_a_signal_resumes_to_the_uninterrupted_result(mnist_root, tmp_path, sig):
    run = tmp_path / "run"
    stop = ["+callbacks.stop._target_=tests.test_resume.SignalAt", f"+callbacks.stop.name={sig.name}"]
    command = train_command(mnist_root, *INTERRUPTIBLE, f"hydra.run.dir={run}", *stop)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    if sig == signal.SIGKILL:  # nothing saved on the way out: the last epoch's checkpoint stays
        assert proc.returncode == -signal.SIGKILL
        assert step == STEPS_PER_EPOCH
    else:  # stopped cleanly, between calls, with a checkpoint of where it stopped: mid-epoch 2
        assert proc.returncode == (1 if sig == signal.SIGINT else 128 + signal.SIGTERM), proc.stderr[-2000:]
        said = [line for line in proc.stderr.splitlines() if line.startswith("interrupted at step")]
        assert said and f"resume={run}" in said[0], proc.stderr[-2000:]
        assert step == STEPS_PER_EPOCH + 6  # after the second call (3 + 3 batches) of the second epoch
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
    assert proc.returncode == 1  # the command says that a job failed
    assert [(r["rho"], r["status"]) for r in rows] == [("1.5", "failed"), ("0.05", "ok")]
    assert rows[0]["error"] == "rho=1.5 must be a number in (0, 1)"
    assert float(rows[1]["test/mse"]) > 0
    # One line for the failed job as it happens, a count at the end; the traceback is in its log.
    said = proc.stderr.strip().splitlines()
    failures = [line for line in said if line.startswith("job ")]
    assert len(failures) == 1 and failures[0].startswith("job 0 (") and " rho=1.5) failed: " in failures[0]
    assert failures[0].endswith("failed: config error: " + rows[0]["error"])
    assert (
        said[-1] == f"1 of 2 jobs failed or did not finish (jobs 0): see {tmp_path / 'sweep' / 'summary.md'}"
    )
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (tmp_path / "sweep" / "0" / "train.log").read_text()


@pytest.mark.slow
def test_sweep_survives_a_job_that_diverges(mnist_root, tmp_path):
    poison = "+callbacks.poison._target_=tests.test_resume.PoisonWeights"
    proc, rows = run_sweep(tmp_path, mnist_root, poison, "+callbacks.poison.at_step=4,1000")
    assert proc.returncode != 0
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["error"].startswith("the training loss became NaN or inf at step 4")


class _RunsCodeOnLoad:
    """Unpickling this calls Path.touch(marker): what a crafted checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def checkpoint_state(run: Path) -> tuple[dict, str]:
    """last.ckpt of a run, and the key of its ModelCheckpoint state."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt, next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))


def test_resume_loads_only_the_run_folders_checkpoints_and_weights_only(mnist_root, tmp_path, monkeypatch):
    """A path recorded in last.ckpt that points elsewhere (here at a crafted pickle) is never loaded,
    even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set: the run tests a checkpoint of its own folder."""
    run = tmp_path / "run"
    train(compose_train([*LEAN, "debug=limit", "epochs=1"], run, mnist_root))
    marker, evil = tmp_path / "code-ran", tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": _RunsCodeOnLoad(marker), "state_dict": {}}, evil)
    ckpt, key = checkpoint_state(run)
    ckpt["callbacks"][key]["best_model_path"] = str(evil)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match="evil.ckpt as a PyTorch checkpoint: it holds Python objects"):
        SafeCheckpointIO().load_checkpoint(evil)  # what Lightning's loading goes through
    resumed = train(
        compose_train([*LEAN, "debug=limit", "epochs=1", f"resume={run}"], tmp_path / "again", mnist_root)
    )
    assert not marker.exists()
    assert Path(resumed["ckpt_path"]).parent == (run / "checkpoints").resolve()


def test_a_copied_or_moved_run_resumes_from_its_own_files(mnist_root, tmp_path):
    original = tmp_path / "original"
    first = train(compose_train([*LEAN, "debug=limit", "epochs=2"], original, mnist_root))
    before = {p: p.read_bytes() for p in original.rglob("*.ckpt")}

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    again = train(
        compose_train([*LEAN, "debug=limit", "epochs=2", f"resume={copy}"], tmp_path / "c", mnist_root)
    )
    assert Path(again["ckpt_path"]).parent == (copy / "checkpoints").resolve()  # the copy's best
    assert again["val/loss"] == first["val/loss"]  # the best score travels with the folder
    assert again["test/mse"] == pytest.approx(first["test/mse"], abs=1e-7)
    # fit/seconds is the run's training time as last.ckpt recorded it (before its own save), not
    # the few seconds of a resume that had nothing left to train.
    recorded = checkpoint_state(copy)[0]["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert again["fit/seconds"] == pytest.approx(recorded) and recorded > 0.25 * first["fit/seconds"]
    assert {p: p.read_bytes() for p in original.rglob("*.ckpt")} == before  # the original untouched

    moved = tmp_path / "moved"
    shutil.move(original, moved)
    more = train(
        compose_train([*LEAN, "debug=limit", "epochs=3", f"resume={moved}"], tmp_path / "m", mnist_root)
    )
    assert more["fit/epochs"] == 3 and Path(more["ckpt_path"]).parent == (moved / "checkpoints").resolve()
    assert more["fit/seconds"] > first["fit/seconds"]  # summed over the resumes


def test_resume_without_last_ckpt_says_how_to_continue_and_leftovers_are_removed(mnist_root, tmp_path):
    run = tmp_path / "run"
    train(compose_train([*LEAN, "debug=limit", "epochs=1"], run, mnist_root))
    checkpoints = run / "checkpoints"
    (checkpoints / "last.ckpt").unlink()  # as if killed while writing the first last.ckpt
    best = next(checkpoints.glob("best-*.ckpt"))
    cfg = compose_train([*LEAN, "debug=limit", "epochs=2", f"resume={run}"], tmp_path / "again", mnist_root)
    with pytest.raises(CheckpointError, match=f"no .*last.ckpt, but {best.name} is there .*: cp {best} "):
        train(cfg)
    shutil.copy(best, checkpoints / "last.ckpt")  # what the message says to do
    leftover = checkpoints / ".last.ckpt.x1y2.tmp"  # what a kill during a save leaves
    leftover.write_bytes(b"half a checkpoint")
    assert train(cfg)["fit/epochs"] == 2
    assert not leftover.exists()


def test_a_slurm_job_run_again_resumes_only_from_its_own_last_ckpt(tmp_path, monkeypatch):
    from sae.training.fit import requeued_by_slurm

    run = tmp_path / "0"
    (run / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not requeued_by_slurm(run)  # requeued before it saved anything: it starts afresh
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeued_by_slurm(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a first run (a folder reused by hand) does not
    assert not requeued_by_slurm(run)
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert not requeued_by_slurm(run)


def record_command(run: Path, overrides: list[str]) -> None:
    """What Hydra writes of the command that started a run (a run trained in-process has none)."""
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def started_run(tmp_path: Path, mnist_root: Path, *overrides: str) -> Path:
    """A one-epoch run trained in-process, with the record of `python train.py <overrides>`."""
    run = tmp_path / "run"
    command = [*LEAN, "debug=limit", "epochs=1", *overrides]
    train(compose_train(command, run, mnist_root))
    record_command(run, [*QUICK_RUN, f"data.root={mnist_root}", f"output_dir={run}", *command])
    return run


@pytest.mark.parametrize(
    "override, changes",
    [
        ("sparsity=l1", "model.latent_activation (sigmoid -> relu), model.sparsity.method (kl -> l1)"),
        ("experiment=all_layers", "model.activation (relu -> sigmoid)"),
        ("+point=l1_beta1e-4", "beta (0.005 -> 0.0001)"),
        ("trainer.precision=bf16-mixed", "trainer.precision (32-true -> bf16-mixed)"),
        ("data.val_size=50", "data.val_size (100 -> 50)"),
    ],
)
def test_resume_refuses_a_group_or_key_override_that_changes_what_the_run_trains(
    mnist_root, tmp_path, override, changes
):
    run = started_run(tmp_path, mnist_root)
    before = last_weights(run)
    cfg = compose_command([*LEAN, f"resume={run}", override], tmp_path / "cmd", mnist_root)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert f"resume={run}: {override} would change what the run trains: " in str(err.value)
    assert changes in str(err.value) and "\n" not in str(err.value)
    after = last_weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained


def test_resume_replays_the_command_that_started_the_run(mnist_root, tmp_path):
    """The run's own preset (debug=limit: 3 training calls an epoch) and settings no checkpoint
    holds (data.batches_per_call) come back from its record, not from the defaults."""
    run = started_run(tmp_path, mnist_root, "data.batches_per_call=1")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    cfg = compose_command([*LEAN, f"resume={run}", "epochs=2"], tmp_path / "cmd", mnist_root)
    assert "limit_train_batches" not in cfg.trainer  # the resume command alone: the defaults
    resumed = train(cfg)
    assert resumed["fit/epochs"] == 2 and resumed["resumed_with"] == "epochs=2"
    # 3 more steps under the run's debug=limit; the defaults would have trained 10 (500 images / 50).
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_run_continued_from_a_checkpoint_trains_at_the_lr_it_records(mnist_root, tmp_path):
    run = started_run(tmp_path, mnist_root)
    cfg = compose_train(
        [*LEAN, "debug=limit", "epochs=2", "lr=0.5", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
        tmp_path / "new",
        mnist_root,
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "new" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["lr"] == 0.5
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [0.5]  # Adam's, too


@pytest.mark.slow
def test_cli_resume_with_another_method_is_one_line(mnist_root, tmp_path):
    run = started_run(tmp_path, mnist_root)
    proc = subprocess.run(
        [*train_command(mnist_root, *LEAN, f"resume={run}", "sparsity=l1", f"hydra.run.dir={tmp_path}/cmd")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"config error: resume={run}: sparsity=l1 would change what the run trains")
