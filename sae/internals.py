"""Every use of a Lightning (or torch, Hydra, CPython) attribute that is not public API, behind
named functions.

Exact resume, the stacked sweep, TensorBoard's HParams entry, a sweep that outlives its jobs and
checkpoints read as input need things the public APIs do not offer; a release that moves one
of them must fail loudly here, naming it, instead of silently training or resuming wrong.
tests/test_lightning_internals.py exercises each against the installed releases, and
pyproject.toml pins lightning and torch to the releases that suite was run with.

| function                     | reaches                                                              |
| ---------------------------- | -------------------------------------------------------------------- |
| count_optimizer_steps        | trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress   |
| batches_trained_this_epoch   | trainer.fit_loop.epoch_loop.batch_progress.current.completed          |
| tensorboard_file_writer      | torch.utils.tensorboard.SummaryWriter._get_file_writer()             |
| guard_checkpoint_restore     | trainer._checkpoint_connector (its two restore methods)              |
| failed_job_error             | hydra.core.utils.JobReturn._return_value (a failed job's exception)  |
| submitit_cluster             | hydra-submitit's launcher class attribute _EXECUTOR ("local", "slurm") |
| is_rank_zero                 | lightning.fabric.utilities.rank_zero._get_rank's environment keys     |
| end_process                  | CPython's threading._shutdown and atexit._run_exitfuncs               |

Why each is needed:
- The vectorized launcher replays a job's recorded steps without taking them (sae.sweep.stacked);
  Lightning's step count (`global_step`, which checkpoints, logging and max_steps read) then has
  to be advanced here.
- A checkpoint written mid-epoch records how many of the epoch's training calls completed, so
  that the resumed epoch skips exactly those (sae.data.mnist.TensorBatches).
- TensorBoard's HParams entry is written without the placeholder metric values that the public
  `log_hyperparams` / `add_hparams` would write as scalars.
- A sweep survives a job that died (sae.sweep.launchers): its outcome is read without re-raising
  the job's exception (JobReturn.return_value raises it), and the executor kind of hydra-submitit's
  launcher names the scheduler in what the sweep says and records.
- A run folder is locked by rank 0 of a DDP run only, as Hydra starts and before Lightning is
  imported (a config error is answered without it): the rank is read from the environment
  variables Lightning's own `_get_rank` reads, in its order.
- An entry script that has done its work ends without the interpreter's teardown of every loaded
  module, slow once torch and Lightning are loaded (docs/performance.md): it does what the
  interpreter does first at exit (joins the threads, runs the exit handlers, which close the
  logs) through CPython's own functions for it, flushes the streams, and leaves.
- A checkpoint is input: what Lightning restores from it (callbacks' and loops' state) is checked
  beforehand where the project can (sae.training.checkpoints.check_training_state); an error Lightning
  still meets while restoring it is reported as the file's, in one line, not as a traceback.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # annotations only: the launchers import this module when Hydra starts
    import lightning as L


class LightningInternalsMoved(RuntimeError):
    """An attribute this project reads inside Lightning or torch is gone: a release changed it."""


def _moved(path: str, err: Exception) -> LightningInternalsMoved:
    return LightningInternalsMoved(
        f"{path} is not where sae/internals.py expects it ({type(err).__name__}: {err}); "
        f"this lightning/torch release is not one the project was tested with: install the versions "
        f"pinned in pyproject.toml, or update sae/internals.py"
    )


def count_optimizer_steps(trainer: L.Trainer, n: int) -> None:
    """Advance trainer.global_step by n optimizer steps taken outside Lightning's optimizer wrapper."""
    try:
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_by(n)
    except AttributeError as err:
        raise _moved("trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress", err) from err


def batches_trained_this_epoch(trainer: L.Trainer) -> int:
    """Training calls (items of the training loader) of the current epoch that have completed."""
    try:
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
    except AttributeError as err:
        raise _moved("trainer.fit_loop.epoch_loop.batch_progress.current.completed", err) from err


def tensorboard_file_writer(writer: Any) -> Any:
    """The event-file writer behind a torch SummaryWriter (e.g. TensorBoardLogger.experiment),
    which takes raw Summary protos such as the HParams plugin's."""
    try:
        return writer._get_file_writer()
    except AttributeError as err:
        raise _moved("torch.utils.tensorboard.SummaryWriter._get_file_writer", err) from err


# Errors Lightning raises while restoring state from a checkpoint whose content it does not expect.
RESTORE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


def guard_checkpoint_restore(trainer: L.Trainer, refuse: Callable[[str, BaseException], Exception]) -> None:
    """Make an error Lightning raises while restoring a checkpoint (at fit or test) into
    refuse(path, error), raised instead; an error that is already a one-line one (it has a `kind`)
    passes as it is."""
    try:
        connector = trainer._checkpoint_connector
        methods = {
            name: getattr(connector, name)
            for name in ("_restore_modules_and_callbacks", "restore_training_state")
        }
    except AttributeError as err:
        raise _moved("trainer._checkpoint_connector._restore_modules_and_callbacks", err) from err

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        def restore(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except RESTORE_ERRORS as err:
                if hasattr(err, "kind"):
                    raise
                path = args[0] if args else kwargs.get("checkpoint_path")
                raise refuse(
                    str(path or getattr(trainer, "ckpt_path", None) or "the checkpoint"), err
                ) from err

        return restore

    for name, method in methods.items():
        setattr(connector, name, guarded(method))


def failed_job_error(job_return: Any) -> BaseException | None:
    """A failed Hydra job's exception, read without raising it (JobReturn.return_value re-raises)."""
    try:
        return job_return._return_value
    except AttributeError as err:
        raise _moved("hydra.core.utils.JobReturn._return_value", err) from err


def submitit_cluster(launcher: Any) -> str:
    """The submitit executor kind ("local", "slurm") of a hydra-submitit launcher."""
    try:
        return str(type(launcher)._EXECUTOR)
    except AttributeError as err:
        raise _moved("hydra_plugins.hydra_submitit_launcher BaseSubmititLauncher._EXECUTOR", err) from err


# The environment variables Lightning reads a process's rank from, in its order.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (the only one of a single-process run): Lightning's own
    `rank_zero_only.rank` once Lightning is loaded (a DDP strategy sets it as it starts), before
    that what Lightning would read from the environment, without importing it."""
    loaded = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if loaded is not None:
        return getattr(loaded.rank_zero_only, "rank", 0) == 0
    rank = next((os.environ[key] for key in RANK_VARIABLES if key in os.environ), "0")
    return int(rank) == 0


def end_process(code: int | str | None) -> NoReturn:
    """Exit as sys.exit(code) does (a str is printed to stderr, status 1), but without tearing
    down every loaded module when torch is loaded: the threads are joined and the exit handlers
    run as at any exit (logs and event files closed, child processes waited for), the streams
    are flushed, and the process ends."""
    if "torch" not in sys.modules:  # little to tear down: the ordinary exit
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("a message")
        print(code, file=sys.stderr)
        code = 1
    try:
        shutdown, run_exit_handlers = threading._shutdown, atexit._run_exitfuncs
    except AttributeError as err:
        raise _moved("threading._shutdown / atexit._run_exitfuncs", err) from err
    shutdown()  # waits for the threads that are not daemons, as the interpreter does first
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            pass
    os._exit(code)
