"""target_l0: every method ends at a chosen L0. The controller's step by hand, where each method
reads it (the penalty's weight, JumpReLU's thresholds, TopK's k), what a controlled run records
and tests, and short real-MNIST runs of all five methods landing within 5% of the target."""

from __future__ import annotations

import math

import pytest
import torch

from sae.core.control import L0_CONTROL_GAIN, L0Controller
from sae.core.model import JumpReLU, SparseAutoencoder
from sae.core.settings import InvalidSetting, method_settings
from sae.core.sparsity import L0_CONTROL_START, METHODS, kl_sparsity, make_method
from sae.training.checkpoints import load_checkpoint
from sae.training.fit import train
from tests.conftest import compose_train, run_script

QUICK = ["debug=limit", "data.eval_batch_size=200"]


def test_controller_step_is_the_log_ratio_of_l0_plus_one_to_target_plus_one():
    controller = L0Controller(target=7.0, initial=0.5, gain=0.1)
    controller.update(torch.tensor(15.0))  # denser than the target: the weight grows
    assert controller.weight().item() == pytest.approx(0.5 * (16 / 8) ** 0.1, rel=1e-6)
    controller.update(torch.tensor(3.0))  # sparser: it shrinks by (4 / 8) ** 0.1
    assert controller.weight().item() == pytest.approx(0.5, rel=1e-6)
    controller.update(torch.tensor(0.0))  # no active unit: finite, (1 / 8) ** 0.1
    assert controller.weight().item() == pytest.approx(0.5 * 8**-0.1, rel=1e-6)
    assert "log_weight" in controller.state_dict()  # checkpointed with the weights


@pytest.mark.parametrize("method", ["kl", "l1"])
def test_a_penalty_method_with_a_target_trains_with_the_controllers_knob(method):
    """L1's beta starts small and grows while the code is too dense; KL's rho starts at the
    configured rate and shrinks (beta stays the configured 0.5)."""
    activation, threshold, knob = {"kl": ("sigmoid", 0.1, "rho"), "l1": ("relu", 0.0, "beta")}[method]
    sparsity = {"method": method, "beta": 0.5, "target_l0": 2.0}
    penalty_method = make_method(sparsity, ["latent"], 4, active_above=threshold)
    torch.manual_seed(0)
    net = SparseAutoencoder(6, [], 4, latent_activation=activation)
    x = torch.rand(5, 6)
    out = net(x)
    terms = penalty_method.batch_terms(out, x)  # training mode: the controller steps
    l0 = (out.code > threshold).sum(dim=1).double().mean().item()
    assert terms["l0"].item() == pytest.approx(l0)
    start, sign = (0.05, -1) if method == "kl" else (L0_CONTROL_START, 1)
    assert terms[knob].item() == pytest.approx(start)  # the value this batch trains with
    if method == "kl":  # KL(rho || rho_hat) at the rate before the step, weighted by the configured beta
        assert terms["kl_batch"].item() == pytest.approx(
            kl_sparsity(0.05, out.code.mean(dim=0)).item(), rel=1e-6
        )
        assert penalty_method.penalty(terms).item() == pytest.approx(0.5 * terms["kl_batch"].item(), rel=1e-6)
    else:
        assert penalty_method.penalty(terms).item() == pytest.approx(start * terms["l1"].item(), rel=1e-6)
    stepped = start * ((l0 + 1) / 3) ** (sign * L0_CONTROL_GAIN)
    assert penalty_method.knob(knob).item() == pytest.approx(stepped, rel=1e-5)
    assert penalty_method.fit_record() == {knob: pytest.approx(stepped, rel=1e-5)}
    penalty_method.eval()  # evaluation reads the knob and leaves it
    penalty_method.batch_terms(out, x)
    assert penalty_method.knob(knob).item() == pytest.approx(stepped, rel=1e-5)
    assert not METHODS[method].stacks(sparsity)  # the knob is one run's
    assert METHODS[method].stacks({**sparsity, "target_l0": None})


def test_the_controller_stays_within_its_bounds():
    controller = L0Controller(target=1.0, initial=0.4, sparser_as_it_grows=False, low=1e-4, high=0.5)
    for _ in range(100):
        controller.update(torch.tensor(0.0))  # always too sparse: the rate rises, to its bound
    assert controller.weight().item() == pytest.approx(0.5) and controller.at_bound()


def test_jumprelu_with_a_target_scales_its_thresholds_in_training_forward_passes():
    act = JumpReLU(3, bandwidth=0.01, initial_threshold=0.2, target_l0=1.0)
    x = torch.tensor([[0.5, 0.3, 0.1], [0.25, 0.0, 0.6]])  # 2 and 2 above 0.2: L0 2
    out = act(x)
    assert out.tolist() == [
        pytest.approx([0.5, 0.3, 0.0]),
        pytest.approx([0.25, 0.0, 0.6]),
    ]  # gated by the scale before the step
    scale = (3 / 2) ** L0_CONTROL_GAIN
    assert act.threshold.tolist() == pytest.approx([0.2 * scale] * 3, rel=1e-5)
    assert act.fit_record() == {"threshold_scale": pytest.approx(scale, rel=1e-5)}
    act.eval()
    act(x)
    assert act.fit_record()["threshold_scale"] == pytest.approx(scale, rel=1e-5)
    # The learned thresholds still get the pseudo-derivative through the scale (chain rule: theta).
    act.train()
    x = torch.tensor([[0.2 * scale * 1.01]], requires_grad=True).expand(1, 3).contiguous()
    (act(x) * 1.0).sum().backward()
    assert torch.all(act.log_threshold.grad < 0)


