"""How an entry script runs: a UserError or a config Hydra cannot compose becomes one line and
exit 1 for a run; in a sweep one line, the traceback in the job's log, and the sweep goes on."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from sae.errors import JobFailed, UserError, did_you_mean, one_line
from sae.internals import end_process
from sae.run.atomic import cannot_write_message
from sae.run.console import report, to_run_log
from sae.run.folder import locked_folders, made_here, remove_if_only_begun
from sae.run.record import RunRecord

T = TypeVar("T")


def run_command(command: Callable[[], T]) -> T | JobFailed:
    """Run an entry script's work; a UserError (or a config object Hydra cannot build, or a setting
    Lightning refuses) exits with one line, SIGTERM (preemption, scancel) with 143 after the
    interrupted run has saved itself.

    In a sweep the job instead prints one line, keeps the traceback in its log file, and returns
    JobFailed: Hydra would print every failure's traceback and stop the sweep at the first batch
    with one. Other exceptions (bugs) are raised as they are, traceback and all.
    """
    try:
        return command()
    except BaseException as err:
        if _stopped_by_sigterm(err):  # SaveOnInterrupt has written last.ckpt and said how to resume
            sys.exit(128 + signal.SIGTERM)
        if not _said_in_one_line(err):
            raise
        kind = err.kind if isinstance(err, UserError) else "config error"
        line = one_line(err, limit=400)
        if not in_multirun():
            # A command refused on its config leaves no run folder behind, and writes nothing
            # into a folder that was there before (another run's); a run that failed later says
            # so in its folder, and its log keeps the line (sys.exit prints it).
            if not (kind == "config error" and _leave_nothing_behind()):
                _record_failure(f"{kind}: {line}")
                to_run_log(f"{kind}: {line}", logging.ERROR)
            sys.exit(f"{kind}: {line}")
        job = _job()
        _append_traceback(Path(job.runtime.output_dir) / f"{job.job.name}.log", err)
        overrides = " ".join(job.overrides.task)
        report(f"job {job.job.num} ({overrides}) failed: {kind}: {line}", stream=sys.stderr)
        return JobFailed(line)


def _lightning_error(err: BaseException, module: str, name: str) -> bool:
    """Whether err is Lightning's exception `name`; never true while Lightning is not loaded (a
    config error is answered before it is), so it is not imported for the question."""
    return module in sys.modules and isinstance(err, getattr(sys.modules[module], name))


def _stopped_by_sigterm(err: BaseException) -> bool:
    return _lightning_error(err, "lightning.pytorch.utilities.exceptions", "SIGTERMException")


def _said_in_one_line(err: BaseException) -> bool:
    """A UserError, a config object Hydra cannot build, or a setting Lightning refuses (its
    MisconfigurationException names the setting in its message)."""
    from hydra.errors import InstantiationException

    return isinstance(err, UserError | InstantiationException) or _lightning_error(
        err, "lightning.fabric.utilities.exceptions", "MisconfigurationException"
    )


def _leave_nothing_behind() -> bool:
    """For a refused command: remove the run folder Hydra made for it if it holds nothing but
    Hydra's start; whether that, or the folder was there before it (left as it was)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    folder = Path(HydraConfig.get().runtime.output_dir)
    return folder.is_dir() and (not made_here(folder) or remove_if_only_begun(folder))


def _record_failure(line: str) -> None:
    """status.json in the run folder Hydra made, as a sweep job's: failed, and the line."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        folder = Path(HydraConfig.get().runtime.output_dir)
        if folder.is_dir():
            try:
                RunRecord(folder).failed(line)
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


def in_multirun() -> bool:
    """Whether this process runs a job of a sweep (`-m`, or a preset that sets hydra.mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_app(main: Callable[[], Any], config_name: str) -> NoReturn:
    """Run a Hydra entry point (see _run_app), then end the process (sae.internals.end_process:
    without the interpreter's teardown of torch and Lightning, once their work is done)."""
    try:
        _run_app(main, config_name)
    except SystemExit as done:
        end_process(done.code)
    end_process(0)


def _run_app(main: Callable[[], Any], config_name: str) -> None:
    """Run a Hydra entry point (train.py, evaluate.py) so that a command Hydra cannot compose (a
    key no config has, `bta=0.1`; an option no group has, `sparsity=l2`; a malformed override)
    ends in one line naming it and the nearest known name, instead of Hydra's several lines.

    Hydra prints such errors itself unless HYDRA_FULL_ERROR=1, when it raises them: set here, so
    they come back to be said in one line. A user who sets HYDRA_FULL_ERROR=1 gets Hydra's report.
    A run folder Hydra cannot write (a full disk, a read-only folder) is one line too.
    """
    from hydra.errors import HydraException

    if sys.argv[1:] in (["--help"], ["-h"]) and (text := _plain_help(config_name)) is not None:
        print(text)
        return
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


def _plain_help(config_name: str) -> str | None:
    """`--help` alone, read from conf/<config_name>.yaml's hydra.help.template when it is plain text
    (no $ fields for Hydra to fill): what Hydra prints, without composing every config group's
    options for fields the text does not use (a second and more). None: let Hydra print it."""
    from omegaconf import OmegaConf

    from sae.config import CONF_DIR

    config = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    template = OmegaConf.select(config, "hydra.help.template", default=None)
    return template if isinstance(template, str) and "$" not in template else None


def _run_folder() -> str:
    """The run or sweep folder this process locked as it started (Hydra's callback, before Hydra
    writes .hydra/ into it), or the current folder."""
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
        from sae.config import TRAINER_ARGUMENTS

        if key.startswith("trainer.") and key.split(".", 1)[1] in TRAINER_ARGUMENTS:
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
    from sae.config import CONF_DIR

    conf = CONF_DIR
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name), resolve=False)

    def keys(node: Any, prefix: str = "") -> list[str]:
        if not isinstance(node, dict):
            return [prefix[:-1]]
        return [prefix[:-1]] * bool(prefix) + [
            k for key, v in node.items() for k in keys(v, f"{prefix}{key}.")
        ]

    return keys(cfg)
