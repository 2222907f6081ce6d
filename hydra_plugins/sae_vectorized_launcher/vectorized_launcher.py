"""Hydra finds launchers in the hydra_plugins namespace; the work is in sae.sweep.vectorized.

Hydra imports every hydra_plugins module when it starts, in any Hydra application of the
environment, so this one stays light: torch and the project are imported only to launch. The
launcher's config is registered here, in Hydra's ConfigStore, so that any application (not only
this project's train.py) can select it with `hydra/launcher=vectorized`; applications it cannot
stack run as Hydra's basic launcher runs them.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules without registering them
# in sys.modules, and dataclasses then cannot resolve string annotations.
from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class VectorizedLauncherConf:
    """hydra/launcher=vectorized: jobs of a sweep that differ only in rho, beta, lr and seed train
    as one stacked model in this process; each job's folder then ends up as a separate run's would
    (sae/sweep/vectorized.py)."""

    _target_: str = "hydra_plugins.sae_vectorized_launcher.vectorized_launcher.VectorizedLauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf, provider="sae"
)


class VectorizedLauncher(Launcher):
    """hydra/launcher=vectorized: jobs that differ only in rho, beta, lr and seed train as one model."""

    def __init__(self) -> None:
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sae.sweep.vectorized import launch

        return launch(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx)
