"""Hydra finds launchers in the hydra_plugins namespace; the work is in sae.vectorized.

Hydra imports every hydra_plugins module when it starts, in any Hydra application of the
environment, so this one stays light: torch and the project are imported only to launch.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class VectorizedLauncher(Launcher):
    """hydra/launcher=vectorized: jobs that differ only in rho, beta, lr and seed train as one model."""

    def __init__(self) -> None:
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sae.vectorized import launch

        return launch(self.hydra_context, self.task_function, self.config, job_overrides, initial_job_idx)
