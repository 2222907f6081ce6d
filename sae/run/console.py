"""What a command says: metric tables, and errors as one line that says what to fix.

An error the researcher can fix (a bad config value, missing data, a foreign checkpoint, a run
that diverged) is a `UserError`: the entry scripts print its message as one line, without a
traceback, and exit non-zero. In a sweep the job prints the same line and fails alone; the sweep
goes on with the others and ends with a count of the failed jobs.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from sae.names import metric_text
from sae.run.record import RunRecord

T = TypeVar("T")


def run_log_files() -> list[logging.FileHandler]:
    """The run's log files: the file handlers on the root logger (Hydra's `<job name>.log`)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_run_log(text: str, level: int = logging.INFO) -> None:
    """Write text to the run's log file only (it was said on the console another way)."""
    record = logging.LogRecord("sae", level, __file__, 0, text, None, None)
    for handler in run_log_files():
        handler.handle(record)


def report(text: str, stream=None) -> None:
    """Print text (stdout by default) and keep it in the run's log file, when there is one."""
    print(text, file=stream or sys.stdout, flush=True)
    to_run_log(text)


def tidy_library_output() -> None:
    """Quiet Lightning's noise (quiet_library_noise), and send its messages and Python warnings
    through the root logger, so that they reach the run's log file as well as the console.

    Lightning gives its loggers console handlers of their own, and stops them propagating, when
    it is imported before logging is configured (as train.py imports it, before Hydra sets up the
    job's console and `train.log`). Done only where there is a run log: elsewhere (a notebook,
    the tests) the messages stay as Lightning prints them.
    """
    quiet_library_noise()
    if not run_log_files():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


class _DropLibraryNoise(logging.Filter):
    """Lightning's lines that say nothing about the run: an advert, and accelerators this machine
    does not have ("GPU available: True, used: False" stays: it says a GPU goes unused)."""

    NOISE = ("💡 Tip:", "GPU available: False", "TPU available: False", "HPU available: False")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_library_noise() -> None:
    """Silence what Lightning prints that no user can act on; every other warning stays."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryNoise) for f in logger.filters):
            logger.addFilter(_DropLibraryNoise())
    # Lightning's own use of a torch API that torch deprecated (Lightning 2.6 on torch >= 2.10).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of metric name and value."""
    width = max(map(len, metrics), default=0)
    rows = []
    for name, value in metrics.items():
        text = metric_text(value) if isinstance(value, float) else str(value)
        rows.append(f"{name:<{width}}  {text}")
    return "\n".join(rows)


def closing_lines(folder: Path, ckpt_path: str | None = None, pending: Sequence[str] = ()) -> str:
    """What a run or an evaluation ends with: its folder and the files to open there; `pending`
    names its results still being made beside the next job (sae.run.handoff.pending_results)."""
    folder = folder.resolve()
    files = [f.name for f in (RunRecord(folder).metrics_file,) if f.is_file()]
    if files and "probes" in pending:
        files[0] += " (test/probe_accuracy*: computed beside the next job, added before the sweep ends)"
    if ckpt_path:
        path = Path(ckpt_path).resolve()
        files.append(f"{path.relative_to(folder) if path.is_relative_to(folder) else path} (tested)")
    plots = sorted(p.name for p in (folder / "plots").glob("*.png"))
    if "figures" in pending:
        files.append("plots/ (being drawn beside the next job; all written before the sweep ends)")
    elif plots:
        files.append(f"plots/ ({', '.join(plots)})")
    lines = [f"run folder: {folder}", *(f"  {f}" for f in files)]
    if (folder / "tensorboard").is_dir():
        lines.append(f"  tensorboard --logdir {folder / 'tensorboard'}")
    return "\n".join(lines)
