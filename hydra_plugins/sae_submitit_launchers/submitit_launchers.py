"""Hydra finds launchers in the hydra_plugins namespace; the work is in sae.sweep.launchers.

Hydra imports every hydra_plugins module when it starts: without the sweep extra (no
hydra-submitit-launcher) this module defines nothing rather than warn at every start.
"""

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hydra_submitit

    from sae.sweep import launchers
except ImportError:  # the sweep extra is not installed
    hydra_submitit = None

if hydra_submitit is not None:

    class SlurmLauncher(launchers.SweepOutlivesJobs, hydra_submitit.SlurmLauncher):
        """Hydra's submitit SLURM launcher; a job that died is recorded as failed, the sweep goes on."""

    class LocalLauncher(launchers.SweepOutlivesJobs, hydra_submitit.LocalLauncher):
        """Hydra's submitit local launcher; a job that died is recorded as failed, the sweep goes on."""
