"""A sparsity method is one unit: a toy method registered here trains, checkpoints, evaluates and
summarises with no other change."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import pytest
import torch
import yaml

from sae.core.settings import SETTINGS, MethodSettings, check_weight, register_settings
from sae.core.sparsity import METHODS, SparsityMethod, register
from sae.report.summary import write_summary
from sae.training.checkpoints import load_checkpoint
from sae.training.evaluate import evaluate
from sae.training.fit import train
from tests.conftest import checkpoint_weights, compose_train, evaluate_config, idx_test_split, read_metrics


@pytest.fixture
def code_sum_method():
    """beta * the sum of the covered layers' activations, averaged over samples (a penalty that
    whole-split unit means give exactly), with its own settings: beta."""

    @register_settings
    @dataclass(frozen=True)
    class CodeSumSettings(MethodSettings):
        method = "code_sum"
        beta: float = 5e-3

        def check_knobs(self, latent_dim):
            check_weight("beta", self.beta)

    @register
    class CodeSum(SparsityMethod):
        Settings = CodeSumSettings
        batch_term_names = ("code_sum",)

        def batch_terms(self, out, x):
            return {"code_sum": sum(out.activations[n].sum(dim=1).mean() for n in self.layers)}

        def split_terms(self, unit_means, decoder_weight, densities):
            return {"code_sum": sum(unit_means[n].sum() for n in self.layers)}

        def penalty(self, terms):
            return self.settings.beta * terms["code_sum"]

    yield CodeSum
    del METHODS["code_sum"], SETTINGS["code_sum"]


def test_a_method_registered_in_a_test_runs_through_everything(code_sum_method, mnist_root, tmp_path):
    job = tmp_path / "sweep" / "0"
    overrides = [
        "debug=limit",
        "data.eval_batch_size=200",
        "~model.sparsity",  # what its conf/sparsity/code_sum.yaml would set
        "+model.sparsity={method: code_sum, beta: ${beta}}",
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
    assert module.hparams.sparsity == {"method": "code_sum", "beta": 0.01}
    assert type(module.method).__name__ == "CodeSum"
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
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["sparsity=code_sum"]))
    (job / "status.json").write_text('{"status": "ok"}')
    write_summary(tmp_path / "sweep")
    with open(tmp_path / "sweep" / "summary.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["sparsity"] == "code_sum"
    assert float(row["test/code_sum"]) == pytest.approx(read_metrics(job)["test/code_sum"])


def test_an_unknown_method_is_one_config_line(mnist_root, tmp_path):
    from sae.config import ConfigError

    with pytest.raises(ConfigError, match="model.sparsity.method='l0' must be one of kl"):
        train(compose_train(["model.sparsity.method=l0"], tmp_path, mnist_root))


def test_l1_trains_relu_codes_and_reports_its_penalty_over_the_test_set(mnist_root, tmp_path):
    """sparsity=l1: ReLU codes; test/l1 recomputed in float64 from the checkpoint's weights, and
    test/l0 counts exact non-zeros."""
    cfg = compose_train(
        ["debug=limit", "data.eval_batch_size=200", "sparsity=l1", "beta=0.01"], tmp_path, mnist_root
    )
    assert (cfg.model.sparsity.method, cfg.model.latent_activation) == ("l1", "relu")
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
    assert module.hparams.sparsity["k"] == 4 and module.net.encoder[-1][1].k == 4
    x, _ = idx_test_split(mnist_root)
    w = checkpoint_weights(metrics["ckpt_path"])
    h = torch.relu(x @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
    pre = h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"]
    values = pre.topk(4, dim=1).values
    active = (values > 0).sum(dim=1).double()  # the kept units that survive the ReLU
    assert metrics["test/l0"] == pytest.approx(active.mean().item(), rel=1e-6) and metrics["test/l0"] <= 4
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"], rel=1e-6)  # no penalty term
    assert not any(k in metrics for k in ("test/kl", "test/l1"))


def auxk_model(latent_dim: int = 6, k: int = 2, linear: bool = False, hidden_dims=()):
    """A float64 topk autoencoder (one layer unless hidden_dims) and its method with AuxK on."""
    from sae.core.model import SparseAutoencoder

    torch.manual_seed(0)
    out_act = "identity" if linear else "sigmoid"
    net = SparseAutoencoder(
        5, list(hidden_dims), latent_dim, latent_activation="topk", output_activation=out_act, k=k
    )
    settings = METHODS["topk"].Settings(k=k, auxk=True, auxk_alpha=0.5, auxk_k=2, auxk_dead_after=4)
    return net.double(), METHODS["topk"](settings, ["latent"], latent_dim).double()


def normalized_mse(recon, target):
    """openai/sparse_autoencoder's: the MSE over the MSE of the target's batch mean."""
    return ((recon - target) ** 2).mean() / ((target.mean(dim=0) - target) ** 2).mean()


def test_auxk_hand_computed_in_float64():
    """auxk = normalized_mse(e_hat, e), e_hat = decode(z + z_aux) - decode(z), z_aux the auxk_k
    largest dead pre-activations (ReLU'd), recomputed here row by row."""
    net, method = auxk_model()
    method.eval()  # the counters stay as set
    x = torch.rand(3, 5, dtype=torch.float64)
    method.inputs_since_fired.copy_(torch.tensor([0.0, 4, 9, 3, 4, 5]))  # units 1, 2, 4, 5 dead
    out = net(x)
    terms = method.batch_terms(out, x)
    assert list(terms) == ["auxk", "auxk_dead", "auxk_revived"] and terms["auxk_dead"].item() == 4

    w, b = net.encoder[0][0].weight.detach(), net.encoder[0][0].bias.detach()
    pre = x @ w.T + b
    z_aux = torch.zeros_like(pre)
    for row in range(3):
        dead = sorted([1, 2, 4, 5], key=lambda j: -pre[row, j].item())[:2]
        for j in dead:
            z_aux[row, j] = max(pre[row, j].item(), 0.0)
    with torch.no_grad():
        z, recon = out.code, out.recon
        e = x - recon
        e_hat = net.decoder(z + z_aux) - net.decoder(z)
    assert terms["auxk"].item() == pytest.approx(normalized_mse(e_hat, e).item(), rel=1e-12)
    assert method.penalty(terms) == 0.0  # nothing in `loss`: train/loss is val/loss's quantity
    method.prepare(x)
    variance = ((x - x.mean(dim=0)) ** 2).mean().item()  # per pixel over the inputs, averaged over pixels
    assert method.auxiliary(terms).item() == pytest.approx(0.5 * variance * terms["auxk"].item(), rel=1e-12)


def test_auxk_loss_is_gao_et_als_times_the_input_variance():
    """With a one-layer encoder and a linear decoder, the minimised loss is Var(x) times the
    reference's mse / Var(x) + alpha * normalized_mse(W_dec z_aux + b, e + b): equal gradients
    after dividing by Var(x), so Adam takes the same steps (b held fixed in the auxiliary term)."""
    from sae.core.loss import minimised, objective

    net, method = auxk_model(linear=True)
    method.eval()  # the dead set as given (training would also count this batch)
    training_inputs = torch.rand(50, 5, dtype=torch.float64)
    method.prepare(training_inputs)
    variance = ((training_inputs - training_inputs.mean(dim=0)) ** 2).mean()
    x = torch.rand(8, 5, dtype=torch.float64)
    method.inputs_since_fired.copy_(torch.tensor([0.0, 0, 0, 9, 9, 9]))  # units 3-5 dead
    ours = minimised(method, objective("mse", method, net(x), x)) / variance
    ours_grads = torch.autograd.grad(ours, list(net.parameters()))

    encoder, decoder = net.encoder[0][0], net.decoder[0][0]
    pre = encoder(x)
    values, indices = pre.topk(2, dim=1)
    recon = decoder(torch.zeros_like(pre).scatter(1, indices, values.relu()))
    dead_pre = pre.masked_fill(torch.arange(6) < 3, float("-inf"))
    aux_values, aux_indices = dead_pre.topk(2, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_indices, aux_values.relu())
    aux_recon = z_aux @ decoder.weight.T + decoder.bias.detach()  # the one difference: see TopKSparsity
    target = x - recon.detach() + decoder.bias.detach()
    reference = ((recon - x) ** 2).mean() / variance + 0.5 * normalized_mse(aux_recon, target)
    reference_grads = torch.autograd.grad(reference, list(net.parameters()))
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    for got, want in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_auxk_trains_the_dead_latents_and_the_decoder_only():
    """With a hidden layer shared by every latent, AuxK's gradient stops at the latent layer: the
    dead latents' rows and the decoder learn from it, the live rows and the encoder's hidden
    layer do not."""
    net, method = auxk_model(hidden_dims=[7])
    method.eval()
    x = torch.rand(4, 5, dtype=torch.float64)
    method.inputs_since_fired.copy_(torch.tensor([0.0, 0, 0, 9, 9, 9]))  # units 3-5 dead
    method.prepare(x)
    out = net(x)
    method.auxiliary(method.batch_terms(out, x)).backward()
    hidden, latent = net.encoder[0][0], net.encoder[1][0]
    assert hidden.weight.grad is None or hidden.weight.grad.abs().max() == 0
    assert latent.weight.grad[:3].abs().max() == 0 and latent.weight.grad[3:].abs().max() > 0
    assert net.decoder[0][0].weight.grad.abs().max() > 0


def test_auxk_counts_inputs_since_each_latent_fired_in_training_only():
    net, method = auxk_model()
    x = torch.rand(3, 5, dtype=torch.float64)
    out = net(x)
    fired = (out.code > 0).any(dim=0)
    method.eval()
    method.batch_terms(out, x)
    assert method.inputs_since_fired.sum() == 0
    method.train()
    method.batch_terms(out, x)
    method.batch_terms(out, x)
    torch.testing.assert_close(method.inputs_since_fired, torch.where(fired, 0.0, 6.0).double())
    # Nothing dead yet: the dead latents explain none of the residual, and nothing learns from it.
    fresh_net, fresh = auxk_model()
    terms = fresh.batch_terms(fresh_net(x), x)
    e = (x - fresh_net(x).recon).detach()
    assert terms["auxk"].item() == pytest.approx(normalized_mse(torch.zeros_like(e), e).item())
    assert terms["auxk_dead"].item() == 0
    assert not terms["auxk"].requires_grad or all(
        g is None or g.abs().max() == 0
        for g in torch.autograd.grad(terms["auxk"], list(fresh_net.parameters()), allow_unused=True)
    )


def test_auxk_dead_mask_counts_this_batch():
    """A latent that reaches auxk_dead_after inputs without firing with this batch is dead for
    this batch's AuxK term (the reference takes the mask after its counter update)."""
    net, method = auxk_model()
    method.train()
    x = torch.rand(3, 5, dtype=torch.float64)
    out = net(x)
    silent = int((out.code > 0).any(dim=0).logical_not().nonzero()[0])
    method.inputs_since_fired.fill_(0.0)
    method.inputs_since_fired[silent] = 1.0  # 1 + 3 inputs of this batch = auxk_dead_after
    assert method.batch_terms(out, x)["auxk_dead"].item() == 1


def test_auxk_counts_the_latents_it_revived():
    """A latent that fires after being dead counts as revived, once; fit_record reports the
    latents dead now and revived, which metrics.json carries as fit/auxk_dead, fit/auxk_revived."""
    net, method = auxk_model()
    method.train()
    x = torch.rand(3, 5, dtype=torch.float64)
    out = net(x)
    fired = (out.code > 0).any(dim=0)
    method.inputs_since_fired.fill_(10.0)  # every latent dead before this batch
    terms = method.batch_terms(out, x)
    assert terms["auxk_revived"].item() == int(fired.sum()) > 0
    method.batch_terms(out, x)
    assert method.fit_record() == {"auxk_dead": float((~fired).sum()), "auxk_revived": float(fired.sum())}


def test_topk_with_auxk_trains_checkpoints_and_evaluates(mnist_root, tmp_path):
    overrides = [
        "debug=limit",
        "data.eval_batch_size=200",
        "sparsity=topk",
        "k=2",
        "model.sparsity.auxk=true",
    ]
    metrics = train(
        compose_train([*overrides, "model.sparsity.auxk_dead_after=64", "logger=csv"], tmp_path, mnist_root)
    )
    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/auxk")]
    assert logged and all(float(r["train/auxk_dead"]) <= 32 for r in logged)
    assert any(float(r["train/auxk_dead"]) > 0 for r in logged)  # 64 inputs without firing: it acts
    for r in logged:  # train/loss leaves the auxiliary term out, as val/loss does
        assert float(r["train/loss"]) == pytest.approx(float(r["train/mse"]), rel=1e-6)
        assert float(r["train/auxk_revived"]) >= 0
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"], rel=1e-6)  # a training term only
    assert metrics["fit/auxk_dead"] <= 32 and metrics["fit/auxk_revived"] <= 32
    module, _ = load_checkpoint(metrics["ckpt_path"])
    assert module.hparams.sparsity["auxk"] and module.method.inputs_since_fired.shape == (32,)
    assert module.method.inputs_since_fired.max() > 0  # the counter is in the checkpoint
    # evaluate.py reads the same record off the checkpoint; TopK's truncated code is its code.
    from sae.training.evaluate import evaluate
    from tests.conftest import evaluate_config

    evaluated = evaluate(evaluate_config(metrics["ckpt_path"], mnist_root, tmp_path / "evaluated"))
    for key in ("fit/auxk_dead", "fit/auxk_revived"):
        assert evaluated[key] == metrics[key]
    assert evaluated["test/truncated_mse"] == evaluated["test/mse"] == metrics["test/mse"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+model.sparsity.auxk=true"], "model.sparsity.auxk=True must be absent: kl's settings are"),
        (
            ["sparsity=topk", "k=4", "model.sparsity.auxk=true", "model.sparsity.auxk_k=40"],
            "model.sparsity.auxk_k=40 must be an integer in [1, latent_dim=32]",
        ),
        (
            ["sparsity=topk", "k=4", "model.sparsity.auxk=yes"],
            "model.sparsity.auxk='yes' must be true or false",
        ),
        (["sparsity=topk", "k=40"], "k=40 must be an integer in [1, latent_dim=32]"),
        (["sparsity=topk", "k=0"], "k=0 must be an integer in [1, latent_dim=32]"),
        (["sparsity=topk", "k=33"], "k=33 must be an integer in [1, latent_dim=32]"),
        (["model.activation=topk"], "model.activation='topk' must be one of relu"),
        (["sparsity=batchtopk", "k=0"], "k=0 must be an integer in [1, latent_dim=32]"),
        (["sparsity=jumprelu", "model.sparsity.bandwidth=0"], "bandwidth=0 must be a number in (0, 1]"),
        (["sparsity=jumprelu", "model.sparsity.initial_threshold=-1"], "initial_threshold=-1"),
        (["model.activation=jumprelu"], "model.activation='jumprelu' must be one of relu"),
        (["sparsity=kl", "model.latent_activation=batchtopk"], "latent_activation"),
        (["sparsity=wta", "model.sparsity.rate=0"], "model.sparsity.rate=0 must be a number in (0, 1]"),
        (["sparsity=wta", "model.sparsity.rate=1.5"], "model.sparsity.rate=1.5 must be a number in (0, 1]"),
        (["sparsity=wta", "target_l0=8"], "target_l0=8 must be null: wta has no way to reach a target L0"),
        (["model.activation=wta"], "model.activation='wta' must be one of relu"),
    ],
)
def test_method_settings_are_checked(mnist_root, tmp_path, overrides, message):
    """TopK's, AuxK's, BatchTopK's and JumpReLU's settings, and their latents' place: one line each."""
    from sae.config import ConfigError

    with pytest.raises(ConfigError) as err:
        train(compose_train(overrides, tmp_path, mnist_root))
    assert message in str(err.value)


def test_a_run_describes_its_setting_in_one_line():
    from sae.training.module import SparseAutoencoderModule

    topk = SparseAutoencoderModule(
        hidden_dims=[],
        latent_dim=64,
        latent_activation="topk",
        sparsity={"method": "topk", "k": 4, "auxk": True},
    )
    assert topk.setting() == "sparsity=topk (k 4, AuxK), latent_dim 64, lr 0.001"
    size = 784 * 64 + 64 + 64 * 784 + 784
    assert topk.describe() == f"model: 784-64-784, topk latent; {topk.setting()}; {size:,} parameters"
    kl = SparseAutoencoderModule()
    assert kl.describe().startswith("model: 784-128-32-128-784, relu hidden, sigmoid latent; sparsity=kl")
    assert kl.setting() == "sparsity=kl (rho 0.05, beta 0.005), latent_dim 32, lr 0.001"
