"""Work a sweep job hands off instead of waiting for: its figures and its probes, done in one
worker process while the next job of the sweep trains.

Only where more jobs follow in this process (a multirun with Hydra's basic launcher or the
vectorized launcher): a single run, evaluate.py, and jobs that run in processes of their own
(joblib, submitit) do the work at once, as before. A hand-off's result comes back to this
process, where `then(result)` records it (e.g. a metric into the job's metrics.json): after each
job for the hand-offs done by then (`collect_finished`), and at the sweep's end for all of them
(`wait_for_hand_offs`, before the summary is written), or at the process's exit. A hand-off that
fails is reported there, naming its label, and the sweep goes on.

A hand-off made for a run's result (`result_of=(run folder, "probes")`) is promised in the run's
status.json: the run says "incomplete" until every such result is recorded (sae.run.record). A
worker that dies (the kernel's OOM killer, a kill) loses nothing: its unfinished hand-offs are
done again here when collected.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae.errors import one_line
from sae.run.console import report
from sae.run.record import RunRecord

# Launchers that run a sweep's jobs one after another in the launching process.
IN_PROCESS_LAUNCHERS = ("BasicLauncher", "VectorizedLauncher")


@dataclass
class HandOff:
    """Work handed to the worker, kept until its result is recorded: done again here if the
    worker dies before it is done."""

    label: str
    future: Future
    then: Callable[[Any], None] | None
    work: Callable[..., Any]
    args: tuple
    result_of: tuple[Path, str] | None  # (run folder, result name) whose status.json awaits it


_worker: ProcessPoolExecutor | None = None
_pending: list[HandOff] = []  # in the order handed off
_sharing_refused = False  # shared memory refused a hand-off's data (said once per process)


def more_jobs_follow() -> bool:
    """Whether this process runs further jobs after the current one (a multirun launched here)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra: train(cfg) called directly
        return False
    launcher = str(hydra.launcher.get("_target_", ""))
    return str(hydra.mode) == "RunMode.MULTIRUN" and launcher.endswith(IN_PROCESS_LAUNCHERS)


def run_or_hand_off(
    label: str,
    work: Callable[..., Any],
    *args: Any,
    then: Callable[[Any], None] | None = None,
    result_of: tuple[Path, str] | None = None,
) -> bool:
    """work(*args) in the worker when more jobs follow, else now; whether it was handed off.

    `work` and its arguments must pickle (a module-level function, tensors, paths). `then`, if
    given, gets work's result in this process: at once when the work ran here, else when the
    hand-off is collected (never before the job that handed it off has ended). `result_of` names
    the run folder and result the work produces, for that run's status (pending_results).
    """
    if not more_jobs_follow():
        result = work(*args)
        if then is not None:
            then(result)
        return False
    global _worker
    if result_of is not None:
        result_of = (Path(result_of[0]).resolve(), result_of[1])
    shared = _shared_arguments(args)  # None: shared memory refused them
    tries = 2 if shared is not None else 0
    for _ in range(tries):  # a worker that died (killed, out of memory) is replaced once
        if _worker is None:
            # spawn: a fresh interpreter, not a fork of one whose torch threads are running
            spawn = multiprocessing.get_context("spawn")
            _worker = ProcessPoolExecutor(max_workers=1, mp_context=spawn, initializer=_start_worker)
            atexit.unregister(_wait_at_exit)  # once, however many workers
            atexit.register(_wait_at_exit)
        try:
            _pending.append(HandOff(label, _worker.submit(work, *shared), then, work, shared, result_of))
            return True
        except (BrokenProcessPool, RuntimeError):
            _worker = None
    done: Future = Future()  # no worker to be had: here and now, recorded when collected as above
    done.set_result(work(*args))
    _pending.append(HandOff(label, done, then, work, (), result_of))
    return False


def pending_results(folder: str | Path) -> list[str]:
    """The results of the run in `folder` handed off and not yet recorded ("probes", "figures")."""
    folder = Path(folder).resolve()
    return [h.result_of[1] for h in _pending if h.result_of is not None and h.result_of[0] == folder]


def _shared_arguments(args: tuple) -> tuple | None:
    """The hand-off's arguments with their CPU tensors copied into shared memory (the worker then
    reads them without a copy of its own); None where shared memory refuses (e.g. a container's
    small /dev/shm), said once: that work is then done in this process, as before.

    A copy, not the caller's tensors moved: the pool pickles in a thread of its own, maybe while
    the next job reads the same tensor (a data split its jobs share), and the caller's memory stays
    as it was. A module's parameters are shared in place: a hand-off is given its own copy of a model.
    """
    global _sharing_refused
    try:
        return tuple(_shared(arg) for arg in args)
    except (RuntimeError, OSError) as err:
        if not _sharing_refused:
            _sharing_refused = True
            report(
                f"warning: shared memory refused data a sweep job hands to its worker ({one_line(err)}): "
                "what does not fit is computed in the job instead; a container needs a larger /dev/shm "
                "(e.g. docker run --shm-size=2g)"
            )
        return None


def _shared(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.is_shared():
            return value
        return torch.empty_like(value).share_memory_().copy_(value)
    if isinstance(value, torch.nn.Module):
        return value.share_memory()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (ProbeData)
        return type(value)(*(_shared(item) for item in value))
    if isinstance(value, list | tuple):
        return type(value)(_shared(item) for item in value)
    if isinstance(value, dict):
        return {key: _shared(item) for key, item in value.items()}
    return value


def _start_worker() -> None:
    """In the worker: one thread (the training beside it has the cores), and Ctrl+C left to the
    main process, which stops the sweep and then waits for the figures of the jobs that finished."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)


def is_pending(label: str) -> bool:
    """Whether work handed off under this label is queued, running, or done but not yet recorded."""
    return any(h.label == label for h in _pending)


def collect_finished() -> list[str]:
    """Record the results of the hand-offs finished so far (in the order handed off), without
    waiting; one line per failed one, also printed."""
    return _collect(wait=False)


def wait_for_hand_offs() -> list[str]:
    """Wait for every hand-off and record its result; one line per failed one, also printed."""
    return _collect(wait=True)


def _collect(wait: bool) -> list[str]:
    failures = []
    while _pending and (wait or _pending[0].future.done()):
        hand_off = _pending.pop(0)
        try:
            result = _result(hand_off)
            if hand_off.then is not None:
                hand_off.then(result)
            error = None
        except Exception as err:  # noqa: BLE001 -- reported, and the sweep goes on
            error = one_line(err)
            failures.append(f"{hand_off.label}: {error}")
        if hand_off.result_of is not None:
            try:
                RunRecord(hand_off.result_of[0]).result_done(hand_off.result_of[1], error=error)
            except OSError as err:  # the run folder cannot be written: said, the sweep goes on
                failures.append(f"{hand_off.label}: {one_line(err)}")
    for line in failures:
        report(f"warning: background work failed: {line}")
    return failures


def _result(hand_off: HandOff) -> Any:
    """The hand-off's result; where the worker died before giving it, computed here instead."""
    try:
        return hand_off.future.result()
    except BrokenProcessPool:
        report(f"warning: the worker process died (killed, or out of memory); {hand_off.label} is done here")
        return hand_off.work(*hand_off.args)


def _wait_at_exit() -> None:
    wait_for_hand_offs()
    if _worker is not None:
        _worker.shutdown()
