"""Many training runs of one architecture as one stacked model: the core of the vectorized launcher
(StackedTraining, train_group), and the module that replays a job's recorded epochs (ReplayModule).

A sweep over rho, beta, lr and seed trains small networks that leave a GPU (and a CPU's vector
units) mostly idle, one run at a time. Here the parameters of J runs are stacked along a leading
job dimension and one vmapped forward/backward trains them all. Each job keeps what a separate
`train.py` run would have: its own initialisation (the module built after seeding with its own
seed), its own batch order (its own seed), its own rho, beta and learning rate, and its own Adam
state; nothing is shared but the data tensor. So job j ends with the weights its separate run
ends with, up to float rounding (tests/test_stacked.py checks it against train.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from sae.core.captured import CapturedStep
from sae.core.loss import minimised, objective
from sae.data.mnist import BatchIndexSampler
from sae.internals import count_optimizer_steps
from sae.training.checkpoints import ARCHITECTURE
from sae.training.fit import build_data_and_module
from sae.training.module import SparseAutoencoderModule

log = logging.getLogger(__name__)

# The method's settings stacked jobs may differ in (a tensor of one value per job); they share
# the network, the loss's form and every other setting (shared_settings).
PER_JOB_SETTINGS = ("rho", "beta")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, as the module uses


def shared_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """What stacked jobs must share: the network (ARCHITECTURE), the loss's form, and the method's
    settings but the per-job ones."""
    sparsity = {k: v for k, v in hparams["sparsity"].items() if k not in PER_JOB_SETTINGS}
    shared = {k: hparams[k] for k in (*ARCHITECTURE, "recon_loss")}
    return shared | {f"sparsity.{k}": v for k, v in sparsity.items()}


class StackedTraining:
    """J SparseAutoencoderModules trained together: one vmapped step, one Adam per job.

    With `capture` (a CUDA device; the sweep's cuda_graph knob) the step of all J jobs is recorded
    once as a CUDA graph and replayed for every full batch (sae.core.captured); without, the same
    steps run eagerly through the same control flow. Adam's step count lives on the device, so
    that a replayed update reads the current one.
    """

    def __init__(
        self,
        modules: Sequence[SparseAutoencoderModule],
        device: torch.device | str = "cpu",
        capture: bool = False,
    ):
        first = shared_settings(modules[0].hparams)
        for m in modules[1:]:
            differ = [k for k, v in shared_settings(m.hparams).items() if v != first[k]]
            if differ:
                raise ValueError(f"jobs with different {', '.join(differ)} cannot be stacked")
        method = modules[0].method
        if not type(method).stacks(modules[0].hparams.sparsity):
            raise ValueError(f"sparsity={method.describe()} cannot be stacked")
        self.modules = list(modules)
        self.device = torch.device(device)
        self.recon_loss = modules[0].hparams.recon_loss
        self.method_class, self.settings = type(method), method.settings
        self.layers, self.latent_dim = list(method.layers), modules[0].hparams.latent_dim
        self.per_job = [k for k in PER_JOB_SETTINGS if hasattr(self.settings, k)]
        self.net = modules[0].net  # the function; its own weights are not used
        params, self.buffers = stack_module_state([m.net for m in modules])
        self.params = {k: p.detach().to(self.device).requires_grad_() for k, p in params.items()}
        self.buffers = {k: b.to(self.device) for k, b in self.buffers.items()}

        def column(values: list) -> Tensor:
            return torch.tensor([float(v) for v in values], device=self.device)

        self.columns = [column([getattr(m.method.settings, k) for m in modules]) for k in self.per_job]
        self.lr = column([m.hparams.lr for m in modules])
        self.exp_avg = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in self.params.items()}
        self.steps = 0
        # Adam's t, read by the (recorded) update; its bias corrections in float64, as in Python.
        self.step_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._terms = vmap(self._job_terms)
        self.recorded = CapturedStep(self._take_step, zero_grad=lambda: None, capture=capture)

    def _job_terms(self, params: dict, buffers: dict, x: Tensor, *values: Tensor) -> tuple[Tensor, Tensor]:
        """One job's minimised loss on its batch, and its terms (the module's term_names, stacked);
        `values`: the job's per-job settings (self.per_job), as 0-d tensors."""
        out = functional_call(self.net, (params, buffers), (x,))
        settings = dataclasses.replace(self.settings, **dict(zip(self.per_job, values, strict=True)))
        method = self.method_class(settings, self.layers, self.latent_dim)
        named = objective(self.recon_loss, method, out, x)
        return minimised(method, named), torch.stack(list(named.values()))

    def step(self, x: Tensor) -> Tensor:
        """One optimizer step of every job on its own batch x[j]; returns (J, 3) detached terms."""
        self.steps += 1
        return self.recorded(x).clone()  # a replay's output is overwritten by the next one

    def _take_step(self, x: Tensor) -> Tensor:
        losses, terms = self._terms(self.params, self.buffers, x, *self.columns)
        # Gradients returned, not accumulated in .grad: nothing to zero between steps.
        grads = torch.autograd.grad(losses.sum(), list(self.params.values()))  # jobs are independent
        self._adam(dict(zip(self.params, grads, strict=True)))
        return terms.detach()

    @torch.no_grad()
    def _adam(self, grads: dict[str, Tensor]) -> None:
        """torch.optim.Adam's update (single-tensor form, defaults, its step count on the device as
        when capturable), with one learning rate per job."""
        beta1, beta2 = ADAM_BETAS
        self.step_count += 1
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = (1 - beta2**self.step_count).sqrt().float()
        step_size = (self.lr / bias_correction1).float()  # (J,)
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = v.sqrt().div_(bias_correction2_sqrt).add_(ADAM_EPS)
            # p -= step_size_j * m / denom, with the per-job step size folded into denom in place
            p.addcdiv_(m, denom.div_(step_size.view(-1, *([1] * (p.dim() - 1)))), value=-1)

    def fit(self, images: Tensor, batch_size: int, seeds: Sequence[int], epochs: int, start_epoch: int = 0):
        """Train every job for `epochs` epochs over `images`, job j in the (seeds[j], epoch) order its
        separate run's MNISTDataModule uses; yields (epoch, per-step (J, 3) terms) after each epoch."""
        images = images.to(self.device)
        n, device = len(images), images.device  # index orders on the device: no copy per step
        samplers = [BatchIndexSampler(n, batch_size, shuffle=True, seed=s, device=device) for s in seeds]
        for epoch in range(start_epoch, start_epoch + epochs):
            for sampler in samplers:
                sampler.set_epoch(epoch)
            terms = [self.step(images[torch.stack(idx)]) for idx in zip(*samplers, strict=True)]
            yield epoch, torch.stack(terms)

    def job_state(self, j: int) -> tuple[dict[str, Tensor], dict]:
        """Job j's network weights (SparseAutoencoder state_dict) and its Adam state in the format of
        a torch.optim.Adam over its module's parameters, as a separate run's checkpoint holds them;
        copies on the CPU."""
        weights = {name: p[j].detach().cpu().clone() for name, p in self.params.items()}
        weights |= {name: b[j].detach().cpu().clone() for name, b in self.buffers.items()}
        names = list(self.params)
        state = {
            i: {
                "step": torch.tensor(float(self.steps)),
                "exp_avg": self.exp_avg[n][j].detach().cpu().clone(),
                "exp_avg_sq": self.exp_avg_sq[n][j].detach().cpu().clone(),
            }
            for i, n in enumerate(names)
        }
        reference = torch.optim.Adam(self.modules[j].parameters(), lr=float(self.lr[j])).state_dict()
        return weights, {"state": state, "param_groups": reference["param_groups"]}

    def unstack(self) -> None:
        """Copy each job's weights into its module (and its Adam state to module.stacked_optimizer_state)."""
        for j, module in enumerate(self.modules):
            weights, optimizer_state = self.job_state(j)
            module.net.load_state_dict(weights)
            module.stacked_optimizer_state = optimizer_state


