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
from tests.conftest import LEAN, compose_config, compose_train

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
