"""BatchTopK and JumpReLU against hand computations: which entries each keeps, and the gradients
(JumpReLU's pseudo-derivative with respect to its thresholds, written out here from the paper's
formulas), then each trained end to end and read back from its checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from sae.core.model import BatchTopK, JumpReLU, SparseAutoencoder
from sae.core.sparsity import METHODS
from sae.data.mnist import MNISTDataModule
from sae.training.checkpoints import load_checkpoint
from sae.training.fit import train
from tests.conftest import checkpoint_weights, compose_train, idx_test_split

QUICK = ["debug=limit", "data.eval_batch_size=200"]


def test_batchtopk_keeps_the_k_times_batch_largest_entries_of_the_whole_batch():
    x = torch.tensor([[3.0, 2.5, 2.0], [0.1, -1.0, 0.2]], requires_grad=True)
    act = BatchTopK(k=2)  # 2 * 2 rows = the 4 largest of the 6 entries: three in row 0, one in row 1
    out = act(x)
    assert out.tolist() == [[3.0, 2.5, 2.0], [0.0, 0.0, pytest.approx(0.2)]]
    out.sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]  # through the kept entries only
    # More kept than positive: the ReLU zeroes a kept negative entry.
    negative = torch.tensor([[1.0, -2.0], [-0.5, -3.0]])
    assert BatchTopK(k=1)(negative).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_batchtopk_infers_with_the_mean_smallest_kept_value_of_training_batches():
    act = BatchTopK(k=1)
    batches = [torch.tensor([[0.9, 0.1], [0.4, 0.3]]), torch.tensor([[0.2, 0.8], [0.6, 0.05]])]
    # Batch 1 keeps 0.9 and 0.4 (smallest 0.4); batch 2 keeps 0.8 and 0.6 (smallest 0.6).
    act.estimate_threshold(batches)
    assert act.threshold.item() == pytest.approx(0.5)
    act.eval()  # inference: each entry on its own, above the threshold
    assert act(torch.tensor([[0.45, 0.55, 0.7]])).tolist() == [[0.0, pytest.approx(0.55), pytest.approx(0.7)]]


def test_jumprelu_output_and_its_pseudo_derivatives_hand_computed_in_float64():
    epsilon = 0.002
    act = JumpReLU(3, bandwidth=epsilon, initial_threshold=0.1).double()
    theta = act.threshold[0].item()  # 0.1 as its log in float32 holds it
    x = torch.tensor([[0.3, 0.1004, 0.05], [0.0996, 0.2, 0.0997]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)  # dL/d output
    out = act(x)
    # x where x > theta, else 0.
    assert out.tolist() == [[0.3, 0.1004, 0.0], [0.0, 0.2, 0.0]]
    (out * c).sum().backward()
    assert x.grad.tolist() == [[1.0, 2.0, 0.0], [0.0, 5.0, 0.0]]  # c where the gate is open
    # dL/dtheta_j = sum over rows of c * -(theta / epsilon) * K((x - theta) / epsilon), K = 1 on
    # |u| < 1/2: within 0.001 of 0.1 are 0.0996 (unit 0, c=4), 0.1004 (unit 1, c=2), 0.0997 (unit 2, c=6).
    per_theta = [-(theta / epsilon) * 4, -(theta / epsilon) * 2, -(theta / epsilon) * 6]
    # The parameter is log(theta): the chain rule multiplies by theta.
    expected = [g * theta for g in per_theta]
    assert act.log_threshold.grad.tolist() == pytest.approx(expected, rel=1e-12)
    # The L0 count: 3 entries above their threshold; d/dtheta_j = -(1 / epsilon) per entry in the window.
    act.log_threshold.grad = None
    step = JumpReLU.step_of(x, act.threshold, epsilon)
    assert step.sum().item() == 3.0
    step.sum().backward()
    assert act.log_threshold.grad.tolist() == pytest.approx([-(1 / epsilon) * theta] * 3, rel=1e-12)
    assert x.grad.tolist() == [[1.0, 2.0, 0.0], [0.0, 5.0, 0.0]]  # the count sends nothing to x


def test_jumprelu_penalty_is_beta_times_the_batch_l0():
    settings = METHODS["jumprelu"].Settings(beta=0.25, bandwidth=0.002)
    method = METHODS["jumprelu"](settings, ["latent"], 3)
    torch.manual_seed(0)
    net = SparseAutoencoder(4, [], 3, latent_activation="jumprelu", latent_options={"initial_threshold": 0.2})
    x = torch.rand(5, 4)
    out = net(x)
    terms = method.batch_terms(out, x)
    count = (out.latent_preactivation > 0.2).sum(dim=1).double().mean().item()
    assert terms["l0_batch"].item() == pytest.approx(count)
    assert method.penalty(terms).item() == pytest.approx(0.25 * count)
    # Over a split, from the units' firing frequencies: the mean count of active units per input.
    split = method.split_terms({}, net.decoder_weight, {"latent": torch.tensor([0.5, 0.25, 1.0])})
    assert split["l0_penalized"].item() == pytest.approx(1.75)


def test_batchtopk_trains_and_tests_with_the_threshold_of_its_training_batches(mnist_root, tmp_path):
    cfg = compose_train([*QUICK, "sparsity=batchtopk", "k=4"], tmp_path, mnist_root)
    metrics = train(cfg)
    w = checkpoint_weights(metrics["ckpt_path"])

    def pre(x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.double() @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
        return h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"]

    data = MNISTDataModule(root=str(mnist_root), download=False, val_size=cfg.data.val_size)
    train_images = data.split("train")[0]
    smallest = []
    for batch in train_images.split(cfg.batch_size):
        if len(batch) < cfg.batch_size:
            continue  # whole batches, as in training
        kept = pre(batch).flatten().topk(4 * len(batch)).values
        smallest.append(kept[kept > 0].min())
    threshold = torch.stack(smallest).mean()
    assert w["encoder.1.1.threshold"].item() == pytest.approx(threshold.item(), rel=1e-5)
    test_images = idx_test_split(mnist_root)[0]
    l0 = (pre(test_images) > threshold).sum(dim=1).double().mean().item()
    assert metrics["test/l0"] == pytest.approx(l0, rel=1e-5)
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"], rel=1e-6)  # no penalty term
    module, _ = load_checkpoint(metrics["ckpt_path"])
    assert module.net.latent_activation.threshold.item() == pytest.approx(threshold.item(), rel=1e-5)


def test_jumprelu_trains_its_thresholds_and_reports_beta_times_l0(mnist_root, tmp_path):
    cfg = compose_train([*QUICK, "sparsity=jumprelu", "beta=1e-3"], tmp_path, mnist_root)
    metrics = train(cfg)
    w = checkpoint_weights(metrics["ckpt_path"])
    thresholds = w["encoder.1.1.log_threshold"].exp()
    assert not torch.allclose(thresholds, torch.full_like(thresholds, 0.1))  # learned, unit by unit
    assert metrics["test/l0_penalized"] == pytest.approx(metrics["test/l0"], rel=1e-6)
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"] + 1e-3 * metrics["test/l0"], rel=1e-5)
    assert metrics["test/penalty"] == pytest.approx(1e-3 * metrics["test/l0"], rel=1e-5)
    h = torch.relu(idx_test_split(mnist_root)[0] @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
    pre = h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"]
    assert metrics["test/l0"] == pytest.approx((pre > thresholds).sum(dim=1).double().mean().item(), rel=1e-5)


def test_initial_thresholds_are_the_setting():
    act = JumpReLU(4, initial_threshold=0.25)
    assert act.threshold.tolist() == pytest.approx([0.25] * 4)
    assert act.log_threshold.tolist() == pytest.approx([math.log(0.25)] * 4)
