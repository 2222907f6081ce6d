"""The CUDA path: a run on the GPU (data resident there, the module's step and logging window,
AuxK's counter, the test pass) ends where the same run on the CPU ends, evaluate.py on the GPU
reproduces it, and a training step never makes the host wait for the GPU.

Skipped without a CUDA device; `benchmarks/gpu_check.py` runs them on a GPU machine.
"""

import pytest
import torch

from sae.config import model_settings
from sae.core.loss import objective
from sae.training.evaluate import evaluate
from sae.training.fit import train
from sae.training.module import SparseAutoencoderModule
from tests.conftest import LEAN, checkpoint_weights, compose_config, compose_train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.py runs these on a GPU)"
)

METHODS = {
    "kl": [],
    "topk_auxk": ["sparsity=topk", "k=5", "model.sparsity.auxk=true", "model.sparsity.auxk_dead_after=100"],
}
# The whole synthetic test split in one batch: the limited run's test pass (2 batches) covers the
# split, as evaluate.py does.
WHOLE_TEST = "data.eval_batch_size=200"
COMPARED = ("val/loss", "test/mse", "test/l0", "test/rho_hat_mean", "test/dead_fraction")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_gpu_run_ends_where_the_cpu_run_ends(mnist_root, tmp_path, method):
    overrides = [*LEAN, "debug=limit", WHOLE_TEST, *METHODS[method]]
    cpu = train(compose_train(overrides, tmp_path / "cpu", mnist_root))  # the quick settings: CPU
    gpu = train(compose_train([*overrides, "accelerator=gpu"], tmp_path / "gpu", mnist_root))
    assert gpu["fit/epochs"] == cpu["fit/epochs"] == 2
    for key in COMPARED:  # a few steps of float32 on two devices: close, not bitwise
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-5), key

    where = [f"data.root={mnist_root}", f"output_dir={tmp_path / 'e'}", "accelerator=gpu"]
    cfg = compose_config("evaluate", [f"ckpt_path={gpu['ckpt_path']}", *where])
    cfg.data.eval_batch_size = 64
    again = evaluate(cfg)
    for key in COMPARED[1:]:
        assert again[key] == pytest.approx(gpu[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_never_waits_for_the_gpu(mnist_root, tmp_path, method):
    """No host-device synchronization in the objective, backward or Adam's step: each would stall
    the queue of kernel launches once per step (as a host-to-device copy of rho once did)."""
    cfg = compose_train([*LEAN, *METHODS[method]], tmp_path, mnist_root)
    module = SparseAutoencoderModule(**model_settings(cfg)).cuda()
    optimizer = module.configure_optimizers()
    x = torch.rand(50, 784, device="cuda")
    hp = module.hparams
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the first steps create Adam's state
            loss = objective(hp.recon_loss, module.method, module.net(x), x)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


@pytest.fixture
def recordings(monkeypatch):
    """The CapturedStep objects training makes (sae.training.module records the step with one)."""
    from sae.core.captured import CapturedStep
    from sae.training import module as module_file

    made = []

    class Kept(CapturedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(module_file, "CapturedStep", Kept)
    return made


def weights(run) -> dict:
    return checkpoint_weights(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("method", list(METHODS))
def test_the_recorded_step_trains_as_the_eager_step(mnist_root, tmp_path, method, recordings):
    """cuda_graph=true (the default): one CUDA graph per full batch, replayed, ends where
    Lightning's eager step ends (cuda_graph=false), within the stacked path's tolerance."""
    overrides = [*LEAN, "debug=limit", WHOLE_TEST, "accelerator=gpu", *METHODS[method]]
    graph = train(compose_train(overrides, tmp_path / "graph", mnist_root))
    assert len(recordings) == 1 and recordings[0].graph is not None and recordings[0].replays > 0
    eager = train(compose_train([*overrides, "cuda_graph=false"], tmp_path / "eager", mnist_root))
    assert len(recordings) == 1  # cuda_graph=false records nothing
    for key in COMPARED:
        assert graph[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), key
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "graph")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_a_resumed_run_with_the_recorded_step_ends_where_it_would_have(mnist_root, tmp_path, recordings):
    def run(name: str, *overrides: str) -> dict:
        settings = [*LEAN, "debug=limit", "accelerator=gpu", *overrides]
        return train(compose_train(settings, tmp_path / name, mnist_root))

    full = run("full", "epochs=4")
    run("part", "epochs=2")
    resumed = run("elsewhere", "epochs=4", f"resume={tmp_path / 'part'}")
    assert resumed["fit/epochs"] == full["fit/epochs"] == 4
    assert all(r.graph is not None and r.replays > 0 for r in recordings)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=name)


def test_the_stacked_step_recorded_as_one_graph_trains_as_the_eager_one(mnist_root, tmp_path):
    """The vectorized launcher's stacked step of several jobs, recorded once and replayed, ends
    where the same stacked training run eagerly ends."""
    from sae.sweep.stacked import StackedTraining
    from sae.training.fit import build_data_and_module

    jobs = [{"rho": 0.05, "beta": 5e-3, "seed": 0}, {"rho": 0.1, "beta": 0.05, "seed": 1}]

    def stacked(capture: bool) -> StackedTraining:
        built = [
            build_data_and_module(compose_train([f"{k}={v}" for k, v in job.items()], tmp_path, mnist_root))
            for job in jobs
        ]
        built[0][0].setup("fit")
        training = StackedTraining([m for _, m in built], "cuda", capture=capture)
        for _ in training.fit(built[0][0].split("train")[0], 50, [j["seed"] for j in jobs], 2):
            pass
        return training

    graph, eager = stacked(capture=True), stacked(capture=False)
    assert graph.recorded.graph is not None and graph.recorded.replays > 0
    assert eager.recorded.graph is None and graph.steps == eager.steps
    for name, value in eager.params.items():
        torch.testing.assert_close(graph.params[name], value, rtol=0, atol=1e-4, msg=name)
