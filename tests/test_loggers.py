"""TensorBoard as a researcher opens it: runs named by the knobs set, no non-curves among the cards."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae.training.loggers import (
    MAX_RUN_NAME,
    TensorBoardLogger,
    results_table,
    tensorboard_run_name,
    tensorboard_tag,
)
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


def test_test_metrics_are_written_after_the_curves_and_as_a_table(tmp_path):
    """Test metrics go under zz_test/ (a tag group TensorBoard sorts after train/, val/ and
    visuals/, and so keeps closed), constants only in the table, which names them as metrics.json does."""
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    logger.log_metrics({"test/mse": 0.0123456789, "test/l0": 7.0, "test/l0_threshold": 0.1}, step=9)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["zz_test/l0", "zz_test/mse"]
    assert [(e.step, e.value) for e in events.Scalars("zz_test/mse")] == [(9, pytest.approx(0.0123456789))]
    (text,) = events.Tensors("test/summary/text_summary")
    assert text.step == 9
    assert text.tensor_proto.string_val[0].decode().splitlines() == [
        "| metric | value | what it is |",
        "|---|---|---|",
        "| test/mse | 0.012346 | test MSE |",
        "| test/l0 | 7 | L0 |",
        "| test/l0_threshold | 0.1 |  |",
    ]


def test_tags_of_other_splits_are_their_names():
    assert tensorboard_tag("test/encoder_1/dead_fraction") == "zz_test/encoder_1/dead_fraction"
    assert [tensorboard_tag(n) for n in ("train/loss", "val/mse", "fit/seconds", "testing/x")] == [
        "train/loss",
        "val/mse",
        "fit/seconds",
        "testing/x",
    ]
    assert results_table({}).count("\n") == 1  # the header alone
