"""A sparsity method is one unit: a toy method registered here trains, checkpoints, evaluates and
summarises with no other change."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from sae.checkpoints import load_checkpoint
from sae.evaluation import evaluate
from sae.sparsity import METHODS, SparsityMethod, register
from sae.sweep import write_summary
from sae.training import train
from tests.conftest import checkpoint_weights, compose_train, evaluate_config, idx_test_split, read_metrics


@pytest.fixture
def code_sum_method():
    """beta * the sum of the covered layers' activations, averaged over samples (a penalty that
    whole-split unit means give exactly)."""

    @register
    class CodeSum(SparsityMethod):
        name = "code_sum"
        batch_term_names = ("code_sum",)

        def batch_terms(self, activations, decoder_weight):
            return {"code_sum": sum(activations[n].sum(dim=1).mean() for n in self.layers)}

        def split_terms(self, unit_means, decoder_weight):
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
        evaluate_config(
            metrics["ckpt_path"],
            mnist_root,
            tmp_path / "eval",
            "~callbacks.linear_probe",
            "~callbacks.run_figures",
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


def test_l1_trains_relu_codes_and_reports_its_penalty_over_the_test_set(mnist_root, tmp_path):
    """sparsity=l1: ReLU codes; test/l1 recomputed in float64 from the checkpoint's weights, and
    test/l0 counts exact non-zeros."""
    cfg = compose_train(
        ["debug=limit", "data.eval_batch_size=200", "sparsity=l1", "beta=0.01"], tmp_path, mnist_root
    )
    assert (cfg.model.sparsity, cfg.model.latent_activation) == ("l1", "relu")
    metrics = train(cfg)
    x, _ = idx_test_split(mnist_root)
    w = checkpoint_weights(metrics["ckpt_path"])
    h = torch.relu(x @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
    z = torch.relu(h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"])
    l1 = (z.abs() * w["decoder.0.0.weight"].norm(dim=0)).sum(dim=1).mean()
    assert metrics["test/l1"] == pytest.approx(l1.item(), rel=1e-4)
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"] + 0.01 * metrics["test/l1"], rel=1e-5)
    assert metrics["test/l0"] == pytest.approx((z > 0).sum(dim=1).double().mean().item(), rel=1e-6)
    assert "test/kl" not in metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sparsity=l1", "model.latent_activation=sigmoid"],
            "model.latent_activation='sigmoid' must be one of relu",
        ),
        (["sparsity=l1", "model.sparsity_layers=[encoder_1,latent]"], "must be [latent] with sparsity=l1"),
        (
            ["model.latent_activation=relu"],
            "model.latent_activation='relu' must be one of sigmoid with sparsity=kl",
        ),
    ],
)
def test_a_method_refuses_what_its_terms_are_not_defined_for(mnist_root, tmp_path, overrides, message):
    from sae.config import ConfigError

    with pytest.raises(ConfigError) as err:
        train(compose_train(overrides, tmp_path, mnist_root))
    assert message in str(err.value)


def test_topk_codes_have_at_most_k_active_units_and_no_penalty(mnist_root, tmp_path):
    cfg = compose_train(
        ["debug=limit", "data.eval_batch_size=200", "sparsity=topk", "k=4"], tmp_path, mnist_root
    )
    metrics = train(cfg)
    module, _ = load_checkpoint(metrics["ckpt_path"])
    assert module.hparams.k == 4 and module.net.encoder[-1][1].k == 4
    x, _ = idx_test_split(mnist_root)
    w = checkpoint_weights(metrics["ckpt_path"])
    h = torch.relu(x @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
    pre = h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"]
    values = pre.topk(4, dim=1).values
    active = (values > 0).sum(dim=1).double()  # the kept units that survive the ReLU
    assert metrics["test/l0"] == pytest.approx(active.mean().item(), rel=1e-6) and metrics["test/l0"] <= 4
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"], rel=1e-6)  # no penalty term
    assert not any(k in metrics for k in ("test/kl", "test/l1"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sparsity=topk", "k=0"], "k=0 must be an integer in [1, latent_dim=32]"),
        (["sparsity=topk", "k=33"], "k=33 must be an integer in [1, latent_dim=32]"),
        (["model.activation=topk"], "model.activation='topk' must be one of relu"),
    ],
)
def test_topk_settings_are_checked(mnist_root, tmp_path, overrides, message):
    from sae.config import ConfigError

    with pytest.raises(ConfigError) as err:
        train(compose_train(overrides, tmp_path, mnist_root))
    assert message in str(err.value)