def test_topk_and_batchtopk_take_k_from_the_target():
    for method in ("topk", "batchtopk"):
        settings = method_settings({"method": method, "k": 8, "target_l0": 5})
        assert settings.k == 5
        assert not settings.adapts_in_training()
        with pytest.raises(InvalidSetting, match=r"target_l0=5.5 must be an integer in \[1, latent_dim=32\]"):
            method_settings({"method": method, "target_l0": 5.5}).check(32)
    with pytest.raises(InvalidSetting, match=r"target_l0=40 must be a number in \(0, latent_dim=32\]"):
        method_settings({"method": "kl", "target_l0": 40}).check(32)
    assert method_settings({"method": "jumprelu", "target_l0": 4}).adapts_in_training()


def test_target_l0_mistyped_is_one_line_naming_it(mnist_root):
    result = run_script("train.py", "sparsity=topk", "target_l0=4.5", f"data.root={mnist_root}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "config error: target_l0=4.5 must be an integer in [1, latent_dim=32]: topk sets k to it"
    ]


def test_a_controlled_run_tests_its_last_epoch_and_records_the_weight(mnist_root, tmp_path):
    """val/loss weighs the penalty by each epoch's weight: no epoch is chosen by it."""
    cfg = compose_train([*QUICK, "sparsity=l1", "target_l0=3", "epochs=2"], tmp_path, mnist_root)
    metrics = train(cfg)
    assert metrics["ckpt_path"].endswith("last.ckpt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]
    assert "val/loss" not in metrics  # no best score to report
    module, _ = load_checkpoint(metrics["ckpt_path"])
    weight = module.method.controller.weight().item()
    assert metrics["fit/beta"] == pytest.approx(weight, rel=1e-6)
    assert weight != pytest.approx(L0_CONTROL_START)
    # The test loss is the reconstruction plus the penalty at the weight the run ended with.
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"] + weight * metrics["test/l1"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kl", "l1", "jumprelu", "topk", "batchtopk"])
def test_every_method_ends_within_5_percent_of_the_target_l0(method, real_mnist_root, tmp_path):
    """Three epochs of real MNIST (1290 steps) at target L0 8: test/l0 within 5%."""
    overrides = [f"sparsity={method}", "target_l0=8", "epochs=3", "logger=none", "callbacks=none"]
    metrics = train(compose_train(overrides, tmp_path, real_mnist_root))
    assert metrics["test/l0"] == pytest.approx(8, rel=0.05)
    if method == "l1":
        assert metrics["fit/beta"] > L0_CONTROL_START
    if method == "kl":
        assert 0 < metrics["fit/rho"] <= 0.5
    if method == "jumprelu":
        assert math.isfinite(metrics["fit/threshold_scale"]) and metrics["fit/threshold_scale"] != 1.0


def test_a_method_that_cannot_reach_a_target_refuses_it(mnist_root, tmp_path):
    from dataclasses import dataclass

    from sae.config import ConfigError
    from sae.core.settings import SETTINGS, MethodSettings

    @dataclass(frozen=True)
    class NoTarget(MethodSettings):  # steers nothing: the base's None
        method = "no_target"

    with pytest.raises(
        InvalidSetting, match="target_l0=8 must be null: no_target has no way to reach a target L0"
    ):
        NoTarget(target_l0=8).check(32)
    assert "no_target" not in SETTINGS  # not registered: nothing else sees it
    # A method's YAML that does not pass target_l0 on: refused, not ignored.
    cfg = compose_train(["target_l0=8", "~model.sparsity.target_l0"], tmp_path, mnist_root)
    with pytest.raises(
        ConfigError, match=r"target_l0=8: sparsity=kl does not read it \(its conf/sparsity/kl.yaml"
    ):
        train(cfg)


def test_a_run_that_ends_off_its_target_says_so():
    from sae.training.fit import target_missed
    from sae.training.module import SparseAutoencoderModule

    module = SparseAutoencoderModule(
        sparsity={"method": "l1", "beta": 1e-3, "target_l0": 8.0}, latent_activation="relu"
    )
    assert target_missed(module, {"test/l0": 8.3}) is None  # within 5%
    assert (
        target_missed(module, {"test/l0": 10.0})
        == "note: target_l0=8 not reached, test/l0 10 (+25%): train longer"
    )
    module.method.controller.log_weight.fill_(math.log(1e4))  # the weight at its upper bound
    assert target_missed(module, {"test/l0": 10.0}).endswith(
        ": beta ended at its bound, the target is out of its reach"
    )
    assert target_missed(SparseAutoencoderModule(), {"test/l0": 3.0}) is None  # no target
