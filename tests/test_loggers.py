"""TensorBoard as a researcher opens it: runs named by the knobs set, no non-curves among the cards."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae.training.loggers import MAX_RUN_NAME, TensorBoardLogger, tensorboard_run_name
from tests.conftest import compose_config


def run_name(overrides: list[str], tmp_path: Path) -> str:
    cfg = compose_config("train", overrides, return_hydra_config=True)
    return tensorboard_run_name(cfg, tmp_path)


def test_runs_are_named_by_the_knobs_the_command_set(tmp_path):
    where_and_how = [
        "accelerator=cpu",
        "data.root=/data/mnist",
        "debug=limit",
        "threads=1",
        "data.eval_batch_size=64",
    ]
    assert run_name(["beta=1e-3", *where_and_how, "+point=l1_beta1e-4", "seed=1"], tmp_path) == (
        "beta=1e-3,point=l1_beta1e-4,seed=1"
    )
    assert run_name(where_and_how, tmp_path) == ""  # nothing set that changes what is trained
    assert run_name(["~callbacks.run_figures", "+trainer.enable_progress_bar=false"], tmp_path) == ""
    long = run_name([f"model.hidden_dims=[{','.join(['64'] * 100)}]"], tmp_path)
    assert len(long) == MAX_RUN_NAME and long.endswith("…")


def test_a_resumed_run_keeps_writing_where_its_events_are(tmp_path):
    (tmp_path / "tensorboard" / "beta=1e-3").mkdir(parents=True)
    (tmp_path / "tensorboard" / "beta=1e-3" / "events.out.tfevents.1.host.1.0").touch()
    assert run_name([f"resume={tmp_path}", "epochs=20"], tmp_path) == "beta=1e-3"
    top = tmp_path / "top"
    (top / "tensorboard").mkdir(parents=True)
    (top / "tensorboard" / "events.out.tfevents.1.host.1.0").touch()
    assert run_name([f"resume={top}", "epochs=20"], top) == ""
    assert run_name([f"resume={tmp_path / 'none'}", "beta=1e-3"], tmp_path / "none") == "beta=1e-3"


def test_tensorboard_gets_curves_not_the_epoch_counter_or_constants(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    logger.log_metrics(
        {"train/loss": 0.5, "epoch": 1, "test/l0_threshold": 0.1, "test/dense_density": 0.2}, step=3
    )
    logger.log_metrics({"epoch": 2}, step=4)  # nothing left to write
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.5)]
