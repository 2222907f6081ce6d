"""The Lightning and torch internals in sae/internals.py still mean what the project assumes.

Each test fails, naming the attribute, when a release moves or changes one: then update that
module (and the pins in pyproject.toml) rather than the callers.
"""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from torch.utils.tensorboard.summary import hparams

from sae.internals import (
    RANK_VARIABLES,
    LightningInternalsMoved,
    batches_trained_this_epoch,
    count_optimizer_steps,
    end_process,
    failed_job_error,
    guard_checkpoint_restore,
    is_rank_zero,
    submitit_cluster,
    tensorboard_file_writer,
)


class PlainSteps(L.LightningModule):
    """Manual optimization with plain optimizer steps counted by hand, as the vectorized launcher's
    replay (sae.sweep.stacked.ReplayModule) advances Lightning's step count."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers().optimizer  # the torch optimizer, not Lightning's wrapper
        optimizer.zero_grad()
        self.layer(batch).square().mean().backward()
        optimizer.step()
        count_optimizer_steps(self.trainer, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TrainedSoFar(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batches_trained_this_epoch(trainer)))


def fit(module: L.LightningModule, callbacks=(), **kw) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )
    trainer.fit(module, train_dataloaders=DataLoader(torch.randn(10, 4), batch_size=2))
    return trainer


def test_plain_steps_counted_as_lightning_optimizer_steps():
    """count_optimizer_steps: global_step (what checkpoints, logging and max_steps read) follows."""
    module = PlainSteps()
    trainer = fit(module)
    assert trainer.global_step == 10
    assert fit(PlainSteps(), max_steps=3).global_step == 3  # and Lightning stops on it


def test_batches_trained_this_epoch_counts_completed_calls_from_zero_each_epoch():
    record = TrainedSoFar()
    fit(PlainSteps(), [record])
    assert record.seen == [(e, i, i) for e in (0, 1) for i in range(5)]


def test_tensorboard_file_writer_takes_summary_protos(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    experiment, start, end = hparams({"rho": 0.05}, {"test/mse": 0.0})
    writer = tensorboard_file_writer(logger.experiment)
    for summary in (experiment, start, end):
        writer.add_summary(summary)
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert events.Tags()["scalars"] == []  # no placeholder metric values


class Refused(Exception):
    pass


class Tested(PlainSteps):
    def test_step(self, batch, batch_idx) -> None:
        pass


def test_an_error_restoring_a_checkpoint_is_the_files(tmp_path):
    """guard_checkpoint_restore: what Lightning raises while restoring a checkpoint's state (here a
    loop state of the wrong type) becomes refuse(path, error), at fit and at test."""
    trainer = fit(PlainSteps(), default_root_dir=tmp_path)
    path = tmp_path / "state.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"] = [1]
    torch.save(ckpt, path)
    for stage in ("fit", "test"):
        again = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        guard_checkpoint_restore(again, lambda where, err: Refused(f"{where}: {type(err).__name__}"))
        loader = DataLoader(torch.randn(10, 4), batch_size=2)
        run = again.fit if stage == "fit" else again.test
        if stage == "test":
            ckpt["state_dict"] = {"layer.weight": torch.zeros(3)}  # the test reads the weights only
            torch.save(ckpt, path)
        with pytest.raises(Refused, match=f"{path}: "):
            run(Tested(), loader, ckpt_path=path)


@pytest.mark.parametrize(
    "call, attribute",
    [
        (lambda: count_optimizer_steps(SimpleNamespace(), 1), "manual_optimization.optim_step_progress"),
        (
            lambda: batches_trained_this_epoch(SimpleNamespace()),
            "epoch_loop.batch_progress.current.completed",
        ),
        (lambda: tensorboard_file_writer(object()), "SummaryWriter._get_file_writer"),
        (lambda: guard_checkpoint_restore(SimpleNamespace(), None), "trainer._checkpoint_connector"),
        (lambda: failed_job_error(object()), "JobReturn._return_value"),
        (lambda: submitit_cluster(object()), "BaseSubmititLauncher._EXECUTOR"),
    ],
)
def test_a_moved_attribute_fails_loudly_naming_it(call, attribute):
    with pytest.raises(LightningInternalsMoved, match=attribute.replace(".", r"\.")):
        call()


def test_a_failed_hydra_job_is_read_without_raising_and_submitit_launchers_name_their_cluster():
    from hydra.core.utils import JobReturn, JobStatus

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra (CI installs it)")
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

    error = ValueError("a bug")
    failed = JobReturn(status=JobStatus.FAILED)
    failed.return_value = error
    assert failed_job_error(failed) is error
    with pytest.raises(ValueError):
        failed.return_value  # noqa: B018 -- the public getter raises; the internals read does not
    assert submitit_cluster(LocalLauncher()) == "local"
    assert submitit_cluster(SlurmLauncher()) == "slurm"


@pytest.mark.parametrize(
    "environment, rank",
    [
        ({}, 0),
        ({"LOCAL_RANK": "1"}, 1),
        ({"SLURM_PROCID": "0"}, 0),
        ({"SLURM_PROCID": "3", "LOCAL_RANK": "0"}, 0),  # LOCAL_RANK first: SLURM may not manage the ranks
        ({"RANK": "2", "LOCAL_RANK": "0"}, 2),
    ],
)
def test_the_rank_before_lightning_loads_is_the_one_lightning_reads(monkeypatch, environment, rank):
    """A run folder is locked (rank 0 only) before Lightning is imported: is_rank_zero reads the
    environment as Lightning's _get_rank does, and Lightning's own rank once it is loaded."""
    import sys

    from lightning.fabric.utilities import rank_zero

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert (rank_zero._get_rank() or 0) == rank
    monkeypatch.delitem(sys.modules, "lightning.fabric.utilities.rank_zero")
    assert is_rank_zero() == (rank == 0)
    monkeypatch.setitem(sys.modules, "lightning.fabric.utilities.rank_zero", rank_zero)
    monkeypatch.setattr(rank_zero.rank_zero_only, "rank", 1)
    assert not is_rank_zero()


ENDING_SCRIPT = """
import atexit, sys, threading, time
import torch  # loaded: end_process skips the interpreter's teardown
from sae.internals import end_process

