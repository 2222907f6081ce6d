"""hydra/launcher=vectorized is a Hydra launcher like any other: Hydra's own conformance suites for
launcher plugins (the ones its basic and joblib launchers pass), on applications that are not this
project's, whose jobs it cannot stack and so runs as the basic launcher would."""

import hydra.version
import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.version import VersionBase

from hydra_plugins.sae_vectorized_launcher.vectorized_launcher import VectorizedLauncher


@pytest.fixture(autouse=True)
def hydra_default_version_base():
    """The suites' applications leave version_base unset (Hydra 1.1 behaviour: jobs run in their own
    folder); the other tests compose with version_base 1.3, which Hydra keeps process-wide. (Hydra's
    hydra_restore_singletons fixture, which the suites use, puts it back afterwards.)"""
    VersionBase.instance().setbase(hydra.version.__compat_version__)


def test_hydra_discovers_the_launcher():
    assert VectorizedLauncher.__name__ in [p.__name__ for p in Plugins.instance().discover(Launcher)]


DISCOVER = """
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
print(" ".join(sorted(p.__module__ for p in Plugins.instance().discover(Launcher))))
"""


def test_another_application_finds_the_launchers_of_the_installed_package(tmp_path):
    """Outside the checkout and without PYTHONPATH (pytest puts the checkout on its own sys.path,
    not on a subprocess's): what any other Hydra application on this environment sees."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", DISCOVER], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    found = proc.stdout.split()
    assert "hydra_plugins.sae_vectorized_launcher.vectorized_launcher" in found, proc.stderr
    assert "hydra_plugins.sae_submitit_launchers.submitit_launchers" in found, proc.stderr


@pytest.mark.parametrize("launcher_name, overrides", [("vectorized", [])])
class TestVectorizedLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "launcher_name, overrides", [("vectorized", ["hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])]
)
class TestVectorizedLauncherBatched(BatchedSweeperTestSuite):
    pass


@pytest.mark.slow  # each case starts a Hydra application as a subprocess
@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [
        (
            {},
            [
                "-m",
                "hydra/job_logging=hydra_debug",
                "hydra/job_logging=disabled",
                "hydra/launcher=vectorized",
            ],
        )
    ],
)
class TestVectorizedLauncherIntegration(IntegrationTestSuite):
    """Run from a scratch folder, as other applications run, with no PYTHONPATH: the launcher is
    found because the installed package exposes it (README's `pip install -e ".[dev,sweep]"`)."""
