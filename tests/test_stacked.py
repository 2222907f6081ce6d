"""Stacked training (the vectorized launcher's core) against separate train.py runs."""

import pytest
import torch

from sae.sweep.stacked import StackedTraining
from sae.training.fit import build_data_and_module, train
from tests.conftest import compose_train

# Jobs that differ in everything a sweep varies but the architecture.
JOBS = [
    {"rho": 0.05, "beta": 5e-3, "lr": 1e-3, "seed": 0},
    {"rho": 0.1, "beta": 0.05, "lr": 3e-3, "seed": 1},
    {"rho": 0.02, "beta": 0.0, "lr": 1e-2, "seed": 2},
]


def job_config(job, tmp_path, mnist_root, name, method=()):
    quick = ["epochs=2", "logger=none", "~callbacks.run_figures", "~callbacks.linear_probe"]
    overrides = [f"{k}={v}" for k, v in job.items()] + quick + list(method)
    return compose_train(overrides, tmp_path / name, mnist_root)


# Each sparsity method, and how many training terms it logs (loss, mse, its own).
# JumpReLU's output jumps by its threshold (0.1) where an input crosses it: a last-bit difference
# between the stacked and the separate matrix products there moves a weight by up to about 3e-4 in
# these 20 steps (measured 2026-12-04), so its weights are compared to 2e-3.
TOLERANCE = {"jumprelu": 2e-3}
METHODS = {
    "kl": ([], 3),
    "l1": (["sparsity=l1"], 3),
    "topk": (["sparsity=topk", "k=5"], 2),
    "batchtopk": (["sparsity=batchtopk", "k=5"], 2),
    "jumprelu": (["sparsity=jumprelu"], 3),  # each job its own beta
    "wta": (["sparsity=wta"], 2),  # each unit's winners over the job's own batch
}


@pytest.mark.parametrize("method", list(METHODS))
def test_stacked_jobs_end_with_the_weights_of_separate_runs(mnist_root, tmp_path, method):
    overrides, num_terms = METHODS[method]
    atol = TOLERANCE.get(method, 1e-4)
    separate = []
    for i, job in enumerate(JOBS):
        cfg = job_config(job, tmp_path, mnist_root, f"run{i}", overrides)
        train(cfg)
        ckpt = torch.load(tmp_path / f"run{i}" / "checkpoints" / "last.ckpt", weights_only=True)
        separate.append(ckpt)

    built = [
        build_data_and_module(job_config(job, tmp_path, mnist_root, f"s{i}", overrides))
        for i, job in enumerate(JOBS)
    ]
    datamodule = built[0][0]
    datamodule.setup("fit")
    modules = [m for _, m in built]
    stacked = StackedTraining(modules)
    cfg = job_config(JOBS[0], tmp_path, mnist_root, "s", overrides)
    epochs = list(stacked.fit(datamodule.split("train")[0], cfg.batch_size, [j["seed"] for j in JOBS], 2))
    assert [e for e, _ in epochs] == [0, 1] and epochs[0][1].shape == (10, 3, num_terms)  # steps, jobs, terms
    # Through the recorded step's control flow (capture off on a CPU): warm-up steps, then replays.
    recorded = stacked.recorded
    assert recorded.eager_steps >= 3 and recorded.replays > 0 and recorded.graph is None
    assert recorded.eager_steps + recorded.replays == stacked.steps == 20
    stacked.unstack()

    for job, module, ckpt in zip(JOBS, modules, separate, strict=True):
        for name, value in module.state_dict().items():
            if name.startswith("net.") and not name.endswith(".threshold"):  # BatchTopK's: set by evaluation
                torch.testing.assert_close(value, ckpt["state_dict"][name], rtol=0, atol=atol, msg=name)
        adam = module.stacked_optimizer_state
        saved = ckpt["optimizer_states"][0]
        assert adam["param_groups"][0]["lr"] == pytest.approx(job["lr"])
        assert float(adam["state"][0]["step"]) == float(saved["state"][0]["step"]) == 20
        ours, theirs = adam["state"][0]["exp_avg"], saved["state"][0]["exp_avg"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_jobs_of_another_architecture_are_refused(mnist_root, tmp_path):
    a = build_data_and_module(job_config(JOBS[0], tmp_path, mnist_root, "a"))[1]
    b = build_data_and_module(compose_train(["latent_dim=16"], tmp_path / "b", mnist_root))[1]
    with pytest.raises(ValueError, match="different latent_dim cannot be stacked"):
        StackedTraining([a, b])


def test_the_vectorized_launcher_groups_jobs_by_their_composed_configs(mnist_root, tmp_path):
    """Jobs stack when their composed configs differ only in rho, beta, lr and seed, whatever the
    command line says: the frontier's KL points stack, each k of TopK is its own group."""
    from sae.sweep.vectorized import group_key, stackable

    def config(*overrides):
        return compose_train(list(overrides), tmp_path, mnist_root)

    def key(*overrides):
        return group_key(config(*overrides))

    kl = key("+point=kl_beta1e-3_rho5e-2", "seed=0")
    assert kl == key("+point=kl_beta2e-2_rho2e-2", "seed=1") == key("beta=0.3", "lr=3e-3")
    l1 = key("+point=l1_beta1e-4")
    assert l1 == key("+point=l1_beta3e-4", "seed=1") and l1 != kl
    assert key("+point=topk_k04", "seed=1") == key("sparsity=topk", "k=4") != key("+point=topk_k08")
    assert key("latent_dim=16") != kl and key("epochs=3") != kl
    # AuxK keeps a counter per run: such jobs run one at a time.
    assert stackable(config("sparsity=topk", "k=4"))
    assert not stackable(config("sparsity=topk", "k=4", "model.sparsity.auxk=true"))


def test_a_stacked_job_reports_its_share_of_the_group_fit(mnist_root, tmp_path):
    """fit/seconds of a job replayed from a stacked fit: its share of the group's time (the time
    over the jobs) plus its own; the group's whole time under its own name."""

    class GroupOfFour:  # a replay that leaves training to the module: only its record is read
        stacked_seconds, stacked_jobs = 1000.0, 4

        def attach(self, module, datamodule):
            return module

    cfg = job_config(JOBS[0], tmp_path, mnist_root, "job")
    metrics = train(cfg, replay=GroupOfFour())
    assert metrics["fit/stacked_seconds"] == 1000.0 and metrics["fit/stacked_jobs"] == 4
    assert 250.0 < metrics["fit/seconds"] < 250.0 + 120  # its quarter, plus its own seconds of training
