"""What a command says: metric tables, and errors as one line that says what to fix.

An error the researcher can fix (a bad config value, missing data, a foreign checkpoint, a run
that diverged) is a `UserError`: the entry scripts print its message as one line, without a
traceback, and exit non-zero. In a sweep the job prints the same line and fails alone; the sweep
goes on with the others and ends with a count of the failed jobs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """An error whose message names the key, value or file at fault and the fix."""

    kind = "error"  # the word the one-line report starts with


def disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC itself, or a writer's own error (torch.save's 'file write failed') on a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def cannot_write_message(path: Path, err: BaseException) -> str:
    if disk_full(err, path.parent if path.parent.exists() else Path("/")):
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        return f"cannot write {path}: the disk is full{free}; free some space, or write elsewhere"
    code = getattr(err, "errno", None)
    reason = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(code)
    reason = reason or getattr(err, "strerror", None) or str(err)
    return f"cannot write {path}: {reason}; write elsewhere (another run folder) or fix its permissions"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """ "; did you mean X?" for the known name nearest to name, or ""."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def trainer_arguments() -> list[str]:
    """The arguments Lightning's Trainer takes (what `trainer.*` keys may be)."""
    import inspect

    from lightning.pytorch import Trainer

    return [name for name in inspect.signature(Trainer).parameters if name != "self"]


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message folded onto one line, for errors reported without a traceback."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append(f"{name:<{width}}  {shown}")
    return "\n".join(rows)


def closing_lines(folder: Path, ckpt_path: str | None = None) -> str:
    """What a run or an evaluation ends with: its folder and the files to open there."""
    from sae.background import pending_results  # sae.background reports through this module

    folder = folder.resolve()
    pending = pending_results(folder)
    files = [name for name in ("metrics.json",) if (folder / name).is_file()]
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


@dataclass
class JobFailed:
    """What a sweep job whose error the user can fix returns instead of raising: the sweep goes on,
    sae.sweep marks the job failed with `error`, and the sweep ends with a count of failures."""

    error: str

    def __str__(self) -> str:  # what a sweeper that expects a number (Optuna) reports
        return f"failed: {self.error}"


def run_command(command: Callable[[], T]) -> T | JobFailed:
    """Run an entry script's work; a UserError (or a config object Hydra cannot build, or a setting
    Lightning refuses) exits with one line, SIGTERM (preemption, scancel) with 143 after the
    interrupted run has saved itself.

    In a sweep the job instead prints one line, keeps the traceback in its log file, and returns
    JobFailed: Hydra would print every failure's traceback and stop the sweep at the first batch
    with one. Other exceptions (bugs) are raised as they are, traceback and all.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return command()
    except SIGTERMException:  # SaveOnInterrupt has written last.ckpt and said how to resume
        sys.exit(128 + signal.SIGTERM)
    except (UserError, InstantiationException, MisconfigurationException) as err:
        # Lightning's MisconfigurationException: a setting it refuses, named in its message.
        kind = err.kind if isinstance(err, UserError) else "config error"
        line = one_line(err, limit=400)
        if not _in_multirun():
            _record_failure(f"{kind}: {line}")
            to_run_log(f"{kind}: {line}", logging.ERROR)  # the log keeps it too; sys.exit prints it
            sys.exit(f"{kind}: {line}")
        job = _job()
        _append_traceback(Path(job.runtime.output_dir) / f"{job.job.name}.log", err)
        overrides = " ".join(job.overrides.task)
        report(f"job {job.job.num} ({overrides}) failed: {kind}: {line}", stream=sys.stderr)
        return JobFailed(line)


def _record_failure(line: str) -> None:
    """status.json in the run folder Hydra made, as a sweep job's: failed, and the line."""
    from hydra.core.hydra_config import HydraConfig

    from sae.run_folder import record_status

    if HydraConfig.initialized():
        folder = Path(HydraConfig.get().runtime.output_dir)
        if folder.is_dir():
            try:
                record_status(folder, "failed", line)
            except OSError:
                pass  # e.g. the folder cannot be written: the line itself says so


def _job():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get()


def _append_traceback(log_file: Path, err: BaseException) -> None:
    try:
        with open(log_file, "a") as f:
            f.write("".join(traceback.format_exception(err)))
    except OSError:
        pass  # the one line has been printed; the log is a convenience


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_app(main: Callable[[], Any], config_name: str) -> None:
    """Run a Hydra entry point (train.py, evaluate.py) so that a command Hydra cannot compose (a
    key no config has, `bta=0.1`; an option no group has, `sparsity=l2`; a malformed override)
    ends in one line naming it and the nearest known name, instead of Hydra's several lines.

    Hydra prints such errors itself unless HYDRA_FULL_ERROR=1, when it raises them: set here, so
    they come back to be said in one line. A user who sets HYDRA_FULL_ERROR=1 gets Hydra's report.
    A run folder Hydra cannot write (a full disk, a read-only folder) is one line too.
    """
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except HydraException as err:
        sys.exit(f"config error: {hydra_error_line(err, config_name)}")
    except OSError as err:  # Hydra writing the run folder's .hydra/ or log: a full disk, a read-only folder
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        sys.exit(f"error: {cannot_write_message(Path(err.filename or _run_folder()), err)}")


def _run_folder() -> str:
    """The run or sweep folder this process locked as it started (Hydra's callback, before Hydra
    writes .hydra/ into it), or the current folder."""
    from sae.run_folder import locked_folders

    folders = locked_folders()
    return str(folders[-1]) if folders else os.getcwd()


def hydra_error_line(err: BaseException, config_name: str) -> str:
    """One line for an error Hydra raised composing the command's config."""
    from hydra.errors import MissingConfigException, OverrideParseException

    app = f"{config_name}.py"
    if isinstance(err, OverrideParseException):
        return f"cannot read the override {err.override!r}: {one_line(err.message).split(' See https')[0]}"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = sorted(err.options)
        near = did_you_mean(option, options)
        return f"{group}={option}: no such option; {group} is one of {', '.join(options)}{near}"
    found = re.match(r"Could not (?:override|append to config\. An item is already at) '([^']+)'", str(err))
    if found and "not in struct" in str(err.__cause__ or ""):
        key = found.group(1)
        known = _config_keys(config_name)
        if key.startswith("trainer.") and key.split(".", 1)[1] in trainer_arguments():
            return f"{key} is not set in conf/{config_name}.yaml: add it with +{key}=..."
        hint = did_you_mean(key, known) or f"; `python {app} --cfg job` lists every setting"
        return f"{key} is not a setting of {app}{hint}"
    cause = f" ({one_line(err.__cause__)})" if err.__cause__ is not None else ""
    return one_line(err, limit=300) + cause


def _config_keys(config_name: str) -> list[str]:
    """Every dotted key of conf/<config_name>.yaml as composed with no overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name), resolve=False)

    def keys(node: Any, prefix: str = "") -> list[str]:
        if not isinstance(node, dict):
            return [prefix[:-1]]
        return [prefix[:-1]] * bool(prefix) + [
            k for key, v in node.items() for k in keys(v, f"{prefix}{key}.")
        ]

    return keys(cfg)
