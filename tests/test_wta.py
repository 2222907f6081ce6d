"""Winner-take-all lifetime sparsity (sae.core.model.LifetimeTopK, sparsity=wta) against hand
computations: which entries each unit keeps over a batch, the gradient through them, the plain
ReLU at inference; then trained end to end, its test metrics recomputed from the checkpoint."""

from __future__ import annotations

import pytest
import torch

from sae.core.model import LifetimeTopK
from sae.training.checkpoints import load_checkpoint
from sae.training.fit import train
from tests.conftest import checkpoint_weights, compose_train, idx_test_split

QUICK = ["debug=limit", "data.eval_batch_size=200"]


def test_wta_keeps_each_units_largest_activations_over_the_batch():
    x = torch.tensor(
        [
            [3.0, 0.1, -1.0],
            [1.0, 0.4, -2.0],
            [2.0, 0.2, 0.5],
            [0.5, 0.3, -0.5],
        ],
        requires_grad=True,
    )
    act = LifetimeTopK(rate=0.5)  # 2 of the 4 inputs per unit (column)
    out = act(x)
    # Unit 0 keeps rows 0 and 2; unit 1 rows 1 and 3; unit 2 row 2 and row 3's -0.5, which the
    # ReLU zeroes (a unit keeps fewer than its share where fewer are positive).
    assert out.tolist() == [
        [3.0, 0.0, 0.0],
        [0.0, pytest.approx(0.4), 0.0],
        [2.0, 0.0, 0.5],
        [0.0, pytest.approx(0.3), 0.0],
    ]
    out.sum().backward()
    # Through the kept entries only (the ReLU's gradient at -0.5 is 0).
    assert x.grad.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_wta_keeps_a_rounded_share_of_any_batch_and_is_a_relu_at_inference():
    act = LifetimeTopK(rate=0.05)
    assert [act.winners(b) for b in (128, 88, 10, 1)] == [6, 4, 1, 1]  # at least one per unit
    assert LifetimeTopK(rate=1.0).winners(7) == 7
    x = torch.tensor([[0.3, -0.2], [0.7, 0.1], [-0.4, 0.9]])
    act.eval()
    assert torch.equal(act(x), torch.relu(x))  # every input on its own: no batch selection


def test_wta_trains_and_tests_its_relu_code(mnist_root, tmp_path):
    cfg = compose_train([*QUICK, "sparsity=wta", "model.sparsity.rate=0.1"], tmp_path, mnist_root)
    metrics = train(cfg)
    w = checkpoint_weights(metrics["ckpt_path"])
    h = torch.relu(idx_test_split(mnist_root)[0] @ w["encoder.0.0.weight"].T + w["encoder.0.0.bias"])
    code = torch.relu(h @ w["encoder.1.0.weight"].T + w["encoder.1.0.bias"])
    assert metrics["test/l0"] == pytest.approx((code > 0).sum(dim=1).double().mean().item(), rel=1e-5)
    assert metrics["test/loss"] == pytest.approx(metrics["test/mse"], rel=1e-6)  # no penalty term
    module, _ = load_checkpoint(metrics["ckpt_path"])
    assert module.method.describe() == "wta (rate 0.1)"
    assert module.net.latent_activation.rate == 0.1
    module.net.train()  # the checkpoint's model selects again in training mode
    kept = module.net.encode(idx_test_split(mnist_root)[0][:100].float())
    assert ((kept > 0).sum(dim=0) <= 10).all() and (kept > 0).sum() > 0
