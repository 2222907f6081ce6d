"""The recorded training step (sae.core.captured): on a GPU one CUDA graph per step; here, with
recording disabled, the same control flow, which must take exactly the steps an eager loop takes.
tests/test_cuda.py checks the recording itself against eager training on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from sae.core.captured import WARMUP_STEPS, CapturedStep
from sae.training import module as module_file
from sae.training.fit import train
from tests.conftest import LEAN, checkpoint_weights, compose_train


def last_checkpoint(run):
    return run / "checkpoints" / "last.ckpt"


def toy_training(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 6))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = ((net(x) - x) ** 2).mean()
        loss.backward()
        optimizer.step()
        return loss.detach().reshape(1)

    return net, optimizer, step


def test_full_batches_replay_after_the_warm_up_and_ragged_ones_step_eagerly():
    torch.manual_seed(1)
    sizes = [8, 8, 8, 8, 8, 3, 8, 8, 3]  # two epochs' worth of full and ragged batches
    batches = [torch.rand(n, 6) for n in sizes]

    net, optimizer, step = toy_training()
    recorded = CapturedStep(step, lambda: optimizer.zero_grad(set_to_none=True), capture=False)
    terms = [recorded(x).clone() for x in batches]

    plain_net, plain_optimizer, plain_step = toy_training()
    plain = []
    for x in batches:
        plain_optimizer.zero_grad(set_to_none=True)
        plain.append(plain_step(x))

    assert recorded.eager_steps == WARMUP_STEPS + sizes.count(3)
    assert recorded.replays == sizes.count(8) - WARMUP_STEPS
    assert recorded.shape == (8, 6)
    torch.testing.assert_close(torch.cat(terms), torch.cat(plain), rtol=0, atol=0)
    for a, b in zip(net.parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def recorded_path(monkeypatch):
    """Training through the recorded step's path on the CPU (recording disabled), and the
    CapturedStep objects it made."""
    made = []

    class Kept(CapturedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(module_file.SparseAutoencoderModule, "records_steps", lambda self: True)
    monkeypatch.setattr(module_file, "CapturedStep", Kept)
    return made


AUXK = ["sparsity=topk", "k=2", "model.sparsity.auxk=true", "model.sparsity.auxk_dead_after=64"]


@pytest.mark.parametrize("method", [[], AUXK], ids=["kl", "topk_auxk"])
def test_the_recorded_path_trains_what_lightnings_step_trains(mnist_root, tmp_path, method, recorded_path):
    overrides = [*LEAN, "debug=limit", *method]
    lightning = copy.deepcopy(compose_train(overrides, tmp_path / "lightning", mnist_root))
    recorded_cfg = compose_train(overrides, tmp_path / "recorded", mnist_root)

    recorded = train(recorded_cfg)
    assert len(recorded_path) == 1 and not recorded_path[0].capture  # one per fit; on a CPU, no graph
    assert recorded_path[0].replays > 0 and recorded_path[0].eager_steps >= WARMUP_STEPS
    with pytest.MonkeyPatch.context() as undo:
        undo.setattr(module_file.SparseAutoencoderModule, "records_steps", lambda self: False)
        eager = train(lightning)

    assert recorded["fit/epochs"] == eager["fit/epochs"] == 2
    for key in [k for k in eager if k.startswith(("val/", "test/"))]:
        assert recorded[key] == eager[key], key
    a, b = (checkpoint_weights(last_checkpoint(tmp_path / run)) for run in ("lightning", "recorded"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    steps = [
        torch.load(last_checkpoint(tmp_path / run), weights_only=True)["global_step"]
        for run in ("lightning", "recorded")
    ]
    assert steps[0] == steps[1] > 0  # Lightning's step count advanced for every recorded step


def test_a_run_resumed_on_the_recorded_path_ends_where_it_would_have(mnist_root, tmp_path, recorded_path):
    def run(name: str, *overrides: str) -> dict:
        return train(compose_train([*LEAN, "debug=limit", *overrides], tmp_path / name, mnist_root))

    full = run("full", "epochs=4")
    run("part", "epochs=2")
    resumed = run("elsewhere", "epochs=4", f"resume={tmp_path / 'part'}")
    assert resumed["fit/epochs"] == full["fit/epochs"] == 4
    a, b = (checkpoint_weights(last_checkpoint(tmp_path / run)) for run in ("full", "part"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
