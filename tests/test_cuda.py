"""The CUDA path: a run on the GPU (data resident there, the module's step and logging window,
AuxK's counter, the test pass) ends where the same run on the CPU ends, and evaluate.py on the GPU
reproduces it.

Skipped without a CUDA device; `benchmarks/gpu_check.py` runs them on a GPU machine.
"""

import pytest
import torch

from sae.evaluation import evaluate
from sae.training import train
from tests.conftest import LEAN, compose_config, compose_train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.py runs these on a GPU)"
)

METHODS = {"kl": [], "topk_auxk": ["sparsity=topk", "k=5", "model.auxk=true", "model.auxk_dead_after=100"]}
COMPARED = ("val/loss", "test/mse", "test/l0", "test/rho_hat_mean", "test/dead_fraction")


@pytest.mark.parametrize("method", list(METHODS))
def test_a_gpu_run_ends_where_the_cpu_run_ends(mnist_root, tmp_path, method):
    overrides = [*LEAN, "debug=limit", *METHODS[method]]
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