@dataclass
class JobRecord:
    """What the stacked phase leaves for one job: per-epoch (steps, 3) loss terms, and weights and
    Adam state at each epoch end."""

    terms: list[Tensor] = field(default_factory=list)
    weights: list[dict[str, Tensor]] = field(default_factory=list)
    optimizer_states: list[dict] = field(default_factory=list)
    stacked_seconds: float = 0.0
    stacked_jobs: int = 1

    def attach(self, module: SparseAutoencoderModule, datamodule: L.LightningDataModule) -> ReplayModule:
        """The replaying stand-in for `module` (same hyperparameters and initial weights); the data
        module then serves one training item per epoch."""
        replay = ReplayModule(**module.hparams)
        replay.record = self
        replay.load_state_dict(module.state_dict())
        datamodule.train_dataloader = lambda: [0]  # one training call per epoch; validation as usual
        return replay


class ReplayModule(SparseAutoencoderModule):
    """A SparseAutoencoderModule whose training epochs are replayed from a JobRecord.

    Each epoch is one training call: it feeds the epoch's recorded per-step terms through the
    module's own window logging and divergence check (one optimizer step at a time, so the step
    counter, the train/* windows and a NaN's step are those of the run it stands for), then loads
    the epoch-end weights and Adam state. Validation, checkpoints and everything after are the
    module's and Lightning's own.
    """

    record: JobRecord  # set by JobRecord.attach (not a constructor argument: not a hyperparameter)

    def training_step(self, batch, batch_idx: int) -> None:
        epoch = self.current_epoch
        written = None
        for terms in self.record.terms[epoch].to(self.device):
            count_optimizer_steps(self.trainer, 1)  # the optimizer step this row was recorded at
            if (mean_loss := self._after_step(terms)) is not None:
                written = mean_loss
        self._end_call(written)
        self.net.load_state_dict(self.record.weights[epoch])
        self.optimizers().optimizer.load_state_dict(self.record.optimizer_states[epoch])


def stacked_device(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")


def train_group(cfgs: list[DictConfig]) -> list[JobRecord]:
    """Train the jobs of one group as one stacked model; their records, in order."""
    start = time.perf_counter()
    built = [build_data_and_module(cfg) for cfg in cfgs]  # as train(cfg) builds them
    datamodule = built[0][0]
    device = stacked_device(cfgs[0])
    capture = device.type == "cuda" and bool(cfgs[0].get("cuda_graph", True))
    stacked = StackedTraining([m for _, m in built], device, capture=capture)
    records = [JobRecord(stacked_jobs=len(cfgs)) for _ in cfgs]
    seeds = [cfg.seed for cfg in cfgs]
    images = datamodule.split("train")[0]
    for epoch, terms in stacked.fit(images, cfgs[0].batch_size, seeds, cfgs[0].epochs):
        terms = terms.cpu()
        for j, record in enumerate(records):
            weights, optimizer_state = stacked.job_state(j)
            record.terms.append(terms[:, j])
            record.weights.append(weights)
            record.optimizer_states.append(optimizer_state)
        seconds = time.perf_counter() - start
        log.info(f"stacked {len(cfgs)} jobs: epoch {epoch + 1}/{cfgs[0].epochs} ({seconds:.1f} s)")
    for record in records:
        record.stacked_seconds = time.perf_counter() - start
    return records
