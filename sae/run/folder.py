"""One writer per run folder: a lock that a second train.py is refused by, and a killed run does
not leave behind.

Two processes writing one run folder (the same hydra.run.dir twice, or `resume=` while the run is
still going) would leave checkpoints of different settings side by side and files from whichever
finished last. The lock is `fcntl.flock` on `<folder>/.lock`: the operating system releases it
when the holding process ends, however it ends, so there is nothing stale to clean up. Within one
process the lock is re-entrant (the Hydra callback takes it before Hydra writes `.hydra/`, and
`train(cfg)` takes it again).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sae.errors import UserError, one_line
from sae.internals import is_rank_zero
from sae.run.atomic import CannotWrite, cannot_write_message

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # folder -> open file descriptor holding its lock, in this process
_made: dict[Path, list[Path]] = {}  # folder -> the folders its locking created, itself first


class FolderInUse(UserError, RuntimeError):
    """Another process is writing the run folder."""


def lock_run_folder(folder: str | Path) -> bool:
    """Take the folder's writer lock, or raise FolderInUse; False if this process already holds it.

    Processes other than rank 0 of a multi-process (DDP) run share rank 0's folder and lock.
    """
    if not is_rank_zero():
        return False
    folder = Path(folder).resolve()
    if folder in _held:
        return False
    made = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only folder, a full disk: say so before anything runs
        raise CannotWrite(cannot_write_message(folder / LOCK_FILE, err)) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(
            f"{folder} is being written by another process (it holds {folder / LOCK_FILE}); wait for it "
            "to finish, or write elsewhere (another hydra.run.dir / hydra.sweep.dir)"
        ) from None
    _held[folder] = fd
    if made:
        _made[folder] = made
    return True


def made_here(folder: str | Path) -> bool:
    """Whether this process created the folder as it locked it (it did not exist before)."""
    return Path(folder).resolve() in _made


def remove_if_only_begun(folder: str | Path) -> bool:
    """Remove a run folder this process created that holds nothing but what Hydra writes as a
    job starts (.hydra/, the job's log, the lock), and the parent folders created with it that are
    left empty: what a command refused before it ran leaves behind. Whether it was removed."""
    folder = Path(folder).resolve()
    made = _made.get(folder)
    begun_only = all(p.name in (".hydra", LOCK_FILE) or p.suffix == ".log" for p in folder.iterdir())
    if made is None or not begun_only:
        return False
    import shutil

    unlock_run_folder(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()  # only if empty: another run may have started beside this one
        except OSError:
            break
    del _made[folder]
    return not folder.exists()


def locked_folders() -> list[Path]:
    """The folders this process holds the lock of, in the order it took them."""
    return list(_held)


def unlock_run_folder(folder: str | Path) -> None:
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def writing_run_folder(folder: str | Path) -> Iterator[None]:
    """Hold the folder's lock for the block (released after it, unless it was held before)."""
    taken = lock_run_folder(folder)
    try:
        yield
    finally:
        if taken:
            unlock_run_folder(folder)


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, a run whose files cannot fit in the folder's free space
    (a small tmpfs, a full disk): the run would otherwise fail after training, at its checkpoint."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself will say what is wrong
    if free < needed:
        raise CannotWrite(
            f"{Path(folder).resolve()} has {free / 2**20:.1f} MiB free; this run writes about "
            f"{needed / 2**20:.1f} MiB ({what}): free some space, or write elsewhere (hydra.run.dir=...)"
        )


def remove_leftover_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (`.<name>.*.tmp`) in folder.

    Only safe while holding the folder's lock: then no write of ours is in progress there.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class RunFolderLock(Callback):
    """Hydra callback: lock a single run's folder, or a sweep's folder, before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(config.hydra.sweep.dir)

    @staticmethod
    def _lock(folder: str) -> None:
        try:
            lock_run_folder(folder)
        except UserError as err:  # before any job runs: one line, as for a config error
            sys.exit(f"error: {one_line(err, limit=400)}")
