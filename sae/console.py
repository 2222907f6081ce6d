"""What a command says: metric tables, and errors as one line that says what to fix.

An error the researcher can fix (a bad config value, missing data, a foreign checkpoint, a run
that diverged) is a `UserError`: the entry scripts print its message as one line, without a
traceback, and exit non-zero. In a sweep the error is re-raised instead, so that Hydra marks
the job failed and the sweep goes on with the others.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """An error whose message names the key, value or file at fault and the fix."""

    kind = "error"  # the word the one-line report starts with


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line, for errors reported without a traceback."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of metric name and value."""
    width = max(map(len, metrics), default=0)
    rows = []
    for name, value in metrics.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append(f"{name:<{width}}  {shown}")
    return "\n".join(rows)


def run_command(command: Callable[[], T]) -> T:
    """Run an entry script's work; a UserError (or a config object Hydra cannot build) exits with
    one line, SIGTERM (preemption, scancel) with 143 after the interrupted run has saved itself.
    Inside a multirun the error is raised on, for Hydra to mark the job failed."""
    from hydra.errors import InstantiationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return command()
    except SIGTERMException:  # SaveOnInterrupt has written last.ckpt and said how to resume
        sys.exit(128 + signal.SIGTERM)
    except (UserError, InstantiationException) as err:
        if _in_multirun():
            raise  # Hydra records the job as failed and the sweep goes on with the others
        kind = err.kind if isinstance(err, UserError) else "config error"
        sys.exit(f"{kind}: {one_line(err, limit=400)}")


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