out, code = sys.argv[1], sys.argv[2]

class TornDown:
    def __del__(self):  # runs in the interpreter's teardown of this module, not before
        open(out + ".teardown", "w").write("ran")

kept = TornDown()
threading.Thread(target=lambda: (time.sleep(0.3), open(out + ".thread", "w").write("done"))).start()
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
sys.stdout.write("not yet flushed")
end_process(None if code == "none" else int(code) if code.isdigit() else code)
"""


@pytest.mark.parametrize(
    ("code", "status", "stderr"), [("none", 0, ""), ("3", 3, ""), ("a message", 1, "a message\n")]
)
def test_a_process_ends_as_sys_exit_ends_it_without_the_teardown(tmp_path, code, status, stderr):
    """end_process waits for the threads, runs the exit handlers and flushes the streams, as any
    exit does, exits with sys.exit's status and message, and skips the teardown of modules."""
    import subprocess
    import sys

    script = tmp_path / "ending.py"
    script.write_text(ENDING_SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), str(out), code], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (status, "not yet flushed", stderr)
    assert (tmp_path / "out.thread").read_text() == "done"
    assert (tmp_path / "out.atexit").read_text() == "ran"
    assert not (tmp_path / "out.teardown").exists()


def test_a_python_without_the_exit_functions_fails_loudly(monkeypatch):
    import threading

    monkeypatch.delattr(threading, "_shutdown")
    with pytest.raises(LightningInternalsMoved, match=r"threading\._shutdown"):
        end_process(0)
