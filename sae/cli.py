"""What an entry script (train.py, evaluate.py) does for its whole process: nothing of this
happens on `import sae`, so a notebook or a test that imports the package keeps its own settings.

Light on purpose: it runs before torch is imported, which is when OpenMP reads its settings.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# OpenMP, which runs torch's CPU ops on several threads, keeps an idle worker thread spinning for
# a while before it sleeps (libgomp: 300k spins). On an idle machine that spinning is what makes
# two threads fast: a worker is awake when the next op starts. When other processes hold the
# cores, it takes turns from the threads doing the work, and training slows many times over at
# random; a short spin avoids that, at a cost on an idle machine (docs/performance.md, "A busy
# CPU", measures both).
SHORT_SPIN = "1000"
OPENMP_WAIT_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
# Cores kept busy by other processes, over the sample, from which the machine counts as busy.
BUSY_CORES = 0.5
SAMPLE_SECONDS = 0.2


def start_process() -> None:
    """Register the config resolvers an entry script's process needs (before Hydra composes)."""
    from sae.names import register_resolvers

    register_resolvers()


def choose_openmp_spin(sweep: bool) -> str:
    """Set OpenMP's spin for this process and those it starts, before torch loads OpenMP; say which.

    A short spin (GOMP_SPINCOUNT=1000) where the cores are shared: in a sweep (the hand-off worker
    makes one job's probes and figures beside the next job's training; joblib runs jobs side by
    side), or when other processes keep a core busy as the run starts. Otherwise libgomp's own.
    The thread count is not touched: it decides how CPU kernels round, so a run's numbers do not
    depend on the load. A setting of the user's (GOMP_SPINCOUNT or OMP_WAIT_POLICY) stands, and
    once torch is loaded (a second job of a sweep in one process) nothing changes.
    """
    if any(key in os.environ for key in OPENMP_WAIT_SETTINGS):
        return "the user's"
    if "torch" in sys.modules:
        return "as loaded"
    if not sweep:  # a sweep shares the cores whatever the load: no sample needed
        busy = other_processes_busy_cores()
        if busy is not None and busy < BUSY_CORES:
            return "libgomp's"
    os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN
    return "short"


def other_processes_busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes kept busy over a short sample, from /proc/stat (this
    process sleeps through it); None where the system does not say."""

    def busy_and_total() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total_after - total_before
    cores = os.cpu_count() or 1
    return cores * (busy_after - busy_before) / elapsed if elapsed > 0 else None
