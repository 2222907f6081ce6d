"""A sparsity method is one unit: a toy method registered here trains, checkpoints, evaluates and
summarises with no other change."""

from __future__ import annotations

import csv

import pytest
import yaml

from sae.checkpoints import load_checkpoint
from sae.evaluation import evaluate
from sae.sparsity import METHODS, SparsityMethod, register
from sae.sweep import write_summary
from sae.training import train
from tests.conftest import compose_config, compose_train, read_metrics


@pytest.fixture
def code_sum_method():
    """beta * the sum of the covered layers' activations, averaged over samples (a penalty that
    whole-split unit means give exactly)."""

    @register
    class CodeSum(SparsityMethod):
        name = "code_sum"
        batch_term_names = ("code_sum",)
        split_term_names = ("code_sum",)

        def batch_terms(self, activations):
            return {"code_sum": sum(activations[n].sum(dim=1).mean() for n in self.layers)}

        def split_terms(self, unit_means):
            return {"code_sum": sum(unit_means[n].sum() for n in self.layers)}

        def penalty(self, terms):
            return self.knobs["beta"] * terms["code_sum"]

    yield CodeSum
    del METHODS["code_sum"]


def test_a_method_registered_in_a_test_runs_through_everything(code_sum_method, mnist_root, tmp_path):
    job = tmp_path / "sweep" / "0"
    overrides = [
        "debug=limit",
        "data.eval_batch_size=200",
        "model.sparsity=code_sum",
        "beta=0.01",
        "logger=csv",
    ]
    metrics = train(compose_train(overrides, job, mnist_root))

    # Its whole-split term, in the objective: test/loss = test/mse + beta * test/code_sum, and the
    # sum of 32 unit means is 32 times their mean.
    assert metrics["test/code_sum"] == pytest.approx(32 * metrics["test/rho_hat_mean"], rel=1e-5)
    assert metrics["test/loss"] == pytest.approx(
        metrics["test/mse"] + 0.01 * metrics["test/code_sum"], rel=1e-5
    )
    assert "test/kl" not in metrics
    with open(job / "csv" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/code_sum")]
    assert logged and all(float(r["train/loss"]) > float(r["train/mse"]) for r in logged)

    # The checkpoint rebuilds the method, and evaluate.py reproduces the test.
    module, _ = load_checkpoint(metrics["ckpt_path"])
    assert module.hparams.sparsity == "code_sum" and type(module.method).__name__ == "CodeSum"
    again = evaluate(
        compose_config(
            "evaluate",
            [
                f"ckpt_path={metrics['ckpt_path']}",
                f"data.root={mnist_root}",
                f"output_dir={tmp_path / 'eval'}",
                "accelerator=cpu",
                "+trainer.enable_progress_bar=false",
                "~callbacks.linear_probe",
                "~callbacks.run_figures",
            ],
        )
    )
    assert again["test/code_sum"] == pytest.approx(metrics["test/code_sum"], rel=1e-6)

    # The sweep summary reads its metrics like any other.
    (job / ".hydra").mkdir()
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/loss", "rho": 0.05}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.sparsity=code_sum"]))
    (job / "status.json").write_text('{"status": "ok"}')
    write_summary(tmp_path / "sweep")
    with open(tmp_path / "sweep" / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["model.sparsity"] == "code_sum"
    assert float(row["test/code_sum"]) == pytest.approx(read_metrics(job)["test/code_sum"])


def test_an_unknown_method_is_one_config_line(mnist_root, tmp_path):
    from sae.config import ConfigError

    with pytest.raises(ConfigError, match="model.sparsity='l0' must be one of kl"):
        train(compose_train(["model.sparsity=l0"], tmp_path, mnist_root))
